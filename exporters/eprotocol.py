"""Electronic protocols: DICOM Defined Procedure Protocol objects, vendor-neutral JSON, scanner cards.

One output per protocol x device variant. The base protocol is always exported (it is what
the study's devices not covered by a variant run); each ``variant`` gets its own output with
the *effective* constraints for its devices (base overridden by the variant).

* ``.dcm``  — CT / XA Defined Procedure Protocol Storage (PS3.3 A.82/A.86), CT and XA only.
* ``.json`` — ``imtrial-eprotocol/1`` (schema: ``schemas/imtrial-eprotocol-1.schema.json``), every modality.
* ``.html`` — a one-page printable scanner card for the technologist.

``import_file`` / ``import_files`` read either format back into ``ir.Protocol`` values; the
mapping is documented in ``docs/eprotocol.md``. Pure functions of the IR: nothing here reads
the syntax tree, the clock or the environment.
"""
from __future__ import annotations

import json
import math
import re
import uuid
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from imtrial_dsl import __version__, ir, source, units
from imtrial_dsl.diagnostics import CompileErrors, ImtrialError

FORMAT = "imtrial-eprotocol/1"
SCHEMA_FILE = "imtrial-eprotocol-1.schema.json"
DPP_MODALITIES = ("CT", "XA")
LOCAL_SCHEME = "99IMTRIAL"  # local coding scheme designator (PS3.3 8.2: private schemes start with "99")
PRIVATE_GROUP = 0x0071
PRIVATE_CREATOR = "IMTRIAL EPROTOCOL 1"
_UID_NAMESPACE = uuid.UUID("5d0c6a55-1b9e-4f7e-9a43-2f3c1f0e7a01")  # fixed: UIDs must be stable across runs

# IR constraint kind -> DICOM Constraint Type (0082,0032). EQUAL with a tolerance, and MATCHES, are
# special-cased in _dicom_type (RANGE_INCL + Recommended Default Value; UNCONSTRAINED + private regex).
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

_NUMERIC_VRS = {"DS", "IS", "FD", "FL", "US", "UL", "SS", "SL", "UV", "SV"}
_SINGLE_VALUED_VRS = {"ST", "LT", "UT", "UR"}


# --------------------------------------------------------------------------- small helpers

def _uid(*parts: str) -> str:
    """A deterministic UID under the 2.25 (UUID-derived) root, PS3.5 B.2."""
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, '|'.join(parts)).int}"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.]+", "", text.replace("*", "x").replace("?", "x")) or "x"


def _num(v: float) -> Any:
    """JSON-friendly number: ints stay ints so goldens read naturally."""
    return int(v) if float(v).is_integer() and abs(v) < 1e15 else float(v)


def _round12(v: float) -> float:
    """Undo binary noise from unit conversions (e.g. MHz <-> Hz) without losing written precision."""
    return float(f"{v:.12g}")


def _study_code(trial: ir.Trial) -> str:
    return trial.study.code if trial.study else "STUDY"


def _schema_text() -> str:
    return _data_file(SCHEMA_FILE)


def _data_file(name: str) -> str:
    here = Path(__file__).resolve().parent / "schemas" / name
    if here.exists():
        return here.read_text(encoding="utf-8")
    return resources.files("imtrial_dsl.exporters").joinpath("schemas", name).read_text(encoding="utf-8")


@lru_cache(maxsize=1)
def dpp_modules() -> dict:
    """The generated module table of the CT/XA Defined Procedure Protocol IODs (scripts/gen_dpp_modules.py)."""
    return json.loads(_data_file("dpp_modules.json"))


def schema() -> dict:
    """The published JSON Schema of the vendor-neutral format."""
    return json.loads(_schema_text())


# --------------------------------------------------------------------------- variants and devices

class Target:
    """One export unit: a protocol, one of its variants (None = base), the devices it serves."""

    def __init__(self, protocol: ir.Protocol, variant: Optional[ir.Variant], index: Optional[int],
                 devices: list[tuple[ir.Site, ir.Device]], label: str):
        self.protocol, self.variant, self.index, self.devices, self.label = protocol, variant, index, devices, label

    @property
    def constraints(self) -> list[tuple[ir.Constraint, str]]:
        """Effective constraints with their origin ('base' or 'variant'), in effective_constraints order."""
        if self.variant is None:
            return [(c, "base") for c in self.protocol.constraints]
        v = self.variant
        overridden = {c.keyword for c in v.constraints} | set(v.remove)
        return [(c, "base") for c in self.protocol.constraints if c.keyword not in overridden] + [(c, "variant") for c in v.constraints]


