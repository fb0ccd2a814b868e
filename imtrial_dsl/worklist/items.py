"""A scheduled step as a Modality Worklist item (PS3.4 Annex K, PS3.3 Table K.6-1), and C-FIND matching.

The item carries what the scanner needs for the clinical record — the patient as the hospital knows
them — and what makes the images identifiable without typing: the Clinical Trial Subject module
(sponsor, protocol ID and name, site ID and name, subject ID) and Clinical Trial Study module (time
point = visit), the accession number, the requested procedure, and one Scheduled Protocol Code per
protocol of the visit — the same code the e-protocol export writes (``exporters.eprotocol.dicom_dpp.
protocol_code``). A modality that copies these into its images (PS3.17 "Clinical Trial" usage) makes
them identifiable by :mod:`.claim`.

Matching (PS3.4 C.2.2.2): universal (empty key), single value (exact; ``*``/``?`` wildcards in
string keys), date/time range (``A-B``, ``A-``, ``-B``) for the start date, and sequence matching
for the Scheduled Procedure Step Sequence. A response holds exactly the keys the request asked for.
"""
from __future__ import annotations

import fnmatch
from typing import Any, Optional

from .. import ir
from .schedule import trial_code

# keys whose request value is matched against the entry (top level and inside the step sequence)
MATCH_KEYS = ("PatientID", "PatientName", "AccessionNumber", "RequestedProcedureID", "ClinicalTrialSubjectID",
              "ClinicalTrialProtocolID", "ClinicalTrialSiteID", "ClinicalTrialTimePointID", "StudyInstanceUID")
SPS_MATCH_KEYS = ("Modality", "ScheduledStationAETitle", "ScheduledProcedureStepID", "ScheduledProcedureStepStatus",
                  "ScheduledProcedureStepStartDate", "ScheduledProcedureStepStartTime", "ScheduledStationName")


def _dpp():
    """The e-protocol exporter's DICOM module (it owns the protocol codes)."""
    import importlib

    from ..paths import exporters_package

    return importlib.import_module(exporters_package().__name__ + ".eprotocol.dicom_dpp")


def _code(value: str, meaning: str):
    from pydicom.dataset import Dataset

    d = Dataset()
    d.CodeValue, d.CodingSchemeDesignator, d.CodeMeaning = value[:16], _dpp().LOCAL_SCHEME, meaning[:64]
    return d


def station_ae(trial: ir.Trial, step: dict, calling_ae: Optional[str]) -> str:
    """ScheduledStationAETitle: the required device's AE title (same-device rule), else the calling scanner."""
    if step.get("device"):
        for _, d in trial.devices():
            if d.id == step["device"] and d.ae_title:
                return d.ae_title
    return calling_ae or ""


