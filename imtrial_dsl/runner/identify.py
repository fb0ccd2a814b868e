"""Step 2, identify: research subject IDs from a persistent registry, site from the device inventory,
visit/time point from the schedule.

Registry design (site-side, in ``W/state.sqlite``):

* lookup key = ``hmac:`` + HMAC-SHA256(key, trial ␀ issuer ␀ attr=value…) with the ``identifiers`` key, or,
  when the study names none, with a key derived from the de-identification key; the trial code is inside
  the MAC, so one person in two trials gets two unlinkable keys and two independently numbered subject IDs.
  Only a study with neither key gets ``plain:`` + the identifier (the checker warns, W440).
* ``identity_audit`` records which source identifiers each subject was seen with — as keyed hashes
  (``hmac:…``, per attribute), unless the study asks for a re-identification log
  (``identifiers { reidentification_log yes }``): then the plain values, site-side only. It is never read for
  lookups; :meth:`imtrial_dsl.store.Store.purge_audit_map` drops it (and the de-identification map).
* The keys' keyed fingerprints are recorded at first use and compared before anything is written: a run
  with another key is refused (E704) instead of silently creating new subjects.
* Assignment runs inside one ``BEGIN IMMEDIATE`` transaction, so concurrent runs cannot hand out a
  sequence number twice.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import hmac
import json
import os
import re
import sqlite3
import time
from pathlib import Path
from typing import Any, Optional

from ..diagnostics import ImtrialError
from ..deid import subject_date_shift
from ..secrets import SecretError, key_fingerprint, read_key
from ..worklist.claim import claim as worklist_claim, visit_of as worklist_visit

# ----------------------------------------------------------------------------- check digits

_ALNUM = re.compile(r"[0-9A-Za-z]")


def _digits(body: str) -> str:
    """Letters become their ISO 7064 / IBAN values (A=10 … Z=35); separators are ignored."""
    return "".join(str(int(c, 36)) for c in body if _ALNUM.match(c))


def mod97(body: str) -> str:
    """ISO 7064 MOD 97-10 (as in IBAN): two check digits making ``body+check`` ≡ 1 (mod 97)."""
    n = int(_digits(body) or "0")
    return f"{98 - (n * 100) % 97:02d}"


def luhn(body: str) -> str:
    """Luhn (mod 10) check digit over the digit string."""
    total = 0
    for i, ch in enumerate(reversed(_digits(body))):
        d = int(ch)
        if i % 2 == 0:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return str((10 - total % 10) % 10)


def iso7064_mod11_2(body: str) -> str:
    """ISO 7064 MOD 11-2 (as in ORCID/ISNI): one check character, 0-9 or X."""
    total = 0
    for ch in _digits(body):
        total = (total + int(ch)) * 2
    r = (12 - total % 11) % 11
    return "X" if r == 10 else str(r)


CHECKS = {"mod97": mod97, "luhn": luhn, "iso7064": iso7064_mod11_2, "mod11": iso7064_mod11_2}


def check_digit(body: str, algorithm: str) -> str:
    try:
        return CHECKS[algorithm](body)
    except KeyError:
        raise ValueError(f"unknown check digit algorithm {algorithm!r}; known: {', '.join(sorted(CHECKS))}") from None


def verify_check(subject_id: str, algorithm: str) -> bool:
    """True when the trailing check digit(s) of ``subject_id`` are right."""
    width = 2 if algorithm == "mod97" else 1
    return check_digit(subject_id[:-width], algorithm) == subject_id[-width:]


def format_subject_id(fmt: str, *, site: str, seq: int, study: str = "", algorithm: Optional[str] = None) -> str:
    """Fill ``{site}``, ``{seq:04}``, ``{study}``; ``{check}`` is computed over everything written before it."""
    head, sep, tail = fmt.partition("{check}")
    text = head.format(site=site, seq=seq, study=study)
    if sep:
        if not algorithm:
            algorithm = "mod97"
        text += check_digit(text, algorithm) + tail.format(site=site, seq=seq, study=study)
    return text


# ----------------------------------------------------------------------------- keys and lookup keys

class IdentifyError(ImtrialError):
    """A problem that stops identification of one exam (reported, never silently skipped).

    ``reason`` is the word the state database and step summaries record (``key_missing``,
    ``no_source_identifier``, ``no_exam_date``, ``unmatched``), ``detail`` the sentence; the
    diagnostic's code (E811–E814) names the reason for the CLI.
    """

    CODES = {"key_missing": "E811", "no_source_identifier": "E812", "no_exam_date": "E813", "unmatched": "E814",
             "worklist_mismatch": "E873"}

    def __init__(self, reason: str, detail: str):
        self.reason, self.detail = reason, detail
        super().__init__(detail, code=self.CODES[reason])


def lookup_key(trial) -> Optional[bytes]:
    """The registry's key: the ``identifiers`` key, else one derived from the de-identification key (None when the
    study names neither). IdentifyError ``key_missing`` when a named key is unavailable or too weak."""
    code = trial.study.code if trial.study else "TRIAL"
    source = trial.identifiers.key if trial.identifiers else None
    try:
        if source is not None:
            return read_key(source, study_file=trial.source_file, what="identifiers key")
        if trial.deidentify is not None and trial.deidentify.key is not None:
            from ..deid import resolve_key

            base = resolve_key(trial)
            return hmac.new(base, b"imtrial registry key\x00" + code.encode(), hashlib.sha256).digest()
    except SecretError as err:
        raise IdentifyError("key_missing", err.diagnostic.message) from None
    return None


def source_key(trial_code: str, values: dict[str, Optional[str]], issuer: Optional[str], key: Optional[bytes]) -> str:
    parts = [trial_code, issuer or ""] + [f"{k}={values.get(k) or ''}" for k in sorted(values)]
    msg = "\x00".join(parts).encode()
    if key:
        return "hmac:" + hmac.new(key, msg, hashlib.sha256).hexdigest()
    return "plain:" + "\x00".join(parts[1:])


def audit_value(trial_code: str, attr: str, value: str, issuer: str, key: Optional[bytes], plain: bool) -> str:
    """What ``identity_audit`` records for one source identifier: the value itself only in a re-identification log
    (or when the study has no key at all), else its keyed hash."""
    if plain or not key:
        return value
    msg = "\x00".join(["identity-audit", trial_code, issuer, attr, value]).encode()
    return "hmac:" + hmac.new(key, msg, hashlib.sha256).hexdigest()


def check_keys(trial, db: sqlite3.Connection, *, record: bool = True) -> None:
    """Refuse keys other than those this registry first saw (KeyMismatchError, E704); record them at first use."""
    from ..store import check_key_fingerprint

    code = trial.study.code if trial.study else "TRIAL"
    ids = trial.identifiers.key if trial.identifiers else None
    if ids is not None:
        key = read_key(ids, study_file=trial.source_file, what="identifiers key")
        check_key_fingerprint(db, code, "identifiers", key_fingerprint(key, "identifiers", code), record=record,
                              source=ids)
    if trial.deidentify is not None and trial.deidentify.key is not None:
        from ..deid import resolve_key

        key = resolve_key(trial)
        check_key_fingerprint(db, code, "deidentify", key_fingerprint(key, "deidentify", code), record=record,
                              source=trial.deidentify.key)


def find_subject(trial, db: sqlite3.Connection, values: dict[str, str], issuer: str = "") -> Optional[str]:
    """The subject ID registered for a person's source identifiers (``{"PatientID": "MRN-1"}``), or None: the
    site-side way back from an identifier to a subject, which needs the study's key."""
    code = trial.study.code if trial.study else "TRIAL"
    row = db.execute("SELECT subject_id FROM subjects WHERE trial=? AND source_key=?",
                     (code, source_key(code, values, issuer, lookup_key(trial)))).fetchone()
    return row["subject_id"] if row else None