def _variant_label(v: ir.Variant) -> str:
    parts = [v.vendor] + ([v.model] if v.model else []) + ([v.software] if v.software else [])
    return "-".join(_slug(p) for p in parts)


def targets(trial: ir.Trial, protocol: ir.Protocol) -> list[Target]:
    """The base protocol plus one target per variant, each with the inventory devices it applies to."""
    base_devices, covered = trial.variant_devices(protocol)
    out = [Target(protocol, None, None, base_devices, "base")]
    seen = {"base"}
    for i, v in enumerate(protocol.variants):
        label = _variant_label(v)
        if label in seen:
            label = f"{label}-{i + 1}"
        seen.add(label)
        out.append(Target(protocol, v, i, covered[i], label))
    return out


# --------------------------------------------------------------------------- IR <-> plain values

def _value_to_json(v: ir.Value) -> Any:
    if isinstance(v, ir.Quantity):
        d = {"value": _num(v.value), "unit": v.unit, "dimension": v.dimension}
        if v.source_value is not None:
            d["source_value"] = _num(v.source_value)
        if v.source_unit is not None:
            d["source_unit"] = v.source_unit
        return d
    return v


def _value_from_json(v: Any) -> ir.Value:
    if isinstance(v, dict):
        return ir.Quantity(**v)
    return v


def _tolerance_abs(c: ir.Constraint) -> Optional[float]:
    if c.tolerance is None or not c.values or not isinstance(c.values[0], ir.Quantity):
        return None
    nominal = c.values[0].value
    return abs(nominal) * c.tolerance.value / 100.0 if c.tolerance.relative else c.tolerance.value


def _fmt(v: ir.Value) -> str:
    if isinstance(v, ir.Quantity):
        return v.text()
    if isinstance(v, bool):
        return "yes" if v else "no"
    return f'"{v}"'


def _fmt_canonical(x: float, unit: str) -> str:
    return f"{x:g} {unit}".strip() if unit != "%" else f"{x:g}%"


def constraint_text(c: ir.Constraint) -> str:
    """Plain-language requirement, e.g. '2300 ms ± 1% (2277 – 2323 ms)'."""
    vals = c.values
    k = c.kind
    if k == ir.ConstraintKind.EQUAL:
        s = _fmt(vals[0])
        tol = _tolerance_abs(c)
        if tol is not None:
            t = c.tolerance
            ttext = (f"{t.source_value:g} {t.source_unit}".strip() if t.source_value is not None and t.source_unit
                     else (f"{t.value:g}%" if t.relative else _fmt_canonical(t.value, vals[0].unit)))
            if t.relative and not (t.source_unit and t.source_unit != "%"):
                ttext = f"{t.value:g}%"
            q = vals[0]
            s += f" ± {ttext} ({_fmt_canonical(q.value - tol, q.unit)} – {_fmt_canonical(q.value + tol, q.unit)})"
        return s
    if k == ir.ConstraintKind.NOT_EQUAL:
        return "not " + _fmt(vals[0])
    if k == ir.ConstraintKind.RANGE_INCL:
        return f"between {_fmt(vals[0])} and {_fmt(vals[1])} (inclusive)"
    if k == ir.ConstraintKind.RANGE_EXCL:
        return f"strictly between {_fmt(vals[0])} and {_fmt(vals[1])}"
    if k == ir.ConstraintKind.SET_OF:
        return "one of " + ", ".join(_fmt(v) for v in vals)
    if k == ir.ConstraintKind.MATCHES:
        return f"matches the pattern /{vals[0]}/"
    op = {ir.ConstraintKind.GREATER_OR_EQUAL: "at least", ir.ConstraintKind.LESS_OR_EQUAL: "at most",
          ir.ConstraintKind.GREATER_THAN: "more than", ir.ConstraintKind.LESS_THAN: "less than"}[k]
    return f"{op} {_fmt(vals[0])}"


def _dicom_info(keyword: str) -> tuple[Optional[int], Optional[str], str]:
    from pydicom.datadict import dictionary_description, dictionary_VR, tag_for_keyword

    tag = tag_for_keyword(keyword)
    if tag is None:
        return None, None, keyword
    vr = dictionary_VR(tag).split(" or ")[0]
    return tag, vr, dictionary_description(tag)


