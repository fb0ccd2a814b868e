"""Free-text cleaning (the C action on text): remove this instance's own identifiers and identifier-shaped
substrings, and nothing else.

* The instance's identifiers (read before anything is removed): every person name (each component of
  two letters or more, and the whole name) and the whole values of PatientID, AccessionNumber,
  InstitutionName, StationName, DeviceSerialNumber, … — matched case-insensitively as **whole words**, so a
  word that merely contains a name ("Doering" for the name "Doe") is left alone.
* Identifier shapes: dates in numeric, DICOM and month-name forms ("2024-01-05", "1/5/24", "20240105",
  "05-Jan-2024", "5 Jan 2024", "January 5, 2024", "Jan 2024"), e-mail addresses, phone numbers (with
  spaces, dots, dashes or parentheses), numbers that are identifiers (five digits or more, letters followed
  by five digits or more, and shorter numbers after a label such as "MRN", "ID", "Acc", "#"), and names
  after a title or label ("Dr. Rivera", "Name: Jane Roe").

The corpus in ``tests/data/descriptor_cleaning.tsv`` (over 100 descriptor strings with their expected
cleaned text) is the specification.
"""
from __future__ import annotations

import re
from typing import Iterable

from pydicom.datadict import DicomDictionary, tag_for_keyword
from pydicom.dataset import Dataset

from .elements import elem_vr, text_values

# Attributes whose whole values are direct identifiers: scrubbed out of descriptors by the C (clean) action.
IDENTIFIER_KEYWORDS = ("PatientID", "OtherPatientIDs", "AccessionNumber", "IssuerOfPatientID", "MedicalRecordLocator",
                       "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName", "PatientAddress",
                       "PatientTelephoneNumbers", "StudyID", "RequestedProcedureID", "PerformedProcedureStepID",
                       "ScheduledProcedureStepID", "DeviceSerialNumber", "StationName", "PatientBirthName",
                       "PatientMotherBirthName", "OtherPatientNames", "ClinicalTrialSubjectID")
_PN_TAGS = frozenset(t for t, e in DicomDictionary.items() if e[0] == "PN")
_ID_TAGS = frozenset(tag_for_keyword(k) for k in IDENTIFIER_KEYWORDS) - {None}
_TOKEN_TAGS = _ID_TAGS | _PN_TAGS
# functional groups hold acquisition parameters, one item per frame: not where names live, and large
_SQ_TAGS = frozenset(t for t, e in DicomDictionary.items() if e[0] == "SQ") - {0x52009229, 0x52009230}
_NAME_SPLIT = re.compile(r"[\s^=,]+")
_MAX_DEPTH = 4

_MONTH = (r"(?:jan(?:uary)?|feb(?:ruary)?|mar(?:ch)?|apr(?:il)?|may|june?|july?|aug(?:ust)?|"
          r"sep(?:t(?:ember)?)?|oct(?:ober)?|nov(?:ember)?|dec(?:ember)?)\.?")
_DAY = r"(?:[0-3]?\d)(?:st|nd|rd|th)?"
_YEAR = r"(?:19|20)?\d{2}"
_NAME = r"(?-i:[A-Z][a-zA-Z'’-]+)"          # a capitalized word (case-sensitive inside the case-blind scrub)
_PATTERNS = [
    r"\b\d{4}[-/.]\d{1,2}[-/.]\d{1,2}(?:[T ]\d{1,2}:\d{2}(?::\d{2}(?:\.\d+)?)?)?\b",  # 2024-01-05, …T10:22
    r"\b\d{1,2}[-/.]\d{1,2}[-/.]\d{2,4}\b",                                 # 1/5/24, 05.01.2024
    r"\b(?:19|20)\d{6}(?:\d{2,6}(?:\.\d{1,6})?)?\b",                        # DICOM DA / DT
    rf"\b{_MONTH}[\s.,/-]*(?:19|20)\d{{2}}\b",                              # Jan 2024, January-2024
    rf"\b{_DAY}[\s./-]*{_MONTH}(?:[\s.,/-]*{_YEAR})?\b",                    # 05-Jan-2024, 5 Jan 2024, 5 Jan
    rf"\b{_MONTH}[\s./-]*{_DAY}\b,?(?:[\s.,/-]*(?:19|20)\d{{2}}\b)?",     # Jan 5 2024, January 5, 2024
    r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+",                                          # e-mail
    r"(?:\+\d{1,3}[\s.-]?)?\(?\d{2,4}\)?[\s.-]?\d{3,4}[\s.-]\d{4}\b",       # (617) 555-0199, +44 20 7946 0958
    r"(?<![\w.])\d{3}[\s.-]\d{4}\b",                                        # 555 0199, 555-0199
    r"\+?\d[\d ()-]{7,}\d",                                                 # other long digit groups
    r"(?i:\b(?:mrn|mr\s*#|ids?|acc(?:ession)?|case|record|pat(?:ient)?\s*id|subj(?:ect)?\s*id)"
    r"\s*(?:no\.?|nr\.?|number|#)?\s*[:#=]?\s*[a-z]{0,3}-?\d[\d-]*)",       # MRN 1234, ID: 4567, Acc#889
    r"#\s*\d{3,}\b",                                                          # #4471
    r"\b(?!b\d)[A-Za-z]{1,4}-?\d{5,}\b",                                     # MRN12345, AB-123456
    r"\b\d{5,}\b",                                                            # 12345 (IDs, MRNs)
    rf"\b(?i:dr|mr|mrs|ms|miss|prof)\.?\s+{_NAME}(?:\s+{_NAME})?",            # Dr. Rivera, Mrs Jane Roe
    rf"(?i:\b(?:name|patient|physician|referring|ref|tech(?:nologist)?|operator|reader)\s*:)\s*"
    rf"(?:(?i:dr|mr|mrs|ms|miss|prof)\.?\s+)?{_NAME}(?:[\s^,]+{_NAME})?",      # Name: Jane Roe, Ref: Dr. Kim
]
_SCRUB = re.compile("|".join(f"(?:{p})" for p in _PATTERNS), re.IGNORECASE)
_SPACES = re.compile(r"\s{2,}")
_EMPTY_BRACKETS = re.compile(r"\([\s,;:/^-]*\)|\[[\s,;:/^-]*\]")
_EDGE = " ^-_,;:/"