# ----------------------------------------------------------------------------- devices

def match_device(trial, device: dict) -> tuple[Optional[Any], Optional[Any], str]:
    """(site, device, how) from the inventory: by serial, then station, then vendor+model when unique."""
    from ..vendors import normalize_vendor

    pairs = trial.devices()
    serial = (device.get("serial") or "").strip()
    station = (device.get("station") or "").strip()
    if serial:
        hits = [(s, d) for s, d in pairs if d.serial and d.serial.strip() == serial]
        if hits:
            return hits[0][0], hits[0][1], "serial"
    if station:
        hits = [(s, d) for s, d in pairs if d.station and d.station.strip().lower() == station.lower()]
        if len(hits) == 1:
            return hits[0][0], hits[0][1], "station"
    vendor = normalize_vendor(device.get("manufacturer"))
    model = (device.get("model") or "").strip().lower()
    if vendor and model:
        hits = [(s, d) for s, d in pairs if d.vendor == vendor and (d.model or "").strip().lower() == model]
        if len(hits) == 1:
            return hits[0][0], hits[0][1], "model"
    return None, None, "none"


# ----------------------------------------------------------------------------- visits

def parse_date(text: Optional[str]) -> Optional[_dt.date]:
    if not text:
        return None
    text = str(text).strip().replace("-", "")[:8]
    try:
        return _dt.date(int(text[:4]), int(text[4:6]), int(text[6:8]))
    except ValueError:
        return None


