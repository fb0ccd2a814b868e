"""De-identification (DICOM PS3.15 Annex E) and the ``deidentify`` pipeline step.

The study's profile (``ir.DeidProfile`` rules, normally the generated ``stdlib/deid/ps315.imtrial``),
its options and its overrides are compiled ONCE into a :class:`Plan` (tag -> small operation code).
Applying the plan walks each dataset once, touching only the elements that need work: untouched
elements stay as pydicom raw elements and are written back byte-for-byte.

Choices where the standard leaves room (documented in ``docs/deidentification.md``):

- Conformance alternatives (``X/Z``, ``X/D``, ``X/Z/D``, ``Z/D``, ``X/Z/U*``) resolve without per-IOD module
  tables: ``X/Z`` -> Z, ``X/D`` and ``Z/D`` -> D, ``X/Z/D`` -> Z (a dummy device serial or station name would
  look like another real device to device matching), ``X/Z/U*`` -> keep the sequence and remap the UIDs inside.
  Z and D values carry no information.
- When several selected options change one attribute, the more protective action wins
  (X > Z > D > U > C > K), except that Retain Longitudinal Full Dates beats Modified Dates.
- Sequences: K/U/D/C recurse into every item with the same plan; D on a sequence additionally replaces
  every free-text / person-name element inside it that the table does not mention (e.g. SR TextValue);
  C (Clean Structured Content) cleans those texts instead. Z empties the sequence, X removes it.
- An overlay group (60xx) whose Overlay Data is removed is removed as a whole; under Clean Graphics an overlay
  is kept only when a study pixel region matches the image (the region is blanked in the overlay too).
  Retired curve groups (50xx) are always removed.
- All group-length elements (gggg,0000) and stray command/file-meta elements in the body are dropped; the
  File Meta Information and preamble are rebuilt.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import hmac
import json
import os
import re
import sqlite3
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any, Iterable, Optional

import pydicom
from pydicom.datadict import dictionary_VR, tag_for_keyword, DicomDictionary
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from .. import ir
from ..diagnostics import ImtrialError
from ..secrets import SecretError, read_secret
from ..dicom_tables import (BASIC_PROFILE_CODE, BURNED_IN_RISK_IF_SECONDARY, BURNED_IN_RISK_MODALITIES, CID7050,
                            CLEAN_PIXEL_DATA_CODE, CODING_SCHEME, OPTION_CODES, SAFE_PRIVATE)
from ..vendors import normalize_vendor
from .steps import Param, step

ENGINE_VERSION = "imtrial-deid 1"
IMPLEMENTATION_CLASS_UID = "2.25.229346958127213146873402376458208370217"  # fixed: output must not vary by host
IMPLEMENTATION_VERSION_NAME = "IMTRIAL_DEID_1"


class DeidError(ImtrialError):
    code = "E701"


# --------------------------------------------------------------------------- operations

# Operation codes of the compiled plan (ints: compared in the hot loop).
KEEP, DEL, EMPTY, DUMMY, UID, SHIFT, CLEAN, AEPSEUDO, SET, HASH, SEQ_RECURSE, SEQ_STRICT, SEQ_CLEAN, SEQ_EMPTY = range(14)
_OP_NAMES = ["keep", "remove", "empty", "dummy", "uid", "shift", "clean", "ae_pseudonym", "replace", "hash",
             "recurse", "recurse_strict", "recurse_clean", "empty_sequence"]

_PROTECTIVE = {"X": 5, "Z": 4, "D": 3, "U": 2, "C": 1, "K": 0}
# X/Z/D -> Z, not D: a dummy serial/station/institution reads like a different real device to anything that
# matches devices downstream (adherence does); zero length is conformant wherever the attribute is Type 2 or 3.
_RESOLVE = {"X/Z": "Z", "X/D": "D", "X/Z/D": "Z", "Z/D": "D", "X/Z/U*": "U*"}
_TEXT_VRS = frozenset({"LO", "SH", "ST", "LT", "UT", "UC", "PN"})
_FREE_TEXT_VRS = frozenset({"ST", "LT", "UT", "UC", "PN"})
_DATE_VRS = frozenset({"DA", "DT", "TM"})
# VRs whose values are ASCII in every character set (or are written as ASCII here)
_ASCII_VRS = frozenset({"AE", "AS", "CS", "DA", "DT", "TM", "DS", "IS", "UI", "LO", "SH", "ST", "LT", "UT", "UC",
                        "PN", "UR"})
_SQ_TAGS = frozenset(t for t, e in DicomDictionary.items() if e[0] == "SQ")

_DUMMY_TEXT = {"AE": "ANONYMOUS", "AS": "000Y", "CS": "ANONYMIZED", "DA": "19000101", "DT": "19000101000000",
               "TM": "000000", "DS": "0", "IS": "0", "LO": "ANONYMIZED", "SH": "ANONYMIZED", "ST": "ANONYMIZED",
               "LT": "ANONYMIZED", "UT": "ANONYMIZED", "UC": "ANONYMIZED", "PN": "ANONYMIZED",
               "UR": "urn:x-anonymized"}
_DUMMY_NUM = {"US": 0, "SS": 0, "UL": 0, "SL": 0, "FL": 0.0, "FD": 0.0, "AT": 0, "SV": 0, "UV": 0}
_MAXLEN = {"AE": 16, "CS": 16, "SH": 16, "LO": 64, "PN": 64, "UC": 64, "ST": 1024, "LT": 10240, "UT": 10240}

# Attributes whose values are direct identifiers: scrubbed out of descriptors by the C (clean) action.
_IDENTIFIER_KEYWORDS = ("PatientID", "OtherPatientIDs", "AccessionNumber", "IssuerOfPatientID", "MedicalRecordLocator",
                        "InstitutionName", "InstitutionAddress", "PatientAddress", "PatientTelephoneNumbers",
                        "StudyID", "RequestedProcedureID", "PerformedProcedureStepID", "ScheduledProcedureStepID",
                        "DeviceSerialNumber", "StationName", "PatientBirthName", "PatientMotherBirthName")
_IDENTIFIER_TAGS = frozenset(tag_for_keyword(k) for k in _IDENTIFIER_KEYWORDS)
_PN_TAGS = frozenset(t for t, e in DicomDictionary.items() if e[0] == "PN")
_TOKEN_TAGS = _IDENTIFIER_TAGS | _PN_TAGS
_SCRUB = re.compile("|".join([
    r"\b\d{4}[-/.]\d{1,2}[-/.]\d{1,2}\b",            # ISO-like dates
    r"\b\d{1,2}[-/.]\d{1,2}[-/.]\d{2,4}\b",          # d/m/y dates
    r"\b(?:19|20)\d{6}(?:\d{2,6})?\b",                # DICOM DA/DT
    r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+",                  # e-mail
    r"\+?\d[\d ()-]{7,}\d",                           # phone numbers
    r"\b\d{5,}\b",                                   # long numbers (IDs, MRNs)
]))
_SPACES = re.compile(r"\s{2,}")


def parse_tag(text: str) -> int:
    """'(gggg,eeee)' or a DICOM keyword -> int tag (raises KeyError)."""
    t = text.strip()
    m = re.fullmatch(r"\(?([0-9A-Fa-f]{4}),?([0-9A-Fa-f]{4})\)?", t)
    if m:
        return int(m.group(1) + m.group(2), 16)
    tag = tag_for_keyword(t)
    if tag is None:
        raise KeyError(t)
    return tag


def _vr_of(tag: int) -> str:
    try:
        vr = dictionary_VR(tag)
    except KeyError:
        return "UN"
    return vr.split(" or ")[0]  # e.g. 'US or SS' -> 'US'


@dataclass
class Plan:
    """A compiled de-identification plan (tag -> (op, arg)) plus group rules and method codes."""

    ops: dict[int, tuple[int, Any]]
    curve_op: int                       # 50xx: always DEL (retired curves)
    overlay_op: int                     # 60xx (whole group): DEL or KEEP (clean_graphics)
    private_op: int                     # DEL, or KEEP for the safe-private list
    options: frozenset[str]
    shift_dates: bool
    dates_state: str                    # LongitudinalTemporalInformationModified value
    method_codes: list[tuple[str, str]]
    method_text: str

    def action_for(self, tag: int) -> str:
        """Human-readable operation for a tag (docs, tests)."""
        op = self.ops.get(tag)
        return _OP_NAMES[op[0]] if op else "keep"


def _resolved_action(rule: ir.ProfileRule, options: frozenset[str]) -> tuple[str, Optional[str]]:
    """The action code that applies to a rule, and the option that chose it (None = basic profile)."""
    chosen = [(opt, code) for opt, code in rule.options.items() if opt in options]
    if not chosen:
        return rule.action, None
    names = {o for o, _ in chosen}
    if "retain_longitudinal_full_dates" in names and "retain_longitudinal_modified_dates" in names:
        chosen = [(o, c) for o, c in chosen if o != "retain_longitudinal_modified_dates"]
    opt, code = max(chosen, key=lambda oc: _PROTECTIVE.get(oc[1], 0))
    return code, opt


def compile_plan(profile: ir.DeidProfile, deid: Optional[ir.Deidentify] = None) -> Plan:
    """Compile a profile + the study's options and overrides into a :class:`Plan` (once per run)."""
    options = frozenset(o.value if isinstance(o, ir.DeidOption) else str(o) for o in (deid.options if deid else []))
    ops: dict[int, tuple[int, Any]] = {}
    curve_op = overlay_op = private_op = DEL
    for rule in profile.rules:
        action, opt = _resolved_action(rule, options)
        action = _RESOLVE.get(action, action)
        tag_text = rule.tag.lower()
        if tag_text.startswith("(50xx"):
            curve_op = DEL      # retired curves: removing them is the only cleaning we can vouch for
            continue
        if tag_text.startswith("(60xx"):
            if tag_text == "(60xx,3000)":
                overlay_op = KEEP if action in ("C", "K") else DEL
            continue
        if tag_text.startswith("(gggg"):
            private_op = KEEP if action in ("C", "K") else DEL
            continue
        tag = parse_tag(rule.tag)
        ops[tag] = _compile_action(tag, action, opt)
    for ov in (deid.overrides if deid else []):
        try:
            tag = parse_tag(ov.attribute)
        except KeyError:
            raise DeidError(ov, f"unknown DICOM attribute '{ov.attribute}' in a de-identification override") from None
        vr = _vr_of(tag)
        if ov.action == "keep":
            ops[tag] = (SEQ_RECURSE if vr == "SQ" else KEEP, None)
        elif ov.action == "remove":
            ops[tag] = (DEL, None)
        elif ov.action == "empty":
            ops[tag] = (SEQ_EMPTY if vr == "SQ" else EMPTY, None)
        elif ov.action == "replace":
            ops[tag] = (SET, ov.value or "")
        elif ov.action == "hash":
            ops[tag] = (UID if vr == "UI" else HASH, None)
    shift = "retain_longitudinal_modified_dates" in options and "retain_longitudinal_full_dates" not in options
    dates_state = ("UNMODIFIED" if "retain_longitudinal_full_dates" in options else "MODIFIED" if shift else "REMOVED")
    codes = [(BASIC_PROFILE_CODE, CID7050[BASIC_PROFILE_CODE])]
    for opt in sorted(options, key=lambda o: OPTION_CODES.get(o, "999999")):
        if opt in OPTION_CODES and OPTION_CODES[opt] != CLEAN_PIXEL_DATA_CODE:
            codes.append((OPTION_CODES[opt], CID7050[OPTION_CODES[opt]]))
    # DeidentificationMethod is LO 1-n: one value (<= 64 chars) per code, mirroring the code sequence
    text = "\\".join(meaning[:64] for _, meaning in codes)
    return Plan(ops, curve_op, overlay_op, private_op, options, shift, dates_state, codes, text)


