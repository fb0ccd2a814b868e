"""Scheduled research procedure steps: one per subject x visit x modality, in ``W/state.sqlite``.

Where the dates come from: a subject's day 0 is its enrolment date (``enroll``: a CSV the
coordinator keeps, with the patient as the hospital knows them) or else the date of its baseline exam
as identification recorded it (``subjects.baseline_date`` minus the baseline visit's offset). Each
scheduled visit's target and window are the ones the reminders use (:func:`ops.expected.visit_window`).

:func:`plan` adds the steps that do not exist yet and never touches one that does, so a step the
coordinator moved or cancelled stays as they left it; a visit that already has an exam gets no step.
The accession number (also the Requested Procedure ID and the Scheduled Procedure Step ID) and the
Study Instance UID the scanner is asked to use are derived from (trial, subject, visit, modality), so
planning twice gives the same identifiers.

With a same-device rule, a follow-up step names the device the subject was first scanned on for
that modality (``subject_exams``), which the worklist sends as ``ScheduledStationAETitle``.
"""
from __future__ import annotations

import csv
import datetime as _dt
import hashlib
import json
import time
from pathlib import Path
from typing import Any, Iterable, Optional

from .. import ir
from ..store import connect_workdir, tx
from . import WorklistError

STATUSES = ("SCHEDULED", "IN PROGRESS", "COMPLETED", "DISCONTINUED", "CANCELLED")
ACTIVE = ("SCHEDULED", "IN PROGRESS")
PATIENT_FIELDS = ("PatientID", "IssuerOfPatientID", "PatientName", "PatientBirthDate", "PatientSex")
# CSV column -> patient field (the enrolment and schedule files use short lower-case names)
CSV_PATIENT = {"patient_id": "PatientID", "issuer": "IssuerOfPatientID", "patient_name": "PatientName",
               "birth_date": "PatientBirthDate", "sex": "PatientSex"}
CSV_COLUMNS = ("accession", "subject_id", "site", "visit", "modality", "protocols", "date", "time", "opens",
               "closes", "device", "status", *CSV_PATIENT)


def _days(d: Optional[ir.Days]) -> int:
    return int(round(d.days)) if d is not None else 0


def has_same_device_rule(trial: ir.Trial) -> bool:
    return bool(trial.schedule) and trial.schedule.same_device != "none"


def trial_code(trial: ir.Trial) -> str:
    return trial.study.code if trial.study else "TRIAL"


def accession_for(trial: str, subject_id: str, visit: str, modality: str) -> str:
    """A stable accession number (SH, 16 characters at most) for one subject x visit x modality."""
    digest = hashlib.sha256("\x00".join((trial, subject_id, visit, modality)).encode()).hexdigest()
    return "R" + digest[:12].upper()


def study_uid_for(trial: str, accession: str) -> str:
    """The Study Instance UID the scanner is asked to use (a 2.25 UUID-derived UID, stable per step)."""
    from pydicom.uid import generate_uid

    return str(generate_uid(prefix=None, entropy_srcs=["imtrial worklist", trial, accession]))


def _iso(d: Any, what: str, where: str) -> str:
    try:
        return _dt.date.fromisoformat(str(d).strip()).isoformat()
    except ValueError:
        raise WorklistError(f"{where}: {what} must be an ISO date (YYYY-MM-DD), got {d!r}", code="E871") from None


def _time(t: Optional[str], where: str) -> Optional[str]:
    if t in (None, ""):
        return None
    t = str(t).strip()
    try:
        return _dt.time.fromisoformat(t).strftime("%H:%M")
    except ValueError:
        raise WorklistError(f"{where}: time must be HH:MM, got {t!r}", code="E871") from None


# --------------------------------------------------------------------------- enrolment