def _tag_text(tag: Optional[int]) -> Optional[str]:
    return None if tag is None else f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def _dicom_type(c: ir.Constraint) -> str:
    if c.kind == ir.ConstraintKind.EQUAL and c.tolerance is not None:
        return "RANGE_INCL"
    return _KIND_TO_DICOM[c.kind]


def _dicom_values(c: ir.Constraint) -> tuple[list[Any], Optional[Any]]:
    """(Constraint Value Sequence values, Recommended Default Value) in the attribute's DICOM storage unit."""

    def conv(v: ir.Value) -> Any:
        if isinstance(v, ir.Quantity):
            dim_unit = units.DICOM_UNITS.get(c.keyword)
            if dim_unit and dim_unit[0] == v.dimension:
                return _round12(units.to_dicom(v.value, c.keyword))
            return v.value
        return v

    if c.kind == ir.ConstraintKind.MATCHES:
        return [], None
    if c.kind == ir.ConstraintKind.EQUAL and c.tolerance is not None:
        tol = _tolerance_abs(c)
        q = c.values[0]
        lo = q.model_copy(update={"value": q.value - tol})
        hi = q.model_copy(update={"value": q.value + tol})
        return [conv(lo), conv(hi)], conv(q)
    return [conv(v) for v in c.values], None


def _dicom_unit(c: ir.Constraint) -> Optional[str]:
    q = next((v for v in c.values if isinstance(v, ir.Quantity)), None)
    if q is None:
        return None
    dim_unit = units.DICOM_UNITS.get(c.keyword)
    if dim_unit and dim_unit[0] == q.dimension:
        return dim_unit[1]
    return q.unit


def constraint_to_json(c: ir.Constraint, origin: str) -> dict:
    tag, vr, name = _dicom_info(c.keyword)
    dvals, default = _dicom_values(c)
    if vr in _INTEGER_VRS:
        dvals = _clamp(vr, _integer_bounds(c.kind, dvals))
    d = {
        "keyword": c.keyword,
        "name": name,
        "tag": _tag_text(tag),
        "index": c.index,
        "constraint": c.kind.value,
        "values": [_value_to_json(v) for v in c.values],
        "tolerance": None if c.tolerance is None else {
            k: (_num(x) if isinstance(x, float) else x)
            for k, x in c.tolerance.model_dump(exclude={"span"}).items() if x is not None
        },
        "significance": c.significance.value,
        "modifiable": c.modifiable,
        "note": c.note,
        "origin": origin,
        "requirement": constraint_text(c),
        "dicom": {
            "constraint_type": _dicom_type(c),
            "values": [_num(v) if isinstance(v, float) else v for v in dvals],
            "recommended_default": _num(default) if isinstance(default, float) else default,
            "unit": _dicom_unit(c),
            "vr": vr,
        },
    }
    return d


def constraint_from_json(d: dict) -> ir.Constraint:
    tol = d.get("tolerance")
    return ir.Constraint(
        keyword=d["keyword"], kind=ir.ConstraintKind(d["constraint"]),
        values=[_value_from_json(v) for v in d["values"]],
        tolerance=ir.Tolerance(**tol) if tol else None,
        significance=ir.Significance(d.get("significance", "error")),
        modifiable=bool(d.get("modifiable", False)), index=d.get("index"), note=d.get("note"),
    )


def _protocol_header(p: ir.Protocol) -> dict:
    return {
        "name": p.name, "modality": p.modality, "title": p.title, "body_part": p.body_part,
        "preparation": list(p.preparation), "contrast": p.contrast,
        "match": [{"attribute": m.attribute, "op": m.op.value, "value": m.value} for m in p.match],
        "notes": list(p.notes),
    }


def _variant_json(t: Target) -> Optional[dict]:
    v = t.variant
    if v is None:
        return None
    return {"index": t.index, "vendor": v.vendor, "vendor_text": v.vendor_text, "model": v.model,
            "software": v.software, "remove": list(v.remove)}


def _device_json(site: ir.Site, d: ir.Device) -> dict:
    return {
        "site": site.code, "site_name": site.name, "device": d.id, "modality": d.modality, "vendor": d.vendor,
        "manufacturer": d.vendor_text or d.vendor, "model": d.model, "software": d.software,
        "field_strength": None if d.field_strength is None else d.field_strength.text(),
        "serial": d.serial, "station": d.station,
    }


