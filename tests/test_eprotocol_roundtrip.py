"""E-protocol round trip of every construct: export every example, every real-data study and
tests/data/roundtrip/every_construct.imtrial (paths, private elements and CSA fields, has/!has/count/present/
if present, when-blocks, derived quantities, scopes, site/device and stacking variants, a hybrid device), import
the files back (`imtrial import eprotocol`'s text), and require that the text checks clean and gives the same
protocols. The DICOM Defined Procedure Protocol objects alone round trip too; what their standard attributes
cannot carry comes from imtrial's private block, and the import says so (W620)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import jsonschema
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from imtrial_dsl import ir  # noqa: E402
from imtrial_dsl.compiler import compile_file, compile_text  # noqa: E402
from imtrial_dsl.exporters import eprotocol  # noqa: E402
from imtrial_dsl.exporters.eprotocol import dicom_dpp, json_io  # noqa: E402

STUDIES = (sorted((ROOT / "examples").glob("*.imtrial")) + sorted((ROOT / "tests" / "data" / "real" / "studies").glob("*.imtrial"))
           + [ROOT / "tests" / "data" / "roundtrip" / "every_construct.imtrial"])
EVERY = STUDIES[-1]
FIELDS = ("name", "modality", "title", "body_part", "preparation", "contrast", "notes", "match", "scope",
          "constraints", "conditionals", "variants")


def _export(study: Path, out: Path) -> ir.Trial:
    res = compile_file(study)
    assert res.ok, [str(d) for d in res.diagnostics]
    eprotocol.export(res.trial, None, out)
    return res.trial


def _same(original: list[ir.Protocol], text: str, where: str) -> None:
    back = compile_text(text, where)
    assert [str(d) for d in back.diagnostics] == [], text
    got = {p.name: p for p in back.trial.protocols}
    assert sorted(got) == sorted(p.name for p in original)
    for p in original:
        for f in FIELDS:
            assert ir.strip_spans(getattr(got[p.name], f)) == ir.strip_spans(getattr(p, f)), (p.name, f)


@pytest.mark.parametrize("study", STUDIES, ids=lambda p: p.stem)
def test_json_eprotocols_round_trip(study: Path, tmp_path: Path) -> None:
    trial = _export(study, tmp_path)
    files = sorted(tmp_path.glob("*.json"))
    files.remove(tmp_path / json_io.SCHEMA_FILE)
    text, notes = eprotocol.import_document(files)
    assert notes == []
    _same(trial.protocols, text, f"{study.stem}.imported.imtrial")


@pytest.mark.parametrize("study", [s for s in STUDIES if s.stem in ("oncology_ct", "phantom_qualification", "every_construct")],
                         ids=lambda p: p.stem)
def test_dicom_dpp_round_trip(study: Path, tmp_path: Path) -> None:
    trial = _export(study, tmp_path)
    text, notes = eprotocol.import_document(sorted(tmp_path.glob("*.dcm")))
    carried = [p for p in trial.protocols if p.modality in dicom_dpp.DPP_MODALITIES]
    _same(carried, text, f"{study.stem}.dpp.imtrial")
    beyond = [p for p in carried if p.conditionals or any(not dicom_dpp.in_dpp(c) for c in p.constraints)]
    assert {n.code for n in notes} <= {"W620"} and bool(notes) == bool(beyond)


def test_what_dicom_cannot_carry_is_named_on_import(tmp_path: Path) -> None:
    _export(EVERY, tmp_path)
    _, notes = eprotocol.import_document([tmp_path / "RTRIP_CTAC_base.dcm"])
    assert [n.code for n in notes] == ["W620"]
    msg = notes[0].message
    assert "protocol CTAC: 4 constraints" in msg and 'ImageType has "AXIAL"' in msg and "CTExposureSequence[0].CTDIvol" in msg
    assert "1 in 'when ConvolutionKernel = \"B30f\"'" in msg


def test_new_constructs_are_in_the_json_and_valid(tmp_path: Path) -> None:
    _export(EVERY, tmp_path)
    schema = json_io.schema()
    for f in sorted(tmp_path.glob("RTRIP_*.json")):
        jsonschema.validate(json.loads(f.read_text()), schema)
    doc = json.loads((tmp_path / "RTRIP_DWI_base.json").read_text())
    whens = [p for p in doc["parameters"] if p.get("when")]
    assert {p["keyword"] for p in whens} == {"EchoTime", "RepetitionTime"}
    assert whens[0]["when"]["condition"]["keyword"] == "DiffusionBValue" and whens[0]["condition"] == "when DiffusionBValue = 1000 s/mm2"
    csa = next(p for p in doc["parameters"] if p["path"] and p["path"][-1].get("field") == "B_value")
    assert csa["path"][-1]["creator"] == "SIEMENS CSA HEADER"
    assert json.loads((tmp_path / "RTRIP_CINE_base.json").read_text())["protocol"]["scope"] == {"sites": ["S1"], "devices": []}
    ct = json.loads((tmp_path / "RTRIP_CTAC_base.json").read_text())
    assert [d["modalities"] for d in ct["equipment"] if d["device"] == "S1_PETCT"] == [["PT", "CT"]]
    # a variant file carries its own 'when' blocks as the variant's, the base's as the base's
    siemens = json.loads((tmp_path / "RTRIP_DWI_Siemens.json").read_text())
    assert sorted({(p["origin"], p["when"]["block"]) for p in siemens["parameters"] if p.get("when")}) == [("base", 0), ("variant", 1)]


def test_the_command_prints_a_study_that_checks(tmp_path: Path) -> None:
    from imtrial_dsl.cli import main

    _export(EVERY, tmp_path)
    out = tmp_path / "imported.imtrial"
    assert main(["import", "eprotocol", *map(str, sorted(tmp_path.glob("RTRIP_DWI_*.json"))), "-o", str(out)]) == 0
    text = out.read_text()
    assert text.startswith('study RTRIP "Round trip of every construct" { }\n')
    assert "device S1_PETCT" not in text and "device S2_MR {" in text   # the devices the DWI files list
    res = compile_file(out)
    assert res.ok and [str(d) for d in res.diagnostics] == []
