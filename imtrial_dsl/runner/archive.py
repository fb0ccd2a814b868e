"""Step 7, archive: a content-addressed, immutable store of de-identified instances with an
append-only, hash-chained audit log.

Layout under the archive root::

    objects/sha256/ab/cdef…            instance bytes, read-only, named by their sha256
    records/<subject>/<visit>/<kind>-<uid>/v0001.json   series/exam sidecars (adherence, QC, provenance);
                                        a correction is v0002 with ``supersedes`` = v0001's sha256
    audit.log.jsonl                     one JSON record per line; ``prev`` = previous record's ``hash``
    checkpoint.json                     the chain's anchor: record count and head hash, with a keyed MAC

Versions of an instance: an object whose SOPInstanceUID the archive already holds with other bytes (a
corrected instance) is a new version: its ``object.add`` record names the version it ``supersedes``;
both stay, and the newest is the instance's current version (what sidecars, reports and transfer use).

Anchored: the audit chain alone cannot show that its last records were removed, or that it was rewritten
consistently from some record on. So the record count and head hash are also kept in the state database
(table ``archive_anchor``) and in ``checkpoint.json`` (HMAC-SHA256 under a key derived from the study's
pseudonymization key), and :func:`verify` compares the log with both, and the files on disk with the log
both ways.

Idempotent: an object already in the log is never added again; a record whose content is unchanged
gets no new version. Crash-safe: files are written temp-then-rename *before* their audit record, so a
re-run after ``kill -9`` finds the file and appends the missing record (once). A torn last log line
(no newline: the writer died mid-append) was never a committed record and is cut off before the next
append. No original identifiers or site-side keys (exam keys, original UIDs) are written here.
"""
from __future__ import annotations

import fcntl
import getpass
import hashlib
import hmac
import json
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

from ..diagnostics import ImtrialError
from ..files import atomic_write_bytes, sha256_bytes, sha256_file


GENESIS = "0" * 64
CHECKPOINT = "checkpoint.json"
_OBJECT_ACTIONS = ("object.add", "object.current")


class ArchiveError(ImtrialError):
    """An exam the archive step refuses: no subject, nothing de-identified yet, or a file that is not de-identified."""

    code = "E805"


