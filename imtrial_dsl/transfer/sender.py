"""What every sender shares: the per-instance result, batching results to the ledger, DICOM status texts.

Each sender hands {sha256: (status, detail)} (sent | failed) for every item it was given to ``emit``,
batch by batch, so the ledger is current when a run is interrupted.
"""
from __future__ import annotations

import email.utils
import time
from typing import Callable, Optional

Result = dict[str, tuple[str, dict]]
TIMEOUT = 60  # seconds, per request / DIMSE message
# Retries inside one run, for failures that may pass (connection refused or reset, a protocol error, HTTP 408/429/5xx):
# attempt k (0-based) waits BACKOFF_S * 2**k, or what the receiver's Retry-After asks when it asks at most MAX_WAIT_S.
RETRIES = 3
BACKOFF_S = 1.0
MAX_WAIT_S = 120.0


def retry_after(value: Optional[str], now: Optional[float] = None) -> Optional[float]:
    """Seconds a ``Retry-After`` header asks to wait (delay-seconds or an HTTP-date), or None."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def wait_before_retry(attempt: int, asked: Optional[float], *, backoff: float = None, cap: float = None) -> Optional[float]:
    """How long to wait before retry ``attempt`` (0-based): the receiver's ``asked`` Retry-After when given, else
    exponential backoff; None when the receiver asks for longer than ``cap`` (then the run does not wait)."""
    backoff = BACKOFF_S if backoff is None else backoff
    cap = MAX_WAIT_S if cap is None else cap
    if asked is not None:
        return asked if asked <= cap else None
    return min(cap, backoff * (2 ** attempt))

# PS3.18 / PS3.4 status codes a receiver may report per instance.
_STATUS_TEXT = {
    0x0000: "success", 0x0107: "warning: attribute list error", 0x0110: "processing failure",
    0x0111: "duplicate SOP instance", 0x0112: "no such object instance", 0x0117: "invalid object instance",
    0x0122: "SOP class not supported", 0x0124: "not authorized", 0x0211: "unrecognized operation",
    0xA700: "out of resources", 0xA900: "data set does not match SOP class", 0xB000: "coercion of data elements",
    0xB006: "elements discarded", 0xB007: "data set does not match SOP class (stored anyway)",
    0xC000: "cannot understand", 0xC122: "referenced transfer syntax not supported",
}


def status_text(code: int) -> str:
    """``0xC000 cannot understand``: a status code with its meaning (ranges by their high byte)."""
    text = _STATUS_TEXT.get(code)
    if text is None:
        text = {0xA7: "out of resources", 0xA9: "data set does not match SOP class", 0xC0: "cannot understand"}.get(
            code >> 8, "failure")
    return f"0x{code:04X} {text}"


class Sink:
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
