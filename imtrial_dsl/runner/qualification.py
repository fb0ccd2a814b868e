"""Reading site-qualification decisions from the state database.

``imtrial qualify`` (imtrial_dsl.ops) records decisions in the ``ops_qualifications`` and
``ops_requalification`` tables of ``W/state.sqlite``; the runner only reads them to flag exams
from devices not qualified for a protocol. Living here, the runner needs nothing from ops.
"""
from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Optional

from ..store import connect
from ..workdir import Workdir

STATUS_QUALIFIED = "qualified"
STATUS_NOT = "not_qualified"
STATUS_REQUALIFY = "requalification_needed"
STATUS_NONE = "not_assessed"


def latest_decision(con: sqlite3.Connection, trial: Optional[str], site: str, device: str, protocol: str) -> Optional[dict]:
    q = "SELECT * FROM ops_qualifications WHERE site=? AND device=? AND protocol=?"
    args: tuple = (site, device, protocol)
    if trial:
        q, args = q + " AND trial=?", args + (trial,)
    row = con.execute(q + " ORDER BY id DESC LIMIT 1", args).fetchone()
    return dict(row) if row else None


def open_flags(con: sqlite3.Connection, trial: Optional[str], site: str, device: str, protocol: str) -> list[dict]:
    """Re-qualification flags (e.g. after a software upgrade) not yet resolved by a new decision."""
    q = "SELECT * FROM ops_requalification WHERE site=? AND device=? AND protocol=? AND resolved_by IS NULL"
    args: tuple = (site, device, protocol)
    if trial:
        q, args = q + " AND trial=?", args + (trial,)
    return [dict(r) for r in con.execute(q + " ORDER BY software", args)]


def status_from(con: sqlite3.Connection, site: str, device: str, protocol: str,
                trial: Optional[str] = None) -> tuple[str, Optional[dict], list[dict]]:
    """(status, latest decision, open re-qualification flags)."""
    dec = latest_decision(con, trial, site, device, protocol)
    flags = open_flags(con, trial, site, device, protocol)
    if dec is None:
        return STATUS_NONE, None, flags
    if not dec["qualified"]:
        return STATUS_NOT, dec, flags
    return (STATUS_REQUALIFY if flags else STATUS_QUALIFIED), dec, flags


def status(workdir: str | Path, site: str, device: str, protocol: str,
           trial: Optional[str] = None) -> tuple[str, Optional[dict], list[dict]]:
    path = Workdir(workdir).state_db
    if not path.exists():
        return STATUS_NONE, None, []
    con = connect(path)
    try:
        return status_from(con, site, device, protocol, trial)
    finally:
        con.close()


def is_qualified(workdir: str | Path, site: str, device: str, protocol: str, trial: Optional[str] = None) -> bool:
    """True when the device's latest decision for the protocol is positive and no upgrade since requires re-qualification."""
    return status(workdir, site, device, protocol, trial)[0] == STATUS_QUALIFIED