def _canon(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()


def tool_version() -> str:
    from .. import __version__

    return __version__


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no passwd entry in some containers
        return str(os.getuid())


class Archive:
    """One archive folder; safe for several processes at once (an exclusive file lock guards writes)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        (self.root / "objects" / "sha256").mkdir(parents=True, exist_ok=True)
        (self.root / "records").mkdir(parents=True, exist_ok=True)
        self.log = self.root / "audit.log.jsonl"
        self.log.touch(exist_ok=True)
        self._offset = 0
        self._head = GENESIS
        self._seq = 0
        self._objects: set[str] = set()
        self._current: dict[str, str] = {}          # SOPInstanceUID -> sha256 of its newest version
        self._versions: dict[str, int] = {}         # SOPInstanceUID -> number of versions recorded
        self._records: dict[str, list[dict]] = {}

    # ------------------------------------------------------------------ locking and the log index
    @contextmanager
    def locked(self) -> Iterator[None]:
        with open(self.root / ".lock", "a+") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                self._sync()
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def _sync(self) -> None:
        """Read log records appended since the last look (by this or another process)."""
        with open(self.log, "rb") as fh:
            fh.seek(self._offset)
            data = fh.read()
        end = data.rfind(b"\n")
        if end < 0:
            return
        for line in data[: end + 1].splitlines():
            if not line.strip():
                continue
            rec = json.loads(line)
            self._index(rec)
        self._offset += end + 1

    def _index(self, rec: dict) -> None:
        self._head, self._seq = rec["hash"], rec["seq"]
        if rec["action"] in _OBJECT_ACTIONS:
            self._objects.add(rec["sha256"])
            uid = rec.get("sop_uid")
            if uid:
                self._current[uid] = rec["sha256"]
                self._versions[uid] = self._versions.get(uid, 0) + 1
        elif rec["action"] in ("record.add", "record.correct"):
            self._records.setdefault(rec["key"], []).append(rec)

    def _repair_tail(self) -> None:
        size = self.log.stat().st_size
        if size and size > self._offset:
            with open(self.log, "rb+") as fh:
                fh.seek(self._offset)
                rest = fh.read()
                if b"\n" not in rest:  # a torn write: never committed
                    fh.truncate(self._offset)

    def _append(self, action: str, *, sync: bool = True, **fields: Any) -> dict:
        self._repair_tail()
        rec = {"seq": self._seq + 1, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "user": _user(),
               "action": action, **fields, "prev": self._head}
        rec["hash"] = sha256_bytes(_canon(rec))
        line = _canon(rec) + b"\n"
        fd = os.open(self.log, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, line)
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)
        self._offset += len(line)
        self._index(rec)
        return rec

    # ------------------------------------------------------------------ objects
    def object_path(self, sha: str) -> Path:
        return self.root / "objects" / "sha256" / sha[:2] / sha[2:]

    def has_object(self, sha: str) -> bool:
        with self.locked():
            return sha in self._objects

    def put_object(self, src: str | Path, **meta: Any) -> tuple[str, bool]:
        """Store one file by content; returns (sha256, added). Same bytes are never stored twice."""
        return self.put_objects([(src, meta)])[0]

    def put_objects(self, items: list[tuple[str | Path, dict]]) -> list[tuple[str, bool]]:
        """Store many files at once; returns (sha256, added) per item. Same bytes are never stored twice.

        An item whose ``sop_uid`` the archive holds with other bytes becomes that instance's new version
        (``supersedes`` names the previous one; bytes that were an earlier version become current again with an
        ``object.current`` record). All bytes are written and flushed to disk (one ``os.sync``) before their audit
        records are appended, so the log never names an object that a power cut could lose."""
        data = [(Path(src).read_bytes(), meta) for src, meta in items]
        out: list[tuple[str, bool]] = []
        with self.locked():
            todo: list[tuple[str, str, int, Path, dict]] = []   # (action, sha, size, path, meta)
            planned: dict[str, str] = {}                        # sop_uid -> sha made current by this call
            for blob, meta in data:
                sha = sha256_bytes(blob)
                uid = meta.get("sop_uid")
                current = planned.get(uid, self._current.get(uid)) if uid else None
                known = sha in self._objects or any(sha == t[1] for t in todo)
                if (known and not uid) or (uid and current == sha):
                    out.append((sha, False))
                    continue
                extra = dict(meta)
                if uid and current is not None:
                    extra["supersedes"] = current
                    extra["version"] = self._versions.get(uid, 0) + sum(t[4].get("sop_uid") == uid for t in todo) + 1
                dest = self.object_path(sha)
                if known:  # an earlier version's bytes, current again
                    todo.append(("object.current", sha, len(blob), dest, extra))
                    planned[uid] = sha
                    out.append((sha, False))
                    continue
                if not (dest.exists() and dest.stat().st_size == len(blob) and sha256_bytes(dest.read_bytes()) == sha):
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
                    tmp.write_bytes(blob)
                    os.chmod(tmp, 0o444)
                    os.replace(tmp, dest)
                todo.append(("object.add", sha, len(blob), dest, extra))
                if uid:
                    planned[uid] = sha
                out.append((sha, True))
            if todo:
                os.sync()
                for i, (action, sha, size, dest, meta) in enumerate(todo):
                    self._append(action, sync=(i == len(todo) - 1), sha256=sha, size=size,
                                 path=str(dest.relative_to(self.root)), **meta)
        return out

    def current_objects(self) -> dict[str, str]:
        """SOPInstanceUID -> sha256 of the instance's newest version."""
        with self.locked():
            return dict(self._current)

    # ------------------------------------------------------------------ records (sidecars)
    def history(self, key: str) -> list[dict]:
        """Audit records of every version of one record key, oldest first."""
        with self.locked():
            return list(self._records.get(key, []))

    def read_record(self, key: str, version: Optional[int] = None) -> Optional[dict]:
        hist = self.history(key)
        if not hist:
            return None
        rec = hist[-1] if version is None else next((h for h in hist if h["version"] == version), None)
        return json.loads((self.root / rec["path"]).read_text()) if rec else None

    def put_record(self, key: str, content: dict, provenance: dict, *, reason: Optional[str] = None) -> tuple[dict, bool]:
        """Store a sidecar; a changed content becomes a new version that supersedes the previous one.

        Returns (audit record of the current version, added).
        """
        content_sha = sha256_bytes(_canon(content))
        with self.locked():
            hist = self._records.get(key, [])
            if hist and hist[-1]["content_sha256"] == content_sha:
                return hist[-1], False
            version = len(hist) + 1
            supersedes = {"version": hist[-1]["version"], "sha256": hist[-1]["sha256"]} if hist else None
            doc = {"key": key, "version": version, "supersedes": supersedes, "content": content,
                   "content_sha256": content_sha, "provenance": provenance}
            if reason:
                doc["reason"] = reason
            data = json.dumps(doc, indent=2, sort_keys=True, default=str).encode() + b"\n"
            dest = self.root / "records" / key / f"v{version:04d}.json"
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
            tmp.write_bytes(data)
            os.chmod(tmp, 0o444)
            os.replace(tmp, dest)  # an unaudited leftover from a killed run is simply replaced
            rec = self._append("record.correct" if hist else "record.add", key=key, version=version,
                               sha256=sha256_bytes(data), content_sha256=content_sha,
                               path=str(dest.relative_to(self.root)), supersedes=supersedes)
            return rec, True

    # ------------------------------------------------------------------ anchoring and verification
    def checkpoint(self, key: Optional[bytes] = None) -> dict:
        """Write ``checkpoint.json`` (record count, head hash, MAC under ``key``) for the chain as it is now;
        returns the anchor ``{records, head, time}``. Monotonic: written under the archive's lock."""
        with self.locked():
            self._repair_tail()
            anchor = {"records": self._seq, "head": self._head,
                      "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            doc = {**anchor, "mac": _mac(key, anchor) if key else None}
            atomic_write_bytes(self.root / CHECKPOINT, json.dumps(doc, indent=2, sort_keys=True).encode() + b"\n",
                               durable=True)
            return anchor

    def verify(self, *, deep: bool = True, anchor: Optional[dict] = None, key: Optional[bytes] = None) -> dict:
        """Check the archive; ``{"ok", "records", "objects", "current", "head", "errors", "notes"}``.

        Always: each record's hash and its link to the previous one; the chain against ``checkpoint.json`` and
        against ``anchor`` (the state database's, when given): fewer records than anchored means records were
        removed, another hash at the anchored position means the chain was rewritten; the checkpoint's MAC
        when ``key`` is given; every file under ``objects/`` and ``records/`` named by the log, and every
        logged file present. ``deep`` (the default) also re-hashes every stored file against its logged sha256."""
        errors: list[str] = []
        notes: list[str] = []
        prev, n = GENESIS, 0
        hashes: list[str] = []
        raw = self.log.read_bytes()
        lines = raw.split(b"\n")
        if lines and lines[-1] == b"":
            lines.pop()
        elif lines and lines[-1]:
            errors.append("last line is incomplete (torn write)")
            lines.pop()
        logged: dict[str, str] = {}
        objects = 0
        for i, line in enumerate(lines, 1):
            try:
                rec = json.loads(line)
            except ValueError:
                errors.append(f"line {i}: not JSON")
                break
            body = {k: v for k, v in rec.items() if k != "hash"}
            if rec.get("prev") != prev:
                errors.append(f"line {i}: chain broken (prev does not match the previous record's hash)")
            if sha256_bytes(_canon(body)) != rec.get("hash"):
                errors.append(f"line {i}: record hash mismatch (record altered)")
            if rec.get("seq") != i:
                errors.append(f"line {i}: sequence number {rec.get('seq')} (expected {i})")
            if rec.get("path"):
                logged[rec["path"]] = rec.get("sha256")
                p = self.root / rec["path"]
                if not p.exists():
                    errors.append(f"line {i}: {rec['path']} is missing")
                elif deep and sha256_file(p) != rec["sha256"]:
                    errors.append(f"line {i}: {rec['path']} content does not match its logged sha256")
            objects += rec.get("action") == "object.add"
            prev = rec.get("hash")
            hashes.append(prev)
            n += 1
        for sub in ("objects", "records"):  # the other way: every stored file is in the log
            for p in sorted((self.root / sub).rglob("*")):
                if not p.is_file():
                    continue
                rel = p.relative_to(self.root).as_posix()
                if rel in logged:
                    continue
                if p.name.startswith(".") and p.name.endswith(".tmp"):
                    notes.append(f"{rel}: a temporary file of an interrupted write (removed by the next run)")
                else:
                    errors.append(f"{rel} is stored but not in the audit log (an object nobody recorded)")
        cp_path = self.root / CHECKPOINT
        checkpoint = None
        if cp_path.exists():
            try:
                checkpoint = json.loads(cp_path.read_text())
                checkpoint = {k: checkpoint[k] for k in ("records", "head", "time", "mac")}
            except (ValueError, KeyError, TypeError):
                errors.append(f"{CHECKPOINT} is not a checkpoint (unreadable or altered)")
                checkpoint = None
        if checkpoint is not None:
            if key is None:
                notes.append(f"{CHECKPOINT}: MAC not checked (no key given)")
            elif checkpoint["mac"] is None:
                errors.append(f"{CHECKPOINT} is unsigned, but a key was given")
            elif not hmac.compare_digest(str(checkpoint["mac"]), _mac(key, checkpoint)):
                errors.append(f"{CHECKPOINT}: MAC does not match (the checkpoint was altered, or written under another key)")
        anchors = [(f"{CHECKPOINT}", checkpoint)] + ([("the state database", anchor)] if anchor is not None else [])
        for where, a in anchors:
            if a is None:
                continue
            m = int(a["records"])
            if n < m:
                errors.append(f"the log has {n} record(s), {where} anchored {m}: records were removed "
                              "(or the log replaced)")
            elif m and hashes[m - 1] != a["head"]:
                errors.append(f"record {m} does not have the head hash {where} anchored: the chain was rewritten")
            elif n > m:
                notes.append(f"{n - m} record(s) after the anchor in {where} (appended since; the next run anchors them)")
        if anchor is None and checkpoint is None and n:
            notes.append("the chain is not anchored (no checkpoint, no state database): removed last records "
                         "or a consistent rewrite cannot be detected")
        current = _current_of(lines)
        return {"ok": not errors, "records": n, "objects": objects, "current": len(current), "head": prev,
                "anchored": {w: (a["records"] if a else None) for w, a in anchors}, "errors": errors, "notes": notes}


def _mac(key: bytes, anchor: dict) -> str:
    """The checkpoint's MAC: HMAC-SHA256 of its record count and head under a key derived for this use only."""
    k = hmac.new(key, b"imtrial archive checkpoint v1", hashlib.sha256).digest()
    return hmac.new(k, _canon({"records": int(anchor["records"]), "head": anchor["head"]}), hashlib.sha256).hexdigest()


def _current_of(lines: list[bytes]) -> dict[str, str]:
    cur: dict[str, str] = {}
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            break
        if rec.get("action") in _OBJECT_ACTIONS:
            cur[rec.get("sop_uid") or rec["sha256"]] = rec["sha256"]
    return cur


def checkpoint_key(trial) -> Optional[bytes]:
    """The key a study's archive checkpoints are signed with: its pseudonymization key (derived for this use
    inside :func:`_mac`), or None when the study names none or it is not available."""
    from ..secrets import SecretError, read_secret

    src = (trial.deidentify.key if trial is not None and trial.deidentify else None) or \
        (trial.identifiers.key if trial is not None and trial.identifiers else None)
    if src is None:
        return None
    try:
        return read_secret(src, study_file=trial.source_file)
    except SecretError:
        return None


def anchor_name(root: str | Path, workdir: Optional[str | Path] = None) -> str:
    """The archive's name in table ``archive_anchor``: relative to the workdir when inside it (a moved workdir
    keeps its anchor), else the absolute path."""
    root = Path(root).resolve()
    if workdir is not None:
        try:
            return root.relative_to(Path(workdir).resolve()).as_posix()
        except ValueError:
            pass
    return str(root)


def anchor(root: str | Path, *, key: Optional[bytes], store=None) -> dict:
    """Checkpoint the archive and, with a state ``store``, record the anchor there too (never moving it back)."""
    a = Archive(root).checkpoint(key)
    if store is not None and a["records"]:
        with store.tx() as db:
            db.execute("INSERT INTO archive_anchor(archive, records, head, time) VALUES (?, ?, ?, ?) "
                       "ON CONFLICT(archive) DO UPDATE SET records=excluded.records, head=excluded.head, "
                       "time=excluded.time WHERE excluded.records > archive_anchor.records",
                       (anchor_name(root, store.workdir), a["records"], a["head"], a["time"]))
    return a


def verify(root: str | Path, *, deep: bool = True, state=None, key: Optional[bytes] = None) -> dict:
    """Verify an archive (see :meth:`Archive.verify`); ``state``: the workdir whose state database holds its anchor."""
    a = None
    if state is not None:
        from ..store import Store

        st = Store(state, create=False)
        try:
            row = st.db.execute("SELECT records, head FROM archive_anchor WHERE archive=?",
                                (anchor_name(root, state),)).fetchone()
        finally:
            st.close()
        if row is None:
            res = Archive(root).verify(deep=deep, key=key)
            if res["records"]:
                res["notes"].append("the state database holds no anchor for this archive (written before anchors "
                                    "existed? the next 'imtrial run' anchors it)")
            return res
        a = dict(row)
    return Archive(root).verify(deep=deep, anchor=a, key=key)


# ------------------------------------------------------------------ the step

def _series_entry(doc: Any, uid: str) -> Optional[dict]:
    """The entry for one series in a classification/adherence/qc result, whatever its exact nesting."""
    if not isinstance(doc, dict):
        return None
    series = doc.get("series")
    if isinstance(series, dict):
        return series.get(uid)
    if isinstance(series, list):
        for s in series:
            if isinstance(s, dict) and uid in (s.get("series_uid"), s.get("SeriesInstanceUID"), s.get("series_instance_uid")):
                return s
    return None


_DEVICE_KEYS = ("device", "reported")


def _scrub(obj: Any, drop: tuple[str, ...]) -> Any:
    if isinstance(obj, dict):
        return {k: _scrub(v, drop) for k, v in obj.items() if k not in drop}
    if isinstance(obj, list):
        return [_scrub(v, drop) for v in obj]
    return obj


def _redact(obj: Any, secrets: list[str]) -> Any:
    """Replace device serials/stations inside free text (e.g. a finding's message) when they must not leave."""
    if not secrets:
        return obj
    if isinstance(obj, dict):
        return {k: _redact(v, secrets) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_redact(v, secrets) for v in obj]
    if isinstance(obj, str):
        for sec in secrets:
            obj = obj.replace(sec, "[removed]")
    return obj


def _device_secrets(trial, exam_info: dict) -> list[str]:
    """Serial and station of the acquiring device (site-side exam.json), unless the study retains them."""
    opts = {getattr(o, "value", o) for o in (trial.deidentify.options if trial is not None and trial.deidentify else [])}
    if "retain_device_identity" in opts:
        return []
    rep = (exam_info or {}).get("device") or {}
    vals = [str(rep.get(k) or "").strip() for k in ("serial", "station")]
    return sorted({v for v in vals if len(v) >= 3}, key=len, reverse=True)


def _exam_level(doc: Any, trial=None) -> Optional[dict]:
    """Exam-level part of a step result. Site-side keys (exam key, paths) stay out of the archive, and so do
    reported device identities (serial, station) unless the study retains device identity."""
    if not isinstance(doc, dict):
        return None
    drop = ("series", "exam", "exam_key", "out", "files", "path")
    opts = {getattr(o, "value", o) for o in (trial.deidentify.options if trial is not None and trial.deidentify else [])}
    if "retain_device_identity" not in opts:
        drop += _DEVICE_KEYS
    return _scrub(doc, drop)


def _load(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def provenance(trial, step_name: str, params: dict) -> dict:
    return {"tool": "imtrial", "tool_version": tool_version(), "step": step_name,
            "study": trial.study.code if trial and trial.study else None,
            "study_sha256": getattr(trial, "source_sha256", None), "parameters": params,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "user": _user(), "host": socket.gethostname()}


def _study_params(trial) -> dict:
    d = trial.deidentify if trial else None
    return {"deidentify": {"profile": d.profile.name, "options": [getattr(o, "value", o) for o in d.options],
                           "overrides": len(d.overrides)} if d else None,
            "qc": sorted(q.name for q in trial.qc) if trial else [],
            "protocols": sorted(p.name for p in trial.protocols) if trial else []}


def archive_step(ctx) -> dict:
    """Store an exam's de-identified instances and per-series sidecars; idempotent, audited.

    The archive is ``W/archive`` in a local run, or ``ctx.archive_root`` (a CWL batch)."""
    import pydicom

    from ..deid.plan import keeps_identity
    from ..deid.step import instance_facts
    from ..workdir import ADHERENCE, ARCHIVED, CLASSIFICATION, DEID, QC
    from .qc import merge_by_series

    trial = ctx.trial
    ident = ctx.identity
    cls, adh = ctx.read_json(CLASSIFICATION), ctx.read_json(ADHERENCE)
    qc = merge_by_series(ctx.read_json(r) for r in ctx.under(QC))
    deid = ctx.path(DEID)
    files = sorted(p for p in deid.rglob("*") if p.is_file() and not p.name.startswith(".") and p.suffix != ".json")
    if not files:  # e.g. every instance was refused by de-identification (quarantined, reported there)
        res = {"instances": 0, "objects_added": 0, "series": 0, "records": [], "new_record_versions": 0,
               "note": "no de-identified instances in this exam"}
        ctx.write_json(ARCHIVED, res)
        return res
    arch = Archive(ctx.archive_root)
    subject, visit = ident["subject_id"], ident.get("visit") or "unscheduled"
    by_series: dict[str, list[dict]] = {}
    study_uid = None
    added = 0
    items, heads = [], []
    # what the de-identification step of this process wrote (file name -> (size, facts)): read, not parsed again
    written = ctx.cache.data.get("deid_facts") or {}
    for f in files:
        hit = written.get(f.name)
        if hit is not None and hit[0] == f.stat().st_size:
            removed, study, suid, sop, inum = hit[1]
        else:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            removed, study, suid, sop, inum = instance_facts(ds)
        # NO only where the study's overrides keep identity (deid.plan.keeps_identity; the checker then requires
        # a destination declared `receives identified`, and transfer sends such objects nowhere else)
        if removed != "YES" and not (removed == "NO" and keeps_identity(trial)):
            raise ArchiveError(f"{f}: PatientIdentityRemoved is not YES; refusing to archive a non-de-identified file")
        study_uid = study_uid or study
        items.append((f, {"subject": subject, "visit": visit, "series_uid": suid, "sop_uid": sop}))
        heads.append((suid, sop, inum))
    for (sha, was_added), (suid, sop, inum) in zip(arch.put_objects(items), heads):
        added += was_added
        by_series.setdefault(suid, []).append({"sop_uid": sop, "sha256": sha, "instance_number": inum})
    params = _study_params(trial)
    secrets = _device_secrets(trial, ctx.exam_info)
    records = []
    new_versions = 0
    for suid, inst in sorted(by_series.items()):
        inst.sort(key=lambda i: (int(i["instance_number"]) if str(i["instance_number"] or "").isdigit() else 0, i["sop_uid"]))
        c = _series_entry(cls, suid) or {}
        content = {"kind": "series", "subject": subject, "visit": visit, "site": ident.get("site"),
                   "timepoint": ident.get("timepoint"), "study_uid": study_uid, "series_uid": suid,
                   "protocol": c.get("protocol"), "classification": {k: c.get(k) for k in ("status", "protocol", "candidates")} if c else None,
                   "adherence": _scrub(_series_entry(adh, suid), ("files", "path")),
                   "qc": _scrub(_series_entry(qc, suid), ("files", "path")),
                   "instances": [{"sop_uid": i["sop_uid"], "sha256": i["sha256"]} for i in inst]}
        content = _redact(content, secrets)
        rec, new = arch.put_record(f"{subject}/{visit}/series-{suid}", content, provenance(trial, "archive", params))
        new_versions += new
        records.append({"key": rec["key"], "version": rec["version"], "new": new})
    exam_content = {"kind": "exam", "subject": subject, "visit": visit, "site": ident.get("site"),
                    "device": ident.get("device"), "timepoint": ident.get("timepoint"),
                    "shifted_date": ident.get("shifted_date"), "in_window": ident.get("in_window"),
                    "study_uid": study_uid, "series": sorted(by_series),
                    "adherence": _exam_level(adh, trial), "qc": _exam_level(qc, trial)}
    rec, new = arch.put_record(f"{subject}/{visit}/exam-{study_uid}", _redact(exam_content, secrets),
                               provenance(trial, "archive", params))
    new_versions += new
    res = {"instances": len(files), "objects_added": added, "series": len(by_series),
           "records": records, "new_record_versions": new_versions}
    key = checkpoint_key(trial)
    if ctx.workdir is not None and Path(ctx.archive_root) == ctx.workdir.archive:
        from ..store import Store

        with Store(ctx.workdir.root) as st:
            anchor(arch.root, key=key, store=st)
    else:  # a staged archive (CWL): the checkpoint file is its anchor
        anchor(arch.root, key=key)
    ctx.write_json(ARCHIVED, res)
    return res