def _csv_rows(path: str | Path, what: str, need: set[str], hint: str) -> Iterable[tuple[int, dict]]:
    """(line number, row with stripped keys and values) of a CSV file whose header holds ``need`` (else E871)."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise WorklistError(f"cannot read {what} file {path}: {exc.strerror or exc}", code="E871") from None
    reader = csv.DictReader(text.splitlines())
    if not reader.fieldnames or not need <= {f.strip() for f in reader.fieldnames}:
        raise WorklistError(f"{path}: the header must contain {','.join(sorted(need))} {hint}", code="E871")
    return [(line, {k.strip(): (v or "").strip() for k, v in row.items() if k})
            for line, row in enumerate(reader, start=2)]


def read_enrollment(path: str | Path) -> list[dict]:
    """Rows of an enrolment CSV: ``subject_id,site,enrolled_on`` (as for ``imtrial reminders``) plus the
    patient as the hospital knows them: ``patient_id`` (required), ``issuer``, ``patient_name``,
    ``birth_date``, ``sex``. Raises WorklistError E871 naming the line of a bad row."""
    out = []
    for line, row in _csv_rows(path, "enrolment", {"subject_id", "site", "enrolled_on", "patient_id"},
                               "(and optionally issuer,patient_name,birth_date,sex)"):
        where = f"{path}:{line}"
        if not row.get("subject_id") or not row.get("site") or not row.get("patient_id"):
            raise WorklistError(f"{where}: subject_id, site and patient_id are required", code="E871")
        out.append({"subject_id": row["subject_id"], "site": row["site"],
                    "enrolled_on": _iso(row.get("enrolled_on"), "enrolled_on", where),
                    "patient": _patient_from_csv(row), "line": where})
    return out


def _patient_from_csv(row: dict) -> dict:
    return {f: row.get(c) or None for c, f in CSV_PATIENT.items()}


def enroll(trial: ir.Trial, workdir: str | Path, rows: Iterable[dict]) -> dict:
    """Record enrolments (subject, site, day 0, patient); an existing subject's row is replaced."""
    code = trial_code(trial)
    rows = list(rows)
    for r in rows:
        if trial.site(r["site"]) is None:
            raise WorklistError(f"{r.get('line', r['subject_id'])}: the study has no site {r['site']!r} "
                                f"(sites: {', '.join(s.code for s in trial.sites)})", code="E871")
    db = connect_workdir(workdir)
    try:
        with tx(db):
            for r in rows:
                db.execute("INSERT OR REPLACE INTO enrollments(trial, subject_id, site, enrolled_on, patient, recorded) "
                           "VALUES (?, ?, ?, ?, ?, ?)", (code, r["subject_id"], r["site"], r["enrolled_on"],
                                                         json.dumps(r["patient"], sort_keys=True), time.time()))
    finally:
        db.close()
    return {"enrolled": len(rows)}


# --------------------------------------------------------------------------- planning

def _visit_modalities(trial: ir.Trial, visit: ir.Visit) -> dict[str, list[str]]:
    """modality -> the protocols of the visit acquired with it (in the visit's order)."""
    out: dict[str, list[str]] = {}
    for ref in visit.acquire:
        p = trial.protocol(ref.name)
        if p is not None:
            out.setdefault(p.modality, []).append(p.name)
    return out