def identifier_tokens(tokens: Iterable[str]) -> tuple[str, ...]:
    """Lower-cased identifiers to remove from free text, longest first (so 'Doe^Jane' goes before 'Doe')."""
    return tuple(sorted({t.lower() for t in tokens if len(t) >= 2}, key=lambda t: (-len(t), t)))


def _collect(ds: Dataset, toks: list[str], depth: int) -> None:
    for tag in list(ds._dict):
        if tag in _TOKEN_TAGS:
            try:
                vals = text_values(ds, tag, elem_vr(ds._dict[tag], tag))
            except Exception:
                continue
            for s in vals:
                s = s.strip()
                if not s:
                    continue
                toks.append(s)
                if tag in _PN_TAGS:
                    toks.append(" ".join(p for p in _NAME_SPLIT.split(s) if p))
                    toks.extend(p for p in _NAME_SPLIT.split(s) if len(p) >= 2)
        elif tag in _SQ_TAGS and depth < _MAX_DEPTH:
            raw = ds._dict[tag]
            try:
                items = ds[tag].value
            except Exception:
                continue
            finally:   # leave the raw element: an untouched sequence is written back byte for byte (walk.py)
                ds._dict[tag] = raw
            for item in items or []:
                if isinstance(item, Dataset):
                    _collect(item, toks, depth + 1)


def instance_tokens(ds: Dataset) -> tuple[str, ...]:
    """This instance's identifiers (every person name and its components, PatientID, StationName, …, also in
    sequence items). Read before anything is removed: the walk calls it first."""
    toks: list[str] = []
    _collect(ds, toks, 0)
    return identifier_tokens(toks)


def clean_text(text: str, tokens: Iterable[str] = ()) -> str:
    """Remove known identifiers (whole words, case-insensitive) and identifier-shaped substrings."""
    toks = tokens if isinstance(tokens, tuple) else identifier_tokens(tokens)
    s = _SCRUB.sub(" ", text)                 # shapes first: an e-mail address holds name tokens
    s = _remove_tokens(s, toks) if toks else s
    if s == text:
        return text                          # nothing identifying: the text stays exactly as written
    s = _EMPTY_BRACKETS.sub(" ", s)
    s = re.sub(r"\s+([,;:])", r"\1", _SPACES.sub(" ", s))
    s = re.sub(r"([,;:/_-])(?:\s*[,;:/_-])+", r"\1", s)
    return s.strip(_EDGE).strip()


def _remove_tokens(text: str, tokens: tuple[str, ...]) -> str:
    """Remove each token where it stands as a whole word (no letter or digit on either side).

    Plain string search, not a regex: the tokens differ in every instance, and compiling a pattern per instance
    would cost more than the rest of the cleaning."""
    low = text.lower()
    if len(low) != len(text):               # case mapping changed the length: match case-blind with a regex
        for t in tokens:
            text = re.sub(rf"(?<![^\W_]){re.escape(t)}(?![^\W_])", " ", text, flags=re.IGNORECASE)
        return text
    for t in tokens:
        i = low.find(t)
        while i >= 0:
            j = i + len(t)
            if (i == 0 or not low[i - 1].isalnum()) and (j == len(low) or not low[j].isalnum()):
                text, low = text[:i] + " " + text[j:], low[:i] + " " + low[j:]
            i = low.find(t, i + 1)
    return text