def item(trial: ir.Trial, step: dict, calling_ae: Optional[str] = None):
    """The full worklist item (a pydicom Dataset) of one scheduled step."""
    from pydicom.dataset import Dataset

    protocol_code = _dpp().protocol_code
    code = trial_code(trial)
    study = trial.study
    site = trial.site(step["site"])
    visit = next((v for v in (trial.schedule.visits if trial.schedule else []) if v.name == step["visit"]), None)
    pat = step.get("patient") or {}
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    # Patient Identification / Demographic
    ds.PatientName = pat.get("PatientName") or ""
    ds.PatientID = pat.get("PatientID") or ""
    ds.IssuerOfPatientID = pat.get("IssuerOfPatientID") or ""
    ds.PatientBirthDate = (pat.get("PatientBirthDate") or "").replace("-", "")
    ds.PatientSex = pat.get("PatientSex") or ""
    # Clinical Trial Subject (PS3.3 C.7.1.3) and Clinical Trial Study (C.7.2.3)
    ds.ClinicalTrialSponsorName = ((study.sponsor if study and study.sponsor else code) or "")[:64]
    ds.ClinicalTrialProtocolID = code
    ds.ClinicalTrialProtocolName = ((study.title if study and study.title else code) or "")[:64]
    ds.ClinicalTrialSiteID = step["site"]
    ds.ClinicalTrialSiteName = ((site.name if site else step["site"]) or "")[:64]
    ds.ClinicalTrialSubjectID = step["subject_id"]
    ds.ClinicalTrialTimePointID = step["visit"]
    ds.ClinicalTrialTimePointDescription = (f"{visit.kind} visit {visit.name}" if visit else step["visit"])[:1024]
    # Imaging Service Request / Requested Procedure
    ds.AccessionNumber = step["accession"]
    ds.ReferringPhysicianName = ""
    ds.RequestedProcedureID = step["accession"]
    ds.RequestedProcedureDescription = f"{code} {step['visit']} {step['modality']}"[:64]
    ds.RequestedProcedureCodeSequence = [_code(f"{code}_{step['modality']}", f"{code} research {step['modality']}")]
    ds.StudyInstanceUID = step["study_uid"]
    ds.RequestedProcedurePriority = "ROUTINE"
    # Scheduled Procedure Step
    sps = Dataset()
    sps.Modality = step["modality"]
    sps.ScheduledStationAETitle = station_ae(trial, step, calling_ae)
    sps.ScheduledStationName = ""
    sps.ScheduledProcedureStepStartDate = step["date"].replace("-", "")
    sps.ScheduledProcedureStepStartTime = (step.get("time") or "").replace(":", "")
    sps.ScheduledPerformingPhysicianName = ""
    sps.ScheduledProcedureStepDescription = (f"{code} {step['visit']}: " + ", ".join(step["protocols"]))[:64]
    prots = [trial.protocol(p) for p in step["protocols"]]
    sps.ScheduledProtocolCodeSequence = [protocol_code(p) for p in prots if p is not None]
    sps.ScheduledProcedureStepID = step["accession"]
    sps.ScheduledProcedureStepStatus = step["status"]
    ds.ScheduledProcedureStepSequence = [sps]
    return ds


# --------------------------------------------------------------------------- matching

def _text(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, (list, tuple)) or type(v).__name__ == "MultiValue":
        return "\\".join(str(x) for x in v)
    return str(v)


def _single(query: str, value: str, key: str) -> bool:
    if "*" in query or "?" in query:
        if key == "PatientName":  # PS3.4 C.2.2.2.4: case-insensitive for PN
            return fnmatch.fnmatchcase(value.upper(), query.upper())
        return fnmatch.fnmatchcase(value, query)
    return value == query


def _range(query: str, value: str) -> bool:
    """DA/TM range matching: ``A-B``, ``A-``, ``-B`` or a single value."""
    if not value:
        return False
    if "-" not in query:
        return value == query
    lo, _, hi = query.partition("-")
    return (not lo or value >= lo) and (not hi or value <= hi)


def _matches(ds, entry, keys: tuple[str, ...]) -> bool:
    for key in keys:
        if key not in ds:
            continue
        q = _text(ds.get(key)).strip()
        if not q or q == "*":
            continue
        v = _text(entry.get(key)).strip()
        if key.endswith("Date") or key.endswith("Time"):
            if not _range(q, v):
                return False
        elif not _single(q, v, key):
            return False
    return True


def matches(query, entry) -> bool:
    """Does worklist item ``entry`` match the C-FIND identifier ``query``?"""
    if not _matches(query, entry, MATCH_KEYS):
        return False
    qseq = query.get("ScheduledProcedureStepSequence")
    if qseq:
        steps = list(entry.get("ScheduledProcedureStepSequence") or [])
        return any(_matches(qseq[0], s, SPS_MATCH_KEYS) for s in steps)
    return True


def project(query, entry, top: bool = True):
    """A response identifier: exactly the keys of ``query``, filled from ``entry`` (sequences recursively)."""
    from pydicom.dataset import Dataset

    out = Dataset()
    for elem in query:
        kw = elem.keyword
        if not kw:
            continue
        if kw == "SpecificCharacterSet":
            continue
        if elem.VR == "SQ":
            sub = entry.get(kw)
            if sub is None:
                setattr(out, kw, [])
            elif elem.value:
                setattr(out, kw, [project(elem.value[0], it, False) for it in sub])
            else:
                setattr(out, kw, list(sub))
        else:
            setattr(out, kw, entry.get(kw, ""))
    if top:
        out.SpecificCharacterSet = entry.get("SpecificCharacterSet", "ISO_IR 192")
    return out