def _baseline_patient(db, workdir: Path, code: str, subject_id: str) -> dict:
    """The patient of a subject known from its exams: the registry's audit map (PatientID, issuer) and the
    name, birth date and sex from its first exam's original header (site-side)."""
    import pydicom

    from ..files import read_json
    from ..workdir import Workdir

    patient: dict[str, Optional[str]] = {f: None for f in PATIENT_FIELDS}
    for r in db.execute("SELECT source_attr, source_value, issuer FROM identity_audit WHERE trial=? AND subject_id=? "
                        "ORDER BY recorded", (code, subject_id)):
        if r["source_attr"] == "PatientID" and not patient["PatientID"]:
            patient["PatientID"], patient["IssuerOfPatientID"] = r["source_value"], r["issuer"] or None
    row = db.execute("SELECT exam_key FROM exams WHERE trial=? AND subject_id=? ORDER BY exam_date, exam_key LIMIT 1",
                     (code, subject_id)).fetchone()
    if row is not None:
        E = Workdir(workdir).exam(row["exam_key"])
        info = read_json(E.exam_json, {}) or {}
        files = [f for s in info.get("series", []) for f in s.get("files", [])]
        if files and E.path(files[0]).is_file():
            ds = pydicom.dcmread(E.path(files[0]), stop_before_pixels=True,
                                 specific_tags=["PatientName", "PatientBirthDate", "PatientSex", "PatientID",
                                                "IssuerOfPatientID"])
            for f in PATIENT_FIELDS:
                if not patient.get(f) and str(ds.get(f, "") or "").strip():
                    patient[f] = str(ds.get(f))
    return patient


def first_devices(db, code: str, subject_id: str) -> dict[str, str]:
    """modality -> the device of the subject's first exam with that modality."""
    out: dict[str, str] = {}
    for r in db.execute("SELECT modality, device FROM subject_exams WHERE trial=? AND subject_id=? AND device IS NOT NULL "
                        "ORDER BY exam_date, exam_key", (code, subject_id)):
        out.setdefault(r["modality"], r["device"])
    return out


def subjects_day0(trial: ir.Trial, db, workdir: Path) -> list[dict]:
    """Every subject with a day 0: ``{subject_id, site, day0, source, patient, from_visit}`` (enrolment wins)."""
    from ..ops.expected import baseline_visit

    code = trial_code(trial)
    out: dict[str, dict] = {}
    bv = baseline_visit(trial)
    for r in db.execute("SELECT subject_id, site, baseline_date FROM subjects WHERE trial=? AND baseline_date IS NOT NULL",
                        (code,)):
        day = _dt.date(int(r["baseline_date"][:4]), int(r["baseline_date"][4:6]), int(r["baseline_date"][6:8]))
        out[r["subject_id"]] = {"subject_id": r["subject_id"], "site": r["site"], "source": "baseline",
                                "day0": day - _dt.timedelta(days=_days(bv.offset) if bv else 0),
                                "patient": _baseline_patient(db, workdir, code, r["subject_id"])}
    for r in db.execute("SELECT subject_id, site, enrolled_on, patient FROM enrollments WHERE trial=?", (code,)):
        out[r["subject_id"]] = {"subject_id": r["subject_id"], "site": r["site"], "source": "enrollment",
                                "day0": _dt.date.fromisoformat(r["enrolled_on"]), "patient": json.loads(r["patient"])}
    return [out[k] for k in sorted(out)]


def _step_row(trial: ir.Trial, subject: dict, visit: ir.Visit, modality: str, protocols: list[str],
              date: _dt.date, device: Optional[str], source: str, time_: Optional[str] = None) -> dict:
    from ..ops.expected import visit_window

    code = trial_code(trial)
    _, opens, closes = visit_window(visit, subject["day0"]) if subject.get("day0") else (None, None, None)
    acc = accession_for(code, subject["subject_id"], visit.name, modality)
    return {"trial": code, "accession": acc, "subject_id": subject["subject_id"], "site": subject["site"],
            "visit": visit.name, "modality": modality, "protocols": protocols, "date": date.isoformat(),
            "time": time_, "opens": opens.isoformat() if opens else None, "closes": closes.isoformat() if closes else None,
            "device": device, "study_uid": study_uid_for(code, acc), "status": "SCHEDULED",
            "patient": subject["patient"], "source": source}


def _insert(db, row: dict, *, replace: bool = False) -> bool:
    verb = "INSERT OR REPLACE" if replace else "INSERT OR IGNORE"
    cur = db.execute(
        f"{verb} INTO scheduled_steps(trial, accession, subject_id, site, visit, modality, protocols, date, time, opens, "
        "closes, device, study_uid, status, patient, source, updated) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (row["trial"], row["accession"], row["subject_id"], row["site"], row["visit"], row["modality"],
         json.dumps(row["protocols"]), row["date"], row.get("time"), row.get("opens"), row.get("closes"),
         row.get("device"), row["study_uid"], row.get("status") or "SCHEDULED",
         json.dumps(row["patient"], sort_keys=True), row.get("source"), time.time()))
    return cur.rowcount > 0