def _contacts(t: Target) -> list[dict]:
    out, seen = [], set()
    for site, _ in t.devices:
        if site.code in seen:
            continue
        seen.add(site.code)
        for c in site.contacts:
            out.append({"site": site.code, "role": c.role, "name": c.name, "email": c.email, "phone": c.phone})
    return out


def series_naming(p: ir.Protocol) -> dict:
    """What to call the series: the match rules and a name that satisfies them, if one is obvious."""
    rules = [{"attribute": m.attribute, "op": m.op.value, "value": m.value, "text": _rule_text(m)} for m in p.match]
    desc_rules = [m for m in p.match if m.attribute in ("SeriesDescription", "ProtocolName")]
    if not desc_rules:
        return {"rules": rules, "suggested_series_description": None}
    candidates = [p.name, p.title, p.name.upper(), p.name.lower()]
    for m in desc_rules:  # plain alternatives of the regexes, e.g. 'mprage' from '(?i)mprage|t1w'
        candidates += _regex_alternatives(m.value)
    suggestion = next((c for c in candidates if c and all(_rule_ok(m, c) for m in desc_rules)), None)
    return {"rules": rules, "suggested_series_description": suggestion}


def _regex_alternatives(pattern: str) -> list[str]:
    body = re.sub(r"^\(\?[a-zA-Z]+\)", "", pattern)
    return [a for a in body.split("|") if re.fullmatch(r"[A-Za-z0-9_ \-]+", a)]


def _rule_ok(m: ir.MatchRule, s: str) -> bool:
    if m.op == ir.MatchOp.MATCHES:
        return re.search(m.value, s) is not None
    if m.op == ir.MatchOp.NOT_MATCHES:
        return re.search(m.value, s) is None
    if m.op in (ir.MatchOp.EQUALS, ir.MatchOp.CONTAINS):
        return s == m.value
    return False


def _rule_text(m: ir.MatchRule) -> str:
    return {
        ir.MatchOp.MATCHES: f"{m.attribute} matches /{m.value}/",
        ir.MatchOp.NOT_MATCHES: f"{m.attribute} does not match /{m.value}/",
        ir.MatchOp.EQUALS: f'{m.attribute} is exactly "{m.value}"',
        ir.MatchOp.CONTAINS: f'{m.attribute} includes "{m.value}"',
    }[m.op]


def _study_json(trial: ir.Trial) -> dict:
    s = trial.study
    if s is None:
        return {"code": "STUDY", "title": "", "registry": None, "sponsor": None, "version": None}
    return {"code": s.code, "title": s.title, "registry": s.registry, "sponsor": s.sponsor, "version": s.version}


def to_json(trial: ir.Trial, t: Target) -> dict:
    """The vendor-neutral document of one protocol x variant."""
    p = t.protocol
    return {
        "format": FORMAT,
        "generator": f"imtrial {__version__}",
        "study": _study_json(trial),
        "protocol": _protocol_header(p),
        "variant": _variant_json(t),
        "label": t.label,
        "equipment": [_device_json(s, d) for s, d in t.devices],
        "series_naming": series_naming(p),
        "parameters": [constraint_to_json(c, origin) for c, origin in t.constraints],
        "contacts": _contacts(t),
        "dicom_sop_instance_uid": _uid(_study_code(trial), p.name, t.label, "sop") if p.modality in DPP_MODALITIES else None,
    }


# --------------------------------------------------------------------------- DICOM DPP writer

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


_INTEGER_VRS = {"IS", "US", "UL", "SS", "SL", "UV", "SV"}


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


