"""Ingest: every inbox file is either grouped into an exam or quarantined with a reason; nothing lost."""
from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from imtrial_dsl.runner.ingest import check_dataset, exam_key_for, ingest_inbox, list_inbox


def _tree_digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture()
def inbox(tmp_path: Path) -> Path:
    """Real pydicom test files, plus damaged ones of every kind ingest must catch."""
    box = tmp_path / "inbox"
    (box / "good").mkdir(parents=True)
    (box / "bad").mkdir()
    mr = Path(get_testdata_file("MR_small.dcm"))
    ct = Path(get_testdata_file("CT_small.dcm"))
    (box / "good" / "mr.dcm").write_bytes(mr.read_bytes())
    (box / "good" / "ct.dcm").write_bytes(ct.read_bytes())
    (box / "good" / "mr_copy_same_bytes.dcm").write_bytes(mr.read_bytes())          # duplicate content
    ds = pydicom.dcmread(mr)
    second = copy.deepcopy(ds)                                                          # 2nd instance, same series
    second.SOPInstanceUID = ds.SOPInstanceUID + ".2"
    second.InstanceNumber = 2
    second.save_as(box / "good" / "mr_2.dcm")
    (box / "bad" / "truncated_pydicom.dcm").write_bytes(Path(get_testdata_file("MR_truncated.dcm")).read_bytes())
    data = mr.read_bytes()
    (box / "bad" / "cut.dcm").write_bytes(data[: len(data) - 3000])                    # pixel data cut short
    (box / "bad" / "notes.txt").write_text("this is not DICOM\n")
    (box / "bad" / "empty.dcm").write_bytes(b"")
    nosop = copy.deepcopy(ds)
    del nosop.SOPInstanceUID
    nosop.save_as(box / "bad" / "no_sop.dcm", enforce_file_format=False)
    (box / ".hidden").write_bytes(b"\x00\x01junk")                                     # hidden files are not skipped
    return box


def test_ingest_groups_quarantines_and_loses_nothing(tmp_path: Path, inbox: Path):
    before = _tree_digest(inbox)
    out, q = tmp_path / "w" / "exams", tmp_path / "w" / "quarantine"
    res = ingest_inbox(None, inbox, tmp_path / "w")

    # the inbox is left untouched without --move
    assert _tree_digest(inbox) == before

    reasons = {item["path"]: item["reason"] for item in res["quarantined_files"]}
    assert reasons == {
        "bad/truncated_pydicom.dcm": "truncated",
        "bad/cut.dcm": "truncated",
        "bad/notes.txt": "not_dicom",
        "bad/empty.dcm": "empty",
        "bad/no_sop.dcm": "missing_essentials",
        ".hidden": "not_dicom",
    }
    for item in res["quarantined_files"]:
        qdir = q / item["sha256"]
        reason = json.loads((qdir / "reason.json").read_text())
        assert reason["reason"] == item["reason"] and reason["original_path"] == item["path"] and reason["detail"]
        assert hashlib.sha256((qdir / "file").read_bytes()).hexdigest() == item["sha256"]
    missing = json.loads((q / next(i["sha256"] for i in res["quarantined_files"] if i["path"] == "bad/no_sop.dcm")
                          / "reason.json").read_text())
    assert missing["missing"] == ["SOPInstanceUID"]

    # duplicates are recorded, not stored twice
    assert res["duplicate_files"] == [{"path": "good/mr_copy_same_bytes.dcm", "of": "good/mr.dcm"}]

    # good files grouped by study -> exam, series; every inbox file accounted for exactly once
    def key_of(name):   # an exam is one study of one patient
        ds = pydicom.dcmread(get_testdata_file(name))
        return str(ds.StudyInstanceUID), exam_key_for(str(ds.StudyInstanceUID), {"PatientID": ds.get("PatientID")})

    (mr_uid, mr_key), (ct_uid, ct_key) = key_of("MR_small.dcm"), key_of("CT_small.dcm")
    assert res["exams_touched"] == sorted({mr_key, ct_key})
    mr_exam = json.loads((out / mr_key / "exam.json").read_text())
    assert mr_exam["study_uid"] == mr_uid and mr_exam["n_instances"] == 2
    assert len(mr_exam["series"]) == 1 and len(mr_exam["series"][0]["files"]) == 2
    assert mr_exam["device"]["manufacturer"] == "TOSHIBA_MEC" and mr_exam["patient"]["PatientID"] == "4MR1"
    stored = list(out.rglob("*.dcm"))
    assert len(stored) == 3
    accounted = res["ingested"] + res["quarantined"] + res["duplicates"]
    assert accounted == len(list_inbox(inbox))


