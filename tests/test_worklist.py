"""Research scheduling and the Modality Worklist, end to end against real worklist clients.

dcmtk's ``findscu`` (Debian package dcmtk, installed by scripts/sysdeps.sh) and pynetdicom acting as
a modality query ``imtrial worklist serve`` on 127.0.0.1; the images a modality would write from the
returned item (pydicom's real MR test image, with the item's patient, Study Instance UID, accession
number and Clinical Trial attributes copied in) are ingested by ``imtrial run`` with no manual step.
"""
from __future__ import annotations

import copy
import csv
import os
import shutil
import subprocess
import time
from pathlib import Path

import pydicom
import pytest
from dcmtk import dcmtk

from imtrial_dsl.compiler import compile_file
from imtrial_dsl.runner.run import run_study
from imtrial_dsl.store import Store
from imtrial_dsl.tools.minicorpus import MINI_STUDY, make_corpus
from imtrial_dsl.worklist import WorklistError
from imtrial_dsl.worklist import schedule as S
from imtrial_dsl.worklist.scp import serve
from netutil import free_port  # tests/netutil.py

KEY = "worklist-test-key-0123456789"
# the mini study with AE titles on its scanner, and a second site whose scanner must see nothing of HOS
STUDY = MINI_STUDY.replace('station "000000000"', 'station "000000000"  ae_title "HOSMR1"').replace(
    "  }\n}", '  }\n  device HOS_MR2 { modality MR  vendor Siemens  model "Skyra"  serial "S2"  ae_title "HOSMR2" }\n}', 1).replace(
    "protocol T2w", '''site OTH "Other Hospital" {
  device OTH_MR1 { modality MR  vendor Siemens  model "Prisma"  ae_title "OTHMR1" }
}

protocol T2w''', 1)
ENROLL = """subject_id,site,enrolled_on,patient_id,issuer,patient_name,birth_date,sex
MINI01-HOS-101,HOS,2026-03-02,MRN555,HOS-MRN,Doe^Jane,19560412,F
MINI01-HOS-102,HOS,2026-03-03,MRN556,HOS-MRN,Roe^Richard,19610202,M
MINI01-OTH-201,OTH,2026-03-04,X9,OTH-MRN,Other^Olga,19700303,F
"""


@pytest.fixture()
def site(tmp_path, monkeypatch):
    monkeypatch.setenv("IMTRIAL_KEY", KEY)
    study = tmp_path / "mini.imtrial"
    study.write_text(STUDY)
    res = compile_file(str(study))
    assert res.ok, [d.message for d in res.diagnostics]
    (tmp_path / "enroll.csv").write_text(ENROLL)
    work = tmp_path / "work"
    S.enroll(res.trial, work, S.read_enrollment(tmp_path / "enroll.csv"))
    S.plan(res.trial, work)
    svc = serve(res.trial, work, port=free_port(), ae_title="IMTRIAL_MWL")
    yield {"trial": res.trial, "study": study, "work": work, "svc": svc, "tmp": tmp_path}
    svc.stop()


def _findscu(port: int, calling: str, *keys: str) -> list[pydicom.Dataset]:
    exe = dcmtk("findscu")
    out = Path(os.environ.get("TMPDIR", "/tmp")) / f"findscu-{os.getpid()}-{time.monotonic_ns()}"
    out.mkdir()
    args = [exe, "-W", "-aet", calling, "-aec", "IMTRIAL_MWL", "-X", "-od", str(out), "127.0.0.1", str(port)]
    for k in keys:
        args += ["-k", k]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    found = [pydicom.dcmread(p) for p in sorted(out.glob("*"))]
    shutil.rmtree(out)
    return found


MWL_KEYS = ("PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex", "AccessionNumber",
            "StudyInstanceUID", "RequestedProcedureID", "RequestedProcedureDescription", "ClinicalTrialSponsorName",
            "ClinicalTrialProtocolID", "ClinicalTrialSiteID", "ClinicalTrialSubjectID", "ClinicalTrialTimePointID",
            "ScheduledProcedureStepSequence[0].Modality=MR", "ScheduledProcedureStepSequence[0].ScheduledStationAETitle",
            "ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartDate",
            "ScheduledProcedureStepSequence[0].ScheduledProcedureStepID",
            "ScheduledProcedureStepSequence[0].ScheduledProtocolCodeSequence")