def _selector_value_item(vr: str, value: Any):
    """One Attribute Value Macro item (PS3.3 Table 10.26-1) holding ``value`` with the attribute's VR."""
    from pydicom.dataset import Dataset
    from pydicom.valuerep import DSfloat

    item = Dataset()
    kw = f"Selector{vr}Value"
    if isinstance(value, bool):
        value = ("YES" if value else "NO") if vr not in _NUMERIC_VRS else int(value)
    if vr == "DS":
        val = DSfloat(float(value), auto_format=True)
    elif vr == "IS":
        val = int(round(float(value)))
    elif vr in ("FD", "FL"):
        val = float(value)
    elif vr in _NUMERIC_VRS:
        val = int(round(float(value)))
    else:
        s = str(value)
        val = s.split("\\") if (vr not in _SINGLE_VALUED_VRS and "\\" in s) else s
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

    tag, vr, name = _dicom_info(c.keyword)
    if tag is None:
        raise ImtrialError(c, f"'{c.keyword}' is not a DICOM keyword; it cannot be a Selector Attribute")
    if vr == "SQ":
        raise ImtrialError(c, f"'{c.keyword}' is a sequence; constraints on sequences have no DPP encoding")
    exact, default = _dicom_values(c)
    dvals = _clamp(vr, _integer_bounds(c.kind, exact)) if vr in _INTEGER_VRS else exact
    item = Dataset()
    item.SelectorAttribute = tag
    item.SelectorValueNumber = 0 if c.index is None else c.index + 1
    nested = NESTED_IN_ELEMENT.get(modality, {}).get(c.keyword) if element_seq == ACQ_ELEMENT_SEQ else None
    item.SelectorSequencePointer = [element_seq] + ([nested] if nested else [])
    item.SelectorSequencePointerItems = [element_number] + ([1] if nested else [])
    item.SelectorAttributeVR = vr
    item.SelectorAttributeName = _lo(name)
    item.SelectorAttributeKeyword = _lo(c.keyword)
    item.ConstraintType = _dicom_type(c)
    if dvals:
        item.ConstraintValueSequence = [_selector_value_item(vr, v) for v in dvals]
    if default is not None:
        written = _clamp(vr, [float(round(default))])[0] if vr in _INTEGER_VRS else default
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
    if default is not None and vr in _INTEGER_VRS and isinstance(default, float) and _clamp(vr, [float(round(default))]) != [default]:
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
    code = _study_code(trial)

    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    # SOP Common
    ds.SOPClassUID = iod["sop_class_uid"]
    ds.SOPInstanceUID = _uid(code, p.name, t.label, "sop")
    ds.InstanceNumber = 1 if t.index is None else t.index + 2
    # General / Enhanced General Equipment: the equipment that made this object
    ds.Manufacturer = "imtrial"
    ds.ManufacturerModelName = "imtrial e-protocol exporter"
    ds.DeviceSerialNumber = "imtrial"
    ds.SoftwareVersions = __version__
    # Protocol Context
    ds.ProtocolName = _lo(p.name)
    ds.PotentialScheduledProtocolCodeSequence = [_code(p.name, p.title or p.name)]
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
    for c, _ in t.constraints:
        key = (c.keyword, c.index)
        if key in seen:
            first = seen[key]
            raise ImtrialError(c, f"{c.keyword} is constrained twice in protocol {p.name}; a DICOM Defined Procedure "
                                  f"Protocol allows one constraint per attribute",
                               f"combine them into one constraint (e.g. a range 'in low .. high'); first one at {first.span}")
        seen[key] = c
    acq, rec = [], []
    for pos, (c, origin) in enumerate(t.constraints):
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
    _private_json(ds, 0x10, {"format": FORMAT, "protocol": _protocol_header(p), "variant": _variant_json(t), "label": t.label})

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    missing = missing_modules(ds, p.modality)
    if missing:  # a writer bug, not a user error
        raise AssertionError(f"DPP for {p.name}/{t.label} lacks mandatory modules: {missing}")
    return ds


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
    from pydicom.dataset import Dataset

    items = []
    for _, d in t.devices:  # one item per device: any item matching makes the protocol applicable (C.34.6.1)
        it = Dataset()
        it.Manufacturer = _lo(d.vendor_text or d.vendor)
        if d.model:
            it.ManufacturerModelName = _lo(d.model)
        if d.software:
            it.SoftwareVersions = _lo(d.software)
        if d.serial:
            it.DeviceSerialNumber = _lo(d.serial)
        items.append(it)
    if not items and t.variant is not None:
        v = t.variant
        it = Dataset()
        it.Manufacturer = _lo(v.vendor_text or v.vendor)
        if v.model:
            it.ManufacturerModelName = _lo(v.model)
        if v.software:
            it.SoftwareVersions = _lo(v.software)
        items.append(it)
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


# --------------------------------------------------------------------------- scanner card

@lru_cache(maxsize=1)
def _template_env():
    import jinja2

    here = Path(__file__).resolve().parent / "templates"
    loader = (jinja2.FileSystemLoader(str(here)) if here.is_dir()
              else jinja2.PackageLoader("imtrial_dsl.exporters", "templates"))
    return jinja2.Environment(loader=loader, autoescape=jinja2.select_autoescape(["html", "j2"]),
                              trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)


