"""``imtrial pull``: the central site fetches, from a relay outside its firewall, what the sites pushed there.

Sites push by STOW-RS (:mod:`.stow`); the centre accepts no inbound connection and pulls instead. One
pass (:func:`pull_once`):

1. list the relay's instances (QIDO-RS, :mod:`.relay`);
2. for each SOP instance the ledger has not received: retrieve it (WADO-RS), verify it — it parses as
   DICOM, its SOP Instance UID is the one listed, it is de-identified (PatientIdentityRemoved YES), it
   belongs to this study (ClinicalTrialProtocolID), and its sha256 equals the sender's transfer manifest
   when one is given (:func:`write_manifest` makes it from the site's transfer ledger) — then write it
   into the inbox (staged in the workdir, fsynced, renamed in: the inbox never holds half a file) and
   record it ``received`` in the ledger (table ``pulls`` of ``W/state.sqlite``);
3. delete from the relay each received instance **once the central workdir has it**: its sha256 is in
   that workdir's ``files`` table, i.e. ``imtrial run`` over the inbox ingested it (stored, or kept in
   quarantine), then record it ``deleted``.

Exactly once, across ``kill -9`` at any point: an instance is written to the inbox under a name derived
from its UIDs, so retrieving it again after a crash before the ledger commit rewrites the same file with
the same bytes; once ``received`` it is never handed over again (even after ``imtrial run --move``
removed it from the inbox); it leaves the relay only after the archive has it, and an instance the
relay no longer lists is simply marked ``deleted``. A relay that goes away mid-pass stops the pass with
an error; the next pass (``--every``) resumes. An instance that fails verification stays on the relay
(``rejected``, with the reason) and is checked again on the next pass.
"""
from __future__ import annotations

import datetime as _dt
import io
import json
import os
import time
from pathlib import Path
from typing import Callable, Optional

from ..files import atomic_write_bytes, atomic_write_json, fsync_dir, sha256_bytes, sha256_file, try_lock
from ..store import connect_workdir, tx
from ..workdir import Workdir
from .relay import Instance, RelayClient, RelayError

MANIFEST_FORMAT = "imtrial-transfer-manifest-1"


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


# --------------------------------------------------------------------------- the sender's manifest

def write_manifest(trial, workdir: str | Path, destination: str, out: str | Path) -> dict:
    """The site's manifest of what it sent to ``destination``: SOP Instance UID -> sha256 of the bytes sent
    (from the transfer ledger). It travels beside the images (e-mail, SFTP …) so the centre can verify them."""
    from .ledger import transfers

    rows = [r for r in transfers(workdir, destination) if r["status"] == "sent" and (r.get("detail") or {}).get("sop_uid")]
    doc = {"format": MANIFEST_FORMAT, "study": trial.study.code if trial.study else None, "destination": destination,
           "created": _now(), "instances": {r["detail"]["sop_uid"]: r["sha256"] for r in rows}}
    atomic_write_json(out, doc)
    return doc


def read_manifests(paths: list[str | Path]) -> dict[str, str]:
    """SOP Instance UID -> expected sha256, from one or more manifests (RelayError E884 on a bad file)."""
    out: dict[str, str] = {}
    for p in paths:
        try:
            doc = json.loads(Path(p).read_text())
        except (OSError, ValueError) as exc:
            raise RelayError(f"cannot read transfer manifest {p}: {exc}", code="E884") from None
        if not isinstance(doc, dict) or doc.get("format") != MANIFEST_FORMAT or not isinstance(doc.get("instances"), dict):
            raise RelayError(f"{p} is not an imtrial transfer manifest (format {MANIFEST_FORMAT})", code="E884")
        for uid, sha in doc["instances"].items():
            if uid in out and out[uid] != sha:
                raise RelayError(f"transfer manifests disagree about {uid}", code="E884")
            out[str(uid)] = str(sha)
    return out


# --------------------------------------------------------------------------- one pass