def test_findscu_sees_its_sites_steps_with_trial_attributes_and_the_eprotocol_codes(site, tmp_path):
    found = _findscu(site["svc"].port, "HOSMR1", *MWL_KEYS)
    # HOS's two subjects x (baseline, m06); nothing of OTH
    assert sorted((str(d.ClinicalTrialSubjectID), str(d.ClinicalTrialTimePointID)) for d in found) == [
        ("MINI01-HOS-101", "baseline"), ("MINI01-HOS-101", "m06"), ("MINI01-HOS-102", "baseline"), ("MINI01-HOS-102", "m06")]
    d = next(x for x in found if x.ClinicalTrialSubjectID == "MINI01-HOS-101" and x.ClinicalTrialTimePointID == "baseline")
    assert (str(d.PatientName), d.PatientID, d.IssuerOfPatientID, d.PatientBirthDate, d.PatientSex) == (
        "Doe^Jane", "MRN555", "HOS-MRN", "19560412", "F")
    assert (d.ClinicalTrialProtocolID, d.ClinicalTrialSiteID, d.ClinicalTrialSponsorName) == ("MINI01", "HOS", "imtrial tests")
    sps = d.ScheduledProcedureStepSequence[0]
    assert sps.ScheduledProcedureStepStartDate == "20260302" and sps.Modality == "MR"
    assert sps.ScheduledStationAETitle == "HOSMR1"
    assert d.AccessionNumber == d.RequestedProcedureID == sps.ScheduledProcedureStepID
    # the scheduled protocol codes are the ones the e-protocol export writes for the same protocols
    from imtrial_dsl.paths import exporters_package
    import importlib
    exporters_package()
    eprotocol = importlib.import_module("imtrial_dsl.exporters.eprotocol")
    files = eprotocol.export(site["trial"], None, tmp_path / "ep")
    exported = set()
    for f in files:
        if f.suffix == ".dcm":
            for c in pydicom.dcmread(f).PotentialScheduledProtocolCodeSequence:
                exported.add((c.CodeValue, c.CodingSchemeDesignator, c.CodeMeaning))
    codes = {(c.CodeValue, c.CodingSchemeDesignator, c.CodeMeaning) for c in sps.ScheduledProtocolCodeSequence}
    assert codes == {("T2w", "99IMTRIAL", "T2-weighted spin echo"), ("FLAIR", "99IMTRIAL", "FLAIR-like series")}
    if exported:  # MR has no DICOM Defined Procedure Protocol; when the export writes one the codes agree
        assert codes <= exported
    # matching: a date range and a patient name wildcard
    one = _findscu(site["svc"].port, "HOSMR1", "PatientName=roe*", "ClinicalTrialSubjectID",
                   "ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartDate=20260301-20260310")
    assert [(str(x.PatientName), x.ClinicalTrialSubjectID) for x in one] == [("Roe^Richard", "MINI01-HOS-102")]
    # the other site's scanner sees only its own subject
    oth = _findscu(site["svc"].port, "OTHMR1", "ClinicalTrialSubjectID", "PatientID")
    assert sorted(x.ClinicalTrialSubjectID for x in oth) == ["MINI01-OTH-201", "MINI01-OTH-201"]
    # an AE title that is no device of the inventory is refused
    proc = subprocess.run([dcmtk("findscu"), "-W", "-aet", "INTRUDER", "-aec", "IMTRIAL_MWL", "127.0.0.1",
                           str(site["svc"].port), "-k", "PatientName"], capture_output=True, text=True, timeout=30)
    assert "Calling AE Title Not Recognized" in proc.stderr