def _window(v) -> tuple[float, float]:
    lo = v.offset.days - (abs(v.window_before.days) if v.window_before else 0)
    hi = v.offset.days + (abs(v.window_after.days) if v.window_after else 0)
    return lo, hi


def protocols_present(trial, series: list[dict]) -> set[str]:
    """Protocols whose SeriesDescription/modality rules a series obviously meets (a hint for screening
    vs baseline; the classify step does the real classification later)."""
    found = set()
    for p in trial.protocols:
        rules = [r for r in p.match if r.attribute in ("SeriesDescription",)]
        for s in series:
            if s.get("modality") and p.modality and s["modality"] != p.modality:
                continue
            desc = s.get("description") or ""
            ok = bool(rules)
            for r in rules:
                op = getattr(r.op, "value", r.op)
                try:
                    if op == "matches":
                        ok = ok and re.search(r.value, desc) is not None
                    elif op == "not_matches":
                        ok = ok and re.search(r.value, desc) is None
                    elif op == "equals":
                        ok = ok and desc == r.value
                    else:
                        ok = ok and r.value in desc
                except re.error:
                    ok = False
            if ok:
                found.add(p.name)
    return found


def assign_visit(trial, exam_date: _dt.date, prior: list[dict], present: set[str],
                 later: Optional[list[_dt.date]] = None) -> dict:
    """Visit of one exam given the subject's earlier exams (``[{date, visit, visit_kind}]``).

    First exam: baseline, unless the study has a screening visit — then screening, except when the exam
    holds a protocol the baseline acquires and screening does not, or when the subject's next known exam
    (``later``: dates of exams waiting in the same run) is as far away as a follow-up from a baseline and
    not as close as a baseline from a screening. Later exams: relative to the baseline
    date (or to screening − its offset while no baseline exists), the visit whose window contains the date;
    none → the nearest visit, flagged out of window.
    """
    sched = trial.schedule
    # an exam is placed by its date on the calendar visits; an event-driven visit is assigned by an operator
    # (imtrial assign --visit), who knows the event
    visits = [v for v in sched.visits if v.scheduled()] if sched else []
    if not visits:
        return {"visit": "baseline" if not prior else "unscheduled", "visit_kind": "baseline" if not prior else "unscheduled",
                "days_from_baseline": None, "in_window": True, "anchor": exam_date if not prior else None, "visit_obj": None}
    screening = next((v for v in visits if v.kind == "screening"), None)
    baseline = next((v for v in visits if v.kind == "baseline"), None) or \
        next((v for v in visits if v.offset.days == 0 and v.kind != "screening"), None) or \
        next(v for v in visits if v.kind != "screening")
    followups = [v for v in visits if v is not screening and v is not baseline]

    same_day = [p for p in prior if p["date"] == exam_date and p.get("visit")]
    if same_day:
        v = next((x for x in visits if x.name == same_day[0]["visit"]), None)
        return {"visit": same_day[0]["visit"], "visit_kind": same_day[0].get("visit_kind"),
                "days_from_baseline": same_day[0].get("days_from_baseline"), "in_window": same_day[0].get("in_window", True),
                "anchor": None, "visit_obj": v, "same_day": True}

    base_prior = [p for p in prior if p.get("visit") == baseline.name]
    scr_prior = [p for p in prior if screening is not None and p.get("visit") == screening.name]
    if base_prior:
        anchor = min(p["date"] for p in base_prior)
    elif scr_prior:
        anchor = min(p["date"] for p in scr_prior) - _dt.timedelta(days=screening.offset.days)
    else:
        anchor = None

    if anchor is None and not prior:
        if screening is not None:
            only_baseline = {r.name for r in baseline.acquire} - {r.name for r in screening.acquire}
            if not (present & only_baseline) and not _looks_like_baseline(exam_date, later, screening, baseline, followups):
                return _result(screening, screening.offset.days, True, exam_date - _dt.timedelta(days=screening.offset.days))
        return _result(baseline, 0.0, True, exam_date)
    if anchor is None:  # earlier exams exist but none is screening/baseline: the earliest anchors the schedule
        anchor = min(p["date"] for p in prior)
    days = float((exam_date - anchor).days)
    if not base_prior:
        lo, hi = _window(baseline)
        if days < (_window(screening)[1] if screening else lo) and screening is not None and not scr_prior:
            return _result(screening, days, _window(screening)[0] <= days <= _window(screening)[1], None)
        if not followups or days <= hi or not any(_window(v)[0] <= days <= _window(v)[1] for v in followups):
            res = _result(baseline, 0.0, True, exam_date)  # the baseline is day 0 by definition
            if scr_prior:  # now the screening exams can be judged against their window
                res["retro"] = [{"date": p["date"], "visit": screening.name,
                                 "days": float((p["date"] - exam_date).days),
                                 "in_window": _window(screening)[0] <= (p["date"] - exam_date).days <= _window(screening)[1]}
                                for p in scr_prior]
            return res
    cands = [(abs(days - v.offset.days), v) for v in followups if _window(v)[0] <= days <= _window(v)[1]]
    if cands:
        return _result(min(cands, key=lambda c: c[0])[1], days, True, None)
    pool = followups or [baseline]
    nearest = min(pool, key=lambda v: abs(days - v.offset.days))
    return _result(nearest, days, False, None)


