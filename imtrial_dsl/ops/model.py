"""The operations view of a study's data: exams as received, enrolments, and the ops tables.

Operations work on a small plain model (:class:`StudyData`) rather than on the runner's
SQLite schema directly, so expected-vs-received, reminders and reports can be tested on
hand-built data and stay stable if the runner's schema evolves. :func:`load_study_data`
adapts the runner's read API (``imtrial_dsl.store.Store``) to this model.
"""
from __future__ import annotations

import csv
import json
import sqlite3
from dataclasses import asdict, dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import Any, Optional

from ..diagnostics import ImtrialError
from ..workdir import Workdir


class OpsError(ImtrialError):
    """An operations request the study or its files cannot answer: an undeclared site, device or role
    (E841), an enrollment file that cannot be read (E842)."""

    code = "E841"


# Verdict spellings as the adherence/QC steps write them, normalized to three values.
_PASS = {"pass", "passed", "ok", "conformant", "true"}
_WARN = {"warn", "warning", "warnings"}
_FAIL = {"fail", "failed", "error", "errors", "nonconformant", "false"}


def norm_verdict(v: Any) -> Optional[str]:
    """'pass' | 'warn' | 'fail' | None (not checked / unknown)."""
    if v is None:
        return None
    if isinstance(v, bool):
        return "pass" if v else "fail"
    s = str(v).strip().lower()
    if s in _PASS:
        return "pass"
    if s in _WARN:
        return "warn"
    if s in _FAIL:
        return "fail"
    return None


def parse_date(v: Any) -> Optional[date]:
    """ISO 'YYYY-MM-DD', DICOM 'YYYYMMDD', datetime/date -> date; anything else -> None."""
    if v is None or v == "":
        return None
    if isinstance(v, datetime):
        return v.date()
    if isinstance(v, date):
        return v
    s = str(v).strip()
    for fmt in ("%Y-%m-%d", "%Y%m%d"):
        try:
            return datetime.strptime(s[:10] if "-" in s else s[:8], fmt).date()
        except ValueError:
            continue
    return None


@dataclass
class SeriesRecord:
    """One series of an exam with its classification and verdicts."""

    series_uid: str = ""
    description: str = ""
    protocol: Optional[str] = None          # matched protocol name, None if unmatched
    adherence: Optional[str] = None         # 'pass' | 'warn' | 'fail' | None (not checked)
    qc: Optional[str] = None                # 'pass' | 'warn' | 'fail' | None (not checked / no check applies)
    reasons: list[str] = field(default_factory=list)


@dataclass
class ExamRecord:
    """One received exam (a DICOM study) as operations see it."""

    exam_key: str
    subject_id: Optional[str] = None
    site: Optional[str] = None
    device: Optional[str] = None
    visit: Optional[str] = None
    exam_date: Optional[date] = None        # real (unshifted) exam date: the workdir is site-side
    software: list[str] = field(default_factory=list)
    series: list[SeriesRecord] = field(default_factory=list)
    steps: dict[str, str] = field(default_factory=dict)      # step name -> status ('done', 'failed', ...)
    analyses: dict[str, str] = field(default_factory=dict)   # analysis name -> status
    in_window: Optional[bool] = None

    def to_json(self) -> dict:
        d = asdict(self)
        d["exam_date"] = self.exam_date.isoformat() if self.exam_date else None
        return d


@dataclass
class Enrollment:
    subject_id: str
    site: str
    enrolled_on: date
    arm: Optional[str] = None


