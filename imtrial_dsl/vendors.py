"""Vendor names as scanners spell them, normalized to one canonical name.

Scanners write Manufacturer differently across models and years; choosing a
protocol variant must not depend on that spelling.
"""
from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
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


@dataclass(frozen=True)
class SoftwareMatch:
    """How one component of a software pattern matched a SoftwareVersions value.

    ``form`` is ``value`` (the whole value), ``release`` (the part after the last ``:``, as GE writes
    ``MR Software release:DV28.0_R02_1947.a``) or ``token`` (a word of the value, e.g. ``XA30`` of
    ``syngo MR XA30``); ``text`` is what the pattern matched."""

    pattern: str
    value: str
    form: str
    text: str

    def describe(self) -> str:
        if self.form == "value":
            return f"'{self.pattern}' matched value '{self.value}'"
        return f"'{self.pattern}' matched {self.form} '{self.text}' of value '{self.value}'"


def software_values(versions: Iterable[str] | str | None) -> list[str]:
    """SoftwareVersions (or an inventory ``software``) as its list of values.

    A string is split at DICOM's value delimiter ``\\``: ``5.1.1\\5.1.1.0`` is two values, the way
    the header holds them."""
    if versions is None:
        return []
    if isinstance(versions, str):
        versions = versions.split("\\")
    return [str(v).strip() for v in versions if str(v).strip()]


def software_forms(value: str) -> list[tuple[str, str]]:
    """The forms a pattern may match in one value: the value, its ``release:`` suffix, its words."""
    v = value.strip()
    forms = [("value", v)]
    if ":" in v:
        rel = v.rsplit(":", 1)[1].strip()
        if rel:
            forms.append(("release", rel))
    forms += [("token", t) for t in re.split(r"[\s_/:]+", v) if t and t != v]
    return forms


def _component_match(pattern: str, value: str) -> Optional[SoftwareMatch]:
    pat = pattern.strip().lower()
    for form, text in software_forms(value):
        if fnmatch.fnmatchcase(text.lower(), pat):
            return SoftwareMatch(pattern.strip(), value, form, text)
    return None


def software_match(pattern: Optional[str], versions: Iterable[str] | str | None) -> Optional[list[SoftwareMatch]]:
    """How ``pattern`` matches a header's SoftwareVersions, value by value, or None when it does not.

    ``pattern`` is a glob (case-insensitive) or several, written as the header writes them
    (``5.1.1\\5.1.1.0``, ``24\\LX\\MR Software release:HD16.0_V02_1131.a``): every component must match
    a value of its own, in any order; the header may hold more values. A component matches a value
    as a whole, its ``release:`` suffix (``DV28*`` matches ``MR Software release:DV28.0_R02_1947.a``)
    or one of its words (``XA30`` matches ``syngo MR XA30``). None as pattern matches everything
    (an empty list of matches)."""
    if pattern is None:
        return []
    comps = software_values(pattern)
    values = software_values(versions)
    if not comps:
        return []
    if not values:
        return None
    # components are matched to distinct values; patterns are few and short, so try them in order,
    # the most specific (fewest candidate values) first, and backtrack
    cands = [[(j, m) for j, m in enumerate(_component_match(c, v) for v in values) if m] for c in comps]
    order = sorted(range(len(comps)), key=lambda i: len(cands[i]))
    chosen: dict[int, SoftwareMatch] = {}

    def place(k: int, used: frozenset[int]) -> bool:
        if k == len(order):
            return True
        i = order[k]
        for j, m in cands[i]:
            if j not in used:
                chosen[i] = m
                if place(k + 1, used | {j}):
                    return True
        return False

    if not place(0, frozenset()):
        return None
    return [chosen[i] for i in range(len(comps))]


def software_matches(pattern: Optional[str], versions: Iterable[str] | str | None) -> bool:
    """True if ``pattern`` matches SoftwareVersions value by value (see :func:`software_match`)."""
    return software_match(pattern, versions) is not None


def describe_software_match(matches: Optional[list[SoftwareMatch]]) -> str:
    """'DV28*' matched release 'DV28.0_R02_1947.a' of value 'MR Software release:DV28.0_R02_1947.a'."""
    if matches is None:
        return "no match"
    return "; ".join(m.describe() for m in matches) or "no software pattern"


def software_pattern_hint(software: Optional[str]) -> Optional[str]:
    """A release glob for a declared SoftwareVersions: the value that names the release, with a ``*``.

    ``24\\LX\\MR Software release:HD16.0_V02_1131.a`` -> ``HD16.0*``; ``5.1.1\\5.1.1.0`` -> ``5.1.1*``;
    ``syngo MR XA30`` -> ``syngo MR XA30``. A variant written with it covers later builds of that release."""
    values = software_values(software)
    if not values:
        return None
    if len(values) == 1 and ":" not in values[0]:
        return values[0]
    for v in values:  # GE: the value holding 'release:' names the release
        if ":" in v:
            rel = v.rsplit(":", 1)[1].strip()
            m = re.match(r"[A-Za-z]*\d+(?:\.\d+)?", rel)
            return (m.group(0) if m else rel) + "*"
    rel = next((v for v in values if re.search(r"\d", v) and not v.isdigit()), values[0])
    return rel + "*"


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
