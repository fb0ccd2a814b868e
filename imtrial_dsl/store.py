"""The one owner of SQLite: every table's schema and every connection to ``W/state.sqlite``.

One file per workdir holds the pipeline state (files, exams, series, steps, runs, measurements),
the site-side identity registry (subjects, their exams, re-identification maps), the operations
tables (notifications, qualification decisions, upgrades) and the transfer ledger. Other modules
query their own tables, but they open connections only through :func:`connect`, so the schema
and the connection settings (WAL, busy timeout, durable commits) are the same for everybody.

Every write runs in a short immediate transaction (:func:`tx`), so a process killed at any point
leaves the database consistent; the runner re-derives whatever was not recorded yet.
"""
from __future__ import annotations

import hmac
import json
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

from .diagnostics import ImtrialError
from .workdir import Workdir

SCHEMA_VERSION = 2

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);

-- ---------------------------------------------------------------- pipeline state
-- every distinct inbox file content (sha256) and what became of it
CREATE TABLE IF NOT EXISTS files (
  sha256 TEXT PRIMARY KEY, size INTEGER, status TEXT NOT NULL,      -- ingested | quarantined
  exam_key TEXT, series_uid TEXT, sop_uid TEXT, stored_path TEXT,   -- relative to the workdir
  reason TEXT, header TEXT, first_inbox TEXT, first_path TEXT, first_seen REAL);
-- every inbox path seen (a duplicate path points at the same sha256); size+mtime tell a changed file
-- rel_path: the path's bytes as text, losslessly (runner/ingest.py:path_text: non-UTF-8 bytes as backslash-x-HH)
CREATE TABLE IF NOT EXISTS file_sources (
  inbox TEXT NOT NULL, rel_path TEXT NOT NULL, sha256 TEXT NOT NULL, size INTEGER, mtime_ns INTEGER, seen REAL,
  ctime_ns INTEGER,
  PRIMARY KEY (inbox, rel_path, sha256));
-- inbox entries the last look at an inbox did not read (FIFOs, dangling links, loops ...), with the reason
CREATE TABLE IF NOT EXISTS inbox_skipped (
  inbox TEXT NOT NULL, rel_path TEXT NOT NULL, reason TEXT NOT NULL, detail TEXT, seen REAL,
  PRIMARY KEY (inbox, rel_path));
CREATE TABLE IF NOT EXISTS exams (
  exam_key TEXT PRIMARY KEY, study_uid TEXT, trial TEXT, subject_id TEXT, site TEXT, device TEXT,
  visit TEXT, visit_kind TEXT, exam_date TEXT, shifted_date TEXT, days_from_baseline REAL,
  in_window INTEGER, status TEXT NOT NULL DEFAULT 'pending',        -- pending | done | failed | held | unmatched
  n_series INTEGER DEFAULT 0, n_instances INTEGER DEFAULT 0, warnings TEXT DEFAULT '[]',
  generation INTEGER DEFAULT 0, created REAL, updated REAL);
CREATE TABLE IF NOT EXISTS series (
  exam_key TEXT NOT NULL, series_uid TEXT NOT NULL, series_number INTEGER, description TEXT,
  modality TEXT, n_instances INTEGER, protocol TEXT, classification TEXT, adherence TEXT, qc TEXT,
  original_series_uid TEXT,  -- site-side; series_uid is the de-identified UID once deidentify ran
  PRIMARY KEY (exam_key, series_uid));
-- one row per node of the compiled graph per exam (node ids as in imtrial_dsl.graph: "classify",
-- "qc:snr", "analysis:hipvol"); fingerprint = what the node's result was computed from
CREATE TABLE IF NOT EXISTS steps (
  exam_key TEXT NOT NULL, step TEXT NOT NULL, status TEXT NOT NULL,  -- done | failed
  generation INTEGER DEFAULT 0, started REAL, finished REAL, detail TEXT, fingerprint TEXT,
  PRIMARY KEY (exam_key, step));
