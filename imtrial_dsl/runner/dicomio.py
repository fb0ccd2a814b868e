"""Header helpers shared by classify, adherence, QC, synth and the runner.

One entry point, :func:`get_param`, reads an acquisition parameter wherever the
object keeps it: the top level of a classic image, or the Shared / Per-frame
Functional Groups of an Enhanced (multi-frame) image, where the same fact may
live under another keyword (EchoTime is EffectiveEchoTime inside MREchoSequence,
SequenceName is PulseSequenceName, XRayTubeCurrent is XRayTubeCurrentInmA ...).
Values come back raw, in DICOM storage units (convert with ``units.from_dicom``).
"""
from __future__ import annotations

import io
import os
import struct
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

import pydicom
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.valuerep import DSdecimal, DSfloat, IS

# Enhanced objects rename some classic attributes; the classic keyword is what
# protocols are written in, so these are tried (in order) when it is absent.
# Checked against the Enhanced MR macros of PS3.3 C.8.13.5 (MR Timing and Related Parameters, MR FOV/
# Geometry, MR Echo, MR Modifier, MR Imaging Modifier, Cardiac Synchronization) and the Enhanced MR Image
# module (C.8.13.1); the CT names against the CT Acquisition Details / CT Exposure macros (C.8.15.3).
ALIASES: dict[str, tuple[str, ...]] = {
    "EchoTime": ("EffectiveEchoTime",),
    "SequenceName": ("PulseSequenceName",),
    "InversionTime": ("InversionTimes",),
    "ImagingFrequency": ("TransmitterFrequency",),                          # MR Imaging Modifier, MHz both
    "ImagedNucleus": ("ResonantNucleus",),                                  # Enhanced MR Image module
    "NumberOfPhaseEncodingSteps": ("MRAcquisitionPhaseEncodingStepsInPlane",),  # MR FOV/Geometry
    "TriggerTime": ("NominalCardiacTriggerDelayTime",),                     # Cardiac Synchronization, ms both
    "XRayTubeCurrent": ("XRayTubeCurrentInmA", "XRayTubeCurrentInuA"),
    "Exposure": ("ExposureInmAs", "ExposureInuAs"),
    "ExposureTime": ("ExposureTimeInms",),
    "ImageType": ("FrameType",),
}

# Keywords kept by Enhanced MR whose enumerated values differ from the classic ones: the value read
# from a functional group is given in the classic term (MR FOV/Geometry macro: ROW, COLUMN; classic
# MR Image module: ROW, COL).
CLASSIC_TERMS: dict[str, dict[str, str]] = {
    "InPlanePhaseEncodingDirection": {"COLUMN": "COL"},
}

# Functional-group sequences are searched this deep (macro item -> attribute -> one nested level).
_MAX_DEPTH = 2

DEFLATED = "1.2.840.10008.1.2.1.99"
UNCOMPRESSED_SYNTAXES = {
    "1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99",
}


class Missing:
    """Sentinel for an attribute found nowhere (distinct from an empty value)."""

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return "MISSING"


MISSING = Missing()


def raw_bytes(ds: Dataset, tag: int) -> Any:
    """The element's undecoded value (bytes) when pydicom has not converted it yet, else its value.

    Comparing these is a cheap way to see that two instances carry the same value without
    paying for value conversion.
    """
    try:  # Dataset._dict: skips get_item's tag normalisation on this per-instance hot path
        elem = ds._dict.get(tag)
    except AttributeError:
        elem = ds.get_item(tag)
    if elem is None:
        return None
    v = elem.value
    return v if isinstance(v, (bytes, str, int, float)) or v is None else repr(v)


def _elem(ds: Dataset, tag: int) -> Any:
    try:
        return ds._dict.get(tag)
    except AttributeError:
        return ds.get_item(tag)


def raw_text(ds: Dataset, tag: int) -> str:
    """A short text element (UI, CS, IS, LO ...) without value conversion; '' when absent."""
    v = raw_bytes(ds, tag)
    if v is None:
        return ""
    if isinstance(v, bytes):
        return v.decode("ascii", "replace").strip(" \x00")
    return str(v).strip()


def raw_uint(ds: Dataset, tag: int, default: int) -> int:
    """A US/UL/IS element as int without value conversion (implicit VR: VR from the dictionary)."""
    elem = _elem(ds, tag)
    if elem is None or elem.value in (None, b"", ""):
        return default
    v = elem.value
    if isinstance(v, bytes):
        vr = elem.VR
        if vr in (None, "UN"):
            try:
                vr = dictionary_VR(tag)
            except KeyError:
                vr = "UN"
        little = getattr(elem, "is_little_endian", True) is not False
        if vr in ("US", "SS") and len(v) >= 2:
            return struct.unpack("<H" if little else ">H", v[:2])[0]
        if vr in ("UL", "SL") and len(v) >= 4:
            return struct.unpack("<I" if little else ">I", v[:4])[0]
        try:
            return int(v.decode("ascii").strip(" \x00") or default)
        except (ValueError, UnicodeDecodeError):
            return default
    try:
        return int(v[0] if isinstance(v, (list, MultiValue)) else v)
    except (TypeError, ValueError, IndexError):
        return default


