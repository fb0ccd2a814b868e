"""The vendor-neutral ``imtrial-eprotocol/1`` JSON document of a target, its schema, and its reader."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Optional

from imtrial_dsl import __version__, ir, source

from . import dicom_dpp
from .targets import FORMAT, Target, protocol_from_header, protocol_header, variant_header

SCHEMA_FILE = "imtrial-eprotocol-1.schema.json"


def _num(v: float) -> Any:
    """JSON-friendly number: ints stay ints so goldens read naturally."""
    return int(v) if float(v).is_integer() and abs(v) < 1e15 else float(v)


def schema_text() -> str:
    """The published JSON Schema of the format, as written next to the exported files."""
    return (dicom_dpp.SCHEMAS / SCHEMA_FILE).read_text(encoding="utf-8")


def schema() -> dict:
    return json.loads(schema_text())


def dumps(doc: dict) -> str:
    """A document as its ``.json`` file holds it (keys in document order, non-ASCII kept)."""
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"


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


def constraint_to_json(c: ir.Constraint, origin: str, condition: Optional[ir.Conditional] = None) -> dict:
    from imtrial_dsl.derived import DERIVED

    tag, vr, name = dicom_dpp.dicom_info(c.keyword) if not c.path else (None, None, source.parameter(c))
    exact, default = dicom_dpp.dicom_values(c)
    dvals = dicom_dpp.held_values(vr, c.kind, exact)
    d = {
        "keyword": c.keyword,
        "name": name,
        "tag": dicom_dpp.tag_text(tag),
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
        "requirement": source.rhs(c, source.PROSE),
        "path": [s.model_dump(exclude={"span"}) for s in c.path],
        "measure": c.measure,
        "if_present": c.if_present,
        "condition": source.conditional(condition, source.REPORT) if condition is not None else None,
        "derived": DERIVED[c.keyword].description if c.keyword in DERIVED and not c.path else None,
        "dicom": {
            "constraint_type": dicom_dpp.constraint_type(c),
            "values": [_num(v) if isinstance(v, float) else v for v in dvals],
            "recommended_default": _num(default) if isinstance(default, float) else default,
            "unit": dicom_dpp.dicom_unit(c),
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
        path=[ir.PathStep(**s) for s in d.get("path") or []], measure=d.get("measure", "value"),
        if_present=bool(d.get("if_present", False)),
    )


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
        "protocol": protocol_header(p),
        "variant": variant_header(t),
        "label": t.label,
        "equipment": [_device_json(s, d) for s, d in t.devices],
        "series_naming": series_naming(p),
        "parameters": [constraint_to_json(c, origin) for c, origin in t.constraints]
        + [constraint_to_json(c, origin, w) for w, origin in t.conditionals for c in w.constraints],
        "contacts": _contacts(t),
        "dicom_sop_instance_uid": dicom_dpp.sop_instance_uid(trial, t) if p.modality in dicom_dpp.DPP_MODALITIES else None,
    }


def read(path: Path) -> tuple[ir.Protocol, list[tuple[ir.Constraint, str]], Optional[dict]]:
    """(protocol header, origin-tagged constraints, variant or None) of one ``.json`` file."""
    doc = json.loads(path.read_text(encoding="utf-8"))
    if doc.get("format") != FORMAT:
        raise ValueError(f"{path}: not an {FORMAT} document (format={doc.get('format')!r})")
    params = [(constraint_from_json(d), d.get("origin", "base")) for d in doc["parameters"]]
    return protocol_from_header(doc["protocol"]), params, doc.get("variant")
