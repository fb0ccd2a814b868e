"""A DICOMweb relay as the central site's puller sees it: QIDO-RS to list, WADO-RS to retrieve, and a delete.

Credentials come from the environment through :mod:`imtrial_dsl.secrets` — ``IMTRIAL_RELAY_TOKEN``
(sent as ``Authorization: Bearer``) or ``IMTRIAL_RELAY_USER`` + ``IMTRIAL_RELAY_PASSWORD`` (HTTP basic),
or the token of the study's ``transfer`` destination named by ``--from`` — never from the command line
(a URL with ``user:password@`` is refused) and never written anywhere. HTTPS verifies the server's
certificate against the system store, or the CA bundle in ``SSL_CERT_FILE``; credentials are not sent
over plain HTTP to a host other than the loopback. Redirects are not followed (they would carry the
credentials elsewhere).

DICOMweb has no delete in PS3.18 that every server implements, so how an instance leaves the relay is a
setting: ``orthanc`` (Orthanc's REST API beside its DICOMweb plugin: ``/tools/lookup`` then
``DELETE /instances/{id}``), ``dicomweb`` (``DELETE`` on the instance's WADO-RS URL, as e.g. cloud
healthcare APIs accept) or ``keep`` (never delete; the ledger still fetches each instance once).
"""
from __future__ import annotations

import base64
import ipaddress
import json
import re
import ssl
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Optional

from .. import ir
from . import TransferError

TIMEOUT = 60
DELETE_MODES = ("orthanc", "dicomweb", "keep")
PAGE = 500
TOKEN_ENV, USER_ENV, PASSWORD_ENV = "IMTRIAL_RELAY_TOKEN", "IMTRIAL_RELAY_USER", "IMTRIAL_RELAY_PASSWORD"


class RelayError(TransferError):
    """The relay cannot be used: unreachable, refused our credentials, bad certificate, bad answer (E880–E884)."""

    code = "E880"


@dataclass(frozen=True)
class Instance:
    study_uid: str
    series_uid: str
    sop_uid: str


def _env_secret(name: str) -> Optional[str]:
    import os

    from ..secrets import SecretError, read_secret

    if name not in os.environ:
        return None
    try:
        return read_secret(ir.KeySource(kind="env", ref=name), study_file=None, what="relay credentials").decode()
    except SecretError as exc:
        raise RelayError(exc.diagnostic.message, code="E881") from None


def _loopback(host: Optional[str]) -> bool:
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host or "").is_loopback
    except ValueError:
        return False


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


