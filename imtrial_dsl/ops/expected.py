"""Expected vs received: per subject x scheduled visit, where each subject stands on a given date.

A subject's day 0 is its enrolment date (enrolment CSV) or else the date of its first exam
received for the baseline visit. Each visit's window is ``[target - before, target + after]``
with ``target = day0 + offset``. As of a date a visit is:

- ``upcoming``                — window not open yet, nothing received;
- ``window_open``             — inside the window, nothing received yet;
- ``overdue``                 — window closed, nothing received;
- ``received_in_window``      — an exam for the visit was acquired inside the window;
- ``received_out_of_window``  — an exam for the visit was acquired outside the window.

Inside a received visit every required acquisition (``visit.acquire``) is ``ok``, ``missing``,
``failed_adherence``, ``failed_qc`` or ``not_checked``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import date, timedelta
from typing import Optional

from imtrial_dsl import ir

from .model import ExamRecord, StudyData

STATUSES = ("upcoming", "window_open", "overdue", "received_in_window", "received_out_of_window")


@dataclass
class AcquisitionStatus:
    protocol: str
    status: str                       # ok | missing | too_few | failed_adherence | failed_qc | not_checked | optional_missing
    series: list[str] = field(default_factory=list)
    detail: str = ""
    optional: bool = False            # 'acquire optional X': its absence leaves the visit complete


@dataclass
class VisitStatus:
    subject_id: str
    site: str
    visit: str
    kind: str
    optional: bool
    day0: date
    day0_source: str                  # 'enrollment' | 'baseline_exam'
    target: date
    opens: date
    closes: date
    status: str
    exam_keys: list[str] = field(default_factory=list)
    exam_date: Optional[date] = None
    days_from_target: Optional[int] = None
    acquisitions: list[AcquisitionStatus] = field(default_factory=list)

    @property
    def received(self) -> bool:
        return self.status.startswith("received")

    @property
    def incomplete(self) -> bool:
        """Received, but a required acquisition is missing or failed."""
        return self.received and any(a.status != "ok" and not (a.optional and a.status == "optional_missing")
                                     for a in self.acquisitions)

    def to_json(self) -> dict:
        d = asdict(self)
        for k in ("day0", "target", "opens", "closes", "exam_date"):
            d[k] = d[k].isoformat() if d[k] else None
        d["incomplete"] = self.incomplete
        return d


def _days(d: Optional[ir.Days]) -> int:
    return int(round(d.days)) if d is not None else 0


def visit_window(visit: ir.Visit, day0: date) -> tuple[date, date, date]:
    """(target, opens, closes) of a visit for a subject whose day 0 is ``day0`` (both edges inclusive)."""
    target = day0 + timedelta(days=_days(visit.offset))
    # window_before is written '-14' in the source; accept either sign.
    return (target, target - timedelta(days=abs(_days(visit.window_before))),
            target + timedelta(days=abs(_days(visit.window_after))))


def scheduled_visits(trial: ir.Trial) -> list[ir.Visit]:
    if not trial.schedule:
        return []
    return [v for v in trial.schedule.visits if v.kind != "unscheduled"]


def baseline_visit(trial: ir.Trial) -> Optional[ir.Visit]:
    visits = scheduled_visits(trial)
    return (next((v for v in visits if v.kind == "baseline"), None)
            or next((v for v in visits if _days(v.offset) == 0), None))


def day_zero(trial: ir.Trial, data: StudyData) -> dict[str, tuple[date, str]]:
    """subject -> (day 0, source). Subjects with neither enrolment nor a baseline exam are absent."""
    out: dict[str, tuple[date, str]] = {}
    bv = baseline_visit(trial)
    for sid in data.subjects():
        en = data.enrollments.get(sid)
        if en:
            out[sid] = (en.enrolled_on, "enrollment")
            continue
        if bv is None:
            continue
        exams = [e for e in data.exams_of(sid) if e.visit == bv.name and e.exam_date]
        if exams:
            # The baseline exam may itself sit off target; day 0 is the baseline's target date.
            out[sid] = (exams[0].exam_date - timedelta(days=_days(bv.offset)), "baseline_exam")
    return out


def _acquisitions(trial: ir.Trial, visit: ir.Visit, exams: list[ExamRecord]) -> list[AcquisitionStatus]:
    out = []
    for ref in visit.acquire:
        series = [s for e in exams for s in e.series if s.protocol == ref.name]
        if not series:
            out.append(AcquisitionStatus(ref.name, "optional_missing" if ref.optional else "missing",
                                         detail="no series classified as " + ref.name, optional=ref.optional))
            continue
        uids = [s.series_uid for s in series]
        proto = trial.protocol(ref.name)
        qc_applies = bool(proto and trial.qc_for(proto))
        good = [s for s in series if s.adherence in ("pass", "warn") and (s.qc in ("pass", "warn") or (not qc_applies and s.qc is None))]
        if good and len(good) < ref.at_least:
            out.append(AcquisitionStatus(ref.name, "too_few", uids, f"{len(good)} of at least {ref.at_least} series "
                                         f"classified as {ref.name} passed", optional=ref.optional))
        elif good:
            out.append(AcquisitionStatus(ref.name, "ok", uids, optional=ref.optional))
        elif any(s.adherence == "fail" for s in series) and not any(s.adherence in ("pass", "warn") for s in series):
            reasons = sorted({r for s in series for r in s.reasons})
            out.append(AcquisitionStatus(ref.name, "failed_adherence", uids, "; ".join(reasons)))
        elif any(s.qc == "fail" for s in series):
            reasons = sorted({r for s in series for r in s.reasons})
            out.append(AcquisitionStatus(ref.name, "failed_qc", uids, "; ".join(reasons)))
        else:
            out.append(AcquisitionStatus(ref.name, "not_checked", uids, "adherence/QC verdicts not available yet"))
    return out


def _assign_unlabelled(visits: list[ir.Visit], day0: date, labelled: dict[str, list[ExamRecord]],
                       loose: list[ExamRecord]) -> None:
    """Attach exams without a schedule visit label to the nearest free visit by target date."""
    for e in loose:
        if not e.exam_date:
            continue
        free = [v for v in visits if not labelled.get(v.name)]
        if not free:
            return
        v = min(free, key=lambda v: (abs((visit_window(v, day0)[0] - e.exam_date).days), _days(v.offset)))
        labelled.setdefault(v.name, []).append(e)


def expected_vs_received(trial: ir.Trial, data: StudyData, as_of: date) -> list[VisitStatus]:
    """Status of every (subject, scheduled visit) as of ``as_of``, sorted by site, subject, target date.

    Exams acquired after ``as_of`` are ignored, so a report can be reproduced for a past date.
    """
    visits = scheduled_visits(trial)
    names = {v.name for v in visits}
    subjects = data.subjects()
    out: list[VisitStatus] = []
    for sid, (day0, source) in sorted(day_zero(trial, data).items()):
        exams = [e for e in data.exams_of(sid) if e.exam_date is None or e.exam_date <= as_of]
        labelled: dict[str, list[ExamRecord]] = {}
        for e in exams:
            if e.visit in names:
                labelled.setdefault(e.visit, []).append(e)
        _assign_unlabelled(visits, day0, labelled, [e for e in exams if e.visit not in names])
        for v in visits:
            target, opens, closes = visit_window(v, day0)
            got = labelled.get(v.name, [])
            vs = VisitStatus(sid, subjects[sid], v.name, v.kind, v.optional, day0, source, target, opens, closes, "")
            if got:
                first = next((e for e in got if e.exam_date), got[0])
                vs.exam_keys = [e.exam_key for e in got]
                vs.exam_date = first.exam_date
                inside = first.exam_date is not None and opens <= first.exam_date <= closes
                if first.exam_date is None and first.in_window is not None:
                    inside = first.in_window
                vs.status = "received_in_window" if inside else "received_out_of_window"
                if first.exam_date:
                    vs.days_from_target = (first.exam_date - target).days
                vs.acquisitions = _acquisitions(trial, v, got)
            elif as_of < opens:
                vs.status = "upcoming"
            elif as_of <= closes:
                vs.status = "window_open"
            else:
                vs.status = "overdue"
            out.append(vs)
    out.sort(key=lambda s: (s.site, s.subject_id, s.target, s.visit))
    return out


def summarize(statuses: list[VisitStatus]) -> dict[str, dict[str, int]]:
    """site -> status -> count (plus 'incomplete')."""
    out: dict[str, dict[str, int]] = {}
    for s in statuses:
        row = out.setdefault(s.site, {k: 0 for k in STATUSES + ("incomplete",)})
        row[s.status] += 1
        row["incomplete"] += int(s.incomplete)
    return dict(sorted(out.items()))