def fingerprint(ds: Dataset, tags: tuple[int, ...]) -> Optional[tuple]:
    """Undecoded values of ``tags`` of a classic instance (None for Enhanced objects, whose
    values live in functional groups): equal fingerprints mean equal parameter values."""
    try:
        d = ds._dict  # per-instance hot path: plain dict lookups, no tag normalisation
    except AttributeError:
        return None if has_functional_groups(ds) else tuple(raw_bytes(ds, t) for t in tags)
    if 0x52009229 in d or 0x52009230 in d:
        return None
    out = []
    for t in tags:
        e = d.get(t)
        if e is None:
            out.append(None)
        else:
            v = e.value
            out.append(v if type(v) in (bytes, str, int, float) else repr(v))
    return tuple(out)


def has_functional_groups(ds: Dataset) -> bool:
    return raw_bytes(ds, 0x52009229) is not None or raw_bytes(ds, 0x52009230) is not None


def read_header(path: str | os.PathLike, *, specific_tags: Optional[list] = None) -> Dataset:
    """Header-only read (no pixel data): what classification and adherence need (read-only: see :func:`frozen`)."""
    return frozen(pydicom.dcmread(path, stop_before_pixels=True, force=True, specific_tags=specific_tags))


# --------------------------------------------------------------------------- functional-group index
# An Enhanced object answers every keyword from its Shared and Per-frame Functional Groups. Searching the
# groups per keyword and frame costs (keywords x frames x items); a data set the runner only reads is
# instead walked once, each group item flattened to keyword -> (visit order, value), and every lookup is a
# dict probe. The flattening visits items in the order _find_in_item does, so a lookup finds the same value.

_INDEX_ATTR = "_imtrial_fg_index"


class _GroupIndex:
    __slots__ = ("shared", "frames")

    def __init__(self, ds: Dataset):
        shared = ds.get("SharedFunctionalGroupsSequence")
        self.shared = _flatten(shared[0]) if shared else None
        per_frame = ds.get("PerFrameFunctionalGroupsSequence")
        self.frames = [_flatten(item) for item in per_frame] if per_frame else []


def _flatten(item: Dataset) -> dict[str, tuple[int, Any]]:
    """keyword -> (pre-order number of the item that holds it, value) for the non-sequence elements of
    ``item`` and of the first item of its sequences, ``_MAX_DEPTH`` levels down (as :func:`_find_in_item`)."""
    out: dict[str, tuple[int, Any]] = {}
    order = 0

    def visit(it: Dataset, depth: int) -> None:
        nonlocal order
        here = order
        order += 1
        subs = []
        for elem in it:
            if elem.VR == "SQ":
                if elem.value:
                    subs.append(elem.value[0])
            elif elem.keyword and elem.keyword not in out:
                out[elem.keyword] = (here, elem.value)
        if depth > 0:
            for sub in subs:
                visit(sub, depth - 1)

    visit(item, _MAX_DEPTH)
    return out


def _lookup(flat: dict[str, tuple[int, Any]], kws: tuple[str, ...]) -> Any:
    """What ``_find_in_item(item, kws, _MAX_DEPTH)`` returns, from the item's flattened index."""
    best = None
    for pos, kw in enumerate(kws):
        hit = flat.get(kw)
        if hit is not None and (best is None or (hit[0], pos) < best[:2]):
            best = (hit[0], pos, hit[1])
    return MISSING if best is None else best[2]


class _Frozen:
    """The mark :func:`frozen` leaves on a data set. A copy or a pickle of the data set does not keep it (it
    becomes None): a copy may be changed (de-identification previews work on a deep copy)."""

    __slots__ = ("owner", "index")

    def __init__(self, owner: int):
        self.owner, self.index = owner, None

    def __reduce__(self):
        return (type(None), ())


def frozen(ds: Dataset) -> Dataset:
    """Mark ``ds`` as read-only for the runner: its functional groups are indexed on first use. Only for data
    sets nobody changes afterwards (a changed group item would not be seen); the readers here return them."""
    if has_functional_groups(ds):
        object.__setattr__(ds, _INDEX_ATTR, _Frozen(id(ds)))
    return ds


def _index(ds: Dataset) -> Optional[_GroupIndex]:
    """The functional-group index of a :func:`frozen` data set (made on first use), else None."""
    mark = ds.__dict__.get(_INDEX_ATTR)
    if mark is None or mark.owner != id(ds):
        return None
    if mark.index is None:
        mark.index = _GroupIndex(ds)
    return mark.index