def plan(trial: ir.Trial, workdir: str | Path) -> dict:
    """Add a step for every subject x scheduled visit x modality that has neither a step nor an exam yet.

    From an enrolment every visit is planned; from a baseline exam the visits after the baseline."""
    from ..ops.expected import baseline_visit, scheduled_visits, visit_window

    code = trial_code(trial)
    visits = scheduled_visits(trial)
    bv = baseline_visit(trial)
    same_device = has_same_device_rule(trial)
    db = connect_workdir(workdir)
    created, existing, done = 0, 0, 0
    try:
        with tx(db):
            for subj in subjects_day0(trial, db, Path(workdir)):
                had = {r["visit"] for r in db.execute("SELECT visit FROM exams WHERE trial=? AND subject_id=? "
                                                      "AND visit IS NOT NULL", (code, subj["subject_id"]))}
                first = first_devices(db, code, subj["subject_id"]) if same_device else {}
                for v in visits:
                    if subj["source"] == "baseline" and bv is not None and _days(v.offset) <= _days(bv.offset):
                        continue
                    if v.name in had:
                        done += 1
                        continue
                    target, _, _ = visit_window(v, subj["day0"])
                    for modality, prots in _visit_modalities(trial, v).items():
                        row = _step_row(trial, subj, v, modality, prots, target, first.get(modality), subj["source"])
                        if _insert(db, row):
                            created += 1
                        else:
                            existing += 1
    finally:
        db.close()
    return {"created": created, "existing": existing, "visits_done": done}


# --------------------------------------------------------------------------- the coordinator's edits

def _subject(trial: ir.Trial, db, workdir: Path, subject_id: str) -> dict:
    for s in subjects_day0(trial, db, workdir):
        if s["subject_id"] == subject_id:
            return s
    row = db.execute("SELECT subject_id, site FROM subjects WHERE trial=? AND subject_id=?",
                     (trial_code(trial), subject_id)).fetchone()
    if row is None:
        raise WorklistError(f"no subject {subject_id!r}: enrol it first (imtrial schedule enroll) or scan its baseline",
                            code="E870")
    return {"subject_id": row["subject_id"], "site": row["site"], "day0": None, "source": "registry",
            "patient": _baseline_patient(db, workdir, trial_code(trial), subject_id)}


def add(trial: ir.Trial, workdir: str | Path, subject_id: str, visit: str, *, date: Optional[str] = None,
        time_: Optional[str] = None, modality: Optional[str] = None) -> list[dict]:
    """Schedule one visit of one subject by hand (one step per modality, or only ``modality``); replaces a
    cancelled step of the same visit."""
    from ..ops.expected import visit_window

    v = next((x for x in (trial.schedule.visits if trial.schedule else []) if x.name == visit), None)
    if v is None:
        names = [x.name for x in (trial.schedule.visits if trial.schedule else [])]
        raise WorklistError(f"the study's schedule has no visit {visit!r} (visits: {', '.join(names) or 'none'})", code="E870")
    mods = _visit_modalities(trial, v)
    if modality:
        if modality not in mods:
            raise WorklistError(f"visit {visit} acquires no {modality} protocol (modalities: {', '.join(mods)})", code="E870")
        mods = {modality: mods[modality]}
    db = connect_workdir(workdir)
    try:
        subj = _subject(trial, db, Path(workdir), subject_id)
        if date:
            day = _dt.date.fromisoformat(_iso(date, "--date", "schedule add"))
        elif subj.get("day0"):
            day = visit_window(v, subj["day0"])[0]
        else:
            raise WorklistError(f"subject {subject_id} has no day 0 (no enrolment, no baseline exam): give --date", code="E870")
        first = first_devices(db, trial_code(trial), subject_id) if has_same_device_rule(trial) else {}
        rows = []
        with tx(db):
            for m, prots in mods.items():
                row = _step_row(trial, subj, v, m, prots, day, first.get(m), "manual", _time(time_, "schedule add"))
                old = db.execute("SELECT status FROM scheduled_steps WHERE trial=? AND accession=?",
                                 (row["trial"], row["accession"])).fetchone()
                if old is not None and old["status"] in ACTIVE:
                    raise WorklistError(f"{subject_id} {visit} {m} is already scheduled ({row['accession']}): "
                                        f"use 'imtrial schedule move'", code="E870")
                _insert(db, row, replace=True)
                rows.append(row)
        return rows
    finally:
        db.close()