def _looks_like_baseline(exam_date: _dt.date, later: Optional[list[_dt.date]], screening, baseline, followups) -> bool:
    """The next exam's distance fits baseline→follow-up but not screening→baseline."""
    nxt = sorted(d for d in (later or []) if d > exam_date)
    if not nxt:
        return False
    gap = (nxt[0] - exam_date).days
    s_lo, s_hi = _window(screening)
    b_lo, b_hi = _window(baseline)
    fits_screening = (b_lo - s_hi) <= gap <= (b_hi - s_lo)  # baseline date minus screening date
    fits_followup = any(_window(v)[0] <= gap <= _window(v)[1] for v in followups)
    return fits_followup and not fits_screening


def _result(v, days, in_window, anchor) -> dict:
    return {"visit": v.name, "visit_kind": v.kind, "days_from_baseline": days, "in_window": bool(in_window),
            "anchor": anchor, "visit_obj": v}


def timepoint_description(v, days) -> str:
    if v is None:
        return "unscheduled"
    unit = v.offset.source_unit or "day"
    return f"{v.kind} visit {v.name} (target {unit} {v.offset.source_value:g})"


# ----------------------------------------------------------------------------- registry

def connect_registry(registry: str | Path) -> sqlite3.Connection:
    """An autocommit connection to the registry file (a state database; every table created when new)."""
    from ..store import connect

    return connect(registry)


def shifted_date(trial, subject_id: str, exam_date: Optional[_dt.date]) -> Optional[str]:
    """The exam date as the de-identified data will show it (the de-identification step owns the shift)."""
    if exam_date is None:
        return None
    try:
        shift = subject_date_shift(trial, subject_id)
    except SecretError:  # a missing key is reported by the deidentify step itself
        return None
    if shift is None:  # dates kept as they are (full dates retained) or not kept at all
        opts = {getattr(o, "value", o) for o in (trial.deidentify.options if trial.deidentify else [])}
        return exam_date.strftime("%Y%m%d") if "retain_longitudinal_full_dates" in opts else None
    return (exam_date + _dt.timedelta(days=int(shift))).strftime("%Y%m%d")


UNASSIGNED = "unassigned"   # the visit of an exam whose dates are unusable, until ``imtrial assign``
HELD_REASONS = ("no_source_identifier", "unmatched")   # identify errors an operator resolves with imtrial assign


def _usable(value: Any) -> bool:
    if isinstance(value, list):
        return any(_usable(v) for v in value)
    return value is not None and str(value).strip() != ""


def identifier_problem(attrs: list[str], patient: dict) -> str:
    """Why no source identifier is usable, naming present-but-empty ones as such:
    'PatientID is empty', 'PatientID is not present', 'PatientID is empty; OtherPatientIDs is not present'."""
    empty = [a for a in attrs if a in patient and patient[a] is not None]
    absent = [a for a in attrs if a not in empty]

    def said(names: list[str], what: str) -> str:
        return f"{' and '.join(names)} {'is' if len(names) == 1 else 'are'} {what}"

    return "; ".join([said(empty, "empty")] * bool(empty) + [said(absent, "not present")] * bool(absent))


