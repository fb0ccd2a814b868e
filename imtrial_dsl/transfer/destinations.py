"""Destinations: the endpoint a declared ``transfer`` destination resolves to, and its credentials."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

from ..diagnostics import did_you_mean
from . import TransferError

DEFAULT_CALLED_AE = "ANY-SCP"


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
                                + (" (use --host-override/--port-override)" if ep.kind == "dicom" else ""), code="E832")
        if not re.match(r"(?i)https?://", url_override):
            raise TransferError(f"--url-override must be an http(s) URL, not {url_override!r}", code="E832")
        ep = replace(ep, url=url_override.rstrip("/"), overridden=True)
    if host_override is not None or port_override is not None:
        if ep.kind != "dicom":
            raise TransferError(f"--host-override/--port-override apply to a dicom endpoint; {cur.name!r} is {ep.kind}",
                                code="E832")
        ep = replace(ep, host=host_override or ep.host, port=int(port_override) if port_override is not None else ep.port,
                     overridden=True)
    if path_override is not None:
        if ep.kind != "folder":
            raise TransferError(f"--path-override applies to a folder endpoint; {cur.name!r} is {ep.kind}", code="E832")
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
        raise TransferError(exc.diagnostic.message, code="E833") from None


def auth_source(auth) -> Optional[str]:
    """Where the token comes from (``env NAME`` / ``file PATH``), for summaries: never the token."""
    return None if auth is None else f"{auth.kind} {auth.ref}"
