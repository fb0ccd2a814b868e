"""Transfer: send the archive's de-identified instances to a destination the study declares.

Kinds: ``dicomweb`` (STOW-RS over plain ``urllib``), ``dicom`` (C-STORE with pynetdicom), ``folder``
(a verified copy). What was sent where is a ledger, the ``transfers`` table of ``W/state.sqlite``
(one row per destination and instance sha256), so a re-run sends only what the receiver has not
acknowledged and every failure stays recorded with its reason.

Guarantees, in the order they are checked for every instance before anything leaves:
the object's bytes still hash to its name, it is DICOM Part 10, and PatientIdentityRemoved is YES;
anything else is *refused* (recorded, never sent). Bearer tokens come from the destination's
``auth`` (env or file) and appear in no log, result or ledger row.

``via`` (relay): ``transfer X … via R`` means the data for X travel through R, so the instances are
sent to R's endpoint (following R's own ``via`` to the first hop), with R's kind and credentials;
forwarding to X is the relay's job. The ledger still names X.

Why ``urllib`` rather than dicomweb-client: STOW-RS is one multipart/related POST; doing it by hand
keeps the dependency set small and gives direct control over the points that matter here — the
per-instance status in the response (ReferencedSOPSequence / FailedSOPSequence), no redirects
(which would forward the token), and where the token goes.
"""
from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import re
import socket
import sys
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Optional


AE_ENV = "IMTRIAL_AE_TITLE"
DEFAULT_AE = "IMTRIAL"
DEFAULT_CALLED_AE = "ANY-SCP"
STOW_MAX_INSTANCES = 50
STOW_MAX_BYTES = 32 * 1024 * 1024
TIMEOUT = 60  # seconds, per request / DIMSE message
MAX_CONTEXTS = 128  # presentation contexts per association (PS3.8)


# PS3.18 / PS3.4 status codes a receiver may report per instance.
_STATUS_TEXT = {
    0x0000: "success", 0x0107: "warning: attribute list error", 0x0110: "processing failure",
    0x0111: "duplicate SOP instance", 0x0112: "no such object instance", 0x0117: "invalid object instance",
    0x0122: "SOP class not supported", 0x0124: "not authorized", 0x0211: "unrecognized operation",
    0xA700: "out of resources", 0xA900: "data set does not match SOP class", 0xB000: "coercion of data elements",
    0xB006: "elements discarded", 0xB007: "data set does not match SOP class (stored anyway)",
    0xC000: "cannot understand", 0xC122: "referenced transfer syntax not supported",
}


def _status_text(code: int) -> str:
    text = _STATUS_TEXT.get(code)
    if text is None:
        text = {0xA7: "out of resources", 0xA9: "data set does not match SOP class", 0xC0: "cannot understand"}.get(
            code >> 8, "failure")
    return f"0x{code:04X} {text}"


class TransferError(Exception):
    """A problem with the request itself (unknown destination, missing credentials, bad override)."""


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# ----------------------------------------------------------------------------- endpoints

@dataclass(frozen=True)
class Endpoint:
    """Where instances for a destination actually go (after following relays and applying overrides)."""

    destination: str                 # the destination asked for
    contacted: str                   # the destination whose endpoint is contacted (differs with ``via``)
    kind: str                        # dicomweb | dicom | folder
    url: Optional[str] = None
    host: Optional[str] = None
    port: Optional[int] = None
    ae_title: Optional[str] = None
    path: Optional[str] = None
    auth: Any = None                 # ir.KeySource of the contacted destination, or None
    via: tuple[str, ...] = ()        # relay chain after the destination, e.g. ("central",)
    overridden: bool = False

    def describe(self) -> str:
        """Human-readable address without credentials (a URL's user:password part is dropped)."""
        if self.kind == "dicomweb":
            return re.sub(r"//[^/@]*@", "//", self.url or "")
        if self.kind == "dicom":
            return f"{self.ae_title or DEFAULT_CALLED_AE}@{self.host}:{self.port}"
        return str(self.path)

    @property
    def ledger_key(self) -> str:
        """The ledger's ``destination``: the name, plus the address when an override redirected it, so
        acknowledgements from a test or staging endpoint never count for the declared one."""
        return f"{self.destination}@{self.describe()}" if self.overridden else self.destination


