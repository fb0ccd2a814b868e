"""``imtrial assign``: an operator's decision for an exam the pipeline could not place on its own.

Two kinds of exam wait for one (``imtrial status`` lists them):

* **held** — identify could not name the subject: no usable source identifier (``PatientID is empty``),
  or an unknown person at an unknown device. Nothing after identify ran. ``--subject ID`` names an
  enrolled subject; ``--subject new`` enrols one (at the device's site, or ``--site``).
* **unassigned** — the exam's dates are unusable (United Imaging writes ``***``): it was de-identified,
  classified, checked and archived with visit ``unassigned``. ``--date YYYY-MM-DD`` gives the real
  date (the visit follows from the schedule); ``--visit NAME`` names the visit directly.

The decision is recorded (field, value, who, when, note) in the ``exam_assignments`` table of the
state database, which identify reads; the assignment is part of identify's fingerprint, so the exam is
then re-identified and every node after identify runs again (``run_study(..., exams=[key])``).
"""
from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Any, Optional

from .. import ir
from ..diagnostics import ImtrialError, did_you_mean
from ..store import Store
from ..workdir import Workdir


class AssignError(ImtrialError):
    """An assignment that cannot be recorded (unknown exam, subject, site or visit; a bad date)."""

    code = "E815"


def find_exam(store: Store, exam: str) -> str:
    """The exam key an operator means: a key, a unique prefix of one (E815 otherwise)."""
    keys = store.exam_keys()
    if exam in keys:
        return exam
    hits = [k for k in keys if k.startswith(exam)]
    if len(hits) == 1:
        return hits[0]
    if hits:
        raise AssignError(f"{len(hits)} exams start with {exam!r}: {', '.join(hits[:5])}", code="E815",
                          hint="give more of the exam key")
    raise AssignError(f"no exam {exam!r} in {store.workdir}", code="E815",
                      hint="imtrial status --workdir W lists the exams that wait for an assignment")


def parse_iso_date(text: str) -> _dt.date:
    """YYYY-MM-DD (or YYYYMMDD) as a date; E818 for anything else."""
    t = text.strip().replace("-", "")
    try:
        if len(t) != 8 or not t.isdigit():
            raise ValueError
        return _dt.date(int(t[:4]), int(t[4:6]), int(t[6:]))
    except ValueError:
        raise AssignError(f"--date {text!r} is not a date", code="E818", hint="write it as YYYY-MM-DD") from None


def validate(trial: ir.Trial, store: Store, *, subject: Optional[str], site: Optional[str], visit: Optional[str],
             date: Optional[str]) -> dict[str, str]:
    """The fields to record, checked against the study and the registry."""
    code = trial.study.code if trial.study else "TRIAL"
    fields: dict[str, str] = {}
    if subject is not None:
        if subject != "new":
            known = [s["subject_id"] for s in store.subjects(code)]
            if subject not in known:
                raise AssignError(f"no subject {subject!r} in the registry of {code}", code="E816",
                                  hint=did_you_mean(subject, known) or "--subject new enrols a new subject")
        fields["subject"] = subject
    if site is not None:
        sites = [s.code for s in trial.sites]
        if site not in sites:
            raise AssignError(f"no site {site!r} in the study", code="E817",
                              hint=did_you_mean(site, sites) or f"sites: {', '.join(sites)}")
        if subject != "new":
            raise AssignError("--site applies to a new subject only (--subject new --site SITE)", code="E819")
        fields["site"] = site
    if visit is not None:
        visits = [v.name for v in (trial.schedule.visits if trial.schedule else [])]
        if visit not in visits:
            raise AssignError(f"no visit {visit!r} in the schedule", code="E817",
                              hint=did_you_mean(visit, visits) or (f"visits: {', '.join(visits)}" if visits else None))
        fields["visit"] = visit
    if date is not None:
        fields["date"] = parse_iso_date(date).isoformat()
    if not fields:
        raise AssignError("nothing to assign", code="E819", hint="give --subject, --visit or --date")
    return fields


def assign_exam(trial: ir.Trial, workdir: str | Path, exam: str, *, by: str, subject: Optional[str] = None,
                site: Optional[str] = None, visit: Optional[str] = None, date: Optional[str] = None,
                note: Optional[str] = None, run: bool = True) -> dict[str, Any]:
    """Record an assignment for one exam and (``run``) process the exam onward from identify.

    Returns ``{exam_key, assigned, by, history, status, summary}``; ``status`` is the exam's row of the
    state database after the run (or before it, with ``run=False``)."""
    from .run import run_study, summarize

    W = Workdir(Path(workdir).resolve())
    store = Store(W.root, create=False)
    try:
        key = find_exam(store, exam)
        fields = validate(trial, store, subject=subject, site=site, visit=visit, date=date)
        store.add_assignment(key, trial.study.code if trial.study else "TRIAL", fields, by, note)
        history = store.assignment_history(key)
    finally:
        store.close()
    summary = run_study(trial, inbox=None, workdir=W.root, exams=[key]) if run else None
    store = Store(W.root, create=False)
    try:
        row = store.exam(key)
        if summary is None:
            summary = summarize(store)
    finally:
        store.close()
    return {"exam_key": key, "assigned": fields, "by": by, "history": history, "status": row, "summary": summary}
