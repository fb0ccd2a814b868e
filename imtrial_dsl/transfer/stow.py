"""DICOMweb STOW-RS: instances POSTed as multipart/related, the per-instance status read from the response."""
from __future__ import annotations

import io
import json
import uuid
from typing import Any, Callable, Iterator, Optional

from . import sender
from .destinations import Endpoint
from .objects import Item
from .sender import TIMEOUT, Result, status_text

# answers after which the same request may succeed (PS3.18 / RFC 9110): retried with backoff inside the run
RETRYABLE_HTTP = {408, 429, 500, 502, 503, 504}

STOW_MAX_INSTANCES = 50
STOW_MAX_BYTES = 32 * 1024 * 1024


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
            out[str(uid)] = ("sent", "stored" + (f" with warning {status_text(int(warn))}" if warn is not None else ""))
    for it in _dicom_json_items(doc, "00081198"):  # FailedSOPSequence
        uid = _json_value(it, "00081155")
        code = _json_value(it, "00081197")  # FailureReason
        if not uid:
            continue
        code_i = int(code) if code is not None else None
        if code_i == 0x0111:  # the receiver already holds this SOP instance
            out[str(uid)] = ("sent", "already at the destination (duplicate SOP instance)")
        else:
            out[str(uid)] = ("failed", "rejected: " + (status_text(code_i) if code_i is not None else "no FailureReason given"))
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


def _post(opener, req, token: Optional[str], describe: str) -> dict:
    """One STOW-RS request: ``{"http_status", "body", "ctype", "phrase", "retry_after", "error", "retryable"}``.
    Every failure below HTTP (refused, reset, timed out, a malformed or cut-short response) is an ``error``
    with ``retryable`` set, never an exception."""
    import http.client
    import urllib.error

    out = {"http_status": None, "body": b"", "ctype": "", "phrase": "", "retry_after": None, "error": None,
           "retryable": False}
    try:
        with opener.open(req, timeout=TIMEOUT) as resp:
            out.update(http_status=resp.status, ctype=resp.headers.get("Content-Type", ""))
            out["body"] = resp.read()
    except urllib.error.HTTPError as exc:
        out.update(http_status=exc.code, phrase=str(exc.reason or ""))
        out["ctype"] = exc.headers.get("Content-Type", "") if exc.headers else ""
        out["retry_after"] = exc.headers.get("Retry-After") if exc.headers else None
        try:
            out["body"] = exc.read()
        except (OSError, http.client.HTTPException):
            out["body"] = b""
        if exc.code in (301, 302, 303, 307, 308):
            out["error"] = (f"HTTP {exc.code} redirect to {exc.headers.get('Location')!s}; point the destination at "
                            "the final URL")
        out["retryable"] = exc.code in RETRYABLE_HTTP
    except urllib.error.URLError as exc:
        why = exc.reason
        text = "connection refused" if isinstance(why, ConnectionRefusedError) else str(why)
        out.update(error=f"cannot reach {describe}: {_redact(text, token)}", retryable=True)
    except http.client.IncompleteRead as exc:  # the status line came, the body did not: nothing is acknowledged
        out.update(http_status=None, error=f"protocol error from {describe}: the response was cut short (IncompleteRead: "
                         f"{len(exc.partial)} byte(s) read, {exc.expected if exc.expected is not None else 'more'} expected)",
                   retryable=True)
    except http.client.RemoteDisconnected:
        out.update(error=f"protocol error from {describe}: the receiver closed the connection without a response",
                   retryable=True)
    except http.client.BadStatusLine as exc:
        out.update(error=f"protocol error from {describe}: not an HTTP response (BadStatusLine: "
                         f"{_redact(str(exc)[:80], token)!r})", retryable=True)
    except http.client.HTTPException as exc:  # LineTooLong, UnknownProtocol, …: the response is not usable HTTP
        out.update(error=f"protocol error from {describe}: {type(exc).__name__}: {_redact(str(exc)[:120], token)}",
                   retryable=True)
    except ConnectionResetError:
        out.update(error=f"connection reset by {describe}", retryable=True)
    except (OSError, TimeoutError) as exc:
        out.update(error=f"cannot reach {describe}: {_redact(str(exc), token)}", retryable=True)
    return out


def _acknowledged(per: dict, it: Item, http_status: Optional[int], err: Optional[str]) -> tuple[str, str]:
    """(status, reason) for one instance: only what the response says about this SOP instance counts."""
    if it.sop_uid in per:
        return per[it.sop_uid]
    if err:
        return "failed", err
    if http_status == 200 and not per:  # PS3.18: 200 means every instance of the request was stored
        return "sent", "stored (HTTP 200)"
    if per:
        return "failed", (f"not acknowledged: the HTTP {http_status} response lists other SOP instances, not this one")
    return "failed", f"not acknowledged in the STOW-RS response (HTTP {http_status})"


def send_stow(ep: Endpoint, items: list[Item], token: Optional[str], emit: Callable[[Result], None],
              log: Callable[[str], None], *, retries: Optional[int] = None,
              sleep: Callable[[float], None] = None) -> None:
    """STOW-RS: POST ``{url}/studies`` as multipart/related; per-instance status from the response.

    A request that fails below HTTP or gets 408/429/5xx is repeated up to ``retries`` times (default
    :data:`sender.RETRIES`), waiting as the receiver's ``Retry-After`` asks or with exponential backoff."""
    import time
    import urllib.request

    retries = sender.RETRIES if retries is None else retries
    sleep = sleep or time.sleep
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
        tries = 0
        while True:
            tries += 1
            req = urllib.request.Request(url, data=buf.getvalue(), headers=headers, method="POST")
            r = _post(opener, req, token, ep.describe())
            if not r["retryable"] or tries > retries:
                break
            wait = sender.wait_before_retry(tries - 1, sender.retry_after(r["retry_after"]))
            what = r["error"] or f"HTTP {r['http_status']}"
            if wait is None:
                r["error"] = (r["error"] or f"HTTP {r['http_status']} {r['phrase']}".strip()) + \
                    f" (the receiver asks to retry after {r['retry_after']} s, longer than this run waits)"
                break
            log(f"transfer: {what}; retry {tries}/{retries} in {wait:g} s")
            sleep(wait)
        http_status, body, ctype, err, phrase = r["http_status"], r["body"], r["ctype"], r["error"], r["phrase"]
        if http_status is None:  # nothing usable came back, after every retry: do not hammer the receiver
            fatal = err
            emit({it.sha256: ("failed", {"reason": err, "retryable": True, "tries": tries}) for it in batch})
            continue
        per = parse_stow_response(body, ctype) if http_status in (200, 202, 409) else {}
        if err is None and http_status not in (200, 202, 409):
            snippet = _redact(body.decode("utf-8", "replace").strip().replace("\n", " ")[:200], token)
            err = f"HTTP {http_status}" + (f" {phrase}" if phrase else "") + (f": {snippet}" if snippet else "")
        if http_status in (401, 403) or (http_status in (429, 503) and r["retryable"]):
            fatal = err  # credentials will not improve for the next batch, nor an overloaded receiver
        for it in batch:
            status, reason = _acknowledged(per, it, http_status, err)
            detail = {"reason": reason, "http_status": http_status, "tries": tries}
            if status == "sent":
                detail["acknowledged"] = it.sop_uid
            results[it.sha256] = (status, detail)
        emit(results)
        log(f"transfer: STOW-RS batch of {len(batch)} -> HTTP {http_status}")
