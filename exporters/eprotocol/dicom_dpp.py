"""The DICOM CT / XA Defined Procedure Protocol (PS3.3 A.82/A.86) of a target, and its reader.

Constraints become Selector items of the acquisition or reconstruction protocol element (PS3.3
C.34.9); what the standard cannot say (the IR kind, how values were written, tolerances, regexes,
match rules) travels in a private block (group 0071, creator ``IMTRIAL EPROTOCOL 1``) so that
:func:`read` gives back the same IR.
"""
from __future__ import annotations

import json
import math
import re
import uuid
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional

from imtrial_dsl import __version__, ir, source, units
from imtrial_dsl.diagnostics import ImtrialError
from imtrial_dsl.dicom_tables import INTEGER_VRS, NUMERIC_VRS, SINGLE_VALUED_TEXT_VRS

from .targets import FORMAT, Target, protocol_from_header, protocol_header, study_code, variant_header

SCHEMAS = Path(__file__).resolve().parent / "schemas"
DPP_MODALITIES = ("CT", "XA")
LOCAL_SCHEME = "99IMTRIAL"  # local coding scheme designator (PS3.3 8.2: private schemes start with "99")
PRIVATE_GROUP = 0x0071
PRIVATE_CREATOR = "IMTRIAL EPROTOCOL 1"
_UID_NAMESPACE = uuid.UUID("5d0c6a55-1b9e-4f7e-9a43-2f3c1f0e7a01")  # fixed: UIDs must be stable across runs

# IR constraint kind -> DICOM Constraint Type (0082,0032). EQUAL with a tolerance, and MATCHES, are
# special-cased in constraint_type (RANGE_INCL + Recommended Default Value; UNCONSTRAINED + private regex).
_KIND_TO_DICOM = {
    ir.ConstraintKind.EQUAL: "EQUAL",
    ir.ConstraintKind.NOT_EQUAL: "NOT_MEMBER_OF",
    ir.ConstraintKind.RANGE_INCL: "RANGE_INCL",
    ir.ConstraintKind.RANGE_EXCL: "RANGE_EXCL",
    ir.ConstraintKind.GREATER_OR_EQUAL: "GREATER_OR_EQUAL",
    ir.ConstraintKind.LESS_OR_EQUAL: "LESS_OR_EQUAL",
    ir.ConstraintKind.GREATER_THAN: "GREATER_THAN",
    ir.ConstraintKind.LESS_THAN: "LESS_THAN",
    ir.ConstraintKind.SET_OF: "MEMBER_OF",
    ir.ConstraintKind.MATCHES: "UNCONSTRAINED",
}
# What a DICOM Constraint Type means when no imtrial private data says otherwise.
_DICOM_TO_KIND = {
    "EQUAL": ir.ConstraintKind.EQUAL,
    "RANGE_INCL": ir.ConstraintKind.RANGE_INCL,
    "RANGE_EXCL": ir.ConstraintKind.RANGE_EXCL,
    "GREATER_OR_EQUAL": ir.ConstraintKind.GREATER_OR_EQUAL,
    "LESS_OR_EQUAL": ir.ConstraintKind.LESS_OR_EQUAL,
    "GREATER_THAN": ir.ConstraintKind.GREATER_THAN,
    "LESS_THAN": ir.ConstraintKind.LESS_THAN,
    "MEMBER_OF": ir.ConstraintKind.SET_OF,
    "NOT_MEMBER_OF": ir.ConstraintKind.NOT_EQUAL,
}
_SIGNIFICANCE = {ir.Significance.ERROR: "FAILURE", ir.Significance.WARNING: "WARNING", ir.Significance.INFO: "INFORMATIVE"}
_SIGNIFICANCE_BACK = {v: k for k, v in _SIGNIFICANCE.items()}

# Attributes that belong to a reconstruction protocol element rather than the acquisition one.
RECONSTRUCTION_KEYWORDS = frozenset({
    "SliceThickness", "SpacingBetweenSlices", "PixelSpacing", "ReconstructionDiameter", "ReconstructionFieldOfView",
    "ReconstructionPixelSpacing", "ReconstructionAlgorithm", "ReconstructionInterval", "ConvolutionKernel",
    "ConvolutionKernelGroup", "ImageFilter", "Rows", "Columns", "ReconstructionAngle", "ReconstructionTargetCenterPatient",
})

# Selectors address attributes of the *performed* protocol (PS3.3 C.34.9: "only Attributes defined in
# Table C.34.10-1 ... may be specified"), i.e. inside its protocol element sequences; Table C.34.9-2
# shows the addressing: Selector Sequence Pointer (0018,9920) with Items = element number, and KVP one
# level deeper in CT X-Ray Details Sequence (0018,9325) (first beam).
ACQ_ELEMENT_SEQ = 0x00189920     # Acquisition Protocol Element Sequence
RECON_ELEMENT_SEQ = 0x00189934   # Reconstruction Protocol Element Sequence
NESTED_IN_ELEMENT = {"CT": {"KVP": 0x00189325}}  # keyword -> sequence inside the element item