def _compile_action(tag: int, action: str, opt: Optional[str]) -> tuple[int, Any]:
    vr = _vr_of(tag)
    if action == "X":
        return (DEL, None)
    if vr == "SQ":
        if action == "Z":
            return (SEQ_EMPTY, None)
        if action == "D":
            return (SEQ_STRICT, None)
        if action == "C":
            return (SEQ_CLEAN, None)
        return (SEQ_RECURSE, None)       # K, U, U*
    if action == "Z":
        return (EMPTY, None)
    if action == "K":
        return (KEEP, None)
    if action in ("U", "U*") or (vr == "UI" and action in ("D", "C")):
        return (UID, None)
    if action == "D":
        return (DUMMY, vr)
    if action == "C":
        if opt == "retain_longitudinal_modified_dates" or vr in ("DA", "DT", "TM"):
            return (SHIFT, vr) if vr in _DATE_VRS else (KEEP, None)
        if vr == "AE":
            return (AEPSEUDO, None)
        if vr in _TEXT_VRS:
            return (CLEAN, vr)
        return (KEEP, None)   # numbers etc. under a retain/clean option carry no free text
    raise DeidError(None, f"unknown action code '{action}' for tag {tag:08X}")


# --------------------------------------------------------------------------- keys and pseudonyms

