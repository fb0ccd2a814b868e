"""DICOMweb STOW-RS: instances POSTed as multipart/related, the per-instance status read from the response."""
from __future__ import annotations

import io
import json
import uuid
from typing import Any, Callable, Iterator, Optional

from .destinations import Endpoint
from .objects import Item
from .sender import TIMEOUT, Result, status_text

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