def scanner_card(trial: ir.Trial, t: Target) -> str:
    """One printable HTML page a technologist can follow at the console."""
    doc = to_json(trial, t)
    return _template_env().get_template("eprotocol/card.html.j2").render(doc=doc)


# --------------------------------------------------------------------------- export entry point

def export(trial: ir.Trial, graph: Any = None, out_dir: Path | str = ".") -> list[Path]:
    """Write JSON + scanner card for every protocol x variant, and a DPP object for CT/XA ones.

    Returns the written paths in a stable order. Raises ``CompileErrors`` (every problem at once,
    before anything is written) when a constraint has no DICOM encoding. ``graph`` is accepted
    for the exporter interface; e-protocols depend only on the IR.
    """
    code = _study_code(trial)
    planned: list[tuple[str, Any]] = []
    diags = []
    for p in trial.protocols:
        for t in targets(trial, p):
            stem = f"{_slug(code)}_{_slug(p.name)}_{t.label}"
            doc = to_json(trial, t)
            planned.append((f"{stem}.json", json.dumps(doc, indent=2, ensure_ascii=False) + "\n"))
            planned.append((f"{stem}.html", _template_env().get_template("eprotocol/card.html.j2").render(doc=doc)))
            if p.modality in DPP_MODALITIES:
                try:
                    planned.append((f"{stem}.dcm", to_dicom(trial, t)))
                except ImtrialError as exc:
                    diags.append(exc.diagnostic)
    if diags:
        unique = {(d.message, str(d.span)): d for d in diags}
        raise CompileErrors(list(unique.values()))
    planned.append((SCHEMA_FILE, _schema_text()))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for name, content in planned:
        path = out / name
        if isinstance(content, str):
            path.write_text(content, encoding="utf-8")
        else:
            content.save_as(path, enforce_file_format=True)
        written.append(path)
    return written


# --------------------------------------------------------------------------- import

class Imported:
    """One file read back: the protocol header, its origin-tagged constraints, its variant (if any)."""

    def __init__(self, protocol: ir.Protocol, params: list[tuple[ir.Constraint, str]], variant: Optional[dict]):
        self.protocol, self.params, self.variant = protocol, params, variant

    def as_protocol(self) -> ir.Protocol:
        base = [c for c, o in self.params if o == "base"]
        variants = []
        if self.variant is not None:
            variants.append(_make_variant(self.variant, [c for c, o in self.params if o == "variant"]))
        return self.protocol.model_copy(update={"constraints": base, "variants": variants})


def _make_variant(v: dict, constraints: list[ir.Constraint]) -> ir.Variant:
    return ir.Variant(vendor=v["vendor"], vendor_text=v.get("vendor_text", ""), model=v.get("model"),
                      software=v.get("software"), constraints=constraints, remove=list(v.get("remove", [])))


def _header_to_protocol(h: dict) -> ir.Protocol:
    return ir.Protocol(
        name=h["name"], modality=h["modality"], title=h.get("title", ""), body_part=h.get("body_part"),
        preparation=list(h.get("preparation", [])), contrast=h.get("contrast"),
        match=[ir.MatchRule(attribute=m["attribute"], op=ir.MatchOp(m["op"]), value=m["value"]) for m in h.get("match", [])],
        notes=list(h.get("notes", [])),
    )


def _read_json(path: Path) -> Imported:
    doc = json.loads(path.read_text(encoding="utf-8"))
    if doc.get("format") != FORMAT:
        raise ValueError(f"{path}: not an {FORMAT} document (format={doc.get('format')!r})")
    params = [(constraint_from_json(d), d.get("origin", "base")) for d in doc["parameters"]]
    return Imported(_header_to_protocol(doc["protocol"]), params, doc.get("variant"))


def _selector_values(item, vr: str) -> list[Any]:
    kw = f"Selector{vr}Value"
    if kw not in item:
        return []
    v = item[kw].value
    if vr in _NUMERIC_VRS:
        vals = list(v) if isinstance(v, (list, tuple)) or type(v).__name__ == "MultiValue" else [v]
        return [float(x) for x in vals]
    if isinstance(v, (list, tuple)) or type(v).__name__ == "MultiValue":
        return ["\\".join(str(x) for x in v)]
    return [str(v)]


