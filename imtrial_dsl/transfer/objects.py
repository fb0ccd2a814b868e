"""What may leave the site: the archive's objects, each checked before it is sent."""
from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from . import TransferError


def archived_objects(archive: str | Path) -> list[dict]:
    """The current version of every instance in the archive, in audit-log order:
    ``{sha256, path, subject, visit, series_uid, sop_uid, version, supersedes}``.

    A corrected instance (same SOPInstanceUID, new bytes) is archived as a new version that supersedes the
    earlier one (runner/archive.py); only the newest version of each instance is a candidate to send.
    Read-only (no lock, no repair): a torn last line was never a committed record and is ignored."""
    root = Path(archive)
    log = root / "audit.log.jsonl"
    if not log.is_file():
        raise TransferError(f"no archive at {root} (no audit.log.jsonl): run 'imtrial run' first", code="E834")
    current: dict[str, dict] = {}
    data = log.read_bytes()
    for line in data[: data.rfind(b"\n") + 1].splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        if rec.get("action") not in ("object.add", "object.current"):
            continue
        sha = rec["sha256"]
        key = rec.get("sop_uid") or sha
        current.pop(key, None)  # re-inserted: the order is that of the newest version's record
        current[key] = {"sha256": sha, "path": root / (rec.get("path") or f"objects/sha256/{sha[:2]}/{sha[2:]}"),
                        **{k: rec.get(k) for k in ("subject", "visit", "series_uid", "sop_uid")},
                        "version": rec.get("version") or 1, "supersedes": rec.get("supersedes")}
    return list(current.values())


@dataclass
class Item:
    """One archive object checked and ready to send."""

    sha256: str
    path: Path
    meta: dict
    sop_class: str = ""
    sop_uid: str = ""
    transfer_syntax: str = ""
    size: int = 0


def may_receive_identified(trial, destination: str, via: tuple[str, ...] | list[str] = ()) -> bool:
    """Does the study declare ``destination`` — and every relay on the way — as one that may receive identified
    data (``transfer NAME … receives identified``)?"""
    names = [destination, *via]
    dests = {d.name: d for d in trial.transfers}
    return all(n in dests and dests[n].identified for n in names)


def check_object(obj: dict, *, identified_ok: bool = False) -> tuple[Optional[Item], Optional[str]]:
    """(item, None) when the object may leave the site, else (None, reason it is refused).

    Only de-identified instances leave: PatientIdentityRemoved YES — or NO (the study's overrides keep identity)
    when ``identified_ok`` (:func:`may_receive_identified`)."""
    import pydicom

    path = Path(obj["path"])
    try:
        data = path.read_bytes()
    except OSError as exc:
        return None, f"archive object unreadable: {exc.strerror}"
    if hashlib.sha256(data).hexdigest() != obj["sha256"]:
        return None, "archive object altered: its content no longer matches its sha256"
    try:
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    except Exception as exc:  # any parse failure means we cannot vouch for the file
        return None, f"not readable as DICOM: {type(exc).__name__}"
    meta = getattr(ds, "file_meta", None)
    ts = str(getattr(meta, "TransferSyntaxUID", "") or "") if meta is not None else ""
    sop_class = str(ds.get("SOPClassUID", "") or getattr(meta, "MediaStorageSOPClassUID", "") or "")
    sop_uid = str(ds.get("SOPInstanceUID", "") or getattr(meta, "MediaStorageSOPInstanceUID", "") or "")
    if not (ts and sop_class and sop_uid):
        return None, "not a DICOM Part 10 file with SOP Class, SOP Instance UID and Transfer Syntax"
    removed = str(ds.get("PatientIdentityRemoved", "") or "").strip().upper()
    if removed == "NO" and not identified_ok:
        return None, ("PatientIdentityRemoved is NO (the study's overrides keep identity): sent only to a destination "
                      "declared `receives identified`")
    if removed not in ("YES", "NO"):
        return None, f"PatientIdentityRemoved is {removed or 'absent'}, not YES: only de-identified instances are sent"
    return Item(obj["sha256"], path, obj, sop_class, sop_uid, ts, len(data)), None