def _verify(trial, inst: Instance, data: bytes, manifest: dict[str, str]) -> Optional[str]:
    """Why ``data`` must not enter the central archive (None: it may)."""
    import pydicom

    try:
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    except Exception as exc:  # any parse failure is a reason to keep it out
        return f"not DICOM: {type(exc).__name__}: {exc}"
    if str(ds.get("SOPInstanceUID", "")) != inst.sop_uid:
        return f"SOP Instance UID {ds.get('SOPInstanceUID')} is not the one the relay listed ({inst.sop_uid})"
    if str(ds.get("PatientIdentityRemoved", "")).upper() != "YES":
        return "not de-identified (PatientIdentityRemoved is not YES)"
    code = trial.study.code if trial.study else None
    proto = str(ds.get("ClinicalTrialProtocolID", "") or "")
    if code and proto != code:
        return f"foreign: ClinicalTrialProtocolID {proto!r} is not {code!r}"
    expected = manifest.get(inst.sop_uid)
    if expected is not None and expected != sha256_bytes(data):
        return f"content hash {sha256_bytes(data)[:16]}… differs from the sender's manifest ({expected[:16]}…)"
    return None


def inbox_path(inbox: Path, inst: Instance) -> Path:
    return inbox / inst.study_uid / inst.series_uid / f"{inst.sop_uid}.dcm"