def _constraint_from_item(item) -> tuple[Optional[ir.Constraint], str, int]:
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
    kind_name = extras.get("kind")
    if kind_name:
        kind = ir.ConstraintKind(kind_name)
        expected = "RANGE_INCL" if (kind == ir.ConstraintKind.EQUAL and extras.get("tolerance")) else _KIND_TO_DICOM[kind]
        if expected != ctype:
            raise ValueError(f"{keyword}: Constraint Type {ctype} disagrees with imtrial kind {kind_name}")
    elif ctype in _DICOM_TO_KIND:
        kind = _DICOM_TO_KIND[ctype]
        if kind == ir.ConstraintKind.NOT_EQUAL and len(raw) > 1:
            raise ValueError(f"{keyword}: NOT_MEMBER_OF with several values has no imtrial equivalent")
    else:
        return None, "base", extras.get("pos", 0)  # UNCONSTRAINED / MEMBER_OF_CID from other writers

    if kind == ir.ConstraintKind.MATCHES:
        values: list[Any] = [extras["regex"]]
    elif kind == ir.ConstraintKind.EQUAL and extras.get("tolerance"):
        values = default[:1]
        if "exact_default" in extras and values and vr in _INTEGER_VRS:
            if _clamp(vr, [float(round(extras["exact_default"]))])[0] != float(values[0]):
                raise ValueError(f"{keyword}: private exact default {extras['exact_default']} disagrees with {values[0]}")
            values = [extras["exact_default"]]
    else:
        values = raw
    if "exact" in extras and len(extras["exact"]) == len(values) and vr in _INTEGER_VRS:
        expected = _clamp(vr, _integer_bounds(kind, [float(x) for x in extras["exact"]]))
        if expected != [float(x) for x in values]:
            raise ValueError(f"{keyword}: private exact bounds {extras['exact']} disagree with {values}")
        values = extras["exact"]
    metas = extras.get("values") or [{} for _ in values]
    out_vals: list[ir.Value] = []
    for v, meta in zip(values, metas):
        t = meta.get("t")
        if t == "b":
            out_vals.append(bool(meta["v"]))
        elif kind == ir.ConstraintKind.MATCHES or t == "s" or (t is None and isinstance(v, str)):
            out_vals.append(str(v))
        else:
            out_vals.append(_quantity_from_dicom(keyword, float(v), meta))
    tol = extras.get("tolerance")
    c = ir.Constraint(keyword=keyword, kind=kind, values=out_vals, tolerance=ir.Tolerance(**tol) if tol else None,
                      significance=sig, modifiable=modifiable, index=None if index == 0 else index - 1,
                      note=extras.get("note"))
    return c, extras.get("origin", "base"), extras.get("pos", 0)


def _quantity_from_dicom(keyword: str, v: float, meta: dict) -> ir.Quantity:
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
    return ir.Quantity(value=value, unit=unit, dimension=dimension, source_value=meta.get("source_value"),
                       source_unit=meta.get("source_unit"))


def _read_dicom(path: Path) -> Imported:
    import pydicom

    ds = pydicom.dcmread(path)
    modality = next((m for m, iod in dpp_modules()["iods"].items() if iod["sop_class_uid"] == ds.SOPClassUID), None)
    if modality is None:
        raise ValueError(f"{path}: SOP Class {ds.SOPClassUID} is not a CT/XA Defined Procedure Protocol")
    extras = _read_private_json(ds, 0x10)
    if extras:
        protocol = _header_to_protocol(extras["protocol"])
        variant = extras.get("variant")
    else:  # a DPP from another writer: what the standard attributes carry
        codes = ds.get("PotentialScheduledProtocolCodeSequence", [])
        title = str(codes[0].CodeMeaning) if codes else ""
        prep = [str(i.get("InstructionDescription") or i.get("InstructionText", "")) for i in ds.get("InstructionSequence", [])]
        notes = str(ds.get("ProtocolPlanningInformation", "")).split("\n") if "ProtocolPlanningInformation" in ds else []
        protocol = ir.Protocol(name=str(ds.ProtocolName), modality=modality,
                               title="" if title == str(ds.ProtocolName) else title, preparation=prep, notes=notes)
        variant = None
    found = []
    for seq_kw in ("AcquisitionProtocolElementSpecificationSequence", "ReconstructionProtocolElementSpecificationSequence"):
        for element in ds.get(seq_kw, []):
            for item in element.get("ParametersSpecificationSequence", []):
                c, origin, pos = _constraint_from_item(item)
                if c is not None:
                    found.append((pos, len(found), c, origin))
    found.sort(key=lambda x: (x[0], x[1]))
    return Imported(protocol, [(c, o) for _, _, c, o in found], variant)