class RelayClient:
    """One relay's DICOMweb base URL, with credentials and certificate verification."""

    def __init__(self, url: str, *, token: Optional[str] = None, token_source: Optional[str] = None,
                 delete: str = "orthanc"):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise RelayError(f"the relay must be an http(s) URL, not {url!r}", code="E880")
        if parts.username or parts.password:
            raise RelayError("credentials in the relay URL are refused (they would land in shell history and logs): "
                             f"set {TOKEN_ENV}, or {USER_ENV} and {PASSWORD_ENV}", code="E881")
        if delete not in DELETE_MODES:
            raise RelayError(f"delete mode must be one of {', '.join(DELETE_MODES)}, got {delete!r}", code="E883")
        self.url = url.rstrip("/")
        self.delete_mode = delete
        self.auth: Optional[str] = None
        self.auth_source = None
        if token is None:
            token, token_source = _env_secret(TOKEN_ENV), f"env {TOKEN_ENV}"
        user = _env_secret(USER_ENV)
        if token:
            self.auth, self.auth_source = f"Bearer {token}", token_source
        elif user is not None:
            password = _env_secret(PASSWORD_ENV)
            if password is None:
                raise RelayError(f"{USER_ENV} is set but {PASSWORD_ENV} is not", code="E881")
            self.auth = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
            self.auth_source = f"env {USER_ENV}/{PASSWORD_ENV}"
        if self.auth and parts.scheme == "http" and not _loopback(parts.hostname):
            raise RelayError(f"refusing to send relay credentials over plain http to {parts.hostname}: use https",
                             code="E882")
        self._secrets = [s for s in (token, user and _env_secret(PASSWORD_ENV)) if s]
        self._opener = urllib.request.build_opener(_NoRedirect(), urllib.request.HTTPSHandler(context=ssl.create_default_context()))

    # ------------------------------------------------------------------ HTTP
    def describe(self) -> str:
        return self.url

    def _redact(self, text: str) -> str:
        for s in self._secrets:
            text = text.replace(s, "[secret]")
        return text

    def _request(self, method: str, url: str, *, accept: Optional[str] = None, data: Optional[bytes] = None,
                 ctype: Optional[str] = None, ok: tuple[int, ...] = (200,)) -> tuple[int, bytes, str]:
        headers = {"User-Agent": "imtrial-pull"}
        if accept:
            headers["Accept"] = accept
        if ctype:
            headers["Content-Type"] = ctype
        if self.auth:
            headers["Authorization"] = self.auth
        req = urllib.request.Request(url, data=data, headers=headers, method=method)
        try:
            with self._opener.open(req, timeout=TIMEOUT) as resp:
                return resp.status, resp.read(), resp.headers.get("Content-Type", "")
        except urllib.error.HTTPError as exc:
            body = b""
            try:
                body = exc.read()
            except OSError:
                pass
            if exc.code in ok:
                return exc.code, body, exc.headers.get("Content-Type", "") if exc.headers else ""
            if exc.code in (401, 403):
                raise RelayError(f"the relay refused our credentials (HTTP {exc.code}) for {method} "
                                 f"{self._path(url)}" + ("" if self.auth else f": set {TOKEN_ENV} or {USER_ENV}/"
                                                                               f"{PASSWORD_ENV}"), code="E881") from None
            if exc.code in (301, 302, 303, 307, 308):
                raise RelayError(f"the relay redirected {method} {self._path(url)} to {exc.headers.get('Location')}; "
                                 "point --from at the final URL", code="E880") from None
            snippet = self._redact(body.decode("utf-8", "replace").strip().replace("\n", " ")[:200])
            raise RelayError(f"{method} {self._path(url)}: HTTP {exc.code} {exc.reason}" + (f": {snippet}" if snippet else ""),
                             code="E880") from None
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, ssl.SSLCertVerificationError):
                raise RelayError(f"the relay's certificate does not verify ({exc.reason.verify_message}); give the CA "
                                 "bundle in SSL_CERT_FILE", code="E882") from None
            raise RelayError(f"cannot reach the relay {self.url}: {self._redact(str(exc.reason))}", code="E880") from None
        except (OSError, TimeoutError) as exc:
            raise RelayError(f"cannot reach the relay {self.url}: {self._redact(str(exc))}", code="E880") from None

    def _path(self, url: str) -> str:
        return urllib.parse.urlsplit(url).path

    # ------------------------------------------------------------------ QIDO-RS
    def instances(self) -> list[Instance]:
        """Every instance the relay holds (QIDO-RS per study, paged)."""
        studies = self._qido(self.url + "/studies", {"includefield": "0020000D"})
        out: list[Instance] = []
        for st in studies:
            suid = _value(st, "0020000D")
            if not suid:
                continue
            for it in self._qido(f"{self.url}/studies/{suid}/instances", {"includefield": "0020000E"}):
                se, sop = _value(it, "0020000E"), _value(it, "00080018")
                if se and sop:
                    out.append(Instance(suid, se, sop))
        return sorted(set(out), key=lambda i: (i.study_uid, i.series_uid, i.sop_uid))

    def _qido(self, url: str, params: dict) -> list[dict]:
        out: list[dict] = []
        offset = 0
        while True:
            q = urllib.parse.urlencode({**params, "limit": PAGE, "offset": offset})
            status, body, _ = self._request("GET", f"{url}?{q}", accept="application/dicom+json", ok=(200, 204))
            page = json.loads(body) if status == 200 and body.strip() else []
            if not isinstance(page, list):
                raise RelayError(f"QIDO-RS {self._path(url)}: the answer is not a JSON list", code="E880")
            out += page
            if len(page) < PAGE:
                return out
            offset += len(page)

    # ------------------------------------------------------------------ WADO-RS
    def retrieve(self, inst: Instance) -> bytes:
        """The instance's Part 10 bytes as stored (transfer syntax ``*``: no transcoding)."""
        url = f"{self.url}/studies/{inst.study_uid}/series/{inst.series_uid}/instances/{inst.sop_uid}"
        _, body, ctype = self._request("GET", url, accept='multipart/related; type="application/dicom"; transfer-syntax=*')
        parts = split_multipart(body, ctype)
        if len(parts) != 1:
            raise RelayError(f"WADO-RS {inst.sop_uid}: expected one instance, the relay sent {len(parts)} part(s)", code="E880")
        return parts[0]

    # ------------------------------------------------------------------ delete
    def delete(self, inst: Instance) -> str:
        """Remove one instance from the relay; returns how (for the ledger). An instance already gone is fine."""
        if self.delete_mode == "keep":
            return "kept on the relay (--delete keep)"
        if self.delete_mode == "dicomweb":
            url = f"{self.url}/studies/{inst.study_uid}/series/{inst.series_uid}/instances/{inst.sop_uid}"
            status, _, _ = self._request("DELETE", url, ok=(200, 202, 204, 404))
            return f"DELETE {status}"
        rest = re.sub(r"/dicom-web$", "", self.url)
        _, body, _ = self._request("POST", rest + "/tools/lookup", data=inst.sop_uid.encode(), ctype="text/plain")
        hits = [h["ID"] for h in json.loads(body or b"[]") if h.get("Type") == "Instance"]
        for iid in hits:
            self._request("DELETE", f"{rest}/instances/{iid}", ok=(200, 404))
        return f"deleted ({len(hits)} Orthanc instance(s))" if hits else "already gone from the relay"


def _value(item: dict, tag: str) -> Optional[str]:
    vals = (item.get(tag) or {}).get("Value") or []
    return str(vals[0]) if vals else None


def split_multipart(body: bytes, ctype: str) -> list[bytes]:
    """The parts of a multipart/related body (WADO-RS), as bytes (binary-safe: split on the boundary only)."""
    m = re.search(r'boundary="?([^";]+)"?', ctype or "", re.I)
    if "multipart/" not in (ctype or "").lower() or not m:
        raise RelayError(f"WADO-RS: expected a multipart/related answer, got {ctype or 'no Content-Type'}", code="E880")
    delim = b"--" + m.group(1).strip().encode()
    parts = []
    for chunk in body.split(delim)[1:]:
        if chunk.startswith(b"--"):
            break  # the closing delimiter
        head, sep, payload = chunk.partition(b"\r\n\r\n")
        if not sep:
            raise RelayError("WADO-RS: a part of the multipart answer has no header end", code="E880")
        parts.append(payload[:-2] if payload.endswith(b"\r\n") else payload)
    return parts