def test_coordinator_moves_cancels_adds_and_round_trips_csv(site):
    trial, work = site["trial"], site["work"]
    rows = S.steps(trial, work, site="HOS")
    b = next(r for r in rows if r["subject_id"] == "MINI01-HOS-102" and r["visit"] == "baseline")
    S.move(trial, work, b["accession"], "2026-03-09", "08:30")
    m6 = next(r for r in rows if r["subject_id"] == "MINI01-HOS-102" and r["visit"] == "m06")
    S.cancel(trial, work, m6["accession"])
    # planning again keeps the coordinator's edits
    assert S.plan(trial, work)["created"] == 0
    got = {r["accession"]: r for r in S.steps(trial, work)}
    assert (got[b["accession"]]["date"], got[b["accession"]]["time"]) == ("2026-03-09", "08:30")
    assert got[m6["accession"]]["status"] == "CANCELLED"
    # the worklist serves the move at once and withdraws the cancelled step
    found = _findscu(site["svc"].port, "HOSMR1", "ClinicalTrialSubjectID=MINI01-HOS-102", "ClinicalTrialTimePointID",
                     "ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartDate",
                     "ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartTime")
    assert [(x.ClinicalTrialTimePointID, x.ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartDate,
             x.ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartTime) for x in found] == [
        ("baseline", "20260309", "0830")]
    with pytest.raises(WorklistError) as err:
        S.add(trial, work, "MINI01-HOS-102", "baseline")
    assert err.value.diagnostic.code == "E870"
    S.add(trial, work, "MINI01-HOS-102", "m06", date="2026-09-01")  # re-schedules the cancelled one
    assert S.step(trial, work, m6["accession"])["status"] == "SCHEDULED"
    # export, edit in a "spreadsheet", import
    out = site["tmp"] / "schedule.csv"
    S.export_csv(S.steps(trial, work), out)
    table = list(csv.DictReader(out.read_text().splitlines()))
    assert len(table) == 6 and {r["patient_name"] for r in table} >= {"Doe^Jane", "Other^Olga"}
    for r in table:
        if r["accession"] == b["accession"]:
            r["date"], r["time"] = "2026-03-10", "14:00"
    with out.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(table[0]))
        w.writeheader()
        w.writerows(table)
    assert S.import_csv(trial, work, out) == {"created": 0, "updated": 6}
    assert S.step(trial, work, b["accession"])["date"] == "2026-03-10"
    # a bad row is refused with its line, and nothing is written
    bad = site["tmp"] / "bad.csv"
    bad.write_text(out.read_text().replace("2026-03-10", "10/03/2026"))
    with pytest.raises(WorklistError) as err:
        S.import_csv(trial, work, bad)
    assert err.value.diagnostic.code == "E871" and "bad.csv:" in err.value.diagnostic.message
    assert S.step(trial, work, b["accession"])["date"] == "2026-03-10"


def _modality_query(port: int, calling: str, **match) -> list[pydicom.Dataset]:
    """pynetdicom as a scanner's worklist client."""
    from pydicom.dataset import Dataset
    from pynetdicom import AE
    from pynetdicom.sop_class import ModalityWorklistInformationFind

    ae = AE(ae_title=calling)
    ae.add_requested_context(ModalityWorklistInformationFind)
    q = Dataset()
    for k in ("PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex", "AccessionNumber",
              "StudyInstanceUID", "RequestedProcedureDescription", "ClinicalTrialSponsorName", "ClinicalTrialProtocolID",
              "ClinicalTrialProtocolName", "ClinicalTrialSiteID", "ClinicalTrialSiteName", "ClinicalTrialSubjectID",
              "ClinicalTrialTimePointID", "ClinicalTrialTimePointDescription"):
        setattr(q, k, match.get(k, ""))
    sps = Dataset()
    sps.Modality, sps.ScheduledStationAETitle, sps.ScheduledProcedureStepStartDate = "MR", calling, ""
    sps.ScheduledProtocolCodeSequence = []
    q.ScheduledProcedureStepSequence = [sps]
    assoc = ae.associate("127.0.0.1", port, ae_title="IMTRIAL_MWL")
    assert assoc.is_established
    out = [ident for status, ident in assoc.send_c_find(q, ModalityWorklistInformationFind)
           if status and status.Status in (0xFF00, 0xFF01)]
    assoc.release()
    return out


def _mpps(port: int, calling: str, item: pydicom.Dataset, final: str) -> None:
    from pydicom.dataset import Dataset
    from pydicom.uid import generate_uid
    from pynetdicom import AE
    from pynetdicom.sop_class import ModalityPerformedProcedureStep

    ae = AE(ae_title=calling)
    ae.add_requested_context(ModalityPerformedProcedureStep)
    assoc = ae.associate("127.0.0.1", port, ae_title="IMTRIAL_MWL")
    assert assoc.is_established
    uid = generate_uid()
    ds = Dataset()
    ssa = Dataset()
    ssa.AccessionNumber, ssa.StudyInstanceUID = item.AccessionNumber, item.StudyInstanceUID
    ds.ScheduledStepAttributesSequence = [ssa]
    ds.PatientName, ds.PatientID = item.PatientName, item.PatientID
    ds.PerformedProcedureStepStatus = "IN PROGRESS"
    ds.Modality = "MR"
    status, _ = assoc.send_n_create(ds, ModalityPerformedProcedureStep, uid)
    assert status.Status == 0x0000
    mod = Dataset()
    mod.PerformedProcedureStepStatus = final
    status, _ = assoc.send_n_set(mod, ModalityPerformedProcedureStep, uid)
    assert status.Status == 0x0000
    assoc.release()


