"""The dataset walk: apply a compiled :class:`~imtrial_dsl.deid.plan.Plan` to every element of an instance,
through nested sequences, touching only the elements that need work (untouched elements stay pydicom raw
elements and are written back byte for byte); then insert the research identifiers.

Sequences: K/U/D/C recurse into every item with the same plan; D on a sequence additionally replaces every
free-text / person-name element inside it that the table does not mention (e.g. SR TextValue); C (Clean
Structured Content) cleans those texts instead. Z empties the sequence, X removes it. Group lengths and stray
command/file-meta elements in the body are dropped (Part 10 writing rebuilds the File Meta Information).
"""
from __future__ import annotations

import io
from collections import Counter
from copy import deepcopy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import pydicom
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from .. import ir
from ..dicom_tables import CID7050, CLEAN_PIXEL_DATA_CODE, CODING_SCHEME, SAFE_PRIVATE
from . import part10, pixels
from .elements import SQ_TAGS, elem_vr, parse_tag, raw_text, text_values
from .plan import (AEPSEUDO, CLEAN, DEL, DUMMY, EMPTY, HASH, KEEP, OP_NAMES, SEQ_CLEAN, SEQ_EMPTY, SEQ_RECURSE,
                   SEQ_STRICT, SET, SHIFT, UID, DeidError, Plan, compile_plan)