def resolve_hint(exam_key: str, reason: str) -> str:
    """The command that resolves a held or unassigned exam."""
    if reason == "no_source_identifier":
        return f"imtrial assign {exam_key} --subject SUBJECT_ID (or --subject new [--site SITE])"
    if reason == "unmatched":
        return f"imtrial assign {exam_key} --subject SUBJECT_ID (or --subject new --site SITE)"
    return f"imtrial assign {exam_key} --date YYYY-MM-DD (or --visit VISIT)"


def _visit_named(trial, name: str, exam_date: Optional[_dt.date], anchor: Optional[_dt.date]) -> dict:
    """An operator-assigned visit; its day and window when the exam date and the subject's baseline are known."""
    visits = list(trial.schedule.visits) if trial.schedule else []
    v = next((x for x in visits if x.name == name), None)
    days = float((exam_date - anchor).days) if exam_date and anchor else (0.0 if v is not None and v.kind == "baseline" else None)
    in_window = (_window(v)[0] <= days <= _window(v)[1]) if v is not None and days is not None else None
    return {"visit": name, "visit_kind": v.kind if v is not None else "unscheduled", "days_from_baseline": days,
            "in_window": in_window, "visit_obj": v,
            "anchor": exam_date if v is not None and v.kind == "baseline" and exam_date else None}


