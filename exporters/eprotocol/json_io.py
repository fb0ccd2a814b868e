"""The vendor-neutral ``imtrial-eprotocol/1`` JSON document of a target, its schema, and its reader."""
from __future__ import annotations

import json
import math
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


def constraint_to_json(c: ir.Constraint, origin: str, condition: Optional[ir.Conditional] = None,
                       block: Optional[int] = None) -> dict:
    from imtrial_dsl.derived import DERIVED

    tag, vr, name = dicom_dpp.dicom_info(c.keyword) if not c.path else (None, None, source.parameter(c))
    exact, default = dicom_dpp.dicom_values(c)
    dvals = dicom_dpp.held_values(vr, c.kind, exact, c.tolerance is not None)
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
        "path": [path_step_json(s) for s in c.path],
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
    if block is not None and condition is not None:  # a 'when' block's constraint: the block and its condition
        d["when"] = {"block": block, "condition": constraint_to_json(condition.condition, origin)}
    return d


def path_step_json(s: ir.PathStep) -> dict:
    """A path step as the formats carry it (``field`` only when set, so files without one stay as they were)."""
    d = s.model_dump(exclude={"span"})
    if d.get("field") is None:
        d.pop("field", None)
    return d


def when_of(d: dict) -> Optional[tuple[int, ir.Constraint]]:
    """(block number, condition) of a parameter written from a 'when' block, else None."""
    w = d.get("when")
    return None if not w else (int(w["block"]), constraint_from_json(w["condition"]))


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
        **({"modalities": list(d.all_modalities())} if len(d.all_modalities()) > 1 else {}),
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
    if m.op == ir.MatchOp.NOT_CONTAINS:
        return s != m.value
    return False


def _rule_text(m: ir.MatchRule) -> str:
    return {
        ir.MatchOp.MATCHES: f"{m.attribute} matches /{m.value}/",
        ir.MatchOp.NOT_MATCHES: f"{m.attribute} does not match /{m.value}/",
        ir.MatchOp.EQUALS: f'{m.attribute} is exactly "{m.value}"',
        ir.MatchOp.CONTAINS: f'{m.attribute} includes "{m.value}"',
        ir.MatchOp.NOT_CONTAINS: f'{m.attribute} does not include "{m.value}"',
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
        + [constraint_to_json(c, origin, w, k) for k, (w, origin) in enumerate(t.conditionals) for c in w.constraints],
        # the base constraints a variant replaces or removes, so that one variant file alone is a whole protocol
        "base_overridden": [dict(constraint_to_json(c, "base"), base_position=i) for i, c in t.overridden_base],
        "contacts": _contacts(t),
        "dicom_sop_instance_uid": dicom_dpp.sop_instance_uid(trial, t) if p.modality in dicom_dpp.DPP_MODALITIES else None,
    }


def read(path: Path, notes: Optional[list] = None) -> tuple[ir.Protocol, list[tuple[ir.Constraint, str]], Optional[dict], list, dict]:
    """(protocol header, origin-tagged constraints, variant or None, 'when' block constraints as (block, origin,
    condition, constraint), the study and equipment the file names) of one ``.json`` file.

    ``values[].value`` is the canonical number: where an edit left ``source_value`` behind, the value wins
    and ``notes`` gets a W613."""
    notes = [] if notes is None else notes
    doc = json.loads(path.read_text(encoding="utf-8"))
    if doc.get("format") != FORMAT:
        raise ValueError(f"{path}: not an {FORMAT} document (format={doc.get('format')!r})")
    where = Path(path).name
    problems = meaning_problems(doc, dicom=False)
    if problems:
        raise ValueError(f"{path}: " + "; ".join(problems))
    from imtrial_dsl.diagnostics import Diagnostic, Severity

    for text in sorted(set(meaning_problems(doc)) - set(problems)):  # dicom.values left behind by an edit
        notes.append(Diagnostic(severity=Severity.WARNING, code="W613", message=f"{where}: {text}; values[].value is used",
                                hint="values[].value is the canonical number; dicom.values is derived from it"))
    params, whens = [], []
    for d in doc["parameters"]:
        c, origin = _checked(constraint_from_json(d), where, notes), d.get("origin", "base")
        w = when_of(d)
        if w is None:
            params.append((c, origin))
        else:
            whens.append((w[0], origin, w[1], c))
    variant = doc.get("variant")
    if variant is not None:
        variant = dict(variant, base_overridden=[(d["base_position"], _checked(constraint_from_json(d), where, notes))
                                                 for d in doc.get("base_overridden", [])])
    context = {"study": doc.get("study"), "equipment": doc.get("equipment", [])}
    return protocol_from_header(doc["protocol"]), params, variant, whens, context