def resolve_key(trial: ir.Trial) -> bytes:
    """The study key named in ``deidentify.key``; raises :class:`~imtrial_dsl.secrets.SecretError` (never logs it)."""
    deid = trial.deidentify
    if deid is None or deid.key is None:
        raise SecretError(deid, "de-identification needs a key but the study names none",
                          "add `key env IMTRIAL_KEY` (or `key file \"path\"`) to the deidentify block")
    return read_secret(deid.key, study_file=trial.source_file, what="de-identification key")


class Pseudonymizer:
    """Keyed, deterministic replacements: UIDs (2.25 form), per-subject date offsets, hashes."""

    def __init__(self, key: bytes, shift_min: int = -365, shift_max: int = -1):
        self._key = key
        self._cache: dict[str, str] = {}                 # bounded: memory stays flat over any corpus size
        self.record: Optional[dict[str, str]] = None     # set to {} to collect the audit map of one exam
        self._lo, self._hi = min(shift_min, shift_max), max(shift_min, shift_max)

    def _mac(self, purpose: bytes, value: bytes) -> bytes:
        return hmac.new(self._key, purpose + b"\x00" + value, hashlib.sha256).digest()

    def uid(self, old: str) -> str:
        new = self._cache.get(old)
        if new is None:
            n = int.from_bytes(self._mac(b"uid", old.encode("ascii", "replace"))[:16], "big")
            n = (n & ~(0xF << 76)) | (0x8 << 76)          # UUID version 8 (custom)
            n = (n & ~(0x3 << 62)) | (0x2 << 62)          # RFC 4122 variant
            new = f"2.25.{n}"
            if len(self._cache) >= 65536:
                self._cache.clear()
            self._cache[old] = new
        if self.record is not None:
            self.record[old] = new
        return new

    def date_offset(self, subject_id: str) -> int:
        n = int.from_bytes(self._mac(b"date-shift", subject_id.encode("utf-8"))[:8], "big")
        return self._lo + n % (self._hi - self._lo + 1)

    def hash_text(self, text: str, vr: str) -> str:
        h = self._mac(b"hash", text.encode("utf-8")).hex().upper()
        return h[: min(_MAXLEN.get(vr, 64), 32)]

    def ae(self, text: str) -> str:
        return "AE" + self._mac(b"ae", text.encode("utf-8")).hex().upper()[:14]


# --------------------------------------------------------------------------- value helpers

def _raw_text(elem) -> str:
    """The value of a raw/converted element with an ASCII-only VR (UI, DA, DT, TM, AE, CS...)."""
    v = elem.value
    if v is None:
        return ""
    if isinstance(v, (bytes, bytearray)):
        return bytes(v).decode("ascii", "replace").rstrip("\x00 ").strip()
    if isinstance(v, (list, tuple)) or type(v).__name__ == "MultiValue":
        return "\\".join(str(x) for x in v)
    return str(v).strip()


def _elem_vr(elem, tag: int) -> str:
    vr = getattr(elem, "VR", None)
    if vr is None or vr in ("UN",) and tag in DicomDictionary:
        return _vr_of(tag)
    return vr


_EPOCH_CACHE: dict[str, str] = {}


def shift_date(value: str, days: int) -> str:
    """Shift a DA value (possibly multi-valued or a range) by whole days; invalid -> ''."""
    out = []
    for part in value.split("\\"):
        if "-" in part:   # query range form
            out.append("-".join(shift_date(p, days) if p else "" for p in part.split("-")))
            continue
        p = part.strip()
        if not p:
            out.append("")
            continue
        try:
            d = _dt.date(int(p[0:4]), int(p[4:6]), int(p[6:8])) if len(p) == 8 else None
        except ValueError:
            d = None
        out.append((d + _dt.timedelta(days=days)).strftime("%Y%m%d") if d else "")
    return "\\".join(out)


def shift_datetime(value: str, days: int) -> str:
    """Shift the date part of DT values; values without a full date become ''."""
    out = []
    for part in value.split("\\"):
        p = part.strip()
        if len(p) >= 8 and p[:8].isdigit():
            head = shift_date(p[:8], days)
            out.append(head + p[8:] if head else "")
        else:
            out.append("")
    return "\\".join(out)