def identify_exam(trial, exam: dict, db: sqlite3.Connection, *, exam_key: Optional[str] = None,
                  later: Optional[list[_dt.date]] = None, assigned: Optional[dict[str, str]] = None) -> dict:
    """Assign subject, site, device, visit for one exam (exam.json content); writes the registry.

    Returns the identity (no original identifiers) plus ``exam_date`` (real, site-side) and ``warnings``.
    ``assigned``: an operator's decisions (``imtrial assign``: subject, site, visit, date) that take the
    place of what the header cannot give. An exam whose dates are unusable is identified with visit
    ``unassigned`` and an ``unassigned_visit`` warning. Raises :class:`IdentifyError` for an exam that
    cannot be identified (it is held until an assignment resolves it).
    """
    ids = trial.identifiers
    code = trial.study.code if trial.study else "TRIAL"
    attrs = list(ids.source) if ids and ids.source else ["PatientID"]
    issuer_attr = ids.issuer if ids else "IssuerOfPatientID"
    patient = exam.get("patient", {})
    values = {a: (str(patient.get(a)) if _usable(patient.get(a)) else None) for a in attrs}
    assigned = dict(assigned or {})
    if not any(values.values()) and "subject" not in assigned:
        raise IdentifyError("no_source_identifier", identifier_problem(attrs, patient))
    issuer = str(patient.get(issuer_attr) or "") if issuer_attr else ""
    key = lookup_key(trial)
    try:
        check_keys(trial, db)                   # a different key is refused before anything is written
    except SecretError as err:
        if err.code != "E704":
            raise IdentifyError("key_missing", err.diagnostic.message) from None
        raise
    skey = source_key(code, values, issuer, key)
    plain_log = bool(ids and ids.reidentification_log)
    exam_key = exam_key or exam["exam_key"]
    warnings: list[dict] = []

    site, device, how = match_device(trial, exam.get("device", {}))
    if assigned.get("site"):
        site = trial.site(assigned["site"]) or site
    dev = exam.get("device", {})
    if device is None:
        # serial/station stay in the site-side exam.json: identity.json carries no original identifiers
        warnings.append({"code": "unknown_device", "detail": "device not in the inventory: " + ", ".join(
            f"{k}={dev.get(k)}" for k in ("manufacturer", "model") if dev.get(k))})
    if exam.get("study_split"):
        warnings.append({"code": "study_split", "detail": f"the study's instances name {exam['study_split']} different "
                                                          "patients (or some none): split into one exam per patient"})
    if exam.get("devices_differ"):
        warnings.append({"code": "multiple_devices", "detail": "the study's instances report more than one device; "
                                                               "the first series' device was used"})
    exam_date = parse_date(assigned.get("date")) or parse_date(exam.get("study_date"))
    if exam_date is None and not assigned.get("visit"):
        raw = str(exam.get("study_date") or "").strip()
        warnings.append({"code": "unassigned_visit", "detail": (
            f"no usable exam date (StudyDate {raw!r} is not a date)" if raw else
            "no usable exam date (StudyDate, SeriesDate, AcquisitionDate and ContentDate are empty)")
            + f": visit {UNASSIGNED}; resolve with " + resolve_hint(exam_key, "no_exam_date")})
    present = protocols_present(trial, exam.get("series", []))

    db.execute("BEGIN IMMEDIATE")
    try:
        if "subject" in assigned:  # an operator's decision (imtrial assign) names the subject
            row, claimed = _assigned_subject(db, trial, code, assigned["subject"], site, exam_key), None
        else:
            row = db.execute("SELECT * FROM subjects WHERE trial=? AND source_key=?", (code, skey)).fetchone()
            # research attributes from the worklist decide subject and visit, checked against the registry
            claimed = worklist_claim(db, trial, exam | {"exam_key": exam_key}, code, skey, row)
            if claimed is not None:
                row = claimed.row
        if row is not None:
            skey = row["source_key"]
        if row is None:
            if site is None:
                if len(trial.sites) == 1:
                    site = trial.sites[0]
                else:
                    raise IdentifyError("unmatched", "unknown device and unknown subject: no site can be assigned")
            subject_id = _enrol(db, trial, code, skey, site)
            subject_site = site.code
        else:
            subject_id, subject_site = row["subject_id"], row["site"]
            if site is None:
                site = trial.site(subject_site)
            elif site.code != subject_site:
                warnings.append({"code": "site_change", "detail": f"subject enrolled at {subject_site}, exam at {site.code}"})
        for attr, val in values.items():
            if val is not None:
                db.execute("INSERT OR IGNORE INTO identity_audit(trial, subject_id, source_attr, source_value, issuer, "
                           "exam_key, recorded) VALUES (?, ?, ?, ?, ?, ?, ?)",
                           (code, subject_id, attr, audit_value(code, attr, val, issuer, key, plain_log),
                            issuer if plain_log or not key else "", exam_key, time.time()))
        prior_rows = db.execute("SELECT exam_key, exam_date, visit, visit_kind, days_from_baseline, in_window, device "
                                "FROM exams WHERE trial=? AND subject_id=? AND exam_key != ? AND visit IS NOT NULL",
                                (code, subject_id, exam_key)).fetchall()
        prior = [{"date": parse_date(r["exam_date"]), "visit": r["visit"], "visit_kind": r["visit_kind"],
                  "days_from_baseline": r["days_from_baseline"], "in_window": bool(r["in_window"]), "device": r["device"]}
                 for r in prior_rows if parse_date(r["exam_date"])]
        if assigned.get("visit"):  # the operator's visit; its day counts from the subject's baseline exam
            base = min((p["date"] for p in prior if p.get("visit_kind") == "baseline"), default=None)
            v = _visit_named(trial, assigned["visit"], exam_date, base)
        elif exam_date is None:
            v = {"visit": UNASSIGNED, "visit_kind": UNASSIGNED, "days_from_baseline": None, "in_window": None,
                 "anchor": None, "visit_obj": None}
        else:
            v = assign_visit(trial, exam_date, prior, present, later)
        if claimed is not None and not assigned.get("visit"):
            v = worklist_visit(trial, claimed, v, exam_date)
            if v.get("worklist_warning"):
                warnings.append(v["worklist_warning"])
        if v["anchor"] is not None and v["visit_kind"] == "baseline":
            db.execute("UPDATE subjects SET baseline_date=? WHERE trial=? AND source_key=?",
                       (v["anchor"].strftime("%Y%m%d"), code, skey))
        for r in v.get("retro", []):  # screening exams judged against the baseline that now exists
            rows = db.execute("SELECT exam_key, warnings FROM exams WHERE trial=? AND subject_id=? AND exam_date=? AND visit=?",
                              (code, subject_id, r["date"].strftime("%Y%m%d"), r["visit"])).fetchall()
            for row in rows:
                ws = [w for w in json.loads(row["warnings"] or "[]") if w.get("code") != "out_of_window"]
                if not r["in_window"]:
                    ws.append({"code": "out_of_window", "detail": f"{r['visit']}: day {r['days']:g} relative to the "
                                                                  f"baseline is outside the window"})
                db.execute("UPDATE exams SET days_from_baseline=?, in_window=?, warnings=? WHERE exam_key=?",
                           (r["days"], int(r["in_window"]), json.dumps(ws), row["exam_key"]))
        if v["in_window"] is False:
            warnings.append({"code": "out_of_window", "detail": f"{v['visit']}: day {v['days_from_baseline']:g} is outside the window"})
        # software upgrades and the same-device rule are the adherence step's findings; the rule compares
        # devices of one modality (a same-day MR and CT are no device change), so each exam is recorded
        # once per modality it holds, and the identity carries the earlier exams' devices per modality
        modalities = sorted({str(x.get("modality") or "") for x in exam.get("series", [])} - {""})
        day = exam_date.strftime("%Y%m%d") if exam_date else None
        db.execute("DELETE FROM subject_exams WHERE trial=? AND exam_key=?", (code, exam_key))
        for m in modalities:
            db.execute("INSERT INTO subject_exams(trial, subject_id, exam_key, exam_date, visit, modality, device) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?)", (code, subject_id, exam_key, day, v["visit"], m,
                                                        device.id if device else None))
        prior_devices: dict[str, list[str]] = {}
        # an exam without a date is compared with every other exam of the subject
        for r in db.execute("SELECT modality, device FROM subject_exams WHERE trial=? AND subject_id=? AND exam_key != ? "
                            "AND (? IS NULL OR exam_date <= ?) AND device IS NOT NULL ORDER BY modality, device",
                            (code, subject_id, exam_key, day, day)):
            if r["modality"] in modalities and r["device"] not in prior_devices.setdefault(r["modality"], []):
                prior_devices[r["modality"]].append(r["device"])
        now = time.time()
        db.execute("INSERT OR IGNORE INTO exams(exam_key, created, updated) VALUES (?, ?, ?)", (exam_key, now, now))
        db.execute("UPDATE exams SET study_uid=?, trial=?, subject_id=?, site=?, device=?, visit=?, visit_kind=?, "
                   "exam_date=?, days_from_baseline=?, in_window=?, warnings=?, updated=? WHERE exam_key=?",
                   (exam.get("study_uid"), code, subject_id, subject_site,
                    device.id if device else None, v["visit"], v["visit_kind"], day,
                    v["days_from_baseline"], None if v["in_window"] is None else int(v["in_window"]),
                    json.dumps(warnings), now, exam_key))
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    # the subject's site is where it was enrolled; an exam elsewhere keeps it (and says where it was acquired)
    site_obj = trial.site(subject_site)
    identity = {
        "trial": code, "subject_id": subject_id, "site": site_obj.code if site_obj else subject_site,
        "site_name": site_obj.name if site_obj else None, "exam_site": site.code if site else None,
        "device": device.id if device else None,
        "device_match": how, "visit": v["visit"], "visit_kind": v["visit_kind"], "timepoint": v["visit"],
        "timepoint_description": (f"{UNASSIGNED} (no usable exam date)" if v["visit"] == UNASSIGNED
                                   else timepoint_description(v["visit_obj"], v["days_from_baseline"])),
        "days_from_baseline": v["days_from_baseline"], "in_window": v["in_window"],
        "shifted_date": shifted_date(trial, subject_id, exam_date), "exam_key": exam_key,
        "modalities": modalities, "prior_devices": prior_devices, "warnings": warnings,
    }
    if assigned:  # what an operator decided (who and when stay in the site's exam_assignments table)
        identity["assigned"] = {k: assigned[k] for k in sorted(assigned)}
    if claimed is not None:
        identity["identified_by"] = "worklist"
    return {"identity": identity, "exam_date": day}