def _update(trial: ir.Trial, workdir: str | Path, accession: str, **fields: Any) -> dict:
    db = connect_workdir(workdir)
    try:
        with tx(db):
            row = db.execute("SELECT * FROM scheduled_steps WHERE trial=? AND accession=?",
                             (trial_code(trial), accession)).fetchone()
            if row is None:
                raise WorklistError(f"no scheduled step with accession number {accession!r}", code="E870")
            cols = ", ".join(f"{k}=?" for k in fields)
            db.execute(f"UPDATE scheduled_steps SET {cols}, updated=? WHERE trial=? AND accession=?",
                       (*fields.values(), time.time(), trial_code(trial), accession))
        return step(trial, workdir, accession)
    finally:
        db.close()


def move(trial: ir.Trial, workdir: str | Path, accession: str, date: str, time_: Optional[str] = None) -> dict:
    """Move an appointment (a cancelled one becomes scheduled again)."""
    return _update(trial, workdir, accession, date=_iso(date, "--date", "schedule move"),
                   time=_time(time_, "schedule move"), status="SCHEDULED")


def cancel(trial: ir.Trial, workdir: str | Path, accession: str) -> dict:
    """Cancel an appointment: the worklist no longer offers it; planning does not bring it back."""
    return _update(trial, workdir, accession, status="CANCELLED")


def set_status(trial_code_: str, workdir: str | Path, accession: str, status: str, mpps_uid: Optional[str] = None) -> bool:
    """The status a Modality Performed Procedure Step reported (IN PROGRESS / COMPLETED / DISCONTINUED)."""
    db = connect_workdir(workdir)
    try:
        with tx(db):
            cur = db.execute("UPDATE scheduled_steps SET status=?, mpps_uid=COALESCE(?, mpps_uid), updated=? "
                             "WHERE trial=? AND accession=?", (status, mpps_uid, time.time(), trial_code_, accession))
            return cur.rowcount > 0
    finally:
        db.close()


# --------------------------------------------------------------------------- reading

def _decode(row) -> dict:
    d = dict(row)
    d["protocols"] = json.loads(d["protocols"] or "[]")
    d["patient"] = json.loads(d["patient"] or "{}")
    return d


def steps(trial: ir.Trial, workdir: str | Path, *, site: Optional[str] = None, status: Optional[Iterable[str]] = None,
          db=None) -> list[dict]:
    """The study's scheduled steps (by date), optionally of one site and with given statuses."""
    own = db is None
    db = db or connect_workdir(workdir)
    try:
        q, args = "SELECT * FROM scheduled_steps WHERE trial=?", [trial_code(trial)]
        if site:
            q, args = q + " AND site=?", args + [site]
        if status:
            st = list(status)
            q, args = q + f" AND status IN ({','.join('?' * len(st))})", args + st
        return [_decode(r) for r in db.execute(q + " ORDER BY date, time, subject_id, visit, modality", args)]
    finally:
        if own:
            db.close()


