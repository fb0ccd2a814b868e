"""The operation: send every archived instance a destination has not acknowledged (also the ``transfer`` step)."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable, Optional

from . import TransferError
from .destinations import auth_source, read_token, resolve
from .dimse import send_cstore
from .folder import send_folder
from .ledger import Ledger, exclusive, now
from .objects import archived_objects, check_object, may_receive_identified
from .sender import Result
from .stow import send_stow


def transfer(trial, archive: str | Path, destination: str, *, state: Optional[str | Path] = None,
             url_override: Optional[str] = None, host_override: Optional[str] = None,
             port_override: Optional[int] = None, path_override: Optional[str] = None,
             dry_run: bool = False, base: Optional[str | Path] = None,
             log: Callable[[str], None] = lambda s: None, retries: Optional[int] = None) -> dict:
    """Send every archived instance not yet acknowledged by ``destination``; returns a JSON-able summary.

    ``state`` is the SQLite file holding the ``transfers`` ledger (without it every instance is sent
    and nothing is remembered). ``base`` resolves a relative folder destination (default: cwd). ``retries``: how
    often a request that may pass is repeated inside this run (default ``sender.RETRIES``).
    Raises :class:`TransferError` for a request that cannot start (nothing is sent then)."""
    ep = resolve(trial, destination, url_override=url_override, host_override=host_override,
                 port_override=port_override, path_override=path_override)
    objects = archived_objects(archive)
    state_path = Path(state) if state else None
    warnings: list[str] = []
    token = None
    token_problem = None
    if ep.kind == "dicomweb":
        try:
            token = read_token(ep.auth)
        except TransferError as exc:
            if not dry_run:
                raise
            token_problem = exc.diagnostic.message
        if (ep.auth is not None and re.match(r"(?i)http://", ep.url or "")
                and not re.match(r"(?i)http://(127\.\d+\.\d+\.\d+|localhost|\[::1\])(:|/|$)", ep.url or "")):
            warnings.append("the bearer token would travel unencrypted (http:// to a non-loopback host); use https")
    if ep.via:
        warnings.append(f"{destination} is relayed via {' -> '.join(ep.via)}: instances go to {ep.contacted}'s endpoint; "
                        f"forwarding to {destination} is the relay's job")
    summary: dict[str, Any] = {
        "destination": destination, "ledger_destination": ep.ledger_key, "kind": ep.kind, "endpoint": ep.describe(),
        "contacted": ep.contacted, "via": list(ep.via), "overridden": ep.overridden, "auth": auth_source(ep.auth),
        "dry_run": bool(dry_run), "archived": len(objects), "already_sent": 0, "to_send": 0,
        "sent": 0, "failed": 0, "refused": 0, "problems": [], "warnings": warnings, "time": now()}
    if token_problem:
        summary["problems"].append({"sha256": None, "status": "failed", "reason": token_problem})
    with exclusive(state_path if not dry_run else None):
        ledger = Ledger(state_path) if state_path else None
        try:
            before = ledger.statuses(ep.ledger_key) if ledger else {}
            pending = [o for o in objects if before.get(o["sha256"], ("",))[0] != "sent"]
            summary["already_sent"] = len(objects) - len(pending)
            items, refused = [], []
            identified_ok = may_receive_identified(trial, destination, ep.via)
            for o in pending:
                item, why = check_object(o, identified_ok=identified_ok)
                if item is None:
                    refused.append((o, why))
                else:
                    items.append(item)
            summary["to_send"] = len(items)
            summary["refused"] = len(refused)
            for o, why in refused:
                summary["problems"].append({"sha256": o["sha256"], "sop_uid": o.get("sop_uid"), "status": "refused",
                                            "reason": why})
            if dry_run:
                summary["would_send_bytes"] = sum(i.size for i in items)
                summary["ok"] = not summary["problems"]
                return summary
            rows: list[tuple[str, str, dict]] = []

            def attempts(sha: str) -> int:
                return int((before.get(sha, ("", {}))[1] or {}).get("attempts", 0)) + 1

            for o, why in refused:
                rows.append((o["sha256"], "refused", {"reason": why, "sop_uid": o.get("sop_uid"),
                                                      "endpoint": ep.describe(), "attempts": attempts(o["sha256"])}))
            if ledger:
                ledger.record(ep.ledger_key, rows)
            by_sha = {it.sha256: it for it in items}

            def emit(batch: Result) -> None:
                """Record one batch of receiver answers (ledger first, so an interrupted run resumes)."""
                rows = []
                for sha, (status, detail) in batch.items():
                    it = by_sha.pop(sha)
                    detail = {**detail, "sop_uid": it.sop_uid, "endpoint": ep.describe(), "attempts": attempts(sha),
                              "version": it.meta.get("version") or 1}
                    if it.meta.get("supersedes"):
                        detail["supersedes"] = it.meta["supersedes"]
                        if before.get(it.meta["supersedes"], ("",))[0] == "sent":
                            detail["replaces_sent_version"] = True
                    if ep.via:
                        detail["via"] = list(ep.via)
                    rows.append((sha, status, detail))
                    summary[status] += 1
                    if status != "sent":
                        summary["problems"].append({"sha256": sha, "sop_uid": it.sop_uid, "status": status,
                                                    "reason": detail.get("reason")})
                if ledger:
                    ledger.record(ep.ledger_key, rows)

            if items:
                log(f"transfer: {len(items)} instance(s) to {destination} ({ep.kind} {ep.describe()})")
                if ep.kind == "dicomweb":
                    send_stow(ep, items, token, emit, log, retries=retries)
                elif ep.kind == "dicom":
                    send_cstore(ep, items, emit, log, retries=retries)
                else:
                    send_folder(ep, items, Path(base) if base else Path.cwd(), emit, log)
            if by_sha:  # a sender bug must not make an instance vanish from the record
                emit({sha: ("failed", {"reason": "no result from the sender"}) for sha in list(by_sha)})
        finally:
            if ledger:
                ledger.close()
    summary["ok"] = summary["failed"] == 0 and summary["refused"] == 0
    return summary