def identifier_tokens(tokens: Iterable[str]) -> tuple[str, ...]:
    """Lower-cased identifiers to remove from free text, longest first (so 'Doe^Jane' goes before 'Doe')."""
    return tuple(sorted({t.lower() for t in tokens if len(t) >= 2}, key=len, reverse=True))


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


def clean_text(text: str, tokens: Iterable[str] = ()) -> str:
    """Remove known identifiers (this instance's names/IDs, case-insensitive) and identifier-shaped substrings."""
    toks = tokens if isinstance(tokens, tuple) else identifier_tokens(tokens)
    s = _remove_tokens(text, toks) if toks else text
    s = _SCRUB.sub("", s)
    return _SPACES.sub(" ", s).strip(" ^-_,;:/")


def _identifier_tokens(ds: Dataset) -> list[str]:
    toks: list[str] = []
    for tag in [t for t in ds._dict if t in _TOKEN_TAGS]:
        try:
            vals = _text_values(ds, tag, _elem_vr(ds._dict[tag], tag))
        except Exception:
            continue
        for s in vals:
            toks.append(s.strip())
            toks.extend(t for t in _TOKEN_SPLIT.split(s) if len(t) >= 3)
    return [t for t in toks if t]


_TOKEN_SPLIT = re.compile(r"[\s^=,]+")
_SINGLE_VALUED_TEXT = frozenset({"LT", "ST", "UT", "UR"})


def _text_values(ds: Dataset, tag: int, vr: str) -> list[str]:
    """A text element's values as str; ASCII raw bytes are decoded directly, anything else via pydicom."""
    elem = ds._dict[tag]
    v = elem.value
    if isinstance(v, (bytes, bytearray)) and bytes(v).isascii():
        text = bytes(v).decode("ascii").rstrip("\x00 ")
        return [text] if vr in _SINGLE_VALUED_TEXT else [x.strip() for x in text.split("\\")]
    val = ds[tag].value
    if val is None:
        return [""]
    if isinstance(val, (list, tuple)) or type(val).__name__ == "MultiValue":
        return [str(x) for x in val]
    return [str(val)]


# --------------------------------------------------------------------------- the engine

@dataclass
class InstanceResult:
    ok: bool
    dataset: Optional[Dataset] = None
    reason: Optional[str] = None
    detail: str = ""
    pixel_cleaned: bool = False
    burned_in_passed: bool = False