@dataclass
class StudyData:
    """Everything operations know about a study's subjects: exams and (optional) enrolment list."""

    exams: list[ExamRecord] = field(default_factory=list)
    enrollments: dict[str, Enrollment] = field(default_factory=dict)

    def subjects(self) -> dict[str, str]:
        """subject_id -> site, from enrolments and exams (enrolment wins)."""
        out: dict[str, str] = {}
        for e in sorted(self.exams, key=lambda e: (e.exam_date or date.max, e.exam_key)):
            if e.subject_id and e.subject_id not in out and e.site:
                out[e.subject_id] = e.site
        for sid, en in self.enrollments.items():
            out[sid] = en.site
        return dict(sorted(out.items()))

    def exams_of(self, subject_id: str) -> list[ExamRecord]:
        return sorted((e for e in self.exams if e.subject_id == subject_id),
                      key=lambda e: (e.exam_date or date.max, e.exam_key))

    def only_site(self, site: str) -> "StudyData":
        """A copy restricted to one site's exams and subjects (access control happens here, first)."""
        subjects = {s for s, st in self.subjects().items() if st == site}
        return StudyData(
            exams=[e for e in self.exams if e.site == site and (e.subject_id is None or e.subject_id in subjects)],
            enrollments={k: v for k, v in self.enrollments.items() if v.site == site},
        )


def read_enrollment_csv(path: str | Path) -> dict[str, Enrollment]:
    """Read ``subject_id,site,enrolled_on[,arm]`` (header required). Raises :class:`OpsError` with the line on bad rows."""
    out: dict[str, Enrollment] = {}
    try:
        fh = open(path, newline="", encoding="utf-8")
    except OSError as exc:
        raise OpsError(f"cannot read enrollment file {path}: {exc.strerror or exc}", code="E842") from None
    with fh:
        reader = csv.DictReader(fh)
        need = {"subject_id", "site", "enrolled_on"}
        if not reader.fieldnames or not need <= set(reader.fieldnames):
            raise OpsError(f"{path}: header must contain subject_id,site,enrolled_on[,arm]", code="E842")
        for i, row in enumerate(reader, start=2):
            d = parse_date(row["enrolled_on"])
            if not row["subject_id"] or not row["site"] or d is None:
                raise OpsError(f"{path}:{i}: need subject_id, site and an ISO date in enrolled_on", code="E842")
            out[row["subject_id"].strip()] = Enrollment(row["subject_id"].strip(), row["site"].strip(), d,
                                                        (row.get("arm") or "").strip() or None)
    return out


# --------------------------------------------------------------------------- ops tables

def connect(workdir: str | Path) -> sqlite3.Connection:
    """Open ``W/state.sqlite`` (created if missing; the ops tables' schema lives in imtrial_dsl.store)."""
    from imtrial_dsl.store import connect_workdir

    return connect_workdir(workdir)


# --------------------------------------------------------------------------- adapter to the runner's state

def _first(d: dict, *keys: str, default: Any = None) -> Any:
    for k in keys:
        if k in d and d[k] not in (None, ""):
            return d[k]
    return default


def _as_list(v: Any) -> list[str]:
    if v is None or v == "":
        return []
    if isinstance(v, (list, tuple)):
        return [str(x) for x in v]
    s = str(v)
    if s.startswith("["):
        try:
            return [str(x) for x in json.loads(s)]
        except ValueError:
            pass
    return [p for p in s.split("\\") if p]


def _verdict_of(v: Any) -> Optional[str]:
    """A verdict from a runner column: a plain string or a JSON object with a verdict/status field."""
    if isinstance(v, dict):
        return norm_verdict(_first(v, "verdict", "status", "result", "ok"))
    return norm_verdict(v)