def resolve(trial, name: str, *, url_override: Optional[str] = None, host_override: Optional[str] = None,
            port_override: Optional[int] = None, path_override: Optional[str] = None) -> Endpoint:
    """The endpoint to contact for destination ``name``: follow ``via`` to the first hop, apply overrides."""
    from ..diagnostics import did_you_mean

    dests = {d.name: d for d in trial.transfers}
    if name not in dests:
        hint = did_you_mean(name, dests)
        known = ", ".join(sorted(dests)) or "none declared"
        raise TransferError(f"unknown transfer destination {name!r}" + (f"; {hint}" if hint else "") + f" (known: {known})")
    chain = [name]
    cur = dests[name]
    while cur.relay is not None:
        nxt = cur.relay.name
        if nxt not in dests:
            raise TransferError(f"destination {cur.name!r} relays via undefined destination {nxt!r}")
        if nxt in chain:
            raise TransferError(f"transfer relays form a loop: {' -> '.join(chain + [nxt])}")
        chain.append(nxt)
        cur = dests[nxt]
    ep = Endpoint(destination=name, contacted=cur.name, kind=cur.kind, url=(cur.url or "").rstrip("/") or None, host=cur.host, port=cur.port,
                  ae_title=cur.ae_title, path=cur.path, auth=cur.auth, via=tuple(chain[1:]))
    if url_override is not None:
        if ep.kind != "dicomweb":
            raise TransferError(f"--url-override applies to a dicomweb endpoint; {cur.name!r} is {ep.kind}"
                                + (" (use --host-override/--port-override)" if ep.kind == "dicom" else ""))
        if not re.match(r"(?i)https?://", url_override):
            raise TransferError(f"--url-override must be an http(s) URL, not {url_override!r}")
        ep = replace(ep, url=url_override.rstrip("/"), overridden=True)
    if host_override is not None or port_override is not None:
        if ep.kind != "dicom":
            raise TransferError(f"--host-override/--port-override apply to a dicom endpoint; {cur.name!r} is {ep.kind}")
        ep = replace(ep, host=host_override or ep.host, port=int(port_override) if port_override is not None else ep.port,
                     overridden=True)
    if path_override is not None:
        if ep.kind != "folder":
            raise TransferError(f"--path-override applies to a folder endpoint; {cur.name!r} is {ep.kind}")
        ep = replace(ep, path=path_override, overridden=True)
    missing = {"dicomweb": ["url"] if not ep.url else [],
               "dicom": [k for k in ("host", "port") if not getattr(ep, k)],
               "folder": ["path"] if not ep.path else []}[ep.kind]
    if missing:
        raise TransferError(f"destination {cur.name!r} ({ep.kind}) has no {' or '.join(missing)}")
    return ep


def read_token(auth) -> Optional[str]:
    """The bearer token named by a KeySource (env variable or file); the message names the source, never the value.

    A relative token file resolves against the folder of the file that declares it (the study file)."""
    from ..secrets import SecretError, read_secret

    if auth is None:
        return None
    try:
        return read_secret(auth, study_file=auth.span.file if auth.span else None,
                           what="the destination's token").decode("utf-8")
    except SecretError as exc:
        raise TransferError(exc.diagnostic.message) from None


def _auth_source(auth) -> Optional[str]:
    return None if auth is None else f"{auth.kind} {auth.ref}"


# ----------------------------------------------------------------------------- archive objects

def archived_objects(archive: str | Path) -> list[dict]:
    """Every object of the archive in audit-log order: ``{sha256, path, subject, visit, series_uid, sop_uid}``.

    Read-only (no lock, no repair): a torn last line was never a committed record and is ignored."""
    root = Path(archive)
    log = root / "audit.log.jsonl"
    if not log.is_file():
        raise TransferError(f"no archive at {root} (no audit.log.jsonl): run 'imtrial run' first")
    out, seen = [], set()
    data = log.read_bytes()
    for line in data[: data.rfind(b"\n") + 1].splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        if rec.get("action") != "object.add" or rec["sha256"] in seen:
            continue
        seen.add(rec["sha256"])
        sha = rec["sha256"]
        out.append({"sha256": sha, "path": root / (rec.get("path") or f"objects/sha256/{sha[:2]}/{sha[2:]}"),
                    **{k: rec.get(k) for k in ("subject", "visit", "series_uid", "sop_uid")}})
    return out


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