from .pseudonyms import pseudonymizer, shift_date, shift_datetime
from .text import clean_text, instance_tokens
from .vr import ASCII_VRS, DATE_VRS, DUMMY_NUM, DUMMY_TEXT, TEXT_VRS


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
        self.pseudo = pseudonymizer(trial, key)
        self.seen: Counter = Counter()                  # (tag, operation) -> count over every instance: conformance
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
        verdict = pixels.screen(ds, self.deid)
        if verdict is not None and verdict.refused:
            return InstanceResult(False, reason=verdict.refused, detail=verdict.detail)
        cleaned = bool(verdict and verdict.cleaned)
        ctx = _Ctx(self, subject, self.seen)
        enc = ds.original_encoding if hasattr(ds, "original_encoding") else (None, None)
        self._implicit = bool(enc[0]) if enc[0] is not None else False
        self._little = bool(enc[1]) if enc[1] is not None else True
        if self._needs_tokens:
            ctx.tokens = instance_tokens(ds)                # before any identifier is removed
        self._walk(ds, ctx, 0)
        if ctx.overlays:
            pixels.clean_overlays(ds, ctx.overlays, self.deid.pixel_regions)
        self._insert_identifiers(ds, identity, pixel_cleaned=cleaned)
        return InstanceResult(True, ds, pixel_cleaned=cleaned,
                              burned_in_passed=bool(verdict and verdict.passed_unchecked))

    def deidentify_file(self, src: Path, identity: dict) -> tuple[InstanceResult, Optional[bytes]]:
        """Read, de-identify and serialize one file. Returns (result, bytes or None)."""
        try:
            ds = pydicom.dcmread(io.BytesIO(Path(src).read_bytes()), force=True)  # from memory: faster than the file
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
        return res, part10.to_bytes(ds, ts)

    # -- what the output will say, without writing it (classification on the originals) ----------------
    def output_uid(self, tag: int, value: str) -> str:
        """The value UID element ``tag`` holding ``value`` has in the output: its keyed remap, itself
        (retain_uids, keep), a study's replacement, or "" (removed)."""
        op = self.plan.ops.get(tag)
        code = op[0] if op else KEEP
        if code == UID:
            return "\\".join(self.pseudo.uid(u.strip()) for u in value.split("\\") if u.strip())
        if code == SET:
            return str(op[1])
        if code in (DEL, EMPTY):
            return ""
        return value

    def preview(self, ds: Dataset, identity: dict) -> Optional[Dataset]:
        """A de-identified copy of header ``ds`` (``ds`` is untouched; pixels are not needed), or None when the
        instance would be refused. Nothing is recorded (audit map, conformance counts)."""
        copy = deepcopy(ds)
        seen, record = self.seen, self.pseudo.record
        self.seen, self.pseudo.record = Counter(), None
        try:
            res = self.deidentify(copy, identity)
        finally:
            self.seen, self.pseudo.record = seen, record
        return res.dataset if res.ok else None

    def _walk(self, ds: Dataset, ctx: "_Ctx", mode: int) -> None:
        """Apply the plan to one dataset level; ``mode`` 0 normal, 1 strict (inside D), 2 clean (inside C).

        Inside a D sequence nothing of the original may survive (PS3.15 E.1.1: D is "a dummy value"): every
        element takes its own row's action made strict (keep/clean become a dummy), and an element the table
        does not name gets a dummy of its VR (a sequence: the same, item by item)."""
        d = ds._dict
        plan_ops = self.plan.ops
        seen = ctx.seen
        for tag in list(d):
            group = tag >> 16
            if group in (0x0000, 0x0002) or not tag & 0xFFFF:
                seen[(tag, "remove")] = seen.get((tag, "remove"), 0) + 1
                self._del(d, tag)   # command/file-meta groups do not belong in a dataset; group lengths go stale
                continue
            op = plan_ops.get(tag)
            if op is None:
                if group & 1:
                    _count(seen, (tag, self._private(ds, tag)))
                elif 0x5000 <= group <= 0x50FF:
                    if self.plan.curve_op == DEL:
                        self._del(d, tag)
                    _count(seen, (tag, "remove" if self.plan.curve_op == DEL else "keep"))
                elif 0x6000 <= group <= 0x60FF:
                    if self.plan.overlay_op == DEL:
                        self._del(d, tag)
                        _count(seen, (tag, "remove"))
                    elif (tag & 0xFFFF) == 0x3000:
                        ctx.overlays.append(tag)
                        _count(seen, (tag, "clean"))
                    elif elem_vr(d[tag], tag) in TEXT_VRS:
                        self._clean(ds, tag, ctx)
                        _count(seen, (tag, "clean"))
                    else:
                        _count(seen, (tag, "keep"))
                elif tag in SQ_TAGS:
                    self._recurse(ds, tag, ctx, mode)
                    _count(seen, (tag, "recurse_strict" if mode == 1 else "recurse"))
                elif mode:
                    vr = elem_vr(d[tag], tag)
                    if mode == 1:
                        _count(seen, (tag, self._strict_unlisted(d, tag, vr)))
                    elif vr in TEXT_VRS:            # clean structured content: every text (codes stay as written)
                        self._clean(ds, tag, ctx)
                        _count(seen, (tag, "clean"))
                    else:
                        _count(seen, (tag, "keep"))
                else:
                    k = (tag, "keep")
                    seen[k] = seen.get(k, 0) + 1
                continue
            code = op[0]
            if mode == 1 and tag not in self._override_tags:
                code = _STRICT.get(code, code)
            k = (tag, OP_NAMES[code])
            seen[k] = seen.get(k, 0) + 1
            if code == KEEP:
                continue
            if code == DEL:
                self._del(d, tag)
                continue
            elem = d[tag]
            if code == UID:
                old = raw_text(elem)
                if old:
                    new = "\\".join(self.pseudo.uid(u.strip()) for u in old.split("\\") if u.strip())
                    self._set(d, tag, "UI", new)
            elif code == EMPTY:
                self._set(d, tag, elem_vr(elem, tag), None)
            elif code == SHIFT:
                self._shift(d, tag, elem, op[1], ctx)
            elif code == DUMMY:
                vr = elem_vr(elem, tag)
                if vr == "SQ":
                    self._recurse(ds, tag, ctx, 1)
                else:
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
                old = raw_text(elem)
                if old:
                    self._set(d, tag, "AE", "\\".join(self.pseudo.ae(v) for v in old.split("\\")))
            elif code == SET:
                self._set(d, tag, elem_vr(elem, tag), op[1])
            elif code == HASH:
                vr = elem_vr(elem, tag)
                try:
                    old = str(ds[tag].value or "")
                except Exception:
                    old = raw_text(elem)
                self._set(d, tag, vr, self.pseudo.hash_text(old, vr) if old else None)

    def _strict_unlisted(self, d: dict, tag: int, vr: str) -> str:
        """Inside a D sequence, an element the table does not name: a dummy of its VR (a UID: its keyed remap,
        unless it is a DICOM-defined UID such as a SOP class, which identifies nothing). Returns what was done."""
        elem = d[tag]
        if vr == "UI":
            old = raw_text(elem)
            if not old or all(u.strip().startswith(_DICOM_UID_ROOT) for u in old.split("\\")):
                return "keep"
            self._set(d, tag, "UI", "\\".join(u.strip() if u.strip().startswith(_DICOM_UID_ROOT)
                                               else self.pseudo.uid(u.strip()) for u in old.split("\\") if u.strip()))
            return "uid"
        dummy = self._dummy(vr)
        if dummy is None:
            self._del(d, tag)
            return "remove"
        if elem.value in (None, b"", ""):
            return "keep"                   # empty stays empty: nothing to hide
        self._set(d, tag, vr, dummy)
        return "dummy"

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
        if isinstance(value, str) and vr in ASCII_VRS:
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
        if vr in DUMMY_TEXT:
            return DUMMY_TEXT[vr]
        if vr in DUMMY_NUM:
            return DUMMY_NUM[vr]
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
            self._del(d, tag)                                       # a date that cannot be shifted is not kept
            return
        vr = elem_vr(elem, tag) if vr not in DATE_VRS else vr
        if vr == "TM":
            return                                                  # whole-day shift keeps the time of day
        old = raw_text(elem)
        if not old:
            return
        days = ctx.offset()
        new = shift_date(old, days) if vr == "DA" else shift_datetime(old, days)
        self._set(d, tag, vr, new or None)

    def _clean(self, ds: Dataset, tag: int, ctx: "_Ctx") -> None:
        vr = elem_vr(ds._dict[tag], tag)
        try:
            vals = text_values(ds, tag, vr)
        except Exception:
            self._del(ds._dict, tag)
            return
        if not any(vals):
            return
        cleaned = [clean_text(v, ctx.tokens) for v in vals]
        if cleaned != vals:
            new = cleaned[0] if len(cleaned) == 1 else cleaned
            self._set(ds._dict, tag, vr, new if new != "" else None)

    def _private(self, ds: Dataset, tag: int) -> str:
        """Remove a private element unless the plan keeps safe private elements and it is on the list."""
        d = ds._dict
        if self.plan.private_op == DEL:
            self._del(d, tag)
            return "remove"
        elem_lo = tag & 0xFFFF
        group = tag >> 16
        if 0x0010 <= elem_lo <= 0x00FF:
            # private creator: kept only if one of its elements is on the safe list
            creator = raw_text(d[tag]).upper()
            if not any(c == creator and g == group for (c, g, _) in self._safe_private):
                self._del(d, tag)
                return "remove"
            return "keep"
        block = elem_lo >> 8
        if block < 0x10:
            self._del(d, tag)
            return "remove"
        ctag = (group << 16) | block
        creator = raw_text(d[ctag]).upper() if ctag in d else ""
        if (creator, group, elem_lo & 0xFF) not in self._safe_private:
            self._del(d, tag)
            return "remove"
        return "keep"

    # -- research identifiers and method ---------------------------------------------------------
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
        # PatientIdentityRemoved: NO when the study's overrides keep identity (then no 113100 either)
        self._set(d, 0x00120062, "CS", "NO" if plan.identity_kept else "YES")
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


