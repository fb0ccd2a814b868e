"""Confident identification: the research identifiers an exam carries from the worklist, checked.

A scanner that took its patient from the research worklist copies the Clinical Trial attributes
(ClinicalTrialProtocolID, …SiteID, …SubjectID, …TimePointID) and the AccessionNumber into every
image. The identify step then does not guess: it takes subject and visit from those attributes,
and checks them against everything else it knows —

* the protocol ID is this study's (else the images belong to another trial);
* the accession number names a scheduled step of this study, for the same subject and visit, whose
  patient is the exam's patient (else the technologist picked someone else's worklist entry);
* the registry: the person (keyed hash of the source identifiers) is that subject, or is unknown and
  the subject ID is not taken by another person.

Any disagreement raises ``IdentifyError("worklist_mismatch")`` (E873): the exam is not identified,
and the reason names both sides, for the site to resolve. An accession number that is not ours,
without Clinical Trial attributes, is an ordinary clinical exam: identification proceeds as usual.
"""
from __future__ import annotations

import datetime as _dt
import time
from dataclasses import dataclass
from typing import Optional

from .schedule import ACTIVE, step_by_accession


@dataclass
class Claim:
    subject_id: str
    site: Optional[str]
    visit: Optional[str]
    accession: Optional[str]
    step: Optional[dict]
    row: object            # the registry's ``subjects`` row of the subject


def _mismatch(detail: str):
    from ..runner.identify import IdentifyError

    return IdentifyError("worklist_mismatch", detail)


def claim(db, trial, exam: dict, code: str, source_key: str, registry_row) -> Optional[Claim]:
    """Check the exam's worklist attributes (inside identification's transaction); None when it has none
    of this study. Inserts the registry row of a subject first seen through the worklist."""
    wl = exam.get("worklist") or {}
    acc = wl.get("AccessionNumber")
    subject = wl.get("ClinicalTrialSubjectID")
    step = step_by_accession(db, code, acc) if acc else None
    if not subject and step is None:
        return None  # no research attributes, and not an accession number of ours
    proto = wl.get("ClinicalTrialProtocolID")
    if proto and proto != code:
        raise _mismatch(f"the images carry ClinicalTrialProtocolID {proto!r}, this study is {code!r}")
    visit = wl.get("ClinicalTrialTimePointID")
    site = wl.get("ClinicalTrialSiteID")
    pid = (exam.get("patient") or {}).get("PatientID")
    if step is not None:
        if subject and subject != step["subject_id"]:
            raise _mismatch(f"accession {acc} was scheduled for {step['subject_id']}, the images say {subject}")
        if visit and visit != step["visit"]:
            raise _mismatch(f"accession {acc} was scheduled for visit {step['visit']}, the images say {visit}")
        spid = (step.get("patient") or {}).get("PatientID")
        if spid and pid and spid != pid:
            raise _mismatch(f"accession {acc} ({step['subject_id']}) was scheduled for another patient than the "
                            f"one in the images (PatientID differs)")
        subject, visit, site = step["subject_id"], step["visit"], site or step["site"]
    names = {v.name for v in (trial.schedule.visits if trial.schedule else [])}
    if visit and names and visit not in names:
        raise _mismatch(f"ClinicalTrialTimePointID {visit!r} is not a visit of the schedule ({', '.join(sorted(names))})")
    if site and trial.site(site) is None:
        raise _mismatch(f"ClinicalTrialSiteID {site!r} is not a site of the study")
    if registry_row is not None:
        if registry_row["subject_id"] != subject:
            raise _mismatch(f"the registry knows this patient as {registry_row['subject_id']}, "
                            f"the worklist attributes say {subject}")
        row = registry_row
    else:
        taken = db.execute("SELECT subject_id FROM subjects WHERE trial=? AND subject_id=?", (code, subject)).fetchone()
        if taken is not None:
            raise _mismatch(f"subject {subject} is registered for another patient than the one in the images")
        enrolled = db.execute("SELECT site FROM enrollments WHERE trial=? AND subject_id=?", (code, subject)).fetchone()
        home = (enrolled["site"] if enrolled else None) or site or (step["site"] if step else None)
        if home is None:
            raise _mismatch(f"subject {subject} is new and the images name no ClinicalTrialSiteID")
        db.execute("INSERT INTO subjects(trial, source_key, subject_id, site, seq, created) VALUES (?, ?, ?, ?, NULL, ?)",
                   (code, source_key, subject, home, time.time()))
        row = db.execute("SELECT * FROM subjects WHERE trial=? AND source_key=?", (code, source_key)).fetchone()
    if step is not None:
        db.execute("UPDATE scheduled_steps SET exam_key=?, status=CASE WHEN status IN (?, ?) THEN 'COMPLETED' ELSE status "
                   "END, updated=? WHERE trial=? AND accession=?",
                   (exam.get("exam_key"), *ACTIVE, time.time(), code, acc))
    return Claim(subject, site, visit, acc, step, row)


def visit_of(trial, claimed: Claim, by_date: dict, exam_date: _dt.date) -> dict:
    """The visit result with the worklist's visit; when the exam date points at another visit the result
    keeps the worklist's (it was scheduled) and carries a warning saying so."""
    if not claimed.visit or claimed.visit == by_date.get("visit"):
        return by_date
    v = next(x for x in trial.schedule.visits if x.name == claimed.visit)
    if v.kind == "baseline":
        days, in_window, anchor = 0.0, True, exam_date
    else:
        days = by_date.get("days_from_baseline")
        lo = v.offset.days - (abs(v.window_before.days) if v.window_before else 0)
        hi = v.offset.days + (abs(v.window_after.days) if v.window_after else 0)
        in_window, anchor = (True if days is None else lo <= days <= hi), None
    return {"visit": v.name, "visit_kind": v.kind, "days_from_baseline": days, "in_window": bool(in_window),
            "anchor": anchor, "visit_obj": v,
            "worklist_warning": {"code": "worklist_visit",
                                 "detail": f"scheduled as {v.name} (worklist); the exam date alone would make it "
                                           f"{by_date.get('visit')}"}}