def _uid(*parts: str) -> str:
    """A deterministic UID under the 2.25 (UUID-derived) root, PS3.5 B.2."""
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, '|'.join(parts)).int}"


def sop_instance_uid(trial: ir.Trial, t: Target) -> str:
    """The SOP Instance UID of a target's DPP object (the JSON document names it too)."""
    return _uid(study_code(trial), t.protocol.name, t.label, "sop")


def _round12(v: float) -> float:
    """Undo binary noise from unit conversions (e.g. MHz <-> Hz) without losing written precision."""
    return float(f"{v:.12g}")


@lru_cache(maxsize=1)
def dpp_modules() -> dict:
    """The generated module table of the CT/XA Defined Procedure Protocol IODs (scripts/gen_dpp_modules.py)."""
    return json.loads((SCHEMAS / "dpp_modules.json").read_text(encoding="utf-8"))


def dicom_info(keyword: str) -> tuple[Optional[int], Optional[str], str]:
    """(tag, VR, attribute name) from pydicom's data dictionary; (None, None, keyword) when unknown."""
    from pydicom.datadict import dictionary_description, dictionary_VR, tag_for_keyword

    tag = tag_for_keyword(keyword)
    if tag is None:
        return None, None, keyword
    vr = dictionary_VR(tag).split(" or ")[0]
    return tag, vr, dictionary_description(tag)


def tag_text(tag: Optional[int]) -> Optional[str]:
    return None if tag is None else f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def in_dpp(c: ir.Constraint) -> bool:
    """Can a DICOM Defined Procedure Protocol carry this constraint? Not: paths into sequences or private
    elements, value counts, 'if present', has/!has/has all/has any/present, derived quantities (no
    Attribute Value Constraint type or Selector Attribute says these). The JSON e-protocol carries them."""
    from imtrial_dsl.derived import DERIVED

    return (not c.path and c.measure == "value" and not c.if_present and c.kind in _KIND_TO_DICOM
            and (c.keyword not in DERIVED or dicom_info(c.keyword)[0] is not None))


def constraint_type(c: ir.Constraint) -> str:
    if c.kind == ir.ConstraintKind.EQUAL and c.tolerance is not None:
        return "RANGE_INCL"
    return _KIND_TO_DICOM.get(c.kind, "UNCONSTRAINED")


def dicom_values(c: ir.Constraint) -> tuple[list[Any], Optional[Any]]:
    """(Constraint Value Sequence values, Recommended Default Value) in the attribute's DICOM storage unit."""

    def conv(v: ir.Value) -> Any:
        if isinstance(v, ir.Quantity):
            dim_unit = units.DICOM_UNITS.get(c.keyword)
            if dim_unit and dim_unit[0] == v.dimension:
                return _round12(units.to_dicom(v.value, c.keyword))
            return v.value
        return v

    if c.kind == ir.ConstraintKind.MATCHES or c.kind not in _KIND_TO_DICOM:
        return [], None
    if c.kind == ir.ConstraintKind.EQUAL and c.tolerance is not None:
        tol = source.tolerance_abs(c)
        q = c.values[0]
        lo = q.model_copy(update={"value": q.value - tol})
        hi = q.model_copy(update={"value": q.value + tol})
        return [conv(lo), conv(hi)], conv(q)
    return [conv(v) for v in c.values], None


def dicom_unit(c: ir.Constraint) -> Optional[str]:
    q = next((v for v in c.values if isinstance(v, ir.Quantity)), None)
    if q is None:
        return None
    dim_unit = units.DICOM_UNITS.get(c.keyword)
    if dim_unit and dim_unit[0] == q.dimension:
        return dim_unit[1]
    return q.unit


def _code(value: str, meaning: str, scheme: str = LOCAL_SCHEME):
    from pydicom.dataset import Dataset

    d = Dataset()
    if len(value) <= 16:
        d.CodeValue = value
    else:
        d.LongCodeValue = value
    d.CodingSchemeDesignator = scheme
    d.CodeMeaning = _lo(meaning)
    return d


def protocol_code(p: ir.Protocol):
    """The code that names a study protocol (local scheme 99IMTRIAL): the e-protocol's Potential Scheduled
    Protocol Code and the Modality Worklist's Scheduled Protocol Code, so a scanner can map one to the other."""
    return _code(p.name, p.title or p.name)


def _integer_bounds(k: ir.ConstraintKind, values: list[Any]) -> list[Any]:
    """Integer-VR attributes hold integers: round each bound in the direction that keeps its meaning
    (x >= 7.5 is x >= 8 for integers); EQUAL/SET_OF round to nearest (a fraction can never match)."""
    up = {ir.ConstraintKind.GREATER_OR_EQUAL, ir.ConstraintKind.GREATER_THAN}
    down = {ir.ConstraintKind.LESS_OR_EQUAL, ir.ConstraintKind.LESS_THAN}
    out = []
    for i, v in enumerate(values):
        if not isinstance(v, float) or v.is_integer():
            out.append(v)
        elif k in up or (k == ir.ConstraintKind.RANGE_INCL and i == 0):
            out.append(float(math.ceil(v)))
        elif k in down or (k == ir.ConstraintKind.RANGE_INCL and i == 1):
            out.append(float(math.floor(v)))
        else:
            out.append(float(round(v)))
    return out