CREATE TABLE IF NOT EXISTS measurements (
  exam_key TEXT NOT NULL, subject TEXT, visit TEXT, site TEXT, protocol TEXT, analysis TEXT NOT NULL,
  measurement TEXT NOT NULL, value REAL, unit TEXT, series_uid TEXT, recorded REAL,
  PRIMARY KEY (exam_key, analysis, measurement));
CREATE TABLE IF NOT EXISTS runs (
  id INTEGER PRIMARY KEY AUTOINCREMENT, started REAL, finished REAL, study TEXT, study_sha256 TEXT,
  inbox TEXT, summary TEXT);
-- the archive's audit chain as last anchored (runner/archive.py): `imtrial verify` compares the log with it
CREATE TABLE IF NOT EXISTS archive_anchor (
  archive TEXT PRIMARY KEY, records INTEGER NOT NULL, head TEXT NOT NULL, time TEXT NOT NULL);

-- ---------------------------------------------------------------- identity registry (site-side)
-- lookup key is a keyed hash of the source identifiers when the study names a key (runner/identify.py)
CREATE TABLE IF NOT EXISTS subjects (
  trial TEXT NOT NULL, source_key TEXT NOT NULL, subject_id TEXT NOT NULL, site TEXT,
  seq INTEGER, baseline_date TEXT, anchor_date TEXT, created REAL,
  PRIMARY KEY (trial, source_key), UNIQUE (trial, subject_id));
CREATE TABLE IF NOT EXISTS subject_seq (trial TEXT NOT NULL, site TEXT NOT NULL, next_seq INTEGER NOT NULL,
  PRIMARY KEY (trial, site));
