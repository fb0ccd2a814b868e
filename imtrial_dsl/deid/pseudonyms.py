"""The study key and everything keyed by it: UID remapping (2.25 form), per-subject date shifting, keyed
hashes and AE-title pseudonyms, and the site-side audit map (original <-> pseudonym) that records them.

Every derivation is HMAC-SHA256(key, purpose ␀ trial ␀ value): it depends only on the key, the trial code and
the original, so it is the same in every file, visit, re-run and process with no shared state — and two
trials that share a key share no pseudonym (a subject in both cannot be linked through UIDs or hashes).
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import hmac
from pathlib import Path
from typing import Optional

from .. import ir
from ..secrets import SecretError, read_key
from ..store import connect, tx
from .plan import option_names, shifts_dates
from .vr import MAX_LENGTH


def resolve_key(trial: ir.Trial) -> bytes:
    """The study key named in ``deidentify.key``; raises :class:`~imtrial_dsl.secrets.SecretError` (never logs it)."""
    deid = trial.deidentify
    if deid is None or deid.key is None:
        raise SecretError(deid, "de-identification needs a key but the study names none",
                          "add `key env IMTRIAL_KEY` (or `key file \"path\"`) to the deidentify block")
    return read_key(deid.key, study_file=trial.source_file, what="de-identification key")


def check_key(trial: ir.Trial, key: bytes, registry: Path, *, record: bool = True) -> None:
    """Refuse a de-identification key other than the one ``registry`` first saw (KeyMismatchError, E704)."""
    from ..secrets import key_fingerprint
    from ..store import check_key_fingerprint

    code = trial.study.code if trial.study else "TRIAL"      # the registry's trial column (runner/identify.py)
    con = connect(registry)
    try:
        check_key_fingerprint(con, code, "deidentify", key_fingerprint(key, "deidentify", code), record=record,
                              source=trial.deidentify.key if trial.deidentify else None)
    finally:
        con.close()


def trial_scope(trial: ir.Trial) -> str:
    """The scope of every keyed derivation: the trial code (pseudonyms of two trials never coincide)."""
    return trial.study.code if trial.study else ""


def pseudonymizer(trial: ir.Trial, key: bytes) -> "Pseudonymizer":
    """The study's :class:`Pseudonymizer` (its key, trial scope and date-shift range)."""
    lo, hi = date_shift_range(trial.deidentify) if trial.deidentify else (-365, -1)
    return Pseudonymizer(key, trial_scope(trial), lo, hi)


def date_shift_range(deid: ir.Deidentify) -> tuple[int, int]:
    """The study's ``date_shift`` bounds in whole days (default -365 .. -1)."""
    lo = int(round(deid.date_shift_min.days)) if deid.date_shift_min else -365
    hi = int(round(deid.date_shift_max.days)) if deid.date_shift_max else -1
    return lo, hi


class Pseudonymizer:
    """Keyed, deterministic replacements: UIDs (2.25 form), per-subject date offsets, hashes."""

    def __init__(self, key: bytes, scope: str = "", shift_min: int = -365, shift_max: int = -1):
        self._key = key
        self._scope = scope.encode("utf-8") + b"\x00"
        self._cache: dict[str, str] = {}                 # bounded: memory stays flat over any corpus size
        self.record: Optional[dict[str, str]] = None     # set to {} to collect the audit map of one exam
        self._lo, self._hi = min(shift_min, shift_max), max(shift_min, shift_max)

    def _mac(self, purpose: bytes, value: bytes) -> bytes:
        return hmac.new(self._key, purpose + b"\x00" + self._scope + value, hashlib.sha256).digest()

    def uid(self, old: str) -> str:
        new = self._cache.get(old)
        if new is None:
            n = int.from_bytes(self._mac(b"uid", old.encode("ascii", "replace"))[:16], "big")
            n = (n & ~(0xF << 76)) | (0x8 << 76)          # UUID version 8 (custom)
            n = (n & ~(0x3 << 62)) | (0x2 << 62)          # RFC 4122 variant
            new = f"2.25.{n}"
            if len(self._cache) >= 65536:
                self._cache.clear()
            self._cache[old] = new
        if self.record is not None:
            self.record[old] = new
        return new

    def date_offset(self, subject_id: str) -> int:
        n = int.from_bytes(self._mac(b"date-shift", subject_id.encode("utf-8"))[:8], "big")
        return self._lo + n % (self._hi - self._lo + 1)

    def hash_text(self, text: str, vr: str) -> str:
        h = self._mac(b"hash", text.encode("utf-8")).hex().upper()
        return h[: min(MAX_LENGTH.get(vr, 64), 32)]

    def ae(self, text: str) -> str:
        return "AE" + self._mac(b"ae", text.encode("utf-8")).hex().upper()[:14]


def shift_date(value: str, days: int) -> str:
    """Shift a DA value (possibly multi-valued or a range) by whole days; invalid -> ''."""
    out = []
    for part in value.split("\\"):
        if "-" in part:   # query range form
            out.append("-".join(shift_date(p, days) if p else "" for p in part.split("-")))
            continue
        p = part.strip()
        if not p:
            out.append("")
            continue
        try:
            d = _dt.date(int(p[0:4]), int(p[4:6]), int(p[6:8])) if len(p) == 8 else None
        except ValueError:
            d = None
        out.append((d + _dt.timedelta(days=days)).strftime("%Y%m%d") if d else "")
    return "\\".join(out)


def shift_datetime(value: str, days: int) -> str:
    """Shift the date part of DT values; values without a full date become ''."""
    out = []
    for part in value.split("\\"):
        p = part.strip()
        if len(p) >= 8 and p[:8].isdigit():
            head = shift_date(p[:8], days)
            out.append(head + p[8:] if head else "")
        else:
            out.append("")
    return "\\".join(out)


def subject_date_shift(trial: ir.Trial, subject_id: str) -> Optional[int]:
    """The keyed per-subject date offset in days, or None when the study does not shift dates.

    Raises SecretError when the study shifts dates but its key is missing.
    """
    deid = trial.deidentify
    if deid is None or not subject_id or not shifts_dates(option_names(deid)):
        return None
    return pseudonymizer(trial, resolve_key(trial)).date_offset(subject_id)


def audit_entries(engine, subject_id: str) -> list[dict]:
    """The site-side audit map (original <-> pseudonym) recorded by ``engine`` (a Deidentifier, ``pseudo.record``):
    UIDs and the date offset. Site-side only: it lets authorized site staff re-identify; it never leaves the registry.
    """
    rows = [{"subject_id": subject_id, "kind": "uid", "original": o, "pseudonym": n}
            for o, n in sorted((engine.pseudo.record or {}).items())]
    if engine.plan.shift_dates:
        rows.append({"subject_id": subject_id, "kind": "date_shift_days", "original": subject_id,
                     "pseudonym": str(engine.pseudo.date_offset(subject_id))})
    return rows


def store_audit(registry: Path, trial_code: str, exam_key: str, rows: list[dict]) -> int:
    """Insert audit rows into table ``deid_audit`` of the state database (idempotent)."""
    con = connect(registry)
    try:
        with tx(con):
            con.executemany(
                "INSERT OR IGNORE INTO deid_audit (trial, subject_id, exam, kind, original, pseudonym)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                [(trial_code, r["subject_id"], exam_key, r["kind"], r["original"], r["pseudonym"]) for r in rows])
    finally:
        con.close()
    return len(rows)
