"""Siemens CSA header fields in protocols (``private "SIEMENS CSA HEADER" (0029,xx10) "B_value"``), on two real
Siemens classic files (syngo MR B17, nibabel's test data, tests/data/README.md). The parser (imtrial_dsl/csa.py)
is checked against nibabel's independent one on every element of both headers."""
from __future__ import annotations

import gzip
import io
import sys
import warnings
from pathlib import Path

import pydicom
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from imtrial_dsl import csa, ir  # noqa: E402
from imtrial_dsl.compiler import compile_text  # noqa: E402
from imtrial_dsl.runner import adherence, dicomio  # noqa: E402

DATA = ROOT / "tests" / "data" / "siemens_csa"


def _header(name: str) -> pydicom.Dataset:
    raw = gzip.decompress((DATA / f"{name}.dcm.gz").read_bytes())
    return pydicom.dcmread(io.BytesIO(raw), stop_before_pixels=True)


@pytest.mark.parametrize("name", ["siemens_dwi_0", "siemens_dwi_1000"])
@pytest.mark.parametrize("tag", [0x00291010, 0x00291020])
def test_the_parser_agrees_with_nibabel_on_real_headers(name: str, tag: int) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # nibabel.nicom warns that its DICOM readers are experimental
        from nibabel.nicom import csareader
    ds = _header(name)
    assert ds.Manufacturer == "SIEMENS" and str(ds[0x00290010].value) == csa.CREATOR
    mine = csa.parse(ds[tag].value)
    ref = csareader.read(ds[tag].value)
    assert ref["type"] == 2 and len(mine) == ref["n_tags"] > 60
    for key, tag_info in ref["tags"].items():
        want = [x.strip() if isinstance(x, str) else x for x in tag_info["items"] if x != ""]
        assert mine[key] == [x for x in want if x != ""], key


def _protocol(body: str) -> ir.Protocol:
    res = compile_text('study CSA "CSA fields" { }\nprotocol DWI modality MR {\n' + body + "\n}\n", "csa.imtrial")
    assert res.ok, [str(d) for d in res.diagnostics]
    return res.trial.protocols[0]


def test_a_protocol_requires_csa_values_on_real_files() -> None:
    p = _protocol('''
  private "SIEMENS CSA HEADER" (0029,xx10) "B_value" = 1000
  private "SIEMENS CSA HEADER" (0029,xx20) "MrPhoenixProtocol.sPat.lAccelFactPE" = 2
  private "SIEMENS CSA HEADER" (0029,xx20) "MrPhoenixProtocol.sSliceAcceleration.lMultiBandFactor" = 3 if present
  private "SIEMENS CSA HEADER" (0029,xx10) "ImaPATModeText"[0] = "p2"
  private "SIEMENS CSA HEADER" (0029,xx10) "MosaicRefAcqTimes" count = 48''')
    rows = {r["parameter"]: r for r in adherence.check_series(p, [_header("siemens_dwi_1000")])["parameters"]}
    assert len(rows) == 5 and all(r["ok"] for r in rows.values()), rows
    low = adherence.check_series(p, [_header("siemens_dwi_0")])
    failed = [r for r in low["parameters"] if not r["ok"]]
    assert low["verdict"] == "fail" and [r["parameter"] for r in failed] == ['private "SIEMENS CSA HEADER" (0029,xx10) "B_value"']
    assert failed[0]["actual_text"] == "0"


def test_a_csa_field_the_header_lacks_is_missing() -> None:
    """B17 predates slice acceleration: without 'if present' the multiband factor fails as missing."""
    p = _protocol('  private "SIEMENS CSA HEADER" (0029,xx20) "MrPhoenixProtocol.sSliceAcceleration.lMultiBandFactor" = 3')
    res = adherence.check_series(p, [_header("siemens_dwi_1000")])
    assert res["verdict"] == "fail" and res["parameters"][0]["actual_text"] == "missing"


def test_bytes_that_are_no_csa_header_read_as_missing() -> None:
    ds = _header("siemens_dwi_1000")
    raw = ds[0x00291010].value
    step = ir.PathStep(creator=csa.CREATOR, tag="(0029,xx10)", field="B_value")
    for broken in (raw[:500], b"SV10" + b"\0" * 20, b"not a csa header at all"):
        ds[0x00291010].value = broken
        assert dicomio.path_values(ds, [step])[0] == [dicomio.MISSING]
    with pytest.raises(ValueError):
        csa.parse(raw[:500])


def test_a_field_outside_the_csa_headers_is_an_error() -> None:
    res = compile_text('study S "S" { }\nprotocol P modality MR {\n  private "GEMS_PARM_01" (0043,xx39) "B_value" = 3\n}\n', "x.imtrial")
    assert [d.code for d in res.diagnostics] == ["E320"]


def test_csa_paths_format_and_render_as_written() -> None:
    from imtrial_dsl import source
    from imtrial_dsl.fmt import format_source

    text = ('study S "S" {}\nprotocol P modality MR {\n'
            '  private "SIEMENS CSA HEADER" (0029,xx10) "ImaPATModeText"[0] = "p2"\n}\n')
    assert format_source(text) == text
    c = compile_text(text, "x.imtrial").trial.protocols[0].constraints[0]
    assert source.constraint(c) == 'private "SIEMENS CSA HEADER" (0029,xx10) "ImaPATModeText"[0] = "p2"'