def check_object(obj: dict) -> tuple[Optional[Item], Optional[str]]:
    """(item, None) when the object may leave the site, else (None, reason it is refused)."""
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
    if removed != "YES":
        return None, f"PatientIdentityRemoved is {removed or 'absent'}, not YES: only de-identified instances are sent"
    return Item(obj["sha256"], path, obj, sop_class, sop_uid, ts, len(data)), None


# ----------------------------------------------------------------------------- the ledger

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
        t = _now()
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
    path = Path(workdir) / "state.sqlite"
    if not path.exists():
        return []
    led = Ledger(path)
    try:
        return led.rows(destination)
    finally:
        led.close()


@contextmanager
def _exclusive(state: Optional[Path]) -> Iterator[None]:
    """One transfer per state database at a time, so two runs never send the same instance twice."""
    if state is None:
        yield
        return
    lock = state.with_name(state.name + ".transfer.lock")
    with open(lock, "a+") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise TransferError(f"another transfer is running on {state} (lock {lock.name})") from None
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


# ----------------------------------------------------------------------------- senders
# Each sender hands {sha256: (status, detail)} (sent | failed) for every item it was given to ``emit``,
# batch by batch, so the ledger is current when a run is interrupted.

Result = dict[str, tuple[str, dict]]


def _redact(text: str, secret: Optional[str]) -> str:
    return text.replace(secret, "[token]") if secret else text


def _no_redirect_opener():
    """A urllib opener that turns every redirect into an error: a redirected POST would lose its body
    or carry the bearer token to another host."""
    import urllib.request

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, req, fp, code, msg, headers, newurl):
            return None

    return urllib.request.build_opener(NoRedirect())


def _dicom_json_items(doc: Any, tag: str) -> list[dict]:
    if isinstance(doc, list):
        doc = doc[0] if doc and isinstance(doc[0], dict) else {}
    if not isinstance(doc, dict):
        return []
    seq = doc.get(tag) or {}
    return [i for i in (seq.get("Value") or []) if isinstance(i, dict)]


def _json_value(item: dict, tag: str) -> Any:
    vals = (item.get(tag) or {}).get("Value") or []
    return vals[0] if vals else None


def _xml_to_json(text: str) -> dict:
    """The part of a PS3.19 Native DICOM Model response we need, as DICOM JSON."""
    import xml.etree.ElementTree as ET

    def conv(node) -> dict:
        out: dict = {}
        for attr in node.findall("DicomAttribute"):
            tag, vr = attr.get("tag", "").upper(), attr.get("vr")
            if vr == "SQ":
                out[tag] = {"vr": vr, "Value": [conv(it) for it in attr.findall("Item")]}
            else:
                vals = [v.text for v in attr.findall("Value")]
                if vr in ("US", "UL", "SS", "SL"):
                    vals = [int(v) for v in vals if v is not None]
                out[tag] = {"vr": vr, "Value": vals}
        return out

    return conv(ET.fromstring(text))


def parse_stow_response(body: bytes, content_type: str) -> dict:
    """``{sop_uid: ("sent"|"failed", reason)}`` from a STOW-RS response body (JSON or XML)."""
    text = body.decode("utf-8", "replace").strip()
    if not text:
        return {}
    try:
        doc = _xml_to_json(text) if "xml" in content_type or text.startswith("<") else json.loads(text)
    except Exception:
        return {}
    out: dict[str, tuple[str, str]] = {}
    for it in _dicom_json_items(doc, "00081199"):  # ReferencedSOPSequence: stored
        uid = _json_value(it, "00081155")
        warn = _json_value(it, "00081196")  # WarningReason
        if uid:
            out[str(uid)] = ("sent", "stored" + (f" with warning {_status_text(int(warn))}" if warn is not None else ""))
    for it in _dicom_json_items(doc, "00081198"):  # FailedSOPSequence
        uid = _json_value(it, "00081155")
        code = _json_value(it, "00081197")  # FailureReason
        if not uid:
            continue
        code_i = int(code) if code is not None else None
        if code_i == 0x0111:  # the receiver already holds this SOP instance
            out[str(uid)] = ("sent", "already at the destination (duplicate SOP instance)")
        else:
            out[str(uid)] = ("failed", "rejected: " + (_status_text(code_i) if code_i is not None else "no FailureReason given"))
    return out


def _stow_batches(items: list[Item]) -> Iterator[list[Item]]:
    batch, size = [], 0
    for it in items:
        if batch and (len(batch) >= STOW_MAX_INSTANCES or size + it.size > STOW_MAX_BYTES):
            yield batch
            batch, size = [], 0
        batch.append(it)
        size += it.size
    if batch:
        yield batch


