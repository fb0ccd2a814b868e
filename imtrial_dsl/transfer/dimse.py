"""DICOM C-STORE (DIMSE, pynetdicom): one association per group of presentation contexts."""
from __future__ import annotations

import os
import re
import socket
from typing import Callable, Optional

from . import TransferError
from .destinations import DEFAULT_CALLED_AE, Endpoint
from .objects import Item
from . import sender
from .sender import TIMEOUT, Result, Sink, status_text

AE_ENV = "IMTRIAL_AE_TITLE"
DEFAULT_AE = "IMTRIAL"
MAX_CONTEXTS = 128  # presentation contexts per association (PS3.8)


def _why_not_established(host: str, port: int) -> str:
    """pynetdicom reports any failed association as 'aborted'; a plain TCP connect tells what happened."""
    try:
        socket.create_connection((host, port), timeout=min(TIMEOUT, 10)).close()
    except ConnectionRefusedError:
        return "connection refused (nothing listens on that port)"
    except (socket.timeout, TimeoutError):
        return "connection timed out"
    except OSError as exc:
        return f"cannot connect: {exc.strerror or exc}"
    return "aborted by the receiver"


def send_cstore(ep: Endpoint, items: list[Item], emit: Callable[[Result], None], log: Callable[[str], None], *,
                retries: Optional[int] = None, sleep: Optional[Callable[[float], None]] = None) -> None:
    """C-STORE: one association per group of up to 128 (SOP class, transfer syntax) presentation contexts.

    An association that cannot be established (refused, aborted, timed out; not a rejection, which names a
    configuration problem) is tried again up to ``retries`` times with exponential backoff."""
    import time

    from pynetdicom import AE, build_context

    retries = sender.RETRIES if retries is None else retries
    sleep = sleep or time.sleep

    calling = os.environ.get(AE_ENV, "").strip() or DEFAULT_AE
    if len(calling) > 16 or not re.fullmatch(r"[\x20-\x7e]+", calling) or "\\" in calling:
        raise TransferError(f"{AE_ENV}={calling!r} is not a valid AE title (1-16 printable characters, no backslash)",
                            code="E836")
    called = ep.ae_title or DEFAULT_CALLED_AE
    pairs: dict[tuple[str, str], list[Item]] = {}
    for it in items:
        pairs.setdefault((it.sop_class, it.transfer_syntax), []).append(it)
    keys = list(pairs)
    out = Sink(emit)
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
            assoc = None
            tries = 0
            while True:
                tries += 1
                try:
                    assoc = ae.associate(ep.host, int(ep.port), ae_title=called)
                except (OSError, ValueError) as exc:  # unresolvable host, bad address
                    fatal = f"cannot reach {called}@{ep.host}:{ep.port}: {exc}"
                    break
                if assoc.is_established or assoc.is_rejected:
                    break
                why = _why_not_established(ep.host, int(ep.port))
                fatal = f"association {calling} -> {called}@{ep.host}:{ep.port}: {why}"
                if tries > retries:
                    break
                wait = sender.wait_before_retry(tries - 1, None)
                log(f"transfer: {fatal}; retry {tries}/{retries} in {wait:g} s")
                sleep(wait)
            if assoc is not None and assoc.is_established:
                fatal = None
            elif assoc is not None and assoc.is_rejected:
                fatal = (f"association {calling} -> {called}@{ep.host}:{ep.port} rejected"
                         " (is our AE title known to the receiver? set IMTRIAL_AE_TITLE)")
            if fatal:
                for it in todo:
                    out.add(it.sha256, "failed", {"reason": fatal, "tries": tries})
                continue
            try:
                _cstore_group(assoc, todo, out)
            finally:
                if assoc.is_established:
                    assoc.release()
            log(f"transfer: C-STORE association for {len(todo)} instance(s) done")
    finally:
        out.flush()


def _cstore_group(assoc, todo: list[Item], out: Sink) -> None:
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
            out.add(it.sha256, "sent", {"reason": "stored" if code == 0 else f"stored with warning {status_text(code)}",
                                        "dimse_status": code, "acknowledged": it.sop_uid})
        else:
            out.add(it.sha256, "failed", {"reason": f"C-STORE {status_text(code)}", "dimse_status": code})