-- each identified exam of a subject: the visit it was assigned and the device per modality
-- (the same-device rule compares devices of one modality across a subject's exams)
CREATE TABLE IF NOT EXISTS subject_exams (
  trial TEXT NOT NULL, subject_id TEXT NOT NULL, exam_key TEXT NOT NULL, exam_date TEXT,
  visit TEXT, modality TEXT NOT NULL, device TEXT,
  PRIMARY KEY (trial, exam_key, modality));
-- the site's re-identification maps (original identifier -> subject, original UID -> pseudonym);
-- site-side only, purgeable (lookups keep working through the keyed hash)
CREATE TABLE IF NOT EXISTS identity_audit (
  trial TEXT NOT NULL, subject_id TEXT NOT NULL, source_attr TEXT, source_value TEXT, issuer TEXT,
  exam_key TEXT, recorded REAL, PRIMARY KEY (trial, subject_id, source_value, issuer));
-- operators' decisions for exams the pipeline could not place alone (``imtrial assign``): a held exam
-- (no usable source identifier, no site) gets a subject (an existing ID, or 'new' at a site); an exam whose
-- dates are unusable gets a date or a visit. Rows are only added (who assigned what, when); identify reads
-- the latest row of each field of the exam, and a new row re-identifies the exam and everything after it.
CREATE TABLE IF NOT EXISTS exam_assignments (
  id INTEGER PRIMARY KEY AUTOINCREMENT, exam_key TEXT NOT NULL, trial TEXT NOT NULL,
  field TEXT NOT NULL,                 -- subject | site | visit | date (ISO YYYY-MM-DD)
  value TEXT NOT NULL, assigned_by TEXT NOT NULL, assigned_at REAL NOT NULL, note TEXT);
CREATE INDEX IF NOT EXISTS exam_assignments_exam ON exam_assignments(exam_key, field, id);
CREATE TABLE IF NOT EXISTS deid_audit (
  trial TEXT NOT NULL, subject_id TEXT NOT NULL, exam TEXT, kind TEXT NOT NULL, original TEXT NOT NULL,
  pseudonym TEXT NOT NULL, PRIMARY KEY (trial, kind, original));

-- ---------------------------------------------------------------- operations (imtrial_dsl.ops)
CREATE TABLE IF NOT EXISTS ops_notifications_sent (
  trial TEXT NOT NULL, subject_id TEXT NOT NULL, visit TEXT NOT NULL, kind TEXT NOT NULL,
  recipient TEXT NOT NULL, sent_on TEXT NOT NULL, channel TEXT NOT NULL,
  PRIMARY KEY (trial, subject_id, visit, kind, recipient));
CREATE TABLE IF NOT EXISTS ops_qualifications (
  id INTEGER PRIMARY KEY AUTOINCREMENT, trial TEXT NOT NULL, site TEXT NOT NULL, device TEXT NOT NULL,
  protocol TEXT NOT NULL, qualified INTEGER NOT NULL, reasons TEXT NOT NULL, decided_on TEXT NOT NULL,
  decided_by TEXT NOT NULL, software TEXT NOT NULL, source TEXT NOT NULL, details TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS ops_software_upgrades (
  trial TEXT NOT NULL, site TEXT NOT NULL, device TEXT NOT NULL, software TEXT NOT NULL,
  inventory_software TEXT, first_exam TEXT NOT NULL, first_seen TEXT, coverage TEXT NOT NULL,
  PRIMARY KEY (trial, site, device, software));
CREATE TABLE IF NOT EXISTS ops_requalification (
  trial TEXT NOT NULL, site TEXT NOT NULL, device TEXT NOT NULL, protocol TEXT NOT NULL,
  software TEXT NOT NULL, exam_key TEXT NOT NULL, detected_on TEXT, resolved_by INTEGER,
  PRIMARY KEY (trial, site, device, protocol, software));

-- ---------------------------------------------------------------- research scheduling (imtrial_dsl.worklist)
-- subjects enrolled before their first exam, with the patient as the hospital knows them (site-side PHI)
CREATE TABLE IF NOT EXISTS enrollments (
  trial TEXT NOT NULL, subject_id TEXT NOT NULL, site TEXT NOT NULL, enrolled_on TEXT NOT NULL,
  patient TEXT NOT NULL,       -- JSON: PatientID, IssuerOfPatientID, PatientName, PatientBirthDate, PatientSex
  recorded REAL, PRIMARY KEY (trial, subject_id));
-- one scheduled research procedure step per subject x visit x modality (what the Modality Worklist serves)
CREATE TABLE IF NOT EXISTS scheduled_steps (
  trial TEXT NOT NULL, accession TEXT NOT NULL,   -- AccessionNumber = RequestedProcedureID = step ID
  subject_id TEXT NOT NULL, site TEXT NOT NULL, visit TEXT NOT NULL, modality TEXT NOT NULL,
  protocols TEXT NOT NULL,     -- JSON list of protocol names (ScheduledProtocolCodeSequence)
  date TEXT NOT NULL, time TEXT, opens TEXT, closes TEXT,   -- ISO dates; the visit's window
  device TEXT,                 -- the device the same-device rule requires, else NULL
  study_uid TEXT NOT NULL,     -- StudyInstanceUID the modality is asked to use
  status TEXT NOT NULL DEFAULT 'SCHEDULED',  -- SCHEDULED | IN PROGRESS | COMPLETED | DISCONTINUED | CANCELLED
  patient TEXT NOT NULL,       -- JSON (site-side PHI), as in enrollments
  source TEXT,                 -- enrollment | baseline | manual | csv
  exam_key TEXT,               -- the exam identified through this step
  mpps_uid TEXT, updated REAL,
  PRIMARY KEY (trial, accession), UNIQUE (trial, subject_id, visit, modality));

-- ---------------------------------------------------------------- relay pulls (imtrial_dsl.transfer.pull)
CREATE TABLE IF NOT EXISTS pulls (
  relay TEXT NOT NULL,         -- the relay's DICOMweb base URL (no credentials)
  sop_uid TEXT NOT NULL, study_uid TEXT, series_uid TEXT,
  sha256 TEXT,                 -- of the bytes handed to the inbox
  status TEXT NOT NULL,        -- received (in the inbox, durable) | deleted (gone from the relay) | rejected
  inbox_path TEXT, detail TEXT, time TEXT NOT NULL,
  PRIMARY KEY (relay, sop_uid));

-- ---------------------------------------------------------------- transfer ledger (imtrial_dsl transfer)
CREATE TABLE IF NOT EXISTS transfers (
  destination TEXT NOT NULL,   -- destination name; 'name@endpoint' when an override pointed it elsewhere
  sha256 TEXT NOT NULL,        -- archive object
  status TEXT NOT NULL,        -- sent | failed | refused
  time TEXT NOT NULL,          -- UTC, ISO 8601
  detail TEXT,                 -- JSON: sop_uid, endpoint, reason / status code, attempts
  PRIMARY KEY (destination, sha256));
"""


# (table, column, declaration) added to an existing table; connect() adds them to an older database
ADDED_COLUMNS = [("file_sources", "ctime_ns", "INTEGER")]


class StoreError(ImtrialError):
    """The state database is missing or was written by an incompatible imtrial."""


def connect(path: str | Path, *, create: bool = True) -> sqlite3.Connection:
    """An autocommit connection to the state database at ``path`` (a file; created with every table when new).

    Rows come back as :class:`sqlite3.Row`. WAL lets readers run beside the one writer; ``synchronous=FULL``
    makes a committed row survive power loss, which the exactly-once archive rests on."""
    path = Path(path)
    if not create and not path.exists():
        raise StoreError(f"no state database at {path} (run 'imtrial run' first)", code="E801")
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(str(path), timeout=60, isolation_level=None)
    db.row_factory = sqlite3.Row
    db.execute("PRAGMA busy_timeout=60000")
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.executescript(SCHEMA)
    for table, column, decl in ADDED_COLUMNS:  # columns added after a table first shipped
        if column not in {r[1] for r in db.execute(f"PRAGMA table_info({table})")}:
            db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")
    row = db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
    if row is None:
        db.execute("INSERT OR IGNORE INTO meta(key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
    elif int(row[0]) != SCHEMA_VERSION:
        db.close()
        raise StoreError(f"{path} was written by another imtrial version (state schema {row[0]}, this one reads "
                         f"{SCHEMA_VERSION}); use a new workdir", code="E802")
    return db


def check_key_fingerprint(db: sqlite3.Connection, trial: str, purpose: str, fingerprint: str, *,
                          record: bool = True, source: Any = None) -> None:
    """Refuse a key that differs from the one this state database first saw for ``trial`` / ``purpose``
    (:class:`~imtrial_dsl.secrets.KeyMismatchError`, E704); record ``fingerprint`` at first use when ``record``.

    A workdir used with another key would silently hand out new subject IDs and pseudonyms: so the keyed
    fingerprint (``imtrial_dsl.secrets.key_fingerprint``) is compared before the caller writes anything."""
    from .secrets import KeyMismatchError

    name = f"key_fingerprint/{trial}/{purpose}"
    row = db.execute("SELECT value FROM meta WHERE key=?", (name,)).fetchone()
    if row is None:
        if not record:
            return
        db.execute("INSERT OR IGNORE INTO meta(key, value) VALUES (?, ?)", (name, fingerprint))
        row = db.execute("SELECT value FROM meta WHERE key=?", (name,)).fetchone()   # another process may have won
    if not hmac.compare_digest(str(row[0]), fingerprint):
        what = {"deidentify": "de-identification key", "identifiers": "identifiers key"}.get(purpose, purpose + " key")
        raise KeyMismatchError(source, f"the {what} of {trial} is not the key this workdir was first run with "
                                       f"(its keyed fingerprint differs): nothing was written",
                               "use the study's original key; a new key would give every subject new "
                               "identifiers and pseudonyms (start a new workdir only for a new study)")


@contextmanager
def tx(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """An immediate (write-locking) transaction: all or nothing."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        db.execute("ROLLBACK")
        raise
    else:
        db.execute("COMMIT")


def connect_workdir(workdir: str | Path, *, create: bool = True) -> sqlite3.Connection:
    return connect(Workdir(workdir).state_db, create=create)


def _loads(text: Optional[str], default: Any = None) -> Any:
    if text is None or text == "":
        return default
    try:
        return json.loads(text)
    except ValueError:
        return default


class Store:
    """Pipeline state of a workdir, read and written as plain dicts (one connection per process: never share it across fork)."""

    def __init__(self, workdir: str | Path, *, create: bool = True):
        self.workdir = Path(workdir)
        self.path = Workdir(self.workdir).state_db
        self.db = connect(self.path, create=create)

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> "State":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def tx(self):
        """An immediate (write-locking) transaction: all or nothing."""
        return tx(self.db)

    # ------------------------------------------------------------------ files
    def file(self, sha256: str) -> Optional[dict]:
        row = self.db.execute("SELECT * FROM files WHERE sha256=?", (sha256,)).fetchone()
        return dict(row) if row else None

    def known_paths(self, inbox: Optional[str | Path] = None) -> dict[str, dict]:
        """Relative path -> {sha256, size, mtime_ns, ctime_ns} of the latest sighting, for one inbox (absolute path) or all."""
        q, args = "SELECT rel_path, sha256, size, mtime_ns, ctime_ns FROM file_sources", ()
        if inbox is not None:
            q, args = q + " WHERE inbox=?", (str(Path(inbox).resolve()),)
        return {r["rel_path"]: dict(r) for r in self.db.execute(q + " ORDER BY seen", args)}

    def files(self, status: Optional[str] = None) -> list[dict]:
        q, args = "SELECT * FROM files", ()
        if status:
            q, args = q + " WHERE status=?", (status,)
        return [dict(r) for r in self.db.execute(q + " ORDER BY first_seen, sha256", args)]

    def quarantined(self) -> list[dict]:
        out = []
        for r in self.files("quarantined"):
            r["reason"] = _loads(r["reason"], {})
            out.append(r)
        return out

    def mark_quarantined(self, items: list[dict], step: str) -> None:
        """Ingested files a later step refused (e.g. burned-in annotation): quarantined, not lost.
        ``items``: ``{"sha256", "reason", "detail"}``; the copy is at ``quarantine/<sha256>/file``."""
        with self.tx() as db:
            for q in items:
                if not q.get("sha256"):
                    continue
                reason = {"reason": q.get("reason"), "detail": q.get("detail"), "step": step}
                db.execute("UPDATE files SET status='quarantined', reason=?, stored_path=?, "
                           "first_seen=COALESCE(first_seen, ?) WHERE sha256=?",
                           (json.dumps(reason), f"quarantine/{q['sha256']}/file", time.time(), q["sha256"]))

    def record_skipped(self, inbox: str | Path, entries: list[dict]) -> None:
        """The inbox entries the last look at ``inbox`` did not read (``{path, reason, detail}``)."""
        inbox, now = str(Path(inbox).resolve()), time.time()
        with self.tx() as db:
            db.execute("DELETE FROM inbox_skipped WHERE inbox=?", (inbox,))
            db.executemany("INSERT OR REPLACE INTO inbox_skipped(inbox, rel_path, reason, detail, seen) VALUES (?, ?, ?, ?, ?)",
                           [(inbox, e["path"], e["reason"], e.get("detail"), now) for e in entries])

    def skipped(self) -> list[dict]:
        """Inbox entries that were not read, with the reason (every inbox, as of its last look)."""
        return [dict(r) for r in self.db.execute("SELECT inbox, rel_path, reason, detail FROM inbox_skipped "
                                                 "ORDER BY inbox, rel_path")]

    def duplicates(self) -> list[dict]:
        """Inbox paths whose content was already seen under another path."""
        rows = self.db.execute(
            "SELECT s.inbox, s.rel_path, s.sha256, f.first_inbox, f.first_path FROM file_sources s JOIN files f USING (sha256) "
            "WHERE s.rel_path != f.first_path OR s.inbox != f.first_inbox ORDER BY s.inbox, s.rel_path")
        return [dict(r) for r in rows]

    # ------------------------------------------------------------------ exams
    def exams(self, status: Optional[str] = None) -> list[dict]:
        q, args = "SELECT * FROM exams", ()
        if status:
            q, args = q + " WHERE status=?", (status,)
        return [self._exam(r) for r in self.db.execute(q + " ORDER BY exam_date, exam_key", args)]

    def exam_keys(self) -> list[str]:
        return [r["exam_key"] for r in self.db.execute("SELECT exam_key FROM exams ORDER BY exam_key")]

    def exam(self, exam_key: str) -> Optional[dict]:
        row = self.db.execute("SELECT * FROM exams WHERE exam_key=?", (exam_key,)).fetchone()
        return self._exam(row) if row else None

    def _exam(self, row: sqlite3.Row) -> dict:
        d = dict(row)
        d["warnings"] = _loads(d.get("warnings"), [])
        d["in_window"] = None if d["in_window"] is None else bool(d["in_window"])
        d["series"] = self.series(d["exam_key"])
        d["steps"] = self.steps(d["exam_key"])
        return d

    def series(self, exam_key: str) -> list[dict]:
        rows = self.db.execute("SELECT * FROM series WHERE exam_key=? ORDER BY series_number, series_uid", (exam_key,))
        out = []
        for r in rows:
            d = dict(r)
            for k in ("classification", "adherence", "qc"):
                d[k] = _loads(d[k])
            out.append(d)
        return out

    def steps(self, exam_key: str) -> dict[str, dict]:
        """The exam's recorded graph nodes, in the order they ran."""
        rows = self.db.execute("SELECT * FROM steps WHERE exam_key=? ORDER BY started, finished, step", (exam_key,))
        return {r["step"]: {**dict(r), "detail": _loads(r["detail"], {})} for r in rows}

    def subject_exams(self, trial: str, subject_id: str) -> list[dict]:
        rows = self.db.execute("SELECT exam_key FROM exams WHERE trial=? AND subject_id=? ORDER BY exam_date, exam_key",
                               (trial, subject_id))
        return [self.exam(r["exam_key"]) for r in rows]

    def upsert_exam(self, exam_key: str, **fields: Any) -> None:
        now = time.time()
        if "warnings" in fields and not isinstance(fields["warnings"], str):
            fields["warnings"] = json.dumps(fields["warnings"], sort_keys=True)
        with self.tx() as db:
            db.execute("INSERT OR IGNORE INTO exams(exam_key, created, updated) VALUES (?, ?, ?)", (exam_key, now, now))
            if fields:
                cols = ", ".join(f"{k}=?" for k in fields)
                db.execute(f"UPDATE exams SET {cols}, updated=? WHERE exam_key=?", (*fields.values(), now, exam_key))

    def set_step(self, exam_key: str, step: str, status: str, detail: Any = None,
                 started: Optional[float] = None, fingerprint: Optional[str] = None) -> None:
        """Record one graph node of one exam (``step`` is the node id) and what it was computed from."""
        with self.tx() as db:
            db.execute("INSERT OR REPLACE INTO steps(exam_key, step, status, started, finished, detail, fingerprint) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (exam_key, step, status, started, time.time(), json.dumps(detail, default=str), fingerprint))

    def fingerprints(self) -> dict[tuple[str, str], tuple[str, Optional[str]]]:
        """(exam_key, node) -> (status, fingerprint) of every recorded node."""
        return {(r["exam_key"], r["step"]): (r["status"], r["fingerprint"])
                for r in self.db.execute("SELECT exam_key, step, status, fingerprint FROM steps")}

    # ------------------------------------------------------------------ registry
    def subjects(self, trial: Optional[str] = None) -> list[dict]:
        q, args = "SELECT trial, subject_id, site, seq, baseline_date, anchor_date, created FROM subjects", ()
        if trial:
            q, args = q + " WHERE trial=?", (trial,)
        return [dict(r) for r in self.db.execute(q + " ORDER BY trial, subject_id", args)]

    def audit_map(self, trial: Optional[str] = None) -> list[dict]:
        """The site's re-identification map (original identifiers): site-side use only."""
        q, args = "SELECT * FROM identity_audit", ()
        if trial:
            q, args = q + " WHERE trial=?", (trial,)
        return [dict(r) for r in self.db.execute(q + " ORDER BY trial, subject_id", args)]

    def purge_audit_map(self, trial: Optional[str] = None) -> int:
        """Drop every re-identification map — source identifiers (``identity_audit``), original UIDs and date
        shifts (``deid_audit``), the original series UIDs kept beside the pipeline state — and return how many
        rows went. Lookups keep working through the keyed hash."""
        where, args = (" WHERE trial=?", (trial,)) if trial else ("", ())
        with self.tx() as db:
            n = db.execute("DELETE FROM identity_audit" + where, args).rowcount
            n += db.execute("DELETE FROM deid_audit" + where, args).rowcount
            sel = " WHERE exam_key IN (SELECT exam_key FROM exams WHERE trial=?)" if trial else ""
            n += db.execute("UPDATE series SET original_series_uid=NULL" + (sel + " AND" if sel else " WHERE")
                            + " original_series_uid IS NOT NULL", args).rowcount
            return n

    # ------------------------------------------------------------------ assignments (imtrial assign)
    ASSIGNABLE = ("subject", "site", "visit", "date")

    def add_assignment(self, exam_key: str, trial: str, fields: dict[str, str], by: str,
                       note: Optional[str] = None) -> None:
        """Record an operator's decision for one exam (fields from :attr:`ASSIGNABLE`), in one transaction."""
        unknown = sorted(set(fields) - set(self.ASSIGNABLE))
        if unknown:
            raise ValueError(f"not assignable: {', '.join(unknown)}")
        now = time.time()
        with self.tx() as db:
            for field, value in fields.items():
                db.execute("INSERT INTO exam_assignments(exam_key, trial, field, value, assigned_by, assigned_at, note) "
                           "VALUES (?, ?, ?, ?, ?, ?, ?)", (exam_key, trial, field, str(value), by, now, note))

    def assignments(self, exam_key: str) -> dict[str, dict]:
        """The exam's current assignments: field -> the latest row ({value, assigned_by, assigned_at, note})."""
        rows = self.db.execute("SELECT * FROM exam_assignments WHERE exam_key=? ORDER BY id", (exam_key,))
        return {r["field"]: dict(r) for r in rows}

    def assignment_history(self, exam_key: Optional[str] = None) -> list[dict]:
        """Every assignment ever recorded (of one exam, or all), oldest first."""
        q, args = "SELECT * FROM exam_assignments", ()
        if exam_key:
            q, args = q + " WHERE exam_key=?", (exam_key,)
        return [dict(r) for r in self.db.execute(q + " ORDER BY id", args)]

    def assignment_token(self, exam_key: str) -> str:
        """What the exam's identity was assigned from ('' when nothing was): part of identify's fingerprint."""
        cur = self.assignments(exam_key)
        return json.dumps({f: r["value"] for f, r in sorted(cur.items())}, sort_keys=True) if cur else ""

    # ------------------------------------------------------------------ measurements
    def measurements(self) -> list[dict]:
        rows = self.db.execute("SELECT subject, visit, site, protocol, analysis, measurement, value, unit, exam_key, "
                               "series_uid FROM measurements ORDER BY subject, visit, protocol, analysis, measurement")
        return [dict(r) for r in rows]

    def replace_measurements(self, rows: list[dict]) -> None:
        """The measurements table becomes ``rows`` (each with ``exam_key``)."""
        now = time.time()
        with self.tx() as db:
            db.execute("DELETE FROM measurements")
            db.executemany("INSERT OR REPLACE INTO measurements(exam_key, subject, visit, site, protocol, analysis, "
                           "measurement, value, unit, series_uid, recorded) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                           [(r["exam_key"], r["subject"], r["visit"], r["site"], r["protocol"], r["analysis"],
                             r["measurement"], r["value"], r["unit"], r["series_uid"], now) for r in rows])

    def runs(self) -> list[dict]:
        return [{**dict(r), "summary": _loads(r["summary"], {})} for r in self.db.execute("SELECT * FROM runs ORDER BY id")]