class Deidentifier:
    """Applies a compiled plan to datasets. Build once per process; reuse for every file."""

    def __init__(self, trial: ir.Trial, key: bytes, plan: Optional[Plan] = None):
        deid = trial.deidentify
        if deid is None:
            raise DeidError(None, "the study has no deidentify block", "add `deidentify using ps315_basic { ... }`")
        self.trial = trial
        self.deid = deid
        if plan is None:
            profile = trial.profile(deid.profile.name)
            if profile is None:
                raise DeidError(deid.profile, f"unknown de-identification profile '{deid.profile.name}'",
                                "import \"stdlib/deid/ps315.imtrial\" for ps315_basic")
            plan = compile_plan(profile, deid)
        self.plan = plan
        lo = int(round(deid.date_shift_min.days)) if deid.date_shift_min else -365
        hi = int(round(deid.date_shift_max.days)) if deid.date_shift_max else -1
        self.pseudo = Pseudonymizer(key, lo, hi)
        self._safe_private = {(c.upper(), g, e) for (c, g, e) in SAFE_PRIVATE}
        self._override_tags = frozenset(parse_tag(o.attribute) for o in deid.overrides)
        self._changes = 0
        self._needs_tokens = any(op[0] in (CLEAN, SEQ_CLEAN) for op in plan.ops.values()) or plan.overlay_op == KEEP

    # -- per dataset ---------------------------------------------------------------------------
    def deidentify(self, ds: Dataset, identity: dict) -> InstanceResult:
        """De-identify ``ds`` in place (after the burned-in check) and insert research identifiers."""
        subject = str(identity.get("subject_id") or "")
        if not subject:
            return InstanceResult(False, reason="no_subject", detail="identity has no subject_id")
        res = self._burned_in(ds)
        if res is not None and not res.ok:
            return res
        ctx = _Ctx(self, subject)
        enc = ds.original_encoding if hasattr(ds, "original_encoding") else (None, None)
        self._implicit = bool(enc[0]) if enc[0] is not None else False
        self._little = bool(enc[1]) if enc[1] is not None else True
        if self._needs_tokens:
            ctx._tokens = identifier_tokens(_identifier_tokens(ds))   # before any identifier is removed
        self._walk(ds, ctx, 0)
        if ctx.overlays:
            self._clean_overlays(ds, ctx.overlays)
        self._insert_identifiers(ds, identity, pixel_cleaned=bool(res and res.pixel_cleaned))
        out = InstanceResult(True, ds, pixel_cleaned=bool(res and res.pixel_cleaned),
                             burned_in_passed=bool(res and res.burned_in_passed))
        return out

    def _walk(self, ds: Dataset, ctx: "_Ctx", mode: int) -> None:
        """Apply the plan to one dataset level; ``mode`` 0 normal, 1 strict (inside D), 2 clean (inside C)."""
        d = ds._dict
        plan_ops = self.plan.ops
        for tag in list(d):
            op = plan_ops.get(tag)
            if op is None:
                group = tag >> 16
                if group & 1:
                    self._private(ds, tag)
                elif not tag & 0xFFFF or group in (0x0000, 0x0002):
                    self._del(d, tag)       # group lengths go stale; command/file-meta groups do not belong here
                elif 0x5000 <= group <= 0x50FF:
                    if self.plan.curve_op == DEL:
                        self._del(d, tag)
                elif 0x6000 <= group <= 0x60FF:
                    if self.plan.overlay_op == DEL:
                        self._del(d, tag)
                    elif (tag & 0xFFFF) == 0x3000:
                        ctx.overlays.append(tag)
                    elif _elem_vr(d[tag], tag) in _TEXT_VRS:
                        self._clean(ds, tag, ctx)
                elif tag in _SQ_TAGS:
                    self._recurse(ds, tag, ctx, mode)
                elif mode:
                    vr = _elem_vr(d[tag], tag)
                    if vr in _FREE_TEXT_VRS:
                        if mode == 1:
                            self._set(d, tag, vr, _DUMMY_TEXT[vr])
                        else:
                            self._clean(ds, tag, ctx)
                continue
            code = op[0]
            if code == KEEP:
                continue
            if code == DEL:
                self._del(d, tag)
                continue
            elem = d[tag]
            if code == UID:
                old = _raw_text(elem)
                if old:
                    new = "\\".join(self.pseudo.uid(u.strip()) for u in old.split("\\") if u.strip())
                    self._set(d, tag, "UI", new)
            elif code == EMPTY:
                self._set(d, tag, _elem_vr(elem, tag), None)
            elif code == SHIFT:
                self._shift(d, tag, elem, op[1], ctx)
            elif code == DUMMY:
                vr = _elem_vr(elem, tag)
                self._set(d, tag, vr, self._dummy(vr))
            elif code == SEQ_RECURSE:
                self._recurse(ds, tag, ctx, mode)
            elif code == SEQ_STRICT:
                self._recurse(ds, tag, ctx, 1)
            elif code == SEQ_CLEAN:
                self._recurse(ds, tag, ctx, 2 if mode != 1 else 1)
            elif code == SEQ_EMPTY:
                self._set(d, tag, "SQ", Sequence())
            elif code == CLEAN:
                self._clean(ds, tag, ctx)
            elif code == AEPSEUDO:
                old = _raw_text(elem)
                if old:
                    self._set(d, tag, "AE", "\\".join(self.pseudo.ae(v) for v in old.split("\\")))
            elif code == SET:
                self._set(d, tag, _elem_vr(elem, tag), op[1])
            elif code == HASH:
                vr = _elem_vr(elem, tag)
                try:
                    old = str(ds[tag].value or "")
                except Exception:
                    old = _raw_text(elem)
                self._set(d, tag, vr, self.pseudo.hash_text(old, vr) if old else None)

    def _del(self, d: dict, tag: int) -> None:
        del d[tag]
        self._changes += 1

    def _set(self, d: dict, tag: int, vr: str, value: Any) -> None:
        """Store a new value; ASCII strings become raw elements (written as-is, no re-encoding)."""
        tag = BaseTag(tag)
        self._changes += 1
        if value is None or value == "":
            d[tag] = RawDataElement(tag, vr, 0, b"", 0, self._implicit, self._little, True, False)
            return
        if isinstance(value, str) and vr in _ASCII_VRS:
            try:
                b = value.encode("ascii")
            except UnicodeEncodeError:
                b = None
            if b is not None:
                if len(b) & 1:
                    b += b"\x00" if vr == "UI" else b" "
                d[tag] = RawDataElement(tag, vr, len(b), b, 0, self._implicit, self._little, True, False)
                return
        d[tag] = DataElement(tag, vr, value)

    @staticmethod
    def _dummy(vr: str) -> Any:
        if vr in _DUMMY_TEXT:
            return _DUMMY_TEXT[vr]
        if vr in _DUMMY_NUM:
            return _DUMMY_NUM[vr]
        if vr in ("OB", "UN"):
            return b"\x00\x00"
        if vr in ("OW", "OF", "OL", "OD", "OV"):
            return b"\x00" * 8
        return None

    def _recurse(self, ds: Dataset, tag: int, ctx: "_Ctx", mode: int) -> None:
        raw = ds._dict[tag]
        before = self._changes
        try:
            seq = ds[tag].value
        except Exception:
            self._del(ds._dict, tag)                                # unparseable sequence: drop, never leak
            return
        if isinstance(seq, Sequence) or isinstance(seq, list):
            for item in seq:
                if isinstance(item, Dataset):
                    self._walk(item, ctx, mode)
        if self._changes == before and isinstance(raw, RawDataElement):
            ds._dict[tag] = raw                                     # untouched: write the original bytes as they were

    def _shift(self, d: dict, tag: int, elem, vr: str, ctx: "_Ctx") -> None:
        if not self.plan.shift_dates:
            return
        vr = _elem_vr(elem, tag) if vr not in _DATE_VRS else vr
        if vr == "TM":
            return                                                  # whole-day shift keeps the time of day
        old = _raw_text(elem)
        if not old:
            return
        days = ctx.offset()
        new = shift_date(old, days) if vr == "DA" else shift_datetime(old, days)
        self._set(d, tag, vr, new or None)

    def _clean(self, ds: Dataset, tag: int, ctx: "_Ctx") -> None:
        vr = _elem_vr(ds._dict[tag], tag)
        try:
            vals = _text_values(ds, tag, vr)
        except Exception:
            self._del(ds._dict, tag)
            return
        if not any(vals):
            return
        toks = ctx.tokens(ds)
        cleaned = [clean_text(v, toks) for v in vals]
        if cleaned != vals:
            new = cleaned[0] if len(cleaned) == 1 else cleaned
            self._set(ds._dict, tag, vr, new if new != "" else None)

    def _private(self, ds: Dataset, tag: int) -> None:
        d = ds._dict
        if self.plan.private_op == DEL:
            self._del(d, tag)
            return
        elem_lo = tag & 0xFFFF
        group = tag >> 16
        if 0x0010 <= elem_lo <= 0x00FF:
            # private creator: kept only if one of its elements is on the safe list
            creator = _raw_text(d[tag]).upper()
            if not any(c == creator and g == group for (c, g, _) in self._safe_private):
                self._del(d, tag)
            return
        block = elem_lo >> 8
        if block < 0x10:
            self._del(d, tag)
            return
        ctag = (group << 16) | block
        creator = _raw_text(d[ctag]).upper() if ctag in d else ""
        if (creator, group, elem_lo & 0xFF) not in self._safe_private:
            self._del(d, tag)

    # -- burned-in annotation ------------------------------------------------------------------
    def _burned_in(self, ds: Dataset) -> Optional[InstanceResult]:
        d = ds._dict
        if 0x7FE00010 not in d:
            return None
        raw = lambda tag: _raw_text(d[tag]).upper() if tag in d else ""   # noqa: E731 - ASCII VRs, no conversion
        flag = raw(0x00280301)                                      # BurnedInAnnotation
        modality = raw(0x00080060)
        image_type = raw(0x00080008).split("\\")
        sop_class = raw(0x00080016)
        if flag == "YES":
            why = "BurnedInAnnotation is YES"
        elif flag == "NO":
            return None
        elif modality in BURNED_IN_RISK_MODALITIES:
            why = f"modality {modality} commonly carries burned-in annotation"
        elif modality in BURNED_IN_RISK_IF_SECONDARY and "SECONDARY" in image_type:
            why = f"{modality} SECONDARY image may carry burned-in annotation"
        elif sop_class.startswith("1.2.840.10008.5.1.4.1.1.7"):
            why = "Secondary Capture image may carry burned-in annotation"
        else:
            return None
        regions = self._regions_for(ds, modality)
        if regions:
            try:
                self._blank(ds, regions)
            except Exception as e:                          # undecodable pixels: never pass them through
                return InstanceResult(False, reason="pixel_cleaning_failed", detail=f"{why}; {type(e).__name__}")
            return InstanceResult(True, pixel_cleaned=True)
        if not self.deid.quarantine_burned_in:
            return InstanceResult(True, burned_in_passed=True)
        return InstanceResult(False, reason="burned_in_annotation",
                              detail=f"{why}; no pixel region in the study matches this image")

    def _regions_for(self, ds: Dataset, modality: str) -> list[ir.PixelRegion]:
        vendor = normalize_vendor(str(ds.get("Manufacturer", "") or ""))
        model = str(ds.get("ManufacturerModelName", "") or "").lower()
        rows, cols = ds.get("Rows"), ds.get("Columns")
        out = []
        for r in self.deid.pixel_regions:
            if r.modality and r.modality.upper() != modality:
                continue
            if r.vendor and normalize_vendor(r.vendor) != vendor:
                continue
            if r.model and r.model.lower() != model:
                continue
            if (r.rows and r.rows != rows) or (r.columns and r.columns != cols):
                continue
            out.append(r)
        return out

    def _blank(self, ds: Dataset, regions: list[ir.PixelRegion]) -> None:
        import numpy as np

        if ds.file_meta.TransferSyntaxUID.is_compressed:
            ds.decompress(generate_instance_uid=False)
        arr = ds.pixel_array.copy()
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        spp = int(ds.get("SamplesPerPixel", 1) or 1)
        view = arr if frames > 1 else arr[np.newaxis, ...]
        for r in regions:
            if spp > 1:
                view[:, r.y0:r.y1, r.x0:r.x1, :] = 0
            else:
                view[:, r.y0:r.y1, r.x0:r.x1] = 0
        ds.PixelData = arr.tobytes()
        ds.BurnedInAnnotation = "NO"

    def _clean_overlays(self, ds: Dataset, data_tags: list[int]) -> None:
        """Clean Graphics: keep an overlay only with the study's regions blanked in it; else remove its group."""
        import numpy as np

        regions = self._regions_for(ds, str(ds.get("Modality", "") or "").upper())
        for tag in data_tags:
            group = tag >> 16
            try:
                rows = int(ds[(group << 16) | 0x0010].value)
                cols = int(ds[(group << 16) | 0x0011].value)
                raw = ds[tag].value
                bits = np.unpackbits(np.frombuffer(raw, dtype=np.uint8), bitorder="little")
                n = bits.size // (rows * cols)
                if not regions or n < 1:
                    raise ValueError("no region")
                planes = bits[: n * rows * cols].reshape(n, rows, cols)
                for r in regions:
                    planes[:, r.y0:r.y1, r.x0:r.x1] = 0
                packed = np.packbits(planes.ravel(), bitorder="little").tobytes()
                if len(packed) % 2:
                    packed += b"\x00"
                ds[tag] = DataElement(tag, "OW", packed)
            except Exception:
                for t in [t for t in ds._dict if t >> 16 == group]:
                    del ds._dict[t]

    # -- identifiers and method ----------------------------------------------------------------
    def _insert_identifiers(self, ds: Dataset, identity: dict, pixel_cleaned: bool) -> None:
        plan = self.plan
        subject = str(identity["subject_id"])
        study = self.trial.study
        d = ds._dict

        def put(tag: int, vr: str, value: Any, limit: int = 64) -> None:
            if tag in self._override_tags:
                return                      # the study's explicit override wins over research identifiers
            if value in (None, ""):
                d.pop(tag, None)            # trial-owned attribute with no trial value: drop the site's value
                return
            self._set(d, tag, vr, str(value)[:limit])

        put(0x00100020, "LO", subject)                    # PatientID
        put(0x00100010, "PN", subject)                    # PatientName
        put(0x00120040, "LO", subject)                    # ClinicalTrialSubjectID
        if study is not None:
            put(0x00120010, "LO", study.sponsor)          # ClinicalTrialSponsorName
            put(0x00120020, "LO", study.code)             # ClinicalTrialProtocolID
            put(0x00120021, "LO", study.title)            # ClinicalTrialProtocolName
        put(0x00120030, "LO", identity.get("site"))       # ClinicalTrialSiteID
        put(0x00120050, "LO", identity.get("timepoint") or identity.get("visit"))   # ClinicalTrialTimePointID
        put(0x00120051, "ST", identity.get("timepoint_description"), 1024)          # ...TimePointDescription
        self._set(d, 0x00120062, "CS", "YES")             # PatientIdentityRemoved
        self._set(d, 0x00120063, "LO", plan.method_text)  # DeidentificationMethod
        codes = list(plan.method_codes)
        if pixel_cleaned:
            codes = sorted(codes + [(CLEAN_PIXEL_DATA_CODE, CID7050[CLEAN_PIXEL_DATA_CODE])])
            self._set(d, 0x00120063, "LO", "\\".join(m[:64] for _, m in codes))
        items = []
        for value, meaning in codes:
            it = Dataset()
            self._set(it._dict, 0x00080100, "SH", value)
            self._set(it._dict, 0x00080102, "SH", CODING_SCHEME)
            self._set(it._dict, 0x00080104, "LO", meaning)
            items.append(it)
        d[BaseTag(0x00120064)] = DataElement(0x00120064, "SQ", Sequence(items))
        self._set(d, 0x00280303, "CS", plan.dates_state)  # LongitudinalTemporalInformationModified

    # -- files ---------------------------------------------------------------------------------
    def to_bytes(self, ds: Dataset, transfer_syntax) -> bytes:
        """Serialize deterministically: zero preamble, File Meta Information rebuilt from scratch."""
        from pydicom.filebase import DicomBytesIO
        from pydicom.filewriter import write_dataset
        from pydicom.uid import UID

        ts = UID(str(transfer_syntax))
        sop_class = _raw_text(ds._dict[0x00080016]) if 0x00080016 in ds._dict else ""
        sop_inst = _raw_text(ds._dict[0x00080018]) if 0x00080018 in ds._dict else ""
        if ts.is_deflated or not ts.is_little_endian:
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = sop_class
            meta.MediaStorageSOPInstanceUID = sop_inst
            meta.TransferSyntaxUID = ts
            meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
            meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
            ds.file_meta = meta
            ds.preamble = b"\x00" * 128
            buf = BytesIO()
            ds.save_as(buf, enforce_file_format=True)
            return buf.getvalue()
        fp = DicomBytesIO()
        fp.is_little_endian = True
        fp.is_implicit_VR = ts.is_implicit_VR
        fp.write(_file_meta_bytes(sop_class, sop_inst, str(ts)))
        write_dataset(fp, ds)
        return fp.getvalue()

    def deidentify_file(self, src: Path, identity: dict) -> tuple[InstanceResult, Optional[bytes]]:
        """Read, de-identify and serialize one file. Returns (result, bytes or None)."""
        try:
            ds = pydicom.dcmread(str(src), force=True)
        except Exception as e:
            return InstanceResult(False, reason="unreadable", detail=type(e).__name__), None
        if "SOPInstanceUID" not in ds or "SOPClassUID" not in ds:
            return InstanceResult(False, reason="missing_essentials", detail="SOPInstanceUID/SOPClassUID"), None
        res = self.deidentify(ds, identity)
        if not res.ok:
            return res, None
        ts = getattr(ds, "file_meta", None) and ds.file_meta.get("TransferSyntaxUID")
        if not ts:
            ts = ImplicitVRLittleEndian if self._implicit else ExplicitVRLittleEndian
        return res, self.to_bytes(ds, ts)