_INT_LIMITS = {"US": (0, 2**16 - 1), "SS": (-2**15, 2**15 - 1), "UL": (0, 2**32 - 1), "SL": (-2**31, 2**31 - 1),
               "UV": (0, 2**64 - 1), "SV": (-2**63, 2**63 - 1), "IS": (-2**31, 2**31 - 1)}


def _clamp(vr: str, values: list[Any]) -> list[Any]:
    """Bounds outside what the VR can hold say nothing more than the VR's own limit (Rows >= -1 is Rows >= 0)."""
    lo, hi = _INT_LIMITS[vr]
    return [min(max(v, float(lo)), float(hi)) if isinstance(v, float) else v for v in values]


def held_values(vr: Optional[str], kind: ir.ConstraintKind, exact: list[Any], tolerance: bool = False) -> list[Any]:
    """The constraint's values as an attribute of ``vr`` can hold them (integer VRs: rounded and clamped).

    ``= v ± t`` is written as the range [v-t, v+t], so its bounds round inward as a range's do
    (integers within 0 ± 0.6 are {0}, not -1 .. 1)."""
    if vr not in INTEGER_VRS:
        return exact
    if kind == ir.ConstraintKind.EQUAL and tolerance:
        kind = ir.ConstraintKind.RANGE_INCL
    return _clamp(vr, _integer_bounds(kind, exact))


def _selector_value_item(vr: str, value: Any):
    """One Attribute Value Macro item (PS3.3 Table 10.26-1) holding ``value`` with the attribute's VR."""
    from pydicom.dataset import Dataset
    from pydicom.valuerep import DSfloat

    item = Dataset()
    kw = f"Selector{vr}Value"
    if isinstance(value, bool):
        value = int(value) if vr in NUMERIC_VRS else source.header_text(value)
    if vr == "DS":
        val = DSfloat(float(value), auto_format=True)
    elif vr in INTEGER_VRS:
        val = int(round(float(value)))
    elif vr in NUMERIC_VRS:  # binary floats
        val = float(value)
    else:
        s = str(value)
        val = s.split("\\") if (vr not in SINGLE_VALUED_TEXT_VRS and "\\" in s) else s
    setattr(item, kw, val)
    return item


def _private_json(ds, element: int, payload: dict) -> None:
    block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
    block.add_new(element, "UT", json.dumps(payload, sort_keys=True, separators=(",", ":")))


def _read_private_json(ds, element: int) -> Optional[dict]:
    try:
        block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR)
    except KeyError:
        return None
    if element not in block:
        return None
    value = block[element].value
    if isinstance(value, bytes):
        value = value.decode("utf-8")
    return json.loads(value)


def _constraint_item(c: ir.Constraint, origin: str, pos: int, element_seq: int = ACQ_ELEMENT_SEQ,
                     element_number: int = 1, modality: str = "CT"):
    from pydicom.dataset import Dataset

    tag, vr, name = dicom_info(c.keyword)
    if tag is None:
        raise ImtrialError(c, f"'{c.keyword}' is not a DICOM keyword; it cannot be a Selector Attribute")
    if vr == "SQ":
        raise ImtrialError(c, f"'{c.keyword}' is a sequence; constraints on sequences have no DPP encoding")
    exact, default = dicom_values(c)
    dvals = held_values(vr, c.kind, exact, c.tolerance is not None)
    item = Dataset()
    item.SelectorAttribute = tag
    item.SelectorValueNumber = 0 if c.index is None else c.index + 1
    nested = NESTED_IN_ELEMENT.get(modality, {}).get(c.keyword) if element_seq == ACQ_ELEMENT_SEQ else None
    item.SelectorSequencePointer = [element_seq] + ([nested] if nested else [])
    item.SelectorSequencePointerItems = [element_number] + ([1] if nested else [])
    item.SelectorAttributeVR = vr
    item.SelectorAttributeName = _lo(name)
    item.SelectorAttributeKeyword = _lo(c.keyword)
    item.ConstraintType = constraint_type(c)
    if dvals:
        item.ConstraintValueSequence = [_selector_value_item(vr, v) for v in dvals]
    if default is not None:
        written = _clamp(vr, [float(round(default))])[0] if vr in INTEGER_VRS else default
        item.RecommendedDefaultValueSequence = [_selector_value_item(vr, written)]
    item.ConstraintViolationSignificance = _SIGNIFICANCE[c.significance]
    item.ModifiableConstraintFlag = "YES" if c.modifiable else "NO"
    # What the standard cannot say: the IR kind, how values were written, the tolerance, a regex.
    extras = {
        "pos": pos, "origin": origin, "kind": c.kind.value, "note": c.note,
        "values": [
            {"t": "q", "unit": v.unit, "dimension": v.dimension, "source_value": v.source_value, "source_unit": v.source_unit}
            if isinstance(v, ir.Quantity) else {"t": "b", "v": v} if isinstance(v, bool) else {"t": "s"}
            for v in c.values
        ],
        "tolerance": None if c.tolerance is None else c.tolerance.model_dump(exclude={"span"}),
    }
    if dvals != exact:  # the integer VR could not hold the bound as written
        extras["exact"] = exact
    if default is not None and vr in INTEGER_VRS and isinstance(default, float) and _clamp(vr, [float(round(default))]) != [default]:
        extras["exact_default"] = default
    if c.kind == ir.ConstraintKind.MATCHES:
        extras["regex"] = str(c.values[0])
    _private_json(item, 0x01, extras)
    return item


