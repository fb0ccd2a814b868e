"""The ledger: what was sent where, the ``transfers`` table of the state database (schema in imtrial_dsl.store)."""
from __future__ import annotations

import fcntl
import json
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from ..workdir import Workdir
from . import TransferError


def now() -> str:
    """The ledger's and the summaries' timestamp: UTC, ISO 8601, to the second."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class Ledger:
    """The ``transfers`` table in the state database (created if absent)."""

    def __init__(self, path: str | Path):
        from ..store import connect

        self.path = Path(path)
        self.db = connect(self.path)

    def close(self) -> None:
        self.db.close()

    def rows(self, destination: Optional[str] = None) -> list[dict]:
        q, args = "SELECT destination, sha256, status, time, detail FROM transfers", ()
        if destination is not None:
            q, args = q + " WHERE destination=?", (destination,)
        cur = self.db.execute(q + " ORDER BY destination, time, sha256", args)
        cols = [c[0] for c in cur.description]
        return [{**dict(zip(cols, r)), "detail": json.loads(r[4]) if r[4] else {}} for r in cur]

    def statuses(self, destination: str) -> dict[str, tuple[str, dict]]:
        return {r["sha256"]: (r["status"], r["detail"]) for r in self.rows(destination)}

    def record(self, destination: str, results: list[tuple[str, str, dict]]) -> None:
        """Store (sha256, status, detail) rows in one transaction; a new attempt replaces the old row."""
        if not results:
            return
        t = now()
        self.db.execute("BEGIN IMMEDIATE")
        try:
            for sha, status, detail in results:
                self.db.execute("INSERT OR REPLACE INTO transfers(destination, sha256, status, time, detail) "
                                "VALUES (?, ?, ?, ?, ?)", (destination, sha, status, t, json.dumps(detail, sort_keys=True)))
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")


def transfers(workdir: str | Path, destination: Optional[str] = None) -> list[dict]:
    """The ledger rows of a workdir (``detail`` decoded), optionally for one ledger destination."""
    path = Workdir(workdir).state_db
    if not path.exists():
        return []
    led = Ledger(path)
    try:
        return led.rows(destination)
    finally:
        led.close()


@contextmanager
def exclusive(state: Optional[Path]) -> Iterator[None]:
    """One transfer per state database at a time, so two runs never send the same instance twice."""
    if state is None:
        yield
        return
    lock = state.with_name(state.name + ".transfer.lock")
    with open(lock, "a+") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise TransferError(f"another transfer is running on {state} (lock {lock.name})", code="E835") from None
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