def _meta_elem(tag: int, vr: str, value: bytes) -> bytes:
    import struct

    if len(value) & 1:
        value += b"\x00" if vr in ("UI", "OB") else b" "
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF) + vr.encode()
    if vr == "OB":
        return head + b"\x00\x00" + struct.pack("<I", len(value)) + value
    return head + struct.pack("<H", len(value)) + value


def _file_meta_bytes(sop_class: str, sop_inst: str, ts: str) -> bytes:
    """Preamble (zeros), 'DICM' and a fresh group 0002 in explicit VR little endian (PS3.10 7.1)."""
    import struct

    body = b"".join([
        _meta_elem(0x00020001, "OB", b"\x00\x01"),
        _meta_elem(0x00020002, "UI", sop_class.encode("ascii")),
        _meta_elem(0x00020003, "UI", sop_inst.encode("ascii")),
        _meta_elem(0x00020010, "UI", ts.encode("ascii")),
        _meta_elem(0x00020012, "UI", IMPLEMENTATION_CLASS_UID.encode("ascii")),
        _meta_elem(0x00020013, "SH", IMPLEMENTATION_VERSION_NAME.encode("ascii")),
    ])
    group_length = _meta_elem(0x00020000, "UL", struct.pack("<I", len(body)))
    return b"\x00" * 128 + b"DICM" + group_length + body