def _checked(c: ir.Constraint, where: str, notes: list) -> ir.Constraint:
    """Make each quantity's written form agree with its canonical ``value`` (the value is the truth)."""
    from imtrial_dsl import units
    from imtrial_dsl.diagnostics import Diagnostic, Severity

    fixed = []
    for v in c.values:
        if isinstance(v, ir.Quantity) and v.source_value is not None and v.source_unit is not None \
                and (v.source_unit == "" or v.source_unit in units.UNITS):
            derived = units.to_canonical(float(v.source_value), v.source_unit)[0]
            if not math.isclose(derived, v.value, rel_tol=1e-9, abs_tol=1e-12):
                factor = units.to_canonical(1.0, v.source_unit)[0] if v.source_unit else 1.0
                new_sv = float(f"{v.value / factor:.12g}")
                notes.append(Diagnostic(
                    severity=Severity.WARNING, code="W613",
                    message=f"{where}: {c.keyword}: value {v.value:g} {v.unit} disagrees with source_value "
                            f"{v.source_value:g} {v.source_unit}; {new_sv:g} {v.source_unit} is used",
                    hint="values[].value is the canonical number; source_value only says how it was written"))
                v = v.model_copy(update={"source_value": new_sv})
        fixed.append(v)
    return c.model_copy(update={"values": fixed})


def meaning_problems(doc: dict, dicom: bool = True) -> list[str]:
    """What a document says that cannot be true, beyond its shape (the JSON Schema checks the shape and the
    units of each dimension; comparisons between fields are beyond JSON Schema): DICOM keywords that exist
    with their own tag, canonical units of known dimensions, written units of the same dimension, ranges
    in order, and ``dicom.values`` equal to ``values`` in the attribute's DICOM unit."""
    from pydicom.datadict import tag_for_keyword

    from imtrial_dsl import units

    from imtrial_dsl.derived import DERIVED

    problems = []
    for n, d in enumerate(doc.get("parameters", []) + doc.get("base_overridden", [])):
        kw = d.get("keyword", "")
        where = f"parameter {n + 1} ({kw})"
        path = d.get("path") or []
        if path:  # a path into sequences or a private element: every named step must be a keyword
            bad = [s.get("keyword") for s in path if s.get("keyword") and tag_for_keyword(s["keyword"]) is None]
            bad += [f"private {s.get('creator')} {s.get('tag')}" for s in path if not s.get("keyword")
                    and not (s.get("creator") and s.get("tag"))]
            problems += [f"{where}: path step '{b}' is not a DICOM keyword or a private element" for b in bad]
            continue   # DICOM cannot carry a path constraint: there is no dicom part to compare
        if kw in DERIVED:
            continue   # a derived quantity (e.g. UptakeTime): computed from the header, no DICOM part
        tag = tag_for_keyword(kw)
        if tag is None:
            problems.append(f"{where}: '{kw}' is not a DICOM keyword")
            continue
        if d.get("tag") not in (None, dicom_dpp.tag_text(tag)):
            problems.append(f"{where}: tag {d.get('tag')} is not the tag of {kw} ({dicom_dpp.tag_text(tag)})")
        for v in d.get("values", []):
            if not isinstance(v, dict):
                continue
            dim = v.get("dimension")
            if dim not in units.CANONICAL and dim != "none":
                problems.append(f"{where}: unknown dimension '{dim}'")
                continue
            if v.get("unit") != units.CANONICAL.get(dim, ""):
                problems.append(f"{where}: unit '{v.get('unit')}' is not the canonical unit of {dim} "
                                f"('{units.CANONICAL.get(dim, '')}')")
            su = v.get("source_unit")
            if su not in (None, "") and (su not in units.UNITS or units.UNITS[su][0] != dim):
                problems.append(f"{where}: source_unit '{su}' is not a unit of {dim}")
        vals = [v.get("value") for v in d.get("values", []) if isinstance(v, dict)]
        if d.get("constraint") in ("RANGE_INCL", "RANGE_EXCL") and len(vals) == 2:
            lo, hi = vals
            if lo > hi:
                problems.append(f"{where}: range {lo:g} .. {hi:g} is not in order")
        try:
            c = constraint_from_json(d)
        except (ValueError, TypeError, KeyError) as exc:
            problems.append(f"{where}: {exc}")
            continue
        _, vr, _ = dicom_dpp.dicom_info(kw)
        exact, default = dicom_dpp.dicom_values(c)
        want = dicom_dpp.held_values(vr, c.kind, exact, c.tolerance is not None)
        got = (d.get("dicom") or {}).get("values", [])
        same = len(want) == len(got) and all(
            math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-9) if isinstance(a, (int, float)) and not isinstance(a, bool)
            and isinstance(b, (int, float)) else a == b for a, b in zip(want, got))
        if not same and dicom:
            problems.append(f"{where}: dicom.values {got} do not equal values (in {dicom_dpp.dicom_unit(c) or 'the stored unit'}: "
                            f"{[_num(x) if isinstance(x, float) else x for x in want]})")
    return problems