def _scan(item: pydicom.Dataset, src_dir: Path, inbox: Path, *, copy_trial: bool = True, patient_id=None) -> None:
    """What a modality writes from the worklist item: real MR images with the item's identifiers copied."""
    inbox.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(sorted(src_dir.rglob("*.dcm"))):
        ds = pydicom.dcmread(f)
        for k in ("PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID",
                  "AccessionNumber"):
            setattr(ds, k, copy.deepcopy(item.get(k)))
        if patient_id:
            ds.PatientID = patient_id
        if copy_trial:
            for k in ("ClinicalTrialSponsorName", "ClinicalTrialProtocolID", "ClinicalTrialProtocolName",
                      "ClinicalTrialSiteID", "ClinicalTrialSiteName", "ClinicalTrialSubjectID", "ClinicalTrialTimePointID",
                      "ClinicalTrialTimePointDescription"):
                setattr(ds, k, item.get(k))
        series_uid = pydicom.uid.generate_uid(entropy_srcs=[str(item.StudyInstanceUID), str(ds.SeriesDescription)])
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = pydicom.uid.generate_uid(entropy_srcs=[series_uid, str(i)])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(inbox / f"{item.AccessionNumber}_{i:03d}.dcm", enforce_file_format=True)


def test_images_from_the_worklist_ingest_with_no_manual_step_and_mpps_reaches_the_schedule(site, tmp_path):
    trial, work, port = site["trial"], site["work"], site["svc"].port
    corpus = make_corpus(tmp_path / "src", subjects=1, slices=2, start="20260302", visits=(("baseline", 0),))
    items = _modality_query(port, "HOSMR1", ClinicalTrialSubjectID="MINI01-HOS-101")
    item = next(i for i in items if i.ClinicalTrialTimePointID == "baseline")
    assert item.ClinicalTrialSiteName == "Test Hospital" and item.ClinicalTrialProtocolName == "Minimal runner study"
    _mpps(port, "HOSMR1", item, "COMPLETED")
    assert S.step(trial, work, item.AccessionNumber)["status"] == "COMPLETED"
    inbox = tmp_path / "inbox"
    _scan(item, Path(corpus["inbox"]), inbox)
    run_study(trial, inbox=inbox, workdir=work, jobs=1, progress=False)
    st = Store(work)
    exams = st.exams()
    assert len(exams) == 1 and exams[0]["status"] == "done", exams[0]["steps"]
    e = exams[0]
    # the worklist's subject ID, not a new registry number; its visit; no warnings to resolve
    assert (e["subject_id"], e["site"], e["visit"]) == ("MINI01-HOS-101", "HOS", "baseline")
    from imtrial_dsl.files import read_json
    from imtrial_dsl.workdir import Workdir
    ident = read_json(Workdir(work).exam(e["exam_key"]).path("results/identity.json"))
    assert ident["identified_by"] == "worklist" and ident["device"] == "HOS_MR1"
    assert not [w for w in e["warnings"] if w["code"].startswith("worklist")]
    # the step now has its exam: the worklist no longer offers it
    assert S.step(trial, work, item.AccessionNumber)["exam_key"] == e["exam_key"]
    assert not [i for i in _modality_query(port, "HOSMR1", ClinicalTrialSubjectID="MINI01-HOS-101")
                if i.ClinicalTrialTimePointID == "baseline"]
    st.close()
    # same-device rule: the follow-up now names the device the subject was first scanned on, also when the
    # site's other scanner asks
    for caller in ("HOSMR1", "HOSMR2"):
        (m6,) = _findscu(port, caller, "ClinicalTrialSubjectID=MINI01-HOS-101", "ClinicalTrialTimePointID",
                         "ScheduledProcedureStepSequence[0].ScheduledStationAETitle")
        assert (m6.ClinicalTrialTimePointID, m6.ScheduledProcedureStepSequence[0].ScheduledStationAETitle) == ("m06", "HOSMR1")
    # while HOS-102, not scanned yet, is offered to the calling scanner
    (b2,) = _findscu(port, "HOSMR2", "ClinicalTrialSubjectID=MINI01-HOS-102", "ClinicalTrialTimePointID=baseline",
                     "ScheduledProcedureStepSequence[0].ScheduledStationAETitle")
    assert b2.ScheduledProcedureStepSequence[0].ScheduledStationAETitle == "HOSMR2"