def test_ingest_is_idempotent_and_move_empties_inbox(tmp_path: Path, inbox: Path):
    out = tmp_path / "w" / "exams"
    ingest_inbox(None, inbox, tmp_path / "w")
    first = _tree_digest(out)
    # a second workdir over the same inbox places the same content under the same names
    res = ingest_inbox(None, inbox, tmp_path / "w2", move=True)
    assert _tree_digest(tmp_path / "w2" / "exams") == first
    assert res["ingested"] == 3
    assert list_inbox(inbox) == []


def test_check_dataset_reads_header_facts():
    data = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    res = check_dataset(data, ["PatientID", "IssuerOfPatientID"])
    assert res["ok"]
    h = res["header"]
    assert h["modality"] == "CT" and h["study_date"] and h["sop_class"] == "1.2.840.10008.5.1.4.1.1.2"
    assert set(h["patient"]) == {"PatientID", "IssuerOfPatientID"}


def test_exam_key_is_stable():
    assert exam_key_for("1.2.3", {"PatientID": "P1"}) == hashlib.sha256(b"1.2.3\x00PatientID=P1").hexdigest()[:16]
    assert exam_key_for("1.2.3", {"PatientID": "P1"}) != exam_key_for("1.2.3", {"PatientID": "P2"}) != exam_key_for("1.2.3")


def test_runner_ingest_records_every_path_and_move_deletes_only_recorded_files(tmp_path: Path, inbox: Path):
    from imtrial_dsl.store import Store as State

    n_paths = len(list_inbox(inbox))
    digests = set(_tree_digest(inbox).values())
    res = ingest_inbox(None, inbox, tmp_path / "w", move=True, progress=False)
    assert res["new_paths"] == n_paths and res["ingested"] == 3 and res["quarantined"] == 6 and res["duplicates"] == 1
    assert list_inbox(inbox) == []                                   # moved: the workdir now holds everything
    st = State(tmp_path / "w")
    assert len(st.known_paths()) == n_paths
    assert {f["sha256"] for f in st.files()} == digests
    stored = {f["sha256"]: (tmp_path / "w" / f["stored_path"]) if f["status"] == "quarantined"
              else (tmp_path / "w" / "exams" / f["exam_key"] / f["stored_path"]) for f in st.files()}
    assert all(hashlib.sha256(p.read_bytes()).hexdigest() == sha for sha, p in stored.items())
    assert [d["rel_path"] for d in st.duplicates()] == ["good/mr_copy_same_bytes.dcm"]
    assert {e["exam_key"] for e in st.exams()} == set(res["exams_touched"])
    st.close()
    again = ingest_inbox(None, inbox, tmp_path / "w", progress=False)
    assert again["new_paths"] == 0 and again["exams_touched"] == []


def test_same_names_in_another_inbox_or_changed_content_are_not_skipped(tmp_path: Path):
    """Sites reuse file names (IM0001.dcm …): only a path whose size and mtime are unchanged counts as seen."""

    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    for n, box in enumerate(("in1", "in2")):
        other = copy.deepcopy(ds)
        other.SOPInstanceUID = f"{ds.SOPInstanceUID}.{n + 7}"
        (tmp_path / box).mkdir()
        other.save_as(tmp_path / box / "IM0001.dcm")
    w = tmp_path / "w"
    assert ingest_inbox(None, tmp_path / "in1", w, progress=False)["ingested"] == 1
    assert ingest_inbox(None, tmp_path / "in2", w, progress=False)["ingested"] == 1      # same name, other inbox
    assert ingest_inbox(None, tmp_path / "in2", w, progress=False)["new_paths"] == 0     # unchanged: not re-read
    changed = copy.deepcopy(ds)
    changed.SOPInstanceUID = f"{ds.SOPInstanceUID}.99"
    changed.save_as(tmp_path / "in2" / "IM0001.dcm")
    os.utime(tmp_path / "in2" / "IM0001.dcm", ns=(1, 1))                                 # a different mtime for sure
    assert ingest_inbox(None, tmp_path / "in2", w, progress=False)["ingested"] == 1      # replaced content: ingested
    from imtrial_dsl.store import Store as State

    st = State(w)
    assert len(st.files("ingested")) == 3 and st.duplicates() == []
    st.close()