def _handoff(W: Workdir, inbox: Path, inst: Instance, data: bytes) -> Path:
    """Write the instance into the inbox: staged in the workdir, fsynced, renamed in, re-read."""
    dest = inbox_path(inbox, inst)
    stage = W.pull_staging / f"{inst.sop_uid}.dcm"
    atomic_write_bytes(stage, data, durable=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(stage, dest)
    except OSError as exc:
        if exc.errno == 18:  # EXDEV
            raise RelayError(f"the inbox {inbox} and the workdir {W.root} must be on one filesystem (an instance is "
                             "renamed from one into the other)", code="E884") from None
        raise
    fsync_dir(dest.parent)
    if sha256_file(dest) != sha256_bytes(data):
        raise RelayError(f"{dest}: the bytes read back differ from the bytes written", code="E884")
    return dest


def _archived(db, sha: str) -> bool:
    return db.execute("SELECT 1 FROM files WHERE sha256=?", (sha,)).fetchone() is not None


def pull_once(trial, relay: RelayClient, inbox: str | Path, workdir: str | Path, *,
              manifest: Optional[dict[str, str]] = None, log: Callable[[str], None] = lambda s: None,
              on_instance: Optional[Callable[[str, str], None]] = None) -> dict:
    """One pass; returns counts and problems. Raises RelayError when the relay cannot be used at all
    (the ledger keeps what was done before). ``on_instance(sop_uid, event)`` is called after each step."""
    W = Workdir(Path(workdir).resolve())
    inbox = Path(inbox).resolve()
    inbox.mkdir(parents=True, exist_ok=True)
    W.root.mkdir(parents=True, exist_ok=True)
    lock = try_lock(W.pull_lock)
    if lock is None:
        raise RelayError(f"another 'imtrial pull' is using {W.root}", code="E880")
    manifest = manifest or {}
    key = relay.describe()
    summary = {"relay": key, "listed": 0, "received": 0, "deleted": 0, "waiting_for_archive": 0, "rejected": 0,
               "foreign": 0, "already": 0, "problems": [], "auth": relay.auth_source}
    db = connect_workdir(W.root)
    try:
        if W.pull_staging.exists():  # what a killed pass staged and did not rename in
            for p in W.pull_staging.iterdir():
                p.unlink()
        listed = relay.instances()
        summary["listed"] = len(listed)
        ledger = {r["sop_uid"]: dict(r) for r in db.execute("SELECT * FROM pulls WHERE relay=?", (key,))}
        on_relay = {i.sop_uid for i in listed}
        with tx(db):  # gone from the relay (deleted by an earlier pass that was killed before recording it)
            for uid, r in ledger.items():
                if r["status"] == "received" and uid not in on_relay and _archived(db, r["sha256"]):
                    db.execute("UPDATE pulls SET status='deleted', time=? WHERE relay=? AND sop_uid=?", (_now(), key, uid))
        for inst in listed:
            row = ledger.get(inst.sop_uid)
            data = None
            if row is not None and row["status"] == "deleted":
                # listed again after it was deleted (the site sent it once more): the same bytes are a duplicate
                # of what the archive has; other bytes are a new version and are checked like a new instance
                data = relay.retrieve(inst)
                if sha256_bytes(data) != row["sha256"]:
                    row = None
            if row is None or row["status"] in ("rejected",):
                data = data if data is not None else relay.retrieve(inst)
                why = _verify(trial, inst, data, manifest)
                if why is not None:
                    status = "foreign" if why.startswith("foreign") else "rejected"
                    summary[status] += 1
                    if status == "rejected":
                        summary["problems"].append(f"{inst.sop_uid}: {why}")
                    with tx(db):
                        db.execute("INSERT OR REPLACE INTO pulls(relay, sop_uid, study_uid, series_uid, sha256, status, "
                                   "inbox_path, detail, time) VALUES (?, ?, ?, ?, ?, ?, NULL, ?, ?)",
                                   (key, inst.sop_uid, inst.study_uid, inst.series_uid, sha256_bytes(data), status,
                                    json.dumps({"reason": why}), _now()))
                    log(f"pull: {inst.sop_uid} {status}: {why}")
                    continue
                dest = _handoff(W, inbox, inst, data)
                if on_instance:
                    on_instance(inst.sop_uid, "in_inbox")
                sha = sha256_bytes(data)
                with tx(db):
                    db.execute("INSERT OR REPLACE INTO pulls(relay, sop_uid, study_uid, series_uid, sha256, status, "
                               "inbox_path, detail, time) VALUES (?, ?, ?, ?, ?, 'received', ?, ?, ?)",
                               (key, inst.sop_uid, inst.study_uid, inst.series_uid, sha, str(dest),
                                json.dumps({"manifest": inst.sop_uid in manifest}), _now()))
                summary["received"] += 1
                row = {"status": "received", "sha256": sha}
                if on_instance:
                    on_instance(inst.sop_uid, "received")
            elif row["status"] == "foreign":
                summary["foreign"] += 1
                continue
            else:
                summary["already"] += 1
            if row["status"] in ("received", "deleted"):
                if not _archived(db, row["sha256"]):
                    summary["waiting_for_archive"] += 1
                    continue
                how = relay.delete(inst)
                with tx(db):
                    db.execute("UPDATE pulls SET status='deleted', detail=?, time=? WHERE relay=? AND sop_uid=?",
                               (json.dumps({"delete": how}), _now(), key, inst.sop_uid))
                summary["deleted"] += 1
                if on_instance:
                    on_instance(inst.sop_uid, "deleted")
        log(f"pull: {summary['listed']} on the relay, {summary['received']} received, {summary['deleted']} deleted, "
            f"{summary['waiting_for_archive']} waiting for the archive")
    finally:
        db.close()
        lock.close()
    summary["ok"] = not summary["problems"]
    return summary


def pulls(workdir: str | Path, relay: Optional[str] = None) -> list[dict]:
    """The pull ledger (detail decoded)."""
    db = connect_workdir(workdir)
    try:
        q, args = "SELECT * FROM pulls", ()
        if relay:
            q, args = q + " WHERE relay=?", (relay,)
        return [{**dict(r), "detail": json.loads(r["detail"] or "{}")} for r in db.execute(q + " ORDER BY time, sop_uid", args)]
    finally:
        db.close()


def parse_every(text: str) -> float:
    """``30s``, ``5m``, ``1h`` -> seconds."""
    import re

    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(s|m|h)?\s*", text or "")
    if not m:
        raise RelayError(f"--every takes a duration such as 30s, 5m or 1h, not {text!r}", code="E880")
    return float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, None: 1}[m.group(2)]


def pull_every(trial, relay: RelayClient, inbox, workdir, interval: float, *, manifest=None, log=lambda s: None,
               passes: Optional[int] = None, report: Callable[[dict], None] = lambda s: None) -> None:
    """Pull every ``interval`` seconds (``passes`` limits the count, for tests); a failed pass is reported and retried."""
    n = 0
    while passes is None or n < passes:
        try:
            report(pull_once(trial, relay, inbox, workdir, manifest=manifest, log=log))
        except RelayError as exc:
            report({"ok": False, "error": exc.diagnostic.message, "code": exc.diagnostic.code})
        n += 1
        if passes is None or n < passes:
            time.sleep(interval)