def _read(path: Path | str) -> Imported:
    """Either format, by content (DICOM Part 10 preamble, else JSON). Malformed input -> ValueError."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(132)
    try:
        if head[128:132] == b"DICM":
            return _read_dicom(path)
        return _read_json(path)
    except (KeyError, TypeError, AttributeError, IndexError) as exc:
        raise ValueError(f"{path}: malformed e-protocol ({type(exc).__name__}: {exc})") from exc
    except Exception as exc:  # pydicom and pydantic errors are not ValueErrors in every version
        if isinstance(exc, (ValueError, OSError)):
            raise
        raise ValueError(f"{path}: {exc}") from exc


def import_file(path: Path | str) -> ir.Protocol:
    """Read one DPP object or ``imtrial-eprotocol/1`` JSON file back into an ``ir.Protocol`` (no spans).

    A base file gives the complete base protocol; a variant file gives that variant plus the base
    constraints it did not override (use :func:`import_files` to merge a protocol's files).
    """
    return _read(path).as_protocol()


def import_files(paths: Iterable[Path | str]) -> list[ir.Protocol]:
    """Read several files and merge them per protocol: base constraints from the base file, one
    variant per variant file (in their original order). Protocols come out in first-seen order."""
    groups: dict[str, list[Imported]] = {}
    for p in paths:
        imp = _read(p)
        groups.setdefault(imp.protocol.name, []).append(imp)
    out = []
    for name, imps in groups.items():
        bases = [i for i in imps if i.variant is None]
        variants = sorted((i for i in imps if i.variant is not None), key=lambda i: i.variant.get("index") or 0)
        if bases:
            head = bases[0]
            base_constraints = [c for c, _ in head.params]
        else:  # no base file: keep the base constraints the variant files carried, first-seen order
            head = imps[0]
            base_constraints, seen = [], set()
            for i in imps:
                for c, o in i.params:
                    key = json.dumps(ir.strip_spans(c), sort_keys=True)
                    if o == "base" and key not in seen:
                        seen.add(key)
                        base_constraints.append(c)
        merged, seen_v = [], set()
        for i in variants:
            key = json.dumps(i.variant, sort_keys=True)
            if key in seen_v:
                continue
            seen_v.add(key)
            merged.append(_make_variant(i.variant, [c for c, o in i.params if o == "variant"]))
        out.append(head.protocol.model_copy(update={"constraints": base_constraints, "variants": merged}))
    return out


# --------------------------------------------------------------------------- .imtrial source

def protocol_to_source(protocol: ir.Protocol) -> str:
    """The protocol in ``.imtrial`` syntax (the style of examples/amyloid_mri.imtrial)."""
    p = protocol
    head = f"protocol {p.name} modality {p.modality}" + (f" {source.quote(p.title)}" if p.title else "") + " {"
    lines = [head]
    if p.body_part:
        lines.append(f"  body_part {source.quote(p.body_part)}")
    if p.contrast:
        lines.append(f"  contrast {source.quote(p.contrast)}")
    for text in p.preparation:
        lines.append(f"  prepare {source.quote(text)}")
    for note in p.notes:
        lines.append(f"  remark {source.quote(note)}")
    ops = {ir.MatchOp.MATCHES: "~", ir.MatchOp.EQUALS: "=", ir.MatchOp.CONTAINS: "has", ir.MatchOp.NOT_MATCHES: "!~"}
    for m in p.match:
        lines.append(f"  match {m.attribute} {ops[m.op]} {source.quote(m.value)}")
    for c in p.constraints:
        lines.append(f"  {source.constraint(c)}")
    for v in p.variants:
        vh = f"  variant {_src_vendor(v)}"
        if v.model:
            vh += f" model {source.quote(v.model)}"
        if v.software:
            vh += f" software {source.quote(v.software)}"
        lines.append(vh + " {")
        for c in v.constraints:
            lines.append(f"    {source.constraint(c)}")
        for r in v.remove:
            lines.append(f"    remove {r}")
        lines.append("  }")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _src_vendor(v: ir.Variant) -> str:
    text = v.vendor_text or v.vendor
    return text if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", text) else source.quote(text)