def _reasons_of(v: Any) -> list[str]:
    """Human reasons of a failed verdict: failing parameters / checks of the step's JSON."""
    if not isinstance(v, dict):
        return []
    out = [str(r) for r in (v.get("reasons") or [])]
    out += [f"{k}: outside its constraint" for k in (v.get("failed") or []) if isinstance(k, str)]
    for key in ("parameters", "checks", "results", "violations"):
        items = v.get(key)
        if isinstance(items, dict):
            items = [{"name": k, **(x if isinstance(x, dict) else {"value": x})} for k, x in items.items()]
        for it in items or []:
            if not isinstance(it, dict):
                continue
            bad = it.get("ok") is False or norm_verdict(_first(it, "verdict", "status")) == "fail"
            sig = str(_first(it, "significance", "severity", default="error")).lower()
            if bad and sig in ("error", "fail"):
                name = _first(it, "keyword", "name", "check", "metric", default="?")
                exp = _first(it, "expected", "threshold")
                act = _first(it, "actual", "value", "measured")
                out.append(f"{name}: {act} (expected {exp})" if exp is not None else f"{name}: {act}")
    return out


def _software_from_exam_json(path: Path) -> list[str]:
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    for holder in (d.get("device") if isinstance(d.get("device"), dict) else None, d):
        if holder:
            v = _first(holder, "software_versions", "SoftwareVersions", "software")
            if v:
                return _as_list(v)
    return []


def exam_from_state(d: dict, workdir: Path | None = None, measured: dict[str, set[str]] | None = None) -> ExamRecord:
    """Map one exam dict of ``Store.exam()`` to an :class:`ExamRecord`."""
    series = []
    for s in d.get("series") or []:
        adh, qc = s.get("adherence"), s.get("qc")
        series.append(SeriesRecord(
            series_uid=str(_first(s, "series_uid", default="")),
            description=str(_first(s, "description", default="")),
            protocol=_first(s, "protocol"),
            adherence=_verdict_of(adh),
            qc=_verdict_of(qc),
            reasons=_reasons_of(adh) + _reasons_of(qc),
        ))
    # the runner records graph nodes ("qc:t1_snr", "analysis:hipvol"); operations speak of steps: a
    # step's status is its worst node's, an analysis' the status its result reports
    steps: dict[str, str] = {}
    analyses: dict[str, str] = {}
    rank = {"failed": 3, "blocked": 2, "skipped": 1, "done": 0}
    for node, v in (d.get("steps") or {}).items():
        status = str(v.get("status") if isinstance(v, dict) else v)
        step, _, ref = str(node).partition(":")
        if rank.get(status, 0) >= rank.get(steps.get(step, "done"), 0):
            steps[step] = status
        if step == "analysis" and ref:
            detail = v.get("detail") if isinstance(v, dict) else None
            analyses[ref] = str((detail or {}).get("status") or status) if status == "done" else status
    for name in (measured or {}).get(d["exam_key"], set()):
        analyses.setdefault(name, "done")
    software = _as_list(_first(d, "software", "software_versions"))
    if not software and workdir is not None:
        software = _software_from_exam_json(Workdir(workdir).exam(d["exam_key"]).exam_json)
    in_window = d.get("in_window")
    return ExamRecord(
        exam_key=str(d["exam_key"]),
        subject_id=_first(d, "subject_id"),
        site=_first(d, "site"),
        device=_first(d, "device"),
        visit=_first(d, "visit"),
        exam_date=parse_date(_first(d, "exam_date")),
        software=software,
        series=series,
        steps=steps,
        analyses=analyses,
        in_window=None if in_window is None else bool(in_window),
    )


def load_study_data(workdir: str | Path, trial_code: str | None = None,
                    enrollment_csv: str | Path | None = None) -> StudyData:
    """Read the runner's state in ``workdir`` (through ``imtrial_dsl.store.Store``) into :class:`StudyData`."""
    from imtrial_dsl.store import Store

    wd = Path(workdir)
    with Store(wd, create=False) as st:
        measured: dict[str, set[str]] = {}
        for m in st.measurements():
            measured.setdefault(m["exam_key"], set()).add(m["analysis"])
        rows = [e for e in st.exams() if not trial_code or e.get("trial") in (None, trial_code)]
        exams = [exam_from_state(e, wd, measured) for e in rows]
    return StudyData(exams=exams, enrollments=read_enrollment_csv(enrollment_csv) if enrollment_csv else {})