class _Ctx:
    """Per-instance state: subject, lazily computed identifier tokens and date offset."""

    __slots__ = ("engine", "subject", "_tokens", "_offset", "overlays")

    def __init__(self, engine: Deidentifier, subject: str):
        self.engine = engine
        self.subject = subject
        self._tokens: Optional[tuple[str, ...]] = None
        self._offset: Optional[int] = None
        self.overlays: list[int] = []

    def tokens(self, ds: Dataset) -> tuple[str, ...]:
        return self._tokens or ()

    def offset(self) -> int:
        if self._offset is None:
            self._offset = self.engine.pseudo.date_offset(self.subject)
        return self._offset


# --------------------------------------------------------------------------- the pipeline step

def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _quarantine(qdir: Path, src: Path, rel: str, reason: str, detail: str) -> str:
    import shutil

    digest = _sha256(src)
    dst = qdir / digest
    dst.mkdir(parents=True, exist_ok=True)
    if not (dst / "file").exists():
        shutil.copyfile(src, dst / "file.tmp")
        os.replace(dst / "file.tmp", dst / "file")
    info = {"reason": reason, "detail": detail, "step": "deidentify", "original_path": rel}
    _atomic_write(dst / "reason.json", json.dumps(info, indent=2, sort_keys=True).encode())
    return digest