def _count(seen: dict, key: tuple) -> None:
    seen[key] = seen.get(key, 0) + 1


# Inside a D sequence the row's action is made strict: nothing is kept as it was.
_STRICT = {KEEP: DUMMY, CLEAN: DUMMY, SHIFT: DUMMY, AEPSEUDO: DUMMY, SEQ_RECURSE: SEQ_STRICT, SEQ_CLEAN: SEQ_STRICT}
_DICOM_UID_ROOT = "1.2.840.10008."     # UIDs the standard defines (SOP classes, coding schemes): identify nobody


class _Ctx:
    """Per-instance state: subject, identifier tokens (read before the walk), lazily computed date offset,
    and what happened to each element (``seen``: (tag, operation) -> count; the conformance report)."""

    __slots__ = ("engine", "subject", "tokens", "_offset", "overlays", "seen")

    def __init__(self, engine: Deidentifier, subject: str, seen: Optional[Counter] = None):
        self.engine = engine
        self.subject = subject
        self.tokens: tuple[str, ...] = ()
        self._offset: Optional[int] = None
        self.overlays: list[int] = []
        self.seen: Counter = seen if seen is not None else Counter()

    def offset(self) -> int:
        if self._offset is None:
            self._offset = self.engine.pseudo.date_offset(self.subject)
        return self._offset
