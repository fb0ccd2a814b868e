"""What every sender shares: the per-instance result, batching results to the ledger, DICOM status texts.

Each sender hands {sha256: (status, detail)} (sent | failed) for every item it was given to ``emit``,
batch by batch, so the ledger is current when a run is interrupted.
"""
from __future__ import annotations

from typing import Callable

Result = dict[str, tuple[str, dict]]
TIMEOUT = 60  # seconds, per request / DIMSE message

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