def step(trial: ir.Trial, workdir: str | Path, accession: str) -> Optional[dict]:
    return next((s for s in steps(trial, workdir) if s["accession"] == accession), None)


def step_by_accession(db, trial: str, accession: str) -> Optional[dict]:
    row = db.execute("SELECT * FROM scheduled_steps WHERE trial=? AND accession=?", (trial, accession)).fetchone()
    return _decode(row) if row else None


# --------------------------------------------------------------------------- CSV

def export_csv(rows: list[dict], path: str | Path) -> int:
    """Write steps as CSV (``CSV_COLUMNS``; protocols joined with ``;``)."""
    from ..files import atomic_write_text
    import io

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for r in rows:
        pat = r.get("patient") or {}
        w.writerow([r["accession"], r["subject_id"], r["site"], r["visit"], r["modality"], ";".join(r["protocols"]),
                    r["date"], r.get("time") or "", r.get("opens") or "", r.get("closes") or "", r.get("device") or "",
                    r["status"], *[pat.get(f) or "" for f in CSV_PATIENT.values()]])
    atomic_write_text(path, buf.getvalue())
    return len(rows)


def import_csv(trial: ir.Trial, workdir: str | Path, path: str | Path) -> dict:
    """Apply a schedule CSV (as exported, edited in a spreadsheet): each row's date, time and status replace
    the step's; a row without an accession number schedules a new step. Every row is checked before any is
    written (E871 names the line)."""
    code = trial_code(trial)
    visits = {v.name: v for v in (trial.schedule.visits if trial.schedule else [])}
    planned = []
    for line, row in _csv_rows(path, "schedule", {"subject_id", "visit", "modality", "date"},
                               "(export one with 'imtrial schedule export')"):
        where = f"{path}:{line}"
        status = (row.get("status") or "SCHEDULED").upper()
        if status not in STATUSES:
            raise WorklistError(f"{where}: status must be one of {', '.join(STATUSES)}, got {status!r}", code="E871")
        v = visits.get(row["visit"])
        if v is None:
            raise WorklistError(f"{where}: the schedule has no visit {row['visit']!r}", code="E871")
        mods = _visit_modalities(trial, v)
        if row["modality"] not in mods:
            raise WorklistError(f"{where}: visit {v.name} acquires no {row['modality']} protocol", code="E871")
        acc = row.get("accession") or accession_for(code, row["subject_id"], v.name, row["modality"])
        if acc != accession_for(code, row["subject_id"], v.name, row["modality"]):
            raise WorklistError(f"{where}: accession {acc} belongs to another subject, visit or modality", code="E871")
        planned.append((row, v, mods[row["modality"]], acc, _iso(row["date"], "date", where), _time(row.get("time"), where),
                        status, where))
    db = connect_workdir(workdir)
    created = updated = 0
    try:
        with tx(db):
            for row, v, prots, acc, date, time_, status, where in planned:
                old = db.execute("SELECT 1 FROM scheduled_steps WHERE trial=? AND accession=?", (code, acc)).fetchone()
                if old is not None:
                    db.execute("UPDATE scheduled_steps SET date=?, time=?, status=?, updated=? WHERE trial=? AND accession=?",
                               (date, time_, status, time.time(), code, acc))
                    updated += 1
                    continue
                subj = next((s for s in subjects_day0(trial, db, Path(workdir)) if s["subject_id"] == row["subject_id"]), None)
                if subj is None:
                    pat = _patient_from_csv(row)
                    if not pat["PatientID"] or not row.get("site"):
                        raise WorklistError(f"{where}: new subject {row['subject_id']}: site and patient_id are required",
                                            code="E871")
                    subj = {"subject_id": row["subject_id"], "site": row["site"], "day0": None, "patient": pat}
                r = _step_row(trial, subj, v, row["modality"], prots, _dt.date.fromisoformat(date), None, "csv", time_)
                r["status"] = status
                _insert(db, r)
                created += 1
    finally:
        db.close()
    return {"created": created, "updated": updated}