def test_disagreement_with_the_registry_is_flagged_not_guessed(site, tmp_path):
    trial, work, port = site["trial"], site["work"], site["svc"].port
    items = _modality_query(port, "HOSMR1", ClinicalTrialSubjectID="MINI01-HOS-102")
    item = next(i for i in items if i.ClinicalTrialTimePointID == "baseline")
    corpus = make_corpus(tmp_path / "src", subjects=1, slices=2, start="20260303", visits=(("baseline", 0),))
    # the technologist picked MINI01-HOS-102's entry for another patient (MRN999)
    inbox = tmp_path / "inbox"
    _scan(item, Path(corpus["inbox"]), inbox, patient_id="MRN999")
    run_study(trial, inbox=inbox, workdir=work, jobs=1, progress=False)
    st = Store(work)
    (e,) = st.exams()
    assert e["status"] == "unmatched" and e["subject_id"] is None
    d = e["steps"]["identify"]["detail"]
    assert d["error"] == "worklist_mismatch" and "scheduled for another patient" in d["detail"]
    assert st.subjects() == []          # nothing was registered for the wrong person
    st.close()


def test_registry_subject_differs_from_worklist_subject(site, tmp_path):
    trial, work = site["trial"], site["work"]
    corpus = make_corpus(tmp_path / "src", subjects=1, slices=2, start="20250106", visits=(("baseline", 0),))
    run_study(trial, inbox=corpus["inbox"], workdir=work, jobs=1, progress=False)   # PAT0001 registered the usual way
    st = Store(work)
    (known,) = st.subjects()
    st.close()
    # later images of the same person (PAT0001) carry another subject's Clinical Trial attributes
    items = _modality_query(site["svc"].port, "HOSMR1", ClinicalTrialSubjectID="MINI01-HOS-101")
    item = next(i for i in items if i.ClinicalTrialTimePointID == "m06")
    src = make_corpus(tmp_path / "src2", subjects=1, slices=2, start="20250706", visits=(("m06", 0),))
    inbox = tmp_path / "inbox2"
    _scan(item, Path(src["inbox"]), inbox)
    for f in inbox.glob("*.dcm"):   # the scanner's own patient record: PAT0001, accession not from the worklist
        ds = pydicom.dcmread(f)
        ds.PatientID, ds.AccessionNumber = "PAT0001", "CLIN42"
        ds.save_as(f)
    run_study(trial, inbox=inbox, workdir=work, jobs=1, progress=False)
    st = Store(work)
    e = next(x for x in st.exams() if x["subject_id"] is None)
    d = e["steps"]["identify"]["detail"]
    assert d["error"] == "worklist_mismatch" and d["detail"] == (f"the registry knows this patient as {known['subject_id']}, the worklist attributes say "
                           "MINI01-HOS-101")
    st.close()


def test_schedule_commands(tmp_path, monkeypatch, capsys):
    import json as _json

    from imtrial_dsl.cli import main

    monkeypatch.setenv("IMTRIAL_KEY", KEY)
    study = tmp_path / "mini.imtrial"
    study.write_text(STUDY)
    (tmp_path / "enroll.csv").write_text(ENROLL)
    w = str(tmp_path / "w")
    assert main(["schedule", "enroll", str(study), "--workdir", w, "--csv", str(tmp_path / "enroll.csv")]) == 0
    assert "scheduled 6 new step(s)" in capsys.readouterr().out
    assert main(["schedule", "list", str(study), "--workdir", w, "--site", "OTH", "--json"]) == 0
    rows = _json.loads(capsys.readouterr().out)
    assert [(r["subject_id"], r["visit"], r["date"]) for r in rows] == [
        ("MINI01-OTH-201", "baseline", "2026-03-04"), ("MINI01-OTH-201", "m06", "2026-08-31")]
    acc = rows[0]["accession"]
    assert main(["schedule", "cancel", str(study), acc, "--workdir", w]) == 0
    assert "CANCELLED" in capsys.readouterr().out
    assert main(["schedule", "list", str(study), "--workdir", w, "--site", "OTH"]) == 0
    assert acc not in capsys.readouterr().out          # list shows active steps; --all shows every one
    assert main(["schedule", "move", str(study), acc, "--workdir", w, "--date", "2026-03-20"]) == 0
    assert "2026-03-20" in capsys.readouterr().out
    assert main(["schedule", "export", str(study), "--workdir", w, "--out", str(tmp_path / "s.csv")]) == 0
    assert main(["schedule", "import", str(study), "--workdir", w, "--csv", str(tmp_path / "s.csv")]) == 0
    assert "0 new, 6 updated" in capsys.readouterr().out
    assert main(["schedule", "move", str(study), "RNOSUCH", "--workdir", w, "--date", "2026-03-20"]) == 1
    assert "no scheduled step with accession number 'RNOSUCH'" in capsys.readouterr().err