def to_dicom(trial: ir.Trial, t: Target):
    """The Defined Procedure Protocol data set of one protocol x variant (CT or XA)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    p = t.protocol
    iod = dpp_modules()["iods"].get(p.modality)
    if iod is None:
        raise ImtrialError(p, f"DICOM defines no Defined Procedure Protocol for modality {p.modality}; use the JSON export")
    study = trial.study
    code = study_code(trial)

    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    # SOP Common
    ds.SOPClassUID = iod["sop_class_uid"]
    ds.SOPInstanceUID = sop_instance_uid(trial, t)
    ds.InstanceNumber = 1 if t.index is None else t.index + 2
    # General / Enhanced General Equipment: the equipment that made this object
    ds.Manufacturer = "imtrial"
    ds.ManufacturerModelName = "imtrial e-protocol exporter"
    ds.DeviceSerialNumber = "imtrial"
    ds.SoftwareVersions = __version__
    # Protocol Context
    ds.ProtocolName = _lo(p.name)
    ds.PotentialScheduledProtocolCodeSequence = [protocol_code(p)]
    ds.PotentialRequestedProcedureCodeSequence = []
    ds.ResponsibleGroupCodeSequence = [_code(f"{code}_IMG"[:16], f"{code} imaging core")]
    custodian = Dataset()
    custodian.InstitutionName = _lo((study.sponsor if study and study.sponsor else code))
    ds.CustodialOrganizationSequence = [custodian]
    if study and study.title:
        ds.ProtocolDesignRationale = f"{code}: {study.title}"
    if p.notes:
        ds.ProtocolPlanningInformation = "\n".join(p.notes)
    # Clinical Trial Context
    if study:
        ds.ClinicalTrialSponsorName = _lo(study.sponsor or code)
        ds.ClinicalTrialProtocolID = _lo(code)
        ds.ClinicalTrialProtocolName = _lo(study.title)
        if study.registry:
            other = Dataset()
            other.ClinicalTrialProtocolID = _lo(study.registry)
            other.IssuerOfClinicalTrialProtocolID = _registry_issuer(study.registry)
            ds.OtherClinicalTrialProtocolIDsSequence = [other]
    # Equipment Specification
    ds.EquipmentModality = p.modality
    ds.ModelSpecificationSequence = _model_specs(t)
    # Instructions: subject preparation
    if p.preparation:
        items = []
        for i, text in enumerate(p.preparation):
            it = Dataset()
            it.InstructionIndex = i + 1
            it.InstructionText = _short(text, 64)
            it.InstructionDescription = text
            it.InstructionPerformedFlag = "N"
            items.append(it)
        ds.InstructionSequence = items
    # General Defined Acquisition / Reconstruction. PS3.3 C.34.9: one item per attribute and addressing
    # (read here per value index, so PixelSpacing[0] and PixelSpacing[1] may both be constrained).
    seen: dict[tuple[str, Optional[int]], ir.Constraint] = {}
    carried = [(c, origin) for c, origin in t.constraints if in_dpp(c)]
    for c, _ in carried:
        key = (c.keyword, c.index)
        if key in seen:
            first = seen[key]
            raise ImtrialError(c, f"{c.keyword} is constrained twice in protocol {p.name}; a DICOM Defined Procedure "
                                  f"Protocol allows one constraint per attribute",
                               f"combine them into one constraint (e.g. a range 'in low .. high'); first one at {first.span}")
        seen[key] = c
    acq, rec = [], []
    for pos, (c, origin) in enumerate(t.constraints):
        if not in_dpp(c):
            continue
        if c.keyword in RECONSTRUCTION_KEYWORDS:
            rec.append(_constraint_item(c, origin, pos, RECON_ELEMENT_SEQ, 1, p.modality))
        else:
            acq.append(_constraint_item(c, origin, pos, ACQ_ELEMENT_SEQ, 1, p.modality))
    a = Dataset()
    a.ProtocolElementNumber = 1
    if acq:
        a.ParametersSpecificationSequence = acq
    ds.AcquisitionProtocolElementSpecificationSequence = [a]
    if rec:
        r = Dataset()
        r.ProtocolElementNumber = 1
        r.ParametersSpecificationSequence = rec
        ds.ReconstructionProtocolElementSpecificationSequence = [r]
    # Everything else the IR knows that DICOM has no attribute for (match rules, variant identity, ...)
    header = {"format": FORMAT, "protocol": protocol_header(p), "variant": variant_header(t), "label": t.label}
    if t.variant is not None:  # what the variant replaces, so that this file alone gives a protocol that compiles
        header["base_overridden"] = [{"position": i, "constraint": _ir_json(c)} for i, c in t.overridden_base]
    # What no Selector can say (paths, has/count/present, 'if present', derived quantities, 'when' blocks) and
    # the devices: kept here so that the import gives the whole protocol back (only when there is any, so that
    # objects of protocols without them stay as they were).
    beyond = [{"position": pos, "origin": origin, "constraint": _ir_json(c)}
              for pos, (c, origin) in enumerate(t.constraints) if not in_dpp(c)]
    if beyond:
        header["beyond_dicom"] = beyond
    whens = [{"block": k, "origin": origin, "condition": _ir_json(w.condition), "constraints": [_ir_json(c) for c in w.constraints]}
             for k, (w, origin) in enumerate(t.conditionals)]
    if whens:
        header["when"] = whens
    if t.devices:
        header["equipment"] = [{"site": site.code, "site_name": site.name, "device": d.model_dump(mode="json", exclude={"span"})}
                               for site, d in t.devices]
    _private_json(ds, 0x10, header)

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    missing = missing_modules(ds, p.modality)
    if missing:  # a writer bug, not a user error
        raise AssertionError(f"DPP for {p.name}/{t.label} lacks mandatory modules: {missing}")
    return ds


def _ir_json(c: ir.Constraint) -> dict:
    return c.model_dump(mode="json", exclude={"span"})


def _lo(text: str, n: int = 64) -> str:
    """Fit ``text`` into a VR limited to ``n`` bytes (UTF-8, ISO_IR 192), never splitting a character."""
    raw = text.encode("utf-8")
    if len(raw) <= n:
        return text
    return raw[:n].decode("utf-8", errors="ignore")


def _short(text: str, n: int) -> str:
    text = " ".join(text.split())
    if len(text.encode("utf-8")) <= n:
        return text
    return _lo(text, n - 3).rstrip() + "..."


def _registry_issuer(registry: str) -> str:
    if registry.upper().startswith("NCT"):
        return "ClinicalTrials.gov"
    if re.match(r"^\d{4}-\d{6}-\d{2}", registry):
        return "EudraCT"
    if registry.upper().startswith("ISRCTN"):
        return "ISRCTN"
    return "registry"


def _model_specs(t: Target):
    """One item per device and per Manufacturer spelling its vendor's scanners write (vendors.scanner_manufacturers):
    any item matching makes the protocol applicable (C.34.6.1), so a scanner matching on Manufacturer finds itself."""
    from pydicom.dataset import Dataset

    from imtrial_dsl.vendors import scanner_manufacturers

    def items_for(vendor: str, written: str, model, software, serial=None) -> list:
        out = []
        for name in scanner_manufacturers(vendor, written):
            it = Dataset()
            it.Manufacturer = _lo(name)
            if model:
                it.ManufacturerModelName = _lo(model)
            if software:
                it.SoftwareVersions = _lo(software)
            if serial:
                it.DeviceSerialNumber = _lo(serial)
            out.append(it)
        return out

    items = []
    for _, d in t.devices:
        items += items_for(d.vendor, d.vendor_text, d.model, d.software, d.serial)
    if not items and t.variant is not None:
        v = t.variant
        items += items_for(v.vendor, v.vendor_text, v.model, v.software)
    return items


# Attributes whose presence shows that a module was written (one or more per module id).
MODULE_EVIDENCE = {
    "general-equipment": ("Manufacturer",),
    "enhanced-general-equipment": ("Manufacturer", "ManufacturerModelName", "DeviceSerialNumber", "SoftwareVersions"),
    "protocol-context": ("ProtocolName", "PotentialScheduledProtocolCodeSequence", "ResponsibleGroupCodeSequence",
                         "CustodialOrganizationSequence"),
    "clinical-trial-context": ("ClinicalTrialSponsorName", "ClinicalTrialProtocolID"),
    "patient-specification": ("PatientSpecificationSequence",),
    "equipment-specification": ("EquipmentModality", "ModelSpecificationSequence"),
    "instructions": ("InstructionSequence",),
    "patient-positioning": ("PatientPositioningInstructionSequence",),
    "general-defined-acquisition": ("AcquisitionProtocolElementSpecificationSequence",),
    "general-defined-reconstruction": ("ReconstructionProtocolElementSpecificationSequence",),
    "defined-storage": ("StorageProtocolElementSpecificationSequence",),
    "sop-common": ("SOPClassUID", "SOPInstanceUID"),
}


def present_modules(ds) -> list[str]:
    return [m for m, kws in MODULE_EVIDENCE.items() if all(k in ds for k in kws)]


def missing_modules(ds, modality: str) -> list[str]:
    """Mandatory modules of the IOD (generated table) that ``ds`` does not carry."""
    have = set(present_modules(ds))
    return [m["id"] for m in dpp_modules()["iods"][modality]["modules"] if m["usage"] == "M" and m["id"] not in have]


def _selector_values(item, vr: str) -> list[Any]:
    kw = f"Selector{vr}Value"
    if kw not in item:
        return []
    v = item[kw].value
    if vr in NUMERIC_VRS:
        vals = list(v) if isinstance(v, (list, tuple)) or type(v).__name__ == "MultiValue" else [v]
        return [float(x) for x in vals]
    if isinstance(v, (list, tuple)) or type(v).__name__ == "MultiValue":
        return ["\\".join(str(x) for x in v)]
    return [str(v)]


def _constraint_from_item(item, notes: list, where: str) -> tuple[Optional[ir.Constraint], str, int]:
    """One Attribute Value Constraint item as an IR constraint. The standard attributes are the truth: where
    imtrial's private copy disagrees with them (a vendor tool edited the object), the standard wins and
    ``notes`` gets a W612 saying what was taken from where."""
    from pydicom.datadict import keyword_for_tag

    extras = _read_private_json(item, 0x01) or {}
    tag = int(item.SelectorAttribute)
    keyword = keyword_for_tag(tag) or str(item.get("SelectorAttributeKeyword", "")) or f"{tag:08X}"
    vr = str(item.get("SelectorAttributeVR", "")) or "UN"
    ctype = str(item.ConstraintType)
    raw = [x for it in item.get("ConstraintValueSequence", []) for x in _selector_values(it, vr)]
    default = [x for it in item.get("RecommendedDefaultValueSequence", []) for x in _selector_values(it, vr)]
    index = int(item.get("SelectorValueNumber", 0) or 0)
    sig = _SIGNIFICANCE_BACK.get(str(item.get("ConstraintViolationSignificance", "FAILURE")), ir.Significance.ERROR)
    modifiable = str(item.get("ModifiableConstraintFlag", "NO")) == "YES"
    pos, origin = extras.get("pos", 0), extras.get("origin", "base")

    def note(text: str) -> None:
        notes.append(_note(f"{where}: {keyword}: {text}"))

    kind_name = extras.get("kind")
    tol = extras.get("tolerance")
    kind: Optional[ir.ConstraintKind] = ir.ConstraintKind(kind_name) if kind_name else None
    if kind is not None:
        expected = "RANGE_INCL" if (kind == ir.ConstraintKind.EQUAL and tol) else _KIND_TO_DICOM[kind]
        if expected != ctype:
            if ctype not in _DICOM_TO_KIND:
                return None, origin, pos   # e.g. edited to UNCONSTRAINED: nothing left to check
            note(f"Constraint Type is {ctype} but imtrial's private copy says {kind_name}; the Constraint Type is used")
            kind, tol, extras = _DICOM_TO_KIND[ctype], None, {k: v for k, v in extras.items() if k not in ("exact", "values")}
    elif ctype in _DICOM_TO_KIND:
        kind = _DICOM_TO_KIND[ctype]
    else:
        return None, origin, pos  # UNCONSTRAINED / MEMBER_OF_CID from other writers
    if kind == ir.ConstraintKind.NOT_EQUAL and len(raw) > 1:
        raise ValueError(f"{keyword}: NOT_MEMBER_OF with several values has no imtrial equivalent")

    metas = list(extras.get("values") or [])
    tolerance = ir.Tolerance(**tol) if tol else None
    if kind == ir.ConstraintKind.MATCHES:
        values: list[Any] = [extras["regex"]]
    elif kind == ir.ConstraintKind.EQUAL and tol:
        values, tolerance, kind = _tolerance_from_range(keyword, vr, raw, default, tol, metas, extras, note)
    else:
        values = raw
        if "exact" in extras and len(extras["exact"]) == len(values) and vr in INTEGER_VRS:
            expected = _clamp(vr, _integer_bounds(kind, [float(x) for x in extras["exact"]]))
            if expected == [float(x) for x in values]:
                values = extras["exact"]
            else:
                note(f"values {values} disagree with imtrial's exact bounds {extras['exact']}; the standard values are used")
    if len(metas) != len(values):
        metas = [metas[0] if metas else {}] * len(values) if kind not in (ir.ConstraintKind.SET_OF,) else [{}] * len(values)
    out_vals: list[ir.Value] = []
    for v, meta in zip(values, metas):
        t = meta.get("t")
        if t == "b":
            out_vals.append(bool(meta["v"]))
        elif kind == ir.ConstraintKind.MATCHES or t == "s" or (t is None and isinstance(v, str)):
            out_vals.append(str(v))
        else:
            out_vals.append(_quantity_from_dicom(keyword, float(v), meta, note))
    c = ir.Constraint(keyword=keyword, kind=kind, values=out_vals, tolerance=tolerance,
                      significance=sig, modifiable=modifiable, index=None if index == 0 else index - 1,
                      note=extras.get("note"))
    return c, origin, pos


def _note(message: str):
    from imtrial_dsl.diagnostics import Diagnostic, Severity

    return Diagnostic(severity=Severity.WARNING, code="W612", message=message,
                      hint="the standard DICOM attributes are the truth; the printed protocol shows what the scanner enforces")


def _tolerance_from_range(keyword, vr, raw, default, tol, metas, extras, note):
    """``= v ± t`` was written as RANGE_INCL [v-t, v+t] + Recommended Default v. Read the range as the truth:
    a symmetric range around the default is ``= v ± (hi-lo)/2``; otherwise the range itself."""
    if len(raw) != 2:
        raise ValueError(f"{keyword}: RANGE_INCL needs two values, found {len(raw)}")
    if "exact" in extras and vr in INTEGER_VRS and len(extras["exact"]) == 2 and \
            _clamp(vr, _integer_bounds(ir.ConstraintKind.RANGE_INCL, [float(x) for x in extras["exact"]])) == [float(x) for x in raw]:
        raw = list(extras["exact"])   # the documented integer rounding, not an edit
    lo, hi = (units.from_dicom(float(x), keyword) for x in raw)
    nominal_raw = default[0] if default else None
    if "exact_default" in extras and nominal_raw is not None and vr in INTEGER_VRS \
            and _clamp(vr, [float(round(extras["exact_default"]))])[0] == float(nominal_raw):
        nominal_raw = extras["exact_default"]
    meta = metas[0] if metas else {}
    if nominal_raw is None:
        note("RANGE_INCL without a Recommended Default Value; read as the range")
        return list(raw), None, ir.ConstraintKind.RANGE_INCL
    nominal = units.from_dicom(float(nominal_raw), keyword)
    half = (hi - lo) / 2
    if not math.isclose(nominal - lo, hi - nominal, rel_tol=1e-9, abs_tol=1e-9):
        note(f"range {_round12(lo):g} .. {_round12(hi):g} is not centred on the recommended default {_round12(nominal):g}; "
             f"read as the range")
        return list(raw), None, ir.ConstraintKind.RANGE_INCL
    q = _quantity_from_dicom(keyword, float(nominal_raw), meta)
    old = ir.Tolerance(**tol)
    old_abs = abs(q.value) * old.value / 100.0 if old.relative else old.value
    if math.isclose(old_abs, half, rel_tol=1e-9, abs_tol=1e-9):
        return [nominal_raw], old, ir.ConstraintKind.EQUAL
    note(f"range {_round12(lo):g} .. {_round12(hi):g} gives a tolerance of ± {_round12(half):g}, not imtrial's "
         f"± {_round12(old_abs):g}; the range is used")
    if old.relative and q.value:
        new = ir.Tolerance(value=_round12(half / abs(q.value) * 100.0), relative=True, source_unit="%")
        new.source_value = new.value
    else:
        sv = _in_unit(half, old.source_unit) if old.source_unit else None
        new = ir.Tolerance(value=_round12(half), relative=False, source_value=sv, source_unit=old.source_unit if sv is not None else None)
    return [nominal_raw], new, ir.ConstraintKind.EQUAL


def _in_unit(canonical: float, unit: Optional[str]) -> Optional[float]:
    """A canonical value expressed in ``unit`` (None for an unknown unit)."""
    if unit is None or (unit != "" and unit not in units.UNITS):
        return None
    factor = units.to_canonical(1.0, unit)[0] if unit else 1.0
    return _round12(canonical / factor)


def _quantity_from_dicom(keyword: str, v: float, meta: dict, note=None) -> ir.Quantity:
    dim_unit = units.DICOM_UNITS.get(keyword)
    dimension = meta.get("dimension") or (dim_unit[0] if dim_unit else "none")
    unit = meta.get("unit")
    if unit is None:
        unit = units.CANONICAL.get(dimension, "")
    value = _round12(units.from_dicom(v, keyword)) if dim_unit and dim_unit[0] == dimension else v
    sv, su = meta.get("source_value"), meta.get("source_unit")
    if sv is not None and su is not None and (su == "" or su in units.UNITS):
        # the canonical value is derived from what the author wrote (as lowering does), bit for bit
        derived = units.to_canonical(float(sv), su)[0]
        if math.isclose(derived, value, rel_tol=1e-9, abs_tol=1e-12):
            value = derived
        else:  # edited on the standard side: the written form follows the standard value
            new_sv = _in_unit(value, su)
            if note is not None:
                note(f"value {value:g} {unit} disagrees with imtrial's written value {float(sv):g} {su}; "
                     f"{new_sv:g} {su} is used")
            sv = new_sv
    return ir.Quantity(value=value, unit=unit, dimension=dimension, source_value=sv, source_unit=su)


def read(path: Path, notes: Optional[list] = None) -> tuple[ir.Protocol, list[tuple[ir.Constraint, str]], Optional[dict], list, dict]:
    """(protocol header, origin-tagged constraints, variant or None, 'when' block constraints, the study and
    equipment) of one DPP file, ours or another writer's (see :func:`json_io.read`).

    Disagreements between the standard attributes and imtrial's private copy go to ``notes`` (W612)."""
    notes = [] if notes is None else notes
    import pydicom

    ds = pydicom.dcmread(path)
    modality = next((m for m, iod in dpp_modules()["iods"].items() if iod["sop_class_uid"] == ds.SOPClassUID), None)
    if modality is None:
        raise ValueError(f"{path}: SOP Class {ds.SOPClassUID} is not a CT/XA Defined Procedure Protocol")
    extras = _read_private_json(ds, 0x10)
    if extras:
        protocol = protocol_from_header(extras["protocol"])
        variant = extras.get("variant")
        if variant is not None:
            variant = dict(variant, base_overridden=[(o["position"], ir.Constraint.model_validate(o["constraint"]))
                                                     for o in extras.get("base_overridden", [])])
    else:  # a DPP from another writer: what the standard attributes carry
        codes = ds.get("PotentialScheduledProtocolCodeSequence", [])
        title = str(codes[0].CodeMeaning) if codes else ""
        prep = [str(i.get("InstructionDescription") or i.get("InstructionText", "")) for i in ds.get("InstructionSequence", [])]
        planning = str(ds.get("ProtocolPlanningInformation", "")).split("\n") if "ProtocolPlanningInformation" in ds else []
        protocol = ir.Protocol(name=str(ds.ProtocolName), modality=modality,
                               title="" if title == str(ds.ProtocolName) else title, preparation=prep, notes=planning)
        variant = None
    found = []
    for seq_kw in ("AcquisitionProtocolElementSpecificationSequence", "ReconstructionProtocolElementSpecificationSequence"):
        for element in ds.get(seq_kw, []):
            for item in element.get("ParametersSpecificationSequence", []):
                c, origin, pos = _constraint_from_item(item, notes, Path(path).name)
                if c is not None:
                    found.append((pos, len(found), c, origin))
    whens: list = []
    if extras:
        found += [(b["position"], len(found) + i, ir.Constraint.model_validate(b["constraint"]), b["origin"])
                  for i, b in enumerate(extras.get("beyond_dicom", []))]
        for w in extras.get("when", []):
            cond = ir.Constraint.model_validate(w["condition"])
            whens += [(w["block"], w["origin"], cond, ir.Constraint.model_validate(c)) for c in w["constraints"]] \
                or [(w["block"], w["origin"], cond, None)]
        carried = len(extras.get("beyond_dicom", [])) + sum(len(w["constraints"]) for w in extras.get("when", []))
        if carried:
            notes.append(_beyond_note(Path(path).name, protocol.name, extras))
    found.sort(key=lambda x: (x[0], x[1]))
    context = {"study": _study_of(ds), "equipment": _equipment_of(extras or {})}
    return protocol, [(c, o) for _, _, c, o in found], variant, whens, context


