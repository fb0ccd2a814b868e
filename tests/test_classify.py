"""Classification: match-rule semantics (data-driven), ambiguity, real pydicom files, problems, the step."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

from imtrial_dsl.loader import load
from imtrial_dsl import synth
from imtrial_dsl.runner import classify, dicomio
from imtrial_dsl.runner.invoke import find_node, run_staged

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "adherence_data"
CASES = json.loads((DATA / "classify_cases.json").read_text())


@pytest.fixture(scope="module")
def trial():
    t, diags, _ = load(DATA / "classify.imtrial")
    assert not [d for d in diags if d.severity.value == "error"], diags
    return t


@pytest.fixture(scope="module")
def amy():
    t, diags, _ = load(ROOT / "examples" / "amyloid_mri.imtrial")
    return t


def _ds(values: dict) -> Dataset:
    ds = Dataset()
    for k, v in values.items():
        setattr(ds, k, v)
    return ds


@pytest.mark.parametrize("case", CASES["cases"], ids=[c["header"].get("SeriesDescription", "-") + "/" + c["status"] for c in CASES["cases"]])
def test_rules(trial, case):
    res = classify.classify_header(trial, _ds(case["header"]))
    assert res["status"] == case["status"], res
    if "protocol" in case:
        assert res["protocol"] == case["protocol"]
    if "candidates" in case:
        assert sorted(res["candidates"]) == sorted(case["candidates"])
    if res["status"] != "matched":
        assert res["protocol"] is None


@pytest.mark.parametrize("name", sorted(CASES["pydicom_files"]))
def test_pydicom_files(trial, name):
    ds = dicomio.read_header(get_testdata_file(name))
    res = classify.classify_header(trial, ds)
    want = CASES["pydicom_files"][name]
    assert res["status"] == want["status"], res
    assert res["protocol"] == want.get("protocol")


def test_protocol_without_rules_matches_by_name():
    from imtrial_dsl import ir

    t = ir.Trial(protocols=[ir.Protocol(name="FLAIR", modality="MR")])
    assert classify.classify_header(t, _ds({"Modality": "MR", "SeriesDescription": "flair"}))["protocol"] == "FLAIR"
    assert classify.classify_header(t, _ds({"Modality": "MR", "SeriesDescription": "flair 3d"}))["status"] == "unmatched"


def test_scan_reports_problems_and_groups_series(trial, tmp_path):
    for name in ["MR_small.dcm", "CT_small.dcm", "MR_truncated.dcm", "emri_small.dcm"]:
        shutil.copy(get_testdata_file(name), tmp_path / name)
    (tmp_path / "notes.bin").write_bytes(b"this is not DICOM at all" * 10)
    scan = classify.scan(tmp_path)
    probs = {p["file"]: p["reason"] for p in scan.problems}
    assert probs["MR_truncated.dcm"] == "truncated"
    assert probs["notes.bin"] in ("not_dicom", "unreadable")
    res = classify.classify_scan(trial, scan)
    files = sorted(f for s in res["series"] for f in s["files"])
    assert files == ["CT_small.dcm", "MR_small.dcm", "emri_small.dcm"]
    assert res["summary"]["problems"] == 2 and res["summary"]["series"] == 3
    assert {s["protocol"] for s in res["series"]} == {"DER", "CTH", "ANY_T1"}
    emri = next(s for s in res["series"] if s["files"] == ["emri_small.dcm"])
    assert emri["n_frames"] == 10 and emri["n_instances"] == 1


def test_synth_series_classify_to_their_protocol(amy, tmp_path):
    m = synth.synthesize(amy, tmp_path, subjects_per_site=1, seed=11, small=True, enhanced=["T1w"],
                         visits=["baseline"])
    for e in m["exams"]:
        res = classify.classify_folder(amy, tmp_path / e["dir"], expected=classify.expected_protocols(amy, e["visit"]))
        got = {s["series_uid"]: s["protocol"] for s in res["series"]}
        assert got == {s["series_uid"]: s["protocol"] for s in e["series"]}
        assert res["missing_protocols"] == []
    # a visit missing one of its acquisitions is reported by name
    e = m["exams"][0]
    gone = next(s for s in e["series"] if s["protocol"] == "SWI")
    shutil.rmtree((tmp_path / gone["files"][0]).parent)
    res = classify.classify_folder(amy, tmp_path / e["dir"], expected=classify.expected_protocols(amy, "baseline"))
    assert res["missing_protocols"] == ["SWI"]


def test_classify_step_reads_identity_visit(amy, tmp_path, monkeypatch):
    monkeypatch.setenv("IMTRIAL_KEY", "classify-test-key-0123456789")   # the result names de-identified series
    m = synth.synthesize(amy, tmp_path / "c", subjects_per_site=1, seed=5, small=True, visits=["m12"])
    e = m["exams"][0]
    exam = tmp_path / "exam"
    shutil.copytree(tmp_path / "c" / e["dir"], exam / "original")
    (exam / "results").mkdir()
    (exam / "results" / "identity.json").write_text(json.dumps({"subject_id": "X", "visit": "m12"}))
    summary = run_staged(amy, find_node(amy, "classify"), [("original/", exam / "original"),
                                                           ("results/identity.json", exam / "results" / "identity.json")], exam)
    out = json.loads((exam / "results" / "classification.json").read_text())
    assert summary["matched"] == 3 and out["visit"] == "m12" and out["missing_protocols"] == []
    assert all(not f.startswith("/") for s in out["series"] for f in s["files"])


@pytest.mark.parametrize("name,complete", [("MR_small.dcm", True), ("MR_small_implicit.dcm", True),
                                           ("MR_small_bigendian.dcm", True), ("MR_small_expb.dcm", True),
                                           ("emri_small.dcm", True), ("CT_small.dcm", True),
                                           ("MR_truncated.dcm", False), ("MR_small_RLE.dcm", True)])
def test_pixel_length_check_across_transfer_syntaxes(name, complete):
    ds, ok, detail = dicomio.read_header_checked(get_testdata_file(name))
    assert ok is complete, detail
    assert dicomio.raw_uint(ds, 0x00280010, 0) == int(ds.Rows)
    assert dicomio.raw_text(ds, 0x0020000E) == str(ds.SeriesInstanceUID)
