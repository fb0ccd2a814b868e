"""Free-text cleaning (the C action on text): remove this instance's own identifiers, matched
case-insensitively, and identifier-shaped substrings (dates, e-mail addresses, phone numbers, long numbers)."""
from __future__ import annotations

import re
from typing import Iterable

from pydicom.datadict import DicomDictionary, tag_for_keyword
from pydicom.dataset import Dataset

from .elements import elem_vr, text_values

# Attributes whose values are direct identifiers: scrubbed out of descriptors by the C (clean) action.
IDENTIFIER_KEYWORDS = ("PatientID", "OtherPatientIDs", "AccessionNumber", "IssuerOfPatientID", "MedicalRecordLocator",
                       "InstitutionName", "InstitutionAddress", "PatientAddress", "PatientTelephoneNumbers",
                       "StudyID", "RequestedProcedureID", "PerformedProcedureStepID", "ScheduledProcedureStepID",
                       "DeviceSerialNumber", "StationName", "PatientBirthName", "PatientMotherBirthName")
_PN_TAGS = frozenset(t for t, e in DicomDictionary.items() if e[0] == "PN")
_TOKEN_TAGS = frozenset(tag_for_keyword(k) for k in IDENTIFIER_KEYWORDS) | _PN_TAGS
_TOKEN_SPLIT = re.compile(r"[\s^=,]+")
_SCRUB = re.compile("|".join([
    r"\b\d{4}[-/.]\d{1,2}[-/.]\d{1,2}\b",            # ISO-like dates
    r"\b\d{1,2}[-/.]\d{1,2}[-/.]\d{2,4}\b",          # d/m/y dates
    r"\b(?:19|20)\d{6}(?:\d{2,6})?\b",                # DICOM DA/DT
    r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+",                  # e-mail
    r"\+?\d[\d ()-]{7,}\d",                           # phone numbers
    r"\b\d{5,}\b",                                   # long numbers (IDs, MRNs)
]))
_SPACES = re.compile(r"\s{2,}")


def identifier_tokens(tokens: Iterable[str]) -> tuple[str, ...]:
    """Lower-cased identifiers to remove from free text, longest first (so 'Doe^Jane' goes before 'Doe')."""
    return tuple(sorted({t.lower() for t in tokens if len(t) >= 2}, key=len, reverse=True))


def instance_tokens(ds: Dataset) -> tuple[str, ...]:
    """This instance's identifiers (every person name, PatientID, StationName, ...): whole values and their parts.

    Read before anything is removed: the walk calls it first."""
    toks: list[str] = []
    for tag in [t for t in ds._dict if t in _TOKEN_TAGS]:
        try:
            vals = text_values(ds, tag, elem_vr(ds._dict[tag], tag))
        except Exception:
            continue
        for s in vals:
            toks.append(s.strip())
            toks.extend(t for t in _TOKEN_SPLIT.split(s) if len(t) >= 3)
    return identifier_tokens(t for t in toks if t)


def clean_text(text: str, tokens: Iterable[str] = ()) -> str:
    """Remove known identifiers (this instance's names/IDs, case-insensitive) and identifier-shaped substrings."""
    toks = tokens if isinstance(tokens, tuple) else identifier_tokens(tokens)
    s = _remove_tokens(text, toks) if toks else text
    s = _SCRUB.sub("", s)
    return _SPACES.sub(" ", s).strip(" ^-_,;:/")


def _remove_tokens(text: str, tokens: tuple[str, ...]) -> str:
    low = text.lower()
    if len(low) != len(text):                   # case mapping changed the length: fall back to a regex
        for t in tokens:
            text = re.sub(re.escape(t), "", text, flags=re.IGNORECASE)
        return text
    for t in tokens:
        i = low.find(t)
        while i >= 0:
            text, low = text[:i] + text[i + len(t):], low[:i] + low[i + len(t):]
            i = low.find(t, i)
    return text
