"""Vendor names as scanners spell them, normalized to one canonical name.

Scanners write Manufacturer differently across models and years; choosing a
protocol variant must not depend on that spelling.
"""
from __future__ import annotations

import fnmatch
import re
from typing import Iterable, Optional

CANONICAL_VENDORS = ("Siemens", "GE", "Philips", "Canon", "Hitachi", "Fujifilm", "United Imaging", "Bruker")

_ALIASES = [
    (re.compile(r"siemens", re.I), "Siemens"),
    (re.compile(r"^ge\b|general electric|ge medical|ge healthcare|gems", re.I), "GE"),
    (re.compile(r"philips", re.I), "Philips"),
    (re.compile(r"toshiba|canon", re.I), "Canon"),
    (re.compile(r"hitachi", re.I), "Hitachi"),
    (re.compile(r"fuji", re.I), "Fujifilm"),
    (re.compile(r"united imaging|uih", re.I), "United Imaging"),
    (re.compile(r"bruker", re.I), "Bruker"),
]


def normalize_vendor(name: Optional[str]) -> str:
    """'SIEMENS', 'Siemens Healthineers' -> 'Siemens'; 'GE MEDICAL SYSTEMS' -> 'GE'; unknown kept as stripped text."""
    if not name:
        return ""
    text = str(name).strip()
    for pattern, canonical in _ALIASES:
        if pattern.search(text):
            return canonical
    return text


def software_matches(pattern: Optional[str], versions: Iterable[str] | str | None) -> bool:
    """True if any software version string matches ``pattern`` (glob, case-insensitive; None matches all).

    SoftwareVersions is often multi-valued (e.g. ['syngo MR XA30', 'XA30A']); a
    version also matches when the pattern occurs as a whole token inside it.
    """
    if pattern is None:
        return True
    if versions is None:
        return False
    if isinstance(versions, str):
        versions = [v for v in re.split(r"\\", versions)]
    pat = pattern.lower()
    for v in versions:
        v = str(v).strip().lower()
        if fnmatch.fnmatchcase(v, pat):
            return True
        if any(fnmatch.fnmatchcase(tok, pat) for tok in re.split(r"[\s_/]+", v) if tok):
            return True
    return False


# Manufacturer (0008,0070) as scanners of each vendor write it, for objects a scanner matches on (the
# e-protocol's Model Specification Sequence). Seen in real headers: 'Siemens Healthineers' (XA30,
# tests' real-dicom reference), 'SIEMENS' (older software, pydicom test files), 'GE MEDICAL SYSTEMS',
# 'Philips Medical Systems' (real-dicom reference), 'TOSHIBA_MEC' (pydicom test files); 'CANON_MEC' is
# the same vendor's spelling after the company's renaming.
SCANNER_MANUFACTURERS: dict[str, tuple[str, ...]] = {
    "Siemens": ("SIEMENS", "Siemens Healthineers"),
    "GE": ("GE MEDICAL SYSTEMS",),
    "Philips": ("Philips Medical Systems", "Philips"),
    "Canon": ("CANON_MEC", "TOSHIBA_MEC"),
}


def scanner_manufacturers(vendor: str, written: str = "") -> list[str]:
    """The Manufacturer spellings a scanner of ``vendor`` writes; a spelling the study wrote that is not the
    canonical name is kept first (it came from a header); unknown vendors keep what was written."""
    canonical = normalize_vendor(vendor or written)
    known = list(SCANNER_MANUFACTURERS.get(canonical, ()))
    text = (written or "").strip()
    if text and text != canonical and text not in known:
        known.insert(0, text)
    return known or [text or canonical]


# Manufacturer (0008,0070) spellings real headers carry, for did-you-mean on a vendor no alias knows.
KNOWN_SPELLINGS = (
    "SIEMENS", "Siemens Healthineers", "GE MEDICAL SYSTEMS", "GE HEALTHCARE", "Philips", "Philips Medical Systems",
    "Philips Healthcare", "TOSHIBA", "Toshiba", "Canon Medical Systems", "CANON_MEC", "Hitachi", "FUJIFILM",
    "United Imaging Healthcare", "UIH", "Bruker",
)


def is_known_vendor(name: Optional[str]) -> bool:
    """Does the alias table recognize ``name`` (so variants and device matching can rely on it)?"""
    return normalize_vendor(name) in CANONICAL_VENDORS