def send_stow(ep: Endpoint, items: list[Item], token: Optional[str], emit: Callable[[Result], None],
              log: Callable[[str], None]) -> None:
    """STOW-RS: POST ``{url}/studies`` as multipart/related; per-instance status from the response."""
    import urllib.error
    import urllib.request

    opener = _no_redirect_opener()
    url = ep.url.rstrip("/") + "/studies"
    fatal: Optional[str] = None
    for batch in _stow_batches(items):
        results: Result = {}
        if fatal:
            emit({it.sha256: ("failed", {"reason": f"not attempted: {fatal}"}) for it in batch})
            continue
        parts = [(it, it.path.read_bytes()) for it in batch]
        boundary = uuid.uuid4().hex
        while any(boundary.encode() in data for _, data in parts):
            boundary = uuid.uuid4().hex
        buf = io.BytesIO()
        for _, data in parts:
            buf.write(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode())
            buf.write(data)
            buf.write(b"\r\n")
        buf.write(f"--{boundary}--\r\n".encode())
        headers = {"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
                   "Accept": "application/dicom+json", "User-Agent": "imtrial-transfer"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        req = urllib.request.Request(url, data=buf.getvalue(), headers=headers, method="POST")
        http_status, body, ctype, err, phrase = None, b"", "", None, ""
        try:
            with opener.open(req, timeout=TIMEOUT) as resp:
                http_status, body, ctype = resp.status, resp.read(), resp.headers.get("Content-Type", "")
        except urllib.error.HTTPError as exc:
            http_status, phrase = exc.code, str(exc.reason or "")
            ctype = exc.headers.get("Content-Type", "") if exc.headers else ""
            try:
                body = exc.read()
            except Exception:
                body = b""
            if exc.code in (301, 302, 303, 307, 308):
                err = f"HTTP {exc.code} redirect to {exc.headers.get('Location')!s}; point the destination at the final URL"
        except urllib.error.URLError as exc:
            fatal = f"cannot reach {ep.describe()}: {_redact(str(exc.reason), token)}"
        except (OSError, TimeoutError) as exc:
            fatal = f"cannot reach {ep.describe()}: {_redact(str(exc), token)}"
        if fatal:
            emit({it.sha256: ("failed", {"reason": fatal}) for it in batch})
            continue
        per = parse_stow_response(body, ctype) if http_status in (200, 202, 409) else {}
        if err is None and http_status not in (200, 202, 409):
            snippet = _redact(body.decode("utf-8", "replace").strip().replace("\n", " ")[:200], token)
            err = f"HTTP {http_status}" + (f" {phrase}" if phrase else "") + (f": {snippet}" if snippet else "")
        if http_status in (401, 403):
            fatal = err  # credentials will not improve for the next batch
        for it in batch:
            if it.sop_uid in per:
                status, reason = per[it.sop_uid]
            elif err:
                status, reason = "failed", err
            elif http_status == 200:  # PS3.18: 200 means every instance of the request was stored
                status, reason = "sent", "stored (HTTP 200)"
            else:
                status, reason = "failed", f"not acknowledged in the STOW-RS response (HTTP {http_status})"
            results[it.sha256] = (status, {"reason": reason, "http_status": http_status})
        emit(results)
        log(f"transfer: STOW-RS batch of {len(batch)} -> HTTP {http_status}")


class _Sink:
    """Collects per-instance results and hands them to ``emit`` every ``every`` instances."""

    def __init__(self, emit: Callable[[Result], None], every: int = 50):
        self.emit, self.every, self.buf = emit, every, {}

    def add(self, sha: str, status: str, detail: dict) -> None:
        self.buf[sha] = (status, detail)
        if len(self.buf) >= self.every:
            self.flush()

    def flush(self) -> None:
        if self.buf:
            buf, self.buf = self.buf, {}
            self.emit(buf)


def send_cstore(ep: Endpoint, items: list[Item], emit: Callable[[Result], None], log: Callable[[str], None]) -> None:
    """C-STORE: one association per group of up to 128 (SOP class, transfer syntax) presentation contexts."""
    from pynetdicom import AE, build_context

    calling = os.environ.get(AE_ENV, "").strip() or DEFAULT_AE
    if len(calling) > 16 or not re.fullmatch(r"[\x20-\x7e]+", calling) or "\\" in calling:
        raise TransferError(f"{AE_ENV}={calling!r} is not a valid AE title (1-16 printable characters, no backslash)")
    called = ep.ae_title or DEFAULT_CALLED_AE
    pairs: dict[tuple[str, str], list[Item]] = {}
    for it in items:
        pairs.setdefault((it.sop_class, it.transfer_syntax), []).append(it)
    keys = list(pairs)
    out = _Sink(emit)
    fatal: Optional[str] = None
    try:
        for start in range(0, len(keys), MAX_CONTEXTS):
            group = keys[start:start + MAX_CONTEXTS]
            todo = [it for k in group for it in pairs[k]]
            if fatal:
                for it in todo:
                    out.add(it.sha256, "failed", {"reason": f"not attempted: {fatal}"})
                continue
            ae = AE(ae_title=calling)
            ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = TIMEOUT
            ae.requested_contexts = [build_context(sc, [ts]) for sc, ts in group]
            try:
                assoc = ae.associate(ep.host, int(ep.port), ae_title=called)
            except (OSError, ValueError) as exc:  # unresolvable host, bad address
                fatal = f"cannot reach {called}@{ep.host}:{ep.port}: {exc}"
                for it in todo:
                    out.add(it.sha256, "failed", {"reason": fatal})
                continue
            if not assoc.is_established:
                why = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "could not be established"
                fatal = (f"association {calling} -> {called}@{ep.host}:{ep.port} {why}"
                         + (" (is our AE title known to the receiver? set IMTRIAL_AE_TITLE)" if assoc.is_rejected else ""))
                for it in todo:
                    out.add(it.sha256, "failed", {"reason": fatal})
                continue
            try:
                _cstore_group(assoc, todo, out)
            finally:
                if assoc.is_established:
                    assoc.release()
            log(f"transfer: C-STORE association for {len(todo)} instance(s) done")
    finally:
        out.flush()


def _cstore_group(assoc, todo: list[Item], out: _Sink) -> None:
    try:  # two small writes per message (command, data set): without NODELAY, Nagle costs ~40 ms each
        assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (AttributeError, OSError):
        pass
    accepted = {(c.abstract_syntax, c.transfer_syntax[0]) for c in assoc.accepted_contexts}
    for it in todo:
        if (it.sop_class, it.transfer_syntax) not in accepted:
            out.add(it.sha256, "failed", {"reason": f"receiver does not accept SOP class {it.sop_class} "
                                                    f"in transfer syntax {it.transfer_syntax}"})
            continue
        if not assoc.is_established:
            out.add(it.sha256, "failed", {"reason": "not attempted: the association was released or aborted"})
            continue
        try:
            status = assoc.send_c_store(it.path)
        except Exception as exc:  # pynetdicom raises on encoding/context problems for this one file
            out.add(it.sha256, "failed", {"reason": f"C-STORE not sent: {type(exc).__name__}: {exc}"})
            continue
        code = getattr(status, "Status", None) if status else None
        if code is None:
            out.add(it.sha256, "failed", {"reason": "no C-STORE response (connection lost or timed out)"})
        elif code == 0x0000 or code in (0xB000, 0xB006, 0xB007):
            out.add(it.sha256, "sent", {"reason": "stored" if code == 0 else f"stored with warning {_status_text(code)}",
                                        "dimse_status": code})
        else:
            out.add(it.sha256, "failed", {"reason": f"C-STORE {_status_text(code)}", "dimse_status": code})


def send_folder(ep: Endpoint, items: list[Item], base: Optional[Path], emit: Callable[[Result], None],
                log: Callable[[str], None]) -> None:
    """Copy to ``PATH/<subject>/<visit>/<series_uid>/<sop_uid>.dcm`` (temp file, fsync, rename, verify)."""
    root = Path(ep.path).expanduser()
    if not root.is_absolute() and base is not None:
        root = base / root
    out = _Sink(emit)

    def safe(part: Any, fallback: str) -> str:
        s = re.sub(r"[^A-Za-z0-9._-]", "_", str(part or "")).strip(".")
        return s or fallback

    try:
        for it in items:
            m = it.meta
            dest = root / safe(m.get("subject"), "unknown") / safe(m.get("visit"), "unscheduled") / \
                safe(m.get("series_uid"), "series") / f"{safe(it.sop_uid, it.sha256)}.dcm"
            try:
                if dest.exists():
                    if hashlib.sha256(dest.read_bytes()).hexdigest() == it.sha256:
                        out.add(it.sha256, "sent", {"reason": "already present", "file": str(dest)})
                    else:
                        out.add(it.sha256, "failed", {"reason": f"{dest} exists with different content; not overwritten"})
                    continue
                dest.parent.mkdir(parents=True, exist_ok=True)
                tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")  # hidden: a folder watcher ignores it
                with open(tmp, "wb") as fh:
                    fh.write(it.path.read_bytes())
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, dest)
                if hashlib.sha256(dest.read_bytes()).hexdigest() == it.sha256:
                    out.add(it.sha256, "sent", {"reason": "copied", "file": str(dest)})
                else:
                    out.add(it.sha256, "failed", {"reason": "copy verification failed (sha256 differs)"})
            except OSError as exc:
                out.add(it.sha256, "failed", {"reason": f"copy failed: {exc.strerror or exc}"})
    finally:
        out.flush()
    log(f"transfer: copied {len(items)} instance(s) to {root}")