def _assigned_subject(db: sqlite3.Connection, trial, code: str, subject: str, site, exam_key: str):
    """The registry row of an operator-assigned subject: an existing subject ID, or ``new`` — a subject
    enrolled now at ``site`` under a lookup key no header can produce (a later exam with an identifier
    gets its own subject unless it is assigned too)."""
    if subject != "new":
        row = db.execute("SELECT * FROM subjects WHERE trial=? AND subject_id=?", (code, subject)).fetchone()
        if row is None:
            raise IdentifyError("unmatched", f"assigned subject {subject} is not in the registry")
        return row
    if site is None:
        if len(trial.sites) != 1:
            raise IdentifyError("unmatched", "a new subject needs a site: the device is unknown (assign --site)")
        site = trial.sites[0]
    skey = f"assigned:{exam_key}"
    row = db.execute("SELECT * FROM subjects WHERE trial=? AND source_key=?", (code, skey)).fetchone()
    if row is not None:
        return row
    _enrol(db, trial, code, skey, site)
    return db.execute("SELECT * FROM subjects WHERE trial=? AND source_key=?", (code, skey)).fetchone()


def _enrol(db: sqlite3.Connection, trial, code: str, skey: str, site) -> str:
    """A new subject at ``site`` under lookup key ``skey`` (inside the caller's transaction); its subject ID."""
    ids = trial.identifiers
    seq_row = db.execute("SELECT next_seq FROM subject_seq WHERE trial=? AND site=?", (code, site.code)).fetchone()
    seq = seq_row["next_seq"] if seq_row else 1
    fmt = ids.subject_format if ids else f"{code}-{{site}}-{{seq:04}}"
    subject_id = format_subject_id(fmt, site=site.code, seq=seq, study=code, algorithm=ids.check_digit if ids else None)
    db.execute("INSERT OR REPLACE INTO subject_seq(trial, site, next_seq) VALUES (?, ?, ?)", (code, site.code, seq + 1))
    db.execute("INSERT INTO subjects(trial, source_key, subject_id, site, seq, created) VALUES (?, ?, ?, ?, ?, ?)",
               (code, skey, subject_id, site.code, seq, time.time()))
    return subject_id