def plain(value: Any) -> Any:
    """A pydicom value as plain Python: numbers as float/int, multi-values as lists, PN/UID as str."""
    if isinstance(value, (MultiValue, list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, (DSfloat, DSdecimal)):
        return float(value)
    if isinstance(value, IS):
        return int(value)
    if isinstance(value, (bytes, bool)) or value is None or type(value) in (int, float, str):
        return value
    if isinstance(value, float):
        return float(value)
    if isinstance(value, int):
        return int(value)
    return str(value)


def _find_in_item(item: Dataset, keywords: tuple[str, ...], depth: int) -> Any:
    for kw in keywords:
        if kw in item:
            elem = item[kw]
            if elem.VR != "SQ":
                return elem.value
    if depth <= 0:
        return MISSING
    for elem in item:
        if elem.VR == "SQ" and elem.value:
            found = _find_in_item(elem.value[0], keywords, depth - 1)
            if found is not MISSING:
                return found
    return MISSING


def _keywords(keyword: str) -> tuple[str, ...]:
    return (keyword,) + ALIASES.get(keyword, ())


def _enum(ds: Dataset, keyword: str, frame: int) -> Optional[str]:
    """An Enhanced MR enumerated value (upper case), or None when the object does not carry it."""
    v = get_param(ds, keyword, frame=frame)
    if v is MISSING or v is None or v == "" or isinstance(v, list):
        return None
    return str(v).strip().upper() or None


def _scanning_sequence(ds: Dataset, frame: int) -> Any:
    """Scanning Sequence (C.8.3.1: SE, IR, GR, EP) from the MR Pulse Sequence module (C.8.13.4) and the
    MR Modifier macro (C.8.13.5.8): Echo Pulse Sequence SPIN → SE, GRADIENT → GR, BOTH → SE\\GR; Echo Planar
    Pulse Sequence YES → EP, which names the gradient-echo train of an echo-planar readout and so takes the
    place of GR (a spin-echo EPI is SE\\EP); Inversion Recovery YES → IR."""
    eps = _enum(ds, "EchoPulseSequence", frame)
    if eps is None:
        return MISSING
    base = {"GRADIENT": ["GR"], "SPIN": ["SE"], "BOTH": ["SE", "GR"]}.get(eps, [eps])
    if _enum(ds, "EchoPlanarPulseSequence", frame) == "YES":
        base = [b for b in base if b != "GR"] + ["EP"]
    if _enum(ds, "InversionRecovery", frame) == "YES":
        base = base + ["IR"]
    return base if len(base) > 1 else base[0]


# Sequence Variant (C.8.3.1 defined terms) from the Enhanced MR attribute that says the same thing.
_VARIANT_RULES: tuple[tuple[str, str, frozenset[str]], ...] = (
    ("SK", "SegmentedKSpaceTraversal", frozenset({"PARTIAL"})),          # segmented coverage
    ("MTC", "MagnetizationTransfer", frozenset({"ON_RESONANCE", "OFF_RESONANCE"})),
    ("SS", "SteadyStatePulseSequence", frozenset({"FREE_PRECESSION", "TRANSVERSE", "LONGITUDINAL"})),
    ("TRSS", "SteadyStatePulseSequence", frozenset({"TIME_REVERSED"})),
    ("SP", "Spoiling", frozenset({"RF", "GRADIENT", "RF_AND_GRADIENT"})),
    ("MP", "InversionRecovery", frozenset({"YES"})),                      # magnetization prepared:
    ("MP", "T2Preparation", frozenset({"YES"})),                          # inversion, T2 or saturation
    ("MP", "SaturationRecovery", frozenset({"YES"})),                     # preparation
    ("OSP", "OversamplingPhase", frozenset({"2D", "3D", "2D_3D"})),
)

# Scan Options (C.8.3.1 defined terms, in the standard's order) from the Enhanced MR attributes.
_OPTION_RULES: tuple[tuple[str, str, frozenset[str]], ...] = (
    ("PER", "RectilinearPhaseEncodeReordering", frozenset({"CENTRIC", "SEGMENTED", "REVERSE_LINEAR", "REVERSE_CENTRIC"})),
    ("RG", "RespiratoryMotionCompensationTechnique", frozenset({"GATING", "RETROSPECTIVE"})),
    ("FC", "FlowCompensation", frozenset({"ACCELERATION", "VELOCITY", "OTHER"})),
    ("SP", "SpatialPresaturation", frozenset({"SLAB"})),
    ("FS", "SpectrallySelectedSuppression", frozenset({"FAT", "FAT_AND_WATER"})),
)
_OPTION_ORDER = ("PER", "RG", "CG", "PPG", "FC", "PFF", "PFP", "SP", "FS")


def _terms(ds: Dataset, frame: int, rules, extra: tuple[str, ...] = ()) -> tuple[list[str], bool]:
    """The defined terms whose rule holds, and whether the object carries any of the rules' attributes."""
    out, seen = list(extra), bool(extra)
    for term, kw, values in rules:
        v = _enum(ds, kw, frame)
        if v is not None:
            seen = True
            if v in values and term not in out:
                out.append(term)
    return out, seen


def _sequence_variant(ds: Dataset, frame: int) -> Any:
    terms, seen = _terms(ds, frame, _VARIANT_RULES)
    if not seen or _enum(ds, "EchoPulseSequence", frame) is None:
        return MISSING
    order = [t for t, _, _ in _VARIANT_RULES]
    terms = sorted(terms, key=order.index) or ["NONE"]
    return terms if len(terms) > 1 else terms[0]


def _scan_options(ds: Dataset, frame: int) -> Any:
    if _enum(ds, "EchoPulseSequence", frame) is None:
        return MISSING
    extra: list[str] = []
    if _enum(ds, "PartialFourier", frame) == "YES":
        direction = _enum(ds, "PartialFourierDirection", frame)
        extra += {"PHASE": ["PFP"], "FREQUENCY": ["PFF"], "COMBINATION": ["PFF", "PFP"]}.get(direction or "", [])
    cardiac = _enum(ds, "CardiacSynchronizationTechnique", frame)
    if cardiac in ("REALTIME", "PROSPECTIVE", "RETROSPECTIVE", "PACED"):
        extra.append("PPG" if _enum(ds, "CardiacSignalSource", frame) == "PP" else "CG")
    terms, _ = _terms(ds, frame, _OPTION_RULES, tuple(extra))
    terms = sorted(set(terms), key=_OPTION_ORDER.index)
    if not terms:
        return ""  # known to have none (a classic header leaves Scan Options empty)
    return terms if len(terms) > 1 else terms[0]


def _acquisition_matrix(ds: Dataset, frame: int) -> Any:
    """Acquisition Matrix (frequency rows\\frequency columns\\phase rows\\phase columns) from the MR FOV/Geometry
    macro's encoding steps and phase-encoding direction: ROW → 0\\F\\P\\0, COL(UMN) → F\\0\\0\\P."""
    f = get_param(ds, "MRAcquisitionFrequencyEncodingSteps", frame=frame)
    p = get_param(ds, "MRAcquisitionPhaseEncodingStepsInPlane", frame=frame)
    d = _enum(ds, "InPlanePhaseEncodingDirection", frame)
    if not isinstance(f, int) or not isinstance(p, int) or d not in ("ROW", "COL"):
        return MISSING
    return [0, f, p, 0] if d == "ROW" else [f, 0, 0, p]


def _sar(ds: Dataset, frame: int) -> Any:
    """SAR (classic: whole body, W/kg) from the Specific Absorption Rate Sequence item defined IEC_WHOLE_BODY."""
    for item in _items(ds, "SpecificAbsorptionRateSequence", frame):
        if str(item.get("SpecificAbsorptionRateDefinition", "")).upper() == "IEC_WHOLE_BODY":
            v = item.get("SpecificAbsorptionRateValue")
            if v is not None:
                return plain(v)
    return MISSING


def _dbdt(ds: Dataset, frame: int) -> Any:
    """dB/dt (T/s) from the MR Timing and Related Parameters macro's Gradient Output when its type is DB_DT."""
    if _enum(ds, "GradientOutputType", frame) != "DB_DT":
        return MISSING
    return get_param(ds, "GradientOutput", frame=frame)


def _items(ds: Dataset, seq_keyword: str, frame: int) -> list[Dataset]:
    """Items of a sequence wherever get_param would look (top level, shared, then the frame's groups)."""
    places: list[Dataset] = [ds]
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared:
        places.append(shared[0])
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame and frame < len(per_frame):
        places.append(per_frame[frame])
    for place in places:
        stack = [(place, _MAX_DEPTH + 1)]
        while stack:
            item, depth = stack.pop()
            if seq_keyword in item and item[seq_keyword].VR == "SQ" and item[seq_keyword].value:
                return list(item[seq_keyword].value)
            if depth > 0:
                stack += [(e.value[0], depth - 1) for e in item if e.VR == "SQ" and e.value]
    return []


# Classic attributes that Enhanced MR expresses through other attributes (PS3.3 C.8.13), each derived
# from the standard's enumerated values; consulted only when the classic keyword is nowhere in the object.
DERIVED = {
    "ScanningSequence": _scanning_sequence,
    "SequenceVariant": _sequence_variant,
    "ScanOptions": _scan_options,
    "AcquisitionMatrix": _acquisition_matrix,
    "SAR": _sar,
    "dBdt": _dbdt,
}

# The Enhanced attributes the derivations read (classic instances are fingerprinted on them too).
DERIVED_FROM: tuple[str, ...] = (
    "EchoPulseSequence", "EchoPlanarPulseSequence", "InversionRecovery", "SegmentedKSpaceTraversal",
    "MagnetizationTransfer", "SteadyStatePulseSequence", "Spoiling", "T2Preparation", "SaturationRecovery",
    "OversamplingPhase", "RectilinearPhaseEncodeReordering", "RespiratoryMotionCompensationTechnique",
    "FlowCompensation", "SpatialPresaturation", "SpectrallySelectedSuppression", "PartialFourier",
    "PartialFourierDirection", "CardiacSynchronizationTechnique", "CardiacSignalSource",
    "MRAcquisitionFrequencyEncodingSteps", "MRAcquisitionPhaseEncodingStepsInPlane",
    "InPlanePhaseEncodingDirection", "SpecificAbsorptionRateSequence", "GradientOutputType", "GradientOutput",
)


def _derived(ds: Dataset, keyword: str, frame: int) -> Any:
    """Classic attributes that Enhanced MR expresses differently (PS3.3 C.8.13): see :data:`DERIVED`."""
    rule = DERIVED.get(keyword)
    return rule(ds, frame) if rule is not None else MISSING


def _classic(keyword: str, value: Any) -> Any:
    """A value read from a functional group, in the classic attribute's terms (:data:`CLASSIC_TERMS`)."""
    terms = CLASSIC_TERMS.get(keyword)
    if terms and isinstance(value, str):
        return terms.get(value.strip().upper(), value)
    return value


def get_param(ds: Dataset, keyword: str, frame: Optional[int] = None) -> Any:
    """The raw value of ``keyword`` (classic or Enhanced object), or :data:`MISSING`.

    Search order: top level; Shared Functional Groups; the Per-frame Functional
    Groups item of ``frame`` (default the first frame); then aliases and values
    derived from Enhanced MR attributes. Multi-valued values come back as lists.
    """
    kws = _keywords(keyword)
    for kw in kws:
        if kw in ds:
            elem = ds[kw]
            if elem.VR != "SQ" and not (elem.value is None or elem.value == ""):
                return plain(elem.value)
    index = _index(ds)
    if index is not None:
        if index.shared is not None:
            found = _lookup(index.shared, kws)
            if found is not MISSING:
                return _classic(keyword, plain(found))
        if (frame or 0) < len(index.frames):
            found = _lookup(index.frames[frame or 0], kws)
            if found is not MISSING:
                return _classic(keyword, plain(found))
    else:
        shared = ds.get("SharedFunctionalGroupsSequence")
        if shared:
            found = _find_in_item(shared[0], kws, _MAX_DEPTH)
            if found is not MISSING:
                return _classic(keyword, plain(found))
        per_frame = ds.get("PerFrameFunctionalGroupsSequence")
        if per_frame:
            idx = frame or 0
            if idx < len(per_frame):
                found = _find_in_item(per_frame[idx], kws, _MAX_DEPTH)
                if found is not MISSING:
                    return _classic(keyword, plain(found))
    # present-but-empty top-level element counts as present with empty value
    for kw in kws:
        if kw in ds and ds[kw].VR != "SQ":
            return plain(ds[kw].value)
    return _derived(ds, keyword, frame or 0)


def get_param_values(ds: Dataset, keyword: str) -> list[Any]:
    """Every distinct value of ``keyword`` across frames (one entry for classic objects).

    Per-frame attributes of an Enhanced object (e.g. a multi-echo EffectiveEchoTime)
    can differ between frames; adherence requires all of them to conform.
    """
    first = get_param(ds, keyword)
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if not per_frame or len(per_frame) < 2 or _in_top_or_shared(ds, keyword):
        return [first]
    out: list[Any] = []
    for i in range(len(per_frame)):
        v = get_param(ds, keyword, frame=i)
        if v not in out:
            out.append(v)
    return out


def _in_top_or_shared(ds: Dataset, keyword: str) -> bool:
    kws = _keywords(keyword)
    if any(kw in ds for kw in kws):
        return True
    index = _index(ds)
    if index is not None:
        return index.shared is not None and _lookup(index.shared, kws) is not MISSING
    shared = ds.get("SharedFunctionalGroupsSequence")
    return bool(shared) and _find_in_item(shared[0], kws, _MAX_DEPTH) is not MISSING


def as_list(value: Any) -> list[Any]:
    """A raw value as a list of its values (a single value becomes a one-element list)."""
    if value is MISSING or value is None:
        return []
    if isinstance(value, list):
        return value
    if isinstance(value, str) and "\\" in value:
        return value.split("\\")
    return [value]


def text(value: Any) -> str:
    """A raw value as the text DICOM would show (multi-values joined with a backslash)."""
    if value is MISSING or value is None:
        return ""
    if isinstance(value, list):
        return "\\".join(text(v) for v in value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def device_identity(ds: Dataset) -> dict[str, Any]:
    """The scanner identity an exam reports (Manufacturer etc.), SoftwareVersions as a list."""
    sw = get_param(ds, "SoftwareVersions")
    return {
        "manufacturer": text(get_param(ds, "Manufacturer")),
        "model": text(get_param(ds, "ManufacturerModelName")),
        "serial": text(get_param(ds, "DeviceSerialNumber")),
        "station": text(get_param(ds, "StationName")),
        "institution": text(get_param(ds, "InstitutionName")),
        "software": [str(v).strip() for v in as_list(sw)],
        "modality": text(get_param(ds, "Modality")),
    }


def number_of_frames(ds: Dataset) -> int:
    try:
        return max(1, int(ds.get("NumberOfFrames", 1) or 1))
    except (TypeError, ValueError):
        return 1


def frame_geometry(ds: Dataset) -> list[tuple[Optional[list[float]], Optional[list[float]]]]:
    """(ImagePositionPatient, ImageOrientationPatient) of every frame of an instance."""
    n = number_of_frames(ds)
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    out = []
    for i in range(n):
        pos = get_param(ds, "ImagePositionPatient", frame=i if per_frame else None)
        ori = get_param(ds, "ImageOrientationPatient", frame=i if per_frame else None)
        out.append((
            [float(x) for x in pos] if isinstance(pos, list) and len(pos) == 3 else None,
            [float(x) for x in ori] if isinstance(ori, list) and len(ori) == 6 else None,
        ))
    return out


_READ_WHOLE = 4 << 20   # bytes: files up to this size are read whole and parsed from memory


def read_header_located(path: str | os.PathLike) -> tuple[Dataset, bool, str, int]:
    """Header-only read plus a Pixel Data length check, with one open of the file.

    A truncated file still yields a readable header, so completeness is checked
    from the file itself: pydicom stops right at the (7FE0,0010) element; its
    declared length is compared with the image geometry and with the bytes that
    are really there. Compressed (encapsulated) pixel data is not length-checked.
    Returns (header, complete, detail, the byte where Pixel Data begins).
    """
    with open(path, "rb") as fp:
        size = os.fstat(fp.fileno()).st_size
        # pydicom parses from memory faster than through the file's many small reads (0.1 ms a file); a
        # large file (a multi-frame object) is parsed from the file, its pixels never read
        src = io.BytesIO(fp.read()) if size <= _READ_WHOLE else fp
        ds = frozen(pydicom.dcmread(src, stop_before_pixels=True, force=True))
        start = src.tell()
        head = src.read(12)
    meta = getattr(ds, "file_meta", None)
    if meta is not None and raw_text(meta, 0x00020010) == DEFLATED:
        # the file's bytes after the meta group are deflated: check the inflated Pixel Data element instead
        elem = pydicom.dcmread(path, force=True).get_item(0x7FE00010)
        head, start = (struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, elem.length) if elem is not None else b""), 0
        size = 12 + len(elem.value or b"") if elem is not None else 0
    ok, detail = _pixel_length_ok(ds, head, size - start)
    return ds, ok, detail, start


def read_header_checked(path: str | os.PathLike) -> tuple[Dataset, bool, str]:
    """:func:`read_header_located` without the Pixel Data offset: (header, complete, detail)."""
    return read_header_located(path)[:3]


def pixel_data_complete(path: str | os.PathLike) -> tuple[bool, str]:
    """(complete, detail) for one file; see :func:`read_header_checked`."""
    _, ok, detail = read_header_checked(path)
    return ok, detail


def _pixel_length_ok(ds: Dataset, head: bytes, remaining: int) -> tuple[bool, str]:
    rows, cols = raw_uint(ds, 0x00280010, 0), raw_uint(ds, 0x00280011, 0)
    if not rows or not cols:
        return True, "no image"
    meta = getattr(ds, "file_meta", None)
    ts = raw_text(meta, 0x00020010) if meta is not None else ""
    ts = ts or "1.2.840.10008.1.2.1"
    if ts not in UNCOMPRESSED_SYNTAXES:
        return True, "compressed pixel data not length-checked"
    big = ts == "1.2.840.10008.1.2.2"
    if head[:4] != struct.pack(">HH" if big else "<HH", 0x7FE0, 0x0010):
        return False, "no Pixel Data element"
    if ts != "1.2.840.10008.1.2" and len(head) >= 12:
        length, header = struct.unpack(">I" if big else "<I", head[8:12])[0], 12
    elif len(head) >= 8:
        length, header = struct.unpack("<I", head[4:8])[0], 8
    else:
        return False, "file truncated inside the Pixel Data element header"
    if length == 0xFFFFFFFF:
        return True, "undefined length"
    frames = max(1, raw_uint(ds, 0x00280008, 1))
    expected = (rows * cols * raw_uint(ds, 0x00280002, 1) * raw_uint(ds, 0x00280100, 16) * frames + 7) // 8
    available = remaining - header
    if length < expected:
        return False, f"Pixel Data declares {length} bytes, geometry needs {expected}"
    if available < length:
        return False, f"file truncated: Pixel Data declares {length} bytes, {max(available, 0)} present"
    return True, "ok"


def iter_dicom_files(root: str | os.PathLike) -> Iterator[Path]:
    """Every regular file under ``root`` in a stable order (DICOM files often have no extension)."""
    root = Path(root)
    if root.is_file():
        yield root
        return
    join = os.path.join
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            if name.startswith(".") or name.endswith((".json", ".txt", ".csv")):
                continue
            yield Path(join(dirpath, name))


def exam_instances_dir(exam: str | os.PathLike) -> Path:
    """Where an exam folder keeps its instances: ``deid/`` if present, else ``original/``, else itself."""
    exam = Path(exam)
    for sub in ("deid", "original"):
        if (exam / sub).is_dir():
            return exam / sub
    return exam


def first_present(ds: Dataset, keywords: Iterable[str]) -> Any:
    for kw in keywords:
        v = get_param(ds, kw)
        if v is not MISSING:
            return v
    return MISSING


# --------------------------------------------------------------------------- attribute paths

def private_block(ds: Dataset, group: int, creator: str) -> Optional[int]:
    """The block byte (0x10-0xFF) that ``creator`` reserved in ``group`` of ``ds`` (PS3.5 7.8.1), or None."""
    want = creator.strip()
    for block in range(0x10, 0x100):
        elem = _elem(ds, (group << 16) | block)
        if elem is not None and text(plain(elem.value) if not isinstance(elem.value, bytes)
                                     else elem.value.decode("latin-1")).strip() == want:
            return block
    return None


def _private_value(elem: Any, creator: str) -> Any:
    """A private element's value; undecoded bytes (VR UN, e.g. after a round trip through implicit
    VR) are read with the VR pydicom's private dictionary gives for this creator, else as text."""
    v = elem.value
    if not isinstance(v, bytes):
        return plain(v)
    from pydicom.datadict import private_dictionary_VR
    from pydicom.dataelem import RawDataElement
    from pydicom.values import convert_value
    try:
        vr = private_dictionary_VR(elem.tag, creator)
    except KeyError:
        vr = None
    if vr and vr not in ("UN", "OB", "OW", "SQ"):
        try:
            return plain(convert_value(vr, RawDataElement(elem.tag, vr, len(v), v, 0, False, True)))
        except Exception:  # a vendor's bytes that do not fit the dictionary VR: fall back to text
            pass
    txt = v.decode("latin-1").strip(" \x00")
    parts = txt.split("\\")
    return parts if len(parts) > 1 else txt


def _field_value(elem: Any, field: str) -> Any:
    """A field inside a private element (a Siemens CSA header element, or a key of its ASCCONV text);
    :data:`MISSING` when the bytes are not a CSA header or the field is not there."""
    from ..csa import field_values

    try:
        values = field_values(elem.value, field)
    except ValueError:  # not a CSA header
        return MISSING
    if values is None:
        return MISSING
    return values if len(values) > 1 else values[0]


def _step_elem(item: Dataset, step: Any) -> Any:
    """The element one path step names in ``item`` (None when absent)."""
    if step.tag:
        group, low = int(step.tag[1:5], 16), int(step.tag[-3:-1], 16)
        block = private_block(item, group, step.creator or "")
        tag = (group << 16) | (block << 8) | low if block is not None else None
        return item[tag] if tag is not None and tag in item else None
    try:
        return item[step.keyword] if step.keyword in item else None
    except (KeyError, ValueError):
        return None


def _selected_items(elem: Any, selector: Any) -> list[Dataset]:
    seq = list(elem.value or []) if elem is not None and elem.VR == "SQ" else []
    if isinstance(selector, int):
        return seq[selector:selector + 1]
    return seq


def path_values(ds: Dataset, steps: list, frame: Optional[int] = None) -> tuple[list[Any], str]:
    """The leaf values an attribute path reaches, and how they combine: 'every' (each must hold)
    or 'any' (one must hold; a ``[any]`` selector anywhere on the path).

    The first step is looked up at the top level, else in the Shared Functional Groups item, else
    in the Per-frame Functional Groups item of ``frame`` (default the first): a functional-group
    macro such as ``MRDiffusionSequence`` is written as the first step. An absent leaf in a
    selected item counts as :data:`MISSING`.
    """
    mode = "any" if any(s.item == "any" for s in steps[:-1]) else "every"
    roots: list[Dataset] = [ds]
    if _step_elem(ds, steps[0]) is None:
        shared = ds.get("SharedFunctionalGroupsSequence")
        per_frame = ds.get("PerFrameFunctionalGroupsSequence")
        if shared and _step_elem(shared[0], steps[0]) is not None:
            roots = [shared[0]]
        elif per_frame and (frame or 0) < len(per_frame):
            roots = [per_frame[frame or 0]]
    level = roots
    for st in steps[:-1]:
        level = [it for item in level for it in _selected_items(_step_elem(item, st), st.item)]
    out = []
    last = steps[-1]
    for item in level:
        elem = _step_elem(item, last)
        if elem is None or elem.VR == "SQ":
            out.append(MISSING)
        elif last.tag and last.field:
            out.append(_field_value(elem, last.field))
        elif last.tag:
            out.append(_private_value(elem, last.creator or ""))
        else:
            out.append(plain(elem.value))
    return out, mode


def frame_count(ds: Dataset) -> int:
    """Frames with their own functional-group item (1 for a classic image)."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    return len(per_frame) if per_frame else 1


# Keywords that PS3.3 defines only inside a sequence of a modality's image IODs, with the sequence
# they live in: scanners put them there, so a protocol that names the bare keyword is looked up
# there too (and the checker says so, W408). Generated: scripts/gen_nested_keywords.py.
def nested_home(keyword: str, modality: str) -> Optional[str]:
    from ..nested import NESTED

    return NESTED.get(modality.upper(), {}).get(keyword, (None,))[0]


# --------------------------------------------------------------------------- native pixel data, read directly
# QC needs every instance's pixels. For the common case (uncompressed little-endian, one sample per pixel) the
# Pixel Data element's bytes *are* the array: reading them at their offset after a header-only parse skips
# pydicom's full parse and its pixel pipeline. The result is the array ``ds.pixel_array`` gives (same dtype,
# shape (frames, rows, columns), unused high bits corrected the same way); anything else returns None and the
# caller takes pydicom's path (tests/test_speed.py compares both on the real files).

_LE_SYNTAXES = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1")
_DTYPES = {(8, 0): "<u1", (8, 1): "<i1", (16, 0): "<u2", (16, 1): "<i2", (32, 0): "<u4", (32, 1): "<i4"}


def native_layout(ds: Dataset) -> Optional[tuple]:
    """How the frames of header-only data set ``ds`` lie in its Pixel Data bytes — ``(implicit, dtype, frames,
    rows, columns, bits allocated, bits stored)`` — or None when this is not the simple case."""
    meta = getattr(ds, "file_meta", None)
    ts = raw_text(meta, 0x00020010) if meta is not None else ""
    if ts not in _LE_SYNTAXES or raw_bytes(ds, 0x7FE00008) is not None or raw_bytes(ds, 0x7FE00009) is not None:
        return None
    if raw_uint(ds, 0x00280002, 1) != 1 or has_functional_groups(ds):
        return None
    rows, cols = raw_uint(ds, 0x00280010, 0), raw_uint(ds, 0x00280011, 0)
    bits, stored = raw_uint(ds, 0x00280100, 0), raw_uint(ds, 0x00280101, 0)
    rep = raw_uint(ds, 0x00280103, -1)
    frames = raw_uint(ds, 0x00280008, -1) if _elem(ds, 0x00280008) is not None else 1  # unreadable: pydicom says why
    dtype = _DTYPES.get((bits, rep))
    if dtype is None or not rows or not cols or not 0 < stored <= bits or frames < 1:
        return None
    return ts == "1.2.840.10008.1.2", dtype, frames, rows, cols, bits, stored


def read_native(fp, start: int, layout: tuple) -> Optional["np.ndarray"]:
    """The frames (frames, rows, columns) of a file whose Pixel Data element starts at byte ``start`` and whose
    header gave ``layout`` (:func:`native_layout`), or None when the element is not what the header says."""
    import numpy as np

    implicit, dtype, frames, rows, cols, bits, stored = layout
    fp.seek(start)
    head = fp.read(12)
    if head[:4] != b"\xe0\x7f\x10\x00":
        return None
    if implicit:
        if len(head) < 8:
            return None
        length, skip = struct.unpack_from("<I", head, 4)[0], 8
    else:
        if len(head) < 12 or head[4:6] not in (b"OB", b"OW"):
            return None
        length, skip = struct.unpack_from("<I", head, 8)[0], 12
    count = rows * cols * frames
    need = count * (bits // 8)
    if length == 0xFFFFFFFF or length < need:
        return None
    fp.seek(start + skip)
    buf = fp.read(need)
    if len(buf) < need:
        return None
    arr = np.frombuffer(buf, dtype=dtype, count=count).reshape(frames, rows, cols)
    if stored < bits:  # as pydicom does: shift the unused high bits out and back (sign-extends signed values)
        arr = arr.copy()
        np.left_shift(arr, bits - stored, out=arr)
        np.right_shift(arr, bits - stored, out=arr)
    return arr


def native_pixels(ds: Dataset, fp, start: int) -> Optional["np.ndarray"]:
    """The frames of a header-only data set ``ds`` whose file ``fp`` has Pixel Data at byte ``start``
    (where ``dcmread(..., stop_before_pixels=True)`` stopped), or None when this is not the simple case."""
    layout = native_layout(ds)
    return read_native(fp, start, layout) if layout is not None else None


def read_with_pixels(path: str | os.PathLike) -> tuple[Dataset, "np.ndarray"]:
    """(read-only header, frames as (frames, rows, columns)) of one instance: the Pixel Data bytes read
    directly when :func:`native_pixels` can, else pydicom's full read and ``pixel_array``."""
    with open(path, "rb") as fp:
        ds = frozen(pydicom.dcmread(fp, stop_before_pixels=True, force=True))
        arr = native_pixels(ds, fp, fp.tell())
    if arr is not None:
        return ds, arr
    ds = frozen(pydicom.dcmread(path, force=True))
    arr = ds.pixel_array
    if number_of_frames(ds) == 1:
        arr = arr[None, ...]
    return ds, arr