# ----------------------------------------------------------------------------- the operation

def transfer(trial, archive: str | Path, destination: str, *, state: Optional[str | Path] = None,
             url_override: Optional[str] = None, host_override: Optional[str] = None,
             port_override: Optional[int] = None, path_override: Optional[str] = None,
             dry_run: bool = False, base: Optional[str | Path] = None,
             log: Callable[[str], None] = lambda s: None) -> dict:
    """Send every archived instance not yet acknowledged by ``destination``; returns a JSON-able summary.

    ``state`` is the SQLite file holding the ``transfers`` ledger (without it every instance is sent
    and nothing is remembered). ``base`` resolves a relative folder destination (default: cwd).
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
            token_problem = str(exc)
        if (ep.auth is not None and re.match(r"(?i)http://", ep.url or "")
                and not re.match(r"(?i)http://(127\.\d+\.\d+\.\d+|localhost|\[::1\])(:|/|$)", ep.url or "")):
            warnings.append("the bearer token would travel unencrypted (http:// to a non-loopback host); use https")
    if ep.via:
        warnings.append(f"{destination} is relayed via {' -> '.join(ep.via)}: instances go to {ep.contacted}'s endpoint; "
                        f"forwarding to {destination} is the relay's job")
    summary: dict[str, Any] = {
        "destination": destination, "ledger_destination": ep.ledger_key, "kind": ep.kind, "endpoint": ep.describe(),
        "contacted": ep.contacted, "via": list(ep.via), "overridden": ep.overridden, "auth": _auth_source(ep.auth),
        "dry_run": bool(dry_run), "archived": len(objects), "already_sent": 0, "to_send": 0,
        "sent": 0, "failed": 0, "refused": 0, "problems": [], "warnings": warnings, "time": _now()}
    if token_problem:
        summary["problems"].append({"sha256": None, "status": "failed", "reason": token_problem})
    with _exclusive(state_path if not dry_run else None):
        ledger = Ledger(state_path) if state_path else None
        try:
            before = ledger.statuses(ep.ledger_key) if ledger else {}
            pending = [o for o in objects if before.get(o["sha256"], ("",))[0] != "sent"]
            summary["already_sent"] = len(objects) - len(pending)
            items, refused = [], []
            for o in pending:
                item, why = check_object(o)
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
                    detail = {**detail, "sop_uid": it.sop_uid, "endpoint": ep.describe(), "attempts": attempts(sha)}
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
                    send_stow(ep, items, token, emit, log)
                elif ep.kind == "dicom":
                    send_cstore(ep, items, emit, log)
                else:
                    send_folder(ep, items, Path(base) if base else Path.cwd(), emit, log)
            if by_sha:  # a sender bug must not make an instance vanish from the record
                emit({sha: ("failed", {"reason": "no result from the sender"}) for sha in list(by_sha)})
        finally:
            if ledger:
                ledger.close()
    summary["ok"] = summary["failed"] == 0 and summary["refused"] == 0
    return summary


def transfer_step(trial, archive, destination, out, state=None, url_override=None, host_override=None,
                  port_override=None, path_override=None, dry_run=False) -> dict:
    """Send the archive's de-identified instances to a declared destination (STOW-RS, C-STORE or folder);
    resumable: only instances the destination has not acknowledged are sent."""
    try:
        summary = transfer(trial, archive, destination, state=state, url_override=url_override,
                           host_override=host_override, port_override=port_override, path_override=path_override,
                           dry_run=bool(dry_run))
    except TransferError as exc:  # nothing was sent; the summary says why (``ok`` false: the step exits 1)
        summary = {"destination": destination, "ok": False, "error": str(exc), "sent": 0}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return summary


# ----------------------------------------------------------------------------- command line

def format_summary(s: dict) -> str:
    head = "DRY RUN: " if s["dry_run"] else ""
    route = f" via {' -> '.join(s['via'])}" if s["via"] else ""
    lines = [f"{head}transfer to {s['destination']}{route} ({s['kind']} {s['endpoint']})"]
    if s["dry_run"]:
        lines.append(f"  archived {s['archived']}, already sent {s['already_sent']}, would send {s['to_send']} "
                     f"({s.get('would_send_bytes', 0)} bytes), would refuse {s['refused']}")
    else:
        lines.append(f"  archived {s['archived']}, already sent {s['already_sent']}, sent {s['sent']}, "
                     f"failed {s['failed']}, refused {s['refused']}")
    for w in s["warnings"]:
        lines.append(f"  warning: {w}")
    groups: dict[tuple[str, str], list[dict]] = {}
    for p in s["problems"]:
        groups.setdefault((p["status"], p["reason"]), []).append(p)
    for (status, reason), ps in groups.items():
        if len(ps) == 1:
            what = ps[0].get("sop_uid") or (ps[0].get("sha256") or "")[:16]
            lines.append(f"  {status}: " + (f"{what}: " if what else "") + reason)
        else:
            lines.append(f"  {status} ({len(ps)} instances): {reason}")
    return "\n".join(lines)


def cmd_transfer(args) -> int:
    from .commands import load_trial

    trial = load_trial(args.study)
    w = Path(args.workdir)
    if not (w / "state.sqlite").exists():
        print(f"imtrial transfer: no state database in {w} (run 'imtrial run' first)", file=sys.stderr)
        return 1
    log = (lambda s: print(s, file=sys.stderr)) if args.verbose else (lambda s: None)
    try:
        summary = transfer(trial, w / "archive", args.to, state=w / "state.sqlite", url_override=args.url_override,
                           host_override=args.host_override, port_override=args.port_override,
                           path_override=args.path_override, dry_run=args.dry_run, log=log)
    except TransferError as exc:
        print(f"imtrial transfer: {exc}", file=sys.stderr)
        return 2
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    print(json.dumps(summary, indent=2, sort_keys=True) if args.json else format_summary(summary))
    return 0 if summary["ok"] else 1


def register(subparsers) -> None:
    p = subparsers.add_parser("transfer", help="send archived de-identified instances to a declared destination",
                              description="Send W/archive's de-identified instances to a `transfer` destination of the "
                                          "study (DICOMweb STOW-RS, DICOM C-STORE or folder). Resumable: only what the "
                                          "destination has not acknowledged is sent (ledger: the transfers table of "
                                          "W/state.sqlite).")
    p.add_argument("study", metavar="STUDY", help=".imtrial file (or IR JSON)")
    p.add_argument("--workdir", required=True, metavar="DIR", help="the run's workdir (archive/ and state.sqlite)")
    p.add_argument("--to", required=True, metavar="NAME", help="destination name declared with `transfer NAME …`")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--url-override", metavar="URL", help="DICOMweb base URL to use instead of the declared one")
    g.add_argument("--host-override", metavar="HOST", help="DICOM host to use instead of the declared one")
    g.add_argument("--path-override", metavar="DIR", help="folder to use instead of the declared one")
    p.add_argument("--port-override", type=int, metavar="PORT", help="DICOM port to use instead of the declared one")
    p.add_argument("--dry-run", action="store_true", help="report what would be sent; send nothing, record nothing")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--out", metavar="FILE", help="also write the JSON summary to FILE")
    p.add_argument("--verbose", "-v", action="store_true")
    p.set_defaults(func=cmd_transfer)


def main(argv: Optional[list[str]] = None) -> int:
    """Stand-alone entry point: ``python -m imtrial_dsl.runner.transfer transfer STUDY …``."""
    import argparse

    ap = argparse.ArgumentParser(prog="imtrial")
    register(ap.add_subparsers(dest="command", required=True))
    args = ap.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
