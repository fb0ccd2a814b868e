"""Step results (``results/*.json``) carry no device or institution identity: the one policy for it.

Results are documented as free of PHI, yet the classification, adherence and QC steps read the original
headers at the site. Before a result is written, every ``serial``, ``station`` and ``institution`` key is
dropped and the exam's own serial number, station name and institution name/address (from the site-side
``exam.json``) are replaced by ``[removed]`` wherever they appear in text (a finding's message, a description).
"""
from __future__ import annotations

from typing import Any, Iterable, Optional

DEVICE_IDENTITY_KEYS = frozenset({"serial", "station", "institution"})
REMOVED = "[removed]"


def exam_identifiers(exam_info: Optional[dict]) -> list[str]:
    """The exam's serial, station and institution values (longest first; values shorter than 3 characters
    are not searched for: they would match inside ordinary words)."""
    dev = (exam_info or {}).get("device") or {}
    vals: list[str] = []
    for k in DEVICE_IDENTITY_KEYS:
        v = dev.get(k)
        vals += [str(x).strip() for x in (v if isinstance(v, list) else [v]) if x]
    return sorted({v for v in vals if len(v) >= 3}, key=lambda v: (-len(v), v))


def scrub(obj: Any, secrets: Iterable[str]) -> Any:
    """``obj`` without device-identity keys and with ``secrets`` replaced in every string."""
    secrets = list(secrets)
    if isinstance(obj, dict):
        return {k: scrub(v, secrets) for k, v in obj.items() if k not in DEVICE_IDENTITY_KEYS}
    if isinstance(obj, list):
        return [scrub(v, secrets) for v in obj]
    if isinstance(obj, str):
        for s in secrets:
            if s in obj:
                obj = obj.replace(s, REMOVED)
        return obj
    return obj


def scrub_device_identity(doc: Any, exam_info: Optional[dict]) -> Any:
    """A step result as it may be written: see the module docstring."""
    return scrub(doc, exam_identifiers(exam_info))