def _beyond_note(where: str, name: str, extras: dict):
    """W620: constraints that no Selector of a Defined Procedure Protocol can carry came from imtrial's private block."""
    from imtrial_dsl.diagnostics import Diagnostic, Severity

    what = [source.text(ir.Constraint.model_validate(b["constraint"]), source.MESSAGE) for b in extras.get("beyond_dicom", [])]
    what += [f"{len(w['constraints'])} in 'when {source.text(ir.Constraint.model_validate(w['condition']), source.MESSAGE)}'"
             for w in extras.get("when", []) if w["constraints"]]
    return Diagnostic(severity=Severity.WARNING, code="W620",
                      message=f"{where}: protocol {name}: {len(what)} constraint{'s' if len(what) > 1 else ''} DICOM's Defined "
                              f"Procedure Protocol cannot carry came from imtrial's private block (0071,xx10): " + "; ".join(what),
                      hint="a scanner reading the standard attributes does not see them; the JSON e-protocol carries them "
                           "in the open, and imtrial's adherence checks them on the images")


def _study_of(ds) -> Optional[dict]:
    """The study a DPP object names (Clinical Trial Context), as the JSON's 'study'."""
    if "ClinicalTrialProtocolID" not in ds:
        return None
    return {"code": str(ds.ClinicalTrialProtocolID), "title": str(ds.get("ClinicalTrialProtocolName", "") or "")}


def _equipment_of(extras: dict) -> list[dict]:
    """The devices imtrial's private block lists, as the JSON's 'equipment' items."""
    out = []
    for e in extras.get("equipment", []):
        d = e["device"]
        out.append({"site": e["site"], "site_name": e.get("site_name", ""), "device": d["id"], "modality": d["modality"],
                    "vendor": d["vendor"], "manufacturer": d.get("vendor_text") or d["vendor"], "model": d.get("model"),
                    "software": d.get("software"), "field_strength": None, "serial": d.get("serial"),
                    "station": d.get("station"), **({"modalities": d["modalities"]} if len(d.get("modalities") or []) > 1 else {})})
    return out