def later_exam_dates(trial, exams: list[dict]) -> dict[str, list[_dt.date]]:
    """exam_key -> dates of the same person's other exams in this batch (matched on the source identifiers)."""
    ids = trial.identifiers
    attrs = list(ids.source) if ids and ids.source else ["PatientID"]
    issuer_attr = ids.issuer if ids else "IssuerOfPatientID"
    groups: dict[tuple, list[tuple[str, Optional[_dt.date]]]] = {}
    for e in exams:
        pat = e.get("patient", {})
        key = tuple(str(pat.get(a) or "") for a in attrs) + (str(pat.get(issuer_attr) or "") if issuer_attr else "",)
        if any(key[:-1]):
            groups.setdefault(key, []).append((e["exam_key"], parse_date(e.get("study_date"))))
    out: dict[str, list[_dt.date]] = {}
    for members in groups.values():
        for k, _ in members:
            out[k] = [d for kk, d in members if kk != k and d is not None]
    return out


def unmatched_identity(trial, exam: dict, error: IdentifyError, exam_key: Optional[str] = None) -> dict:
    """The identity of an exam identify could not place: every later step is skipped with its reason. A
    ``held`` exam (no usable source identifier, no site) waits for ``imtrial assign``."""
    code = trial.study.code if trial.study else "TRIAL"
    key = exam_key or exam.get("exam_key")
    ident = {"trial": code, "subject_id": None, "site": None, "site_name": None, "device": None, "visit": None,
             "visit_kind": None, "timepoint": None, "timepoint_description": None, "days_from_baseline": None,
             "in_window": None, "shifted_date": None, "exam_key": key,
             "warnings": [{"code": error.reason, "detail": error.detail}],
             "skipped": f"not identified ({error.reason}): {error.detail}"}
    if error.reason in HELD_REASONS:
        hint = resolve_hint(key, error.reason)
        ident["held"] = {"reason": error.reason, "detail": error.detail, "resolve": hint}
        ident["warnings"][0]["detail"] = f"{error.detail}; resolve with {hint}"
        ident["skipped"] = f"held ({error.reason}): {error.detail}"
    return ident


def identify_step(ctx) -> dict:
    """The ``identify`` step: one exam's subject, site, device and visit, through the shared registry.

    An exam that cannot be identified (no usable source identifier, unknown person at an unknown device …)
    gets an identity that says why and is held; every later step of that exam is skipped, with that reason,
    until ``imtrial assign`` records what the header could not say (read here from the registry)."""
    from ..workdir import IDENTITY

    exam = ctx.exam_info
    later = later_exam_dates(ctx.trial, ctx.batch).get(ctx.key) if ctx.batch else None
    assigned = {f: r["value"] for f, r in ctx.store.assignments(ctx.key).items()}
    try:
        res = identify_exam(ctx.trial, exam, ctx.store.db, exam_key=ctx.key, later=later, assigned=assigned)
    except IdentifyError as err:
        identity = unmatched_identity(ctx.trial, exam, err, ctx.key)
        ctx.write_json(IDENTITY, identity)
        return {"identified": False, "error": err.reason, "detail": err.detail}
    ctx.write_json(IDENTITY, res["identity"])
    return {"identified": True, **{k: res["identity"][k] for k in ("subject_id", "site", "visit", "in_window")}}