def subject_date_shift(trial: ir.Trial, subject_id: str) -> Optional[int]:
    """The keyed per-subject date offset in days, or None when the study does not shift dates.

    Raises SecretError when the study shifts dates but its key is missing.
    """
    deid = trial.deidentify
    if deid is None or not subject_id:
        return None
    opts = {o.value if isinstance(o, ir.DeidOption) else str(o) for o in deid.options}
    if "retain_longitudinal_modified_dates" not in opts or "retain_longitudinal_full_dates" in opts:
        return None
    lo = int(round(deid.date_shift_min.days)) if deid.date_shift_min else -365
    hi = int(round(deid.date_shift_max.days)) if deid.date_shift_max else -1
    return Pseudonymizer(resolve_key(trial), lo, hi).date_offset(subject_id)


def audit_entries(engine: Deidentifier, subject_id: str) -> list[dict]:
    """The site-side audit map (original <-> pseudonym) recorded by ``engine`` (``pseudo.record``): UIDs, date offset.

    Site-side only: this is what lets authorized staff at the site re-identify; it never leaves the registry.
    """
    rows = [{"subject_id": subject_id, "kind": "uid", "original": o, "pseudonym": n}
            for o, n in sorted((engine.pseudo.record or {}).items())]
    if engine.plan.shift_dates:
        rows.append({"subject_id": subject_id, "kind": "date_shift_days", "original": subject_id,
                     "pseudonym": str(engine.pseudo.date_offset(subject_id))})
    return rows


def store_audit(registry: Path, trial_code: str, exam_key: str, rows: list[dict]) -> int:
    """Insert audit rows into table ``deid_audit`` of the state database (idempotent)."""
    from ..store import connect, tx

    con = connect(registry)
    try:
        with tx(con):
            con.executemany(
                "INSERT OR IGNORE INTO deid_audit (trial, subject_id, exam, kind, original, pseudonym)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                [(trial_code, r["subject_id"], exam_key, r["kind"], r["original"], r["pseudonym"]) for r in rows])
    finally:
        con.close()
    return len(rows)


def deidentify_exam(trial: ir.Trial, exam: Path, identity: dict, out: Path, quarantine: Optional[Path] = None,
                    registry: Optional[Path] = None, engine: Optional[Deidentifier] = None) -> dict:
    """De-identify every file under ``exam/original`` into ``out/<new SOPInstanceUID>.dcm``; return a summary."""
    exam, out = Path(exam), Path(out)
    engine = engine or Deidentifier(trial, resolve_key(trial))
    qdir = Path(quarantine) if quarantine else None
    src_root = exam / "original" if (exam / "original").is_dir() else exam
    files = sorted(p for p in src_root.rglob("*") if p.is_file() and not p.name.endswith(".tmp"))
    out.mkdir(parents=True, exist_ok=True)
    engine.pseudo.record = {}
    written, pixel_cleaned, passed_burned = 0, 0, 0
    quarantined = []
    for src in files:
        rel = src.relative_to(src_root).as_posix()
        res, data = engine.deidentify_file(src, identity)
        if not res.ok or data is None:
            reason = res.reason or "deidentify_failed"
            digest = _quarantine(qdir, src, rel, reason, res.detail) if qdir else _sha256(src)
            quarantined.append({"file": str(src), "sha256": digest, "reason": reason, "detail": res.detail})
            continue
        _atomic_write(out / f"{res.dataset.SOPInstanceUID}.dcm", data)
        written += 1
        pixel_cleaned += res.pixel_cleaned
        passed_burned += res.burned_in_passed
    subject = str(identity.get("subject_id") or "")
    n_audit = 0
    if registry and subject:
        code = trial.study.code if trial.study else ""
        n_audit = store_audit(Path(registry), code, exam.name, audit_entries(engine, subject))
    return {"step": "deidentify", "engine": ENGINE_VERSION, "files": len(files), "written": written, "quarantined": quarantined,
            "pixel_cleaned": pixel_cleaned, "burned_in_passed_unchecked": passed_burned,
            "profile": trial.deidentify.profile.name if trial.deidentify else None,
            "method_codes": [c for c, _ in engine.plan.method_codes], "dates": engine.plan.dates_state,
            "audit_rows": n_audit}


@step(
    "deidentify",
    inputs=[Param("exam", "directory", "exam folder holding original/ (site-side)"),
            Param("identity", "file", "identity.json from the identify step"),
            Param("registry", "file", "SQLite registry: the UID/date audit map goes to table deid_audit", optional=True),
            Param("quarantine", "directory", "also copy refused files to QUARANTINE/<sha256>/{file,reason.json}", optional=True)],
    outputs=[Param("out", "directory", "de-identified instances, <SOPInstanceUID>.dcm")],
)
def deidentify(trial: ir.Trial, exam: str, identity: str, out: str, registry: Optional[str] = None,
               quarantine: Optional[str] = None) -> dict:
    """PS3.15 Annex E de-identification of one exam: study profile + options + overrides, keyed UID remap,
    per-subject date shift, research identifiers; byte-deterministic output."""
    ident = json.loads(Path(identity).read_text(encoding="utf-8"))
    return deidentify_exam(trial, Path(exam), ident, Path(out), Path(quarantine) if quarantine else None,
                           Path(registry) if registry else None)
