"""Protocol adherence: header parameters vs the protocol, per vendor/software variant.

Constraints mean what DICOM's Attribute Value Constraint types mean (EQUAL with
an absolute or % tolerance, RANGE_INCL/RANGE_EXCL, the four comparisons,
NOT_EQUAL) plus SET_OF and MATCHES; header values are converted from their
storage unit with ``units.from_dicom`` before comparison. A series *fails* when an
error-significance constraint is violated, *warns* on a warning-significance one.

Exam-level findings: device not in the inventory (matched by serial, then
station, then vendor+model), software release differing from the inventory
(possible upgrade, and whether a protocol variant covers the new release), and
the schedule's same-device rule against the subject's prior exams (the runner
passes their device ids). Everything works from one exam and header-only reads.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import re
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset

from .. import ir, source, units
from ..vendors import SoftwareMatch, describe_software_match, normalize_vendor, software_match, software_values
from . import dicomio

_REL_EPS = 1e-6


@lru_cache(maxsize=1024)
def _regex(pattern: str) -> re.Pattern:
    return re.compile(pattern)


# --------------------------------------------------------------------------- constraint text

def expected_text(c: ir.Constraint) -> str:
    """Human text of a constraint, e.g. ``= 2300 ms ± 1%`` or ``in 2 .. 3.5 ms``."""
    return source.rhs(c, source.REPORT)


# --------------------------------------------------------------------------- evaluation

def _num(v: ir.Value) -> Optional[float]:
    if isinstance(v, ir.Quantity):
        return float(v.value)
    if isinstance(v, bool):
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _close(a: float, b: float, tol: float = 0.0) -> bool:
    return abs(a - b) <= tol + _REL_EPS * max(1.0, abs(b))


def _tolerance(c: ir.Constraint, nominal: float) -> float:
    if not c.tolerance:
        return 0.0
    return abs(nominal) * c.tolerance.value / 100.0 if c.tolerance.relative else c.tolerance.value


def _numeric_ok(c: ir.Constraint, x: float) -> bool:
    k = c.kind
    vals = [_num(v) for v in c.values]
    if any(v is None for v in vals):
        return False
    if k == ir.ConstraintKind.EQUAL:
        return _close(x, vals[0], _tolerance(c, vals[0]))
    if k == ir.ConstraintKind.NOT_EQUAL:
        return not _close(x, vals[0], _tolerance(c, vals[0]))
    if k == ir.ConstraintKind.RANGE_INCL:
        return vals[0] <= x <= vals[1] or _close(x, vals[0]) or _close(x, vals[1])
    if k == ir.ConstraintKind.RANGE_EXCL:
        return vals[0] < x < vals[1] and not (_close(x, vals[0]) or _close(x, vals[1]))
    if k == ir.ConstraintKind.GREATER_OR_EQUAL:
        return x >= vals[0] or _close(x, vals[0])
    if k == ir.ConstraintKind.LESS_OR_EQUAL:
        return x <= vals[0] or _close(x, vals[0])
    if k == ir.ConstraintKind.GREATER_THAN:
        return x > vals[0] and not _close(x, vals[0])
    if k == ir.ConstraintKind.LESS_THAN:
        return x < vals[0] and not _close(x, vals[0])
    if k == ir.ConstraintKind.SET_OF:
        return any(_close(x, v) for v in vals)
    return False


def _text_ok(c: ir.Constraint, txt: str) -> bool:
    k = c.kind
    if k == ir.ConstraintKind.MATCHES:
        return _regex(str(c.values[0])).search(txt) is not None
    wanted = [source.header_text(v) for v in c.values]
    boolish = any(isinstance(v, bool) for v in c.values)
    norm = (lambda s: s.upper()) if boolish else (lambda s: s)
    if k == ir.ConstraintKind.EQUAL:
        return norm(txt) == norm(wanted[0])
    if k == ir.ConstraintKind.NOT_EQUAL:
        return norm(txt) != norm(wanted[0])
    if k == ir.ConstraintKind.SET_OF:
        return norm(txt) in {norm(w) for w in wanted}
    return False


def _is_numeric_constraint(c: ir.Constraint) -> bool:
    return c.kind != ir.ConstraintKind.MATCHES and all(
        isinstance(v, ir.Quantity) or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in c.values)


def _as_float(x: Any) -> Optional[float]:
    if isinstance(x, bool):
        return None
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _missing(raw: Any) -> bool:
    return raw is dicomio.MISSING or raw is None or raw == "" or raw == []


def _multi_ok(c: ir.Constraint, values: list[Any]) -> bool:
    """has / !has / has all / has any: each wanted value against the attribute's values (numbers by value)."""
    def equal(v: Any, w: ir.Value) -> bool:
        if isinstance(w, ir.Quantity):
            x = _as_float(v)
            return x is not None and _close(units.from_dicom(x, c.keyword), w.value)
        return dicomio.text(v).upper() == source.header_text(w).upper() if isinstance(w, bool) \
            else dicomio.text(v) == source.header_text(w)

    hits = [any(equal(v, w) for v in values) for w in c.values]
    k = c.kind
    if k == ir.ConstraintKind.CONTAINS:
        return hits[0]
    if k == ir.ConstraintKind.NOT_CONTAINS:
        return not hits[0]
    if k == ir.ConstraintKind.CONTAINS_ALL:
        return all(hits)
    return any(hits)


_MULTI = {ir.ConstraintKind.CONTAINS, ir.ConstraintKind.NOT_CONTAINS, ir.ConstraintKind.CONTAINS_ALL,
          ir.ConstraintKind.CONTAINS_ANY}


def evaluate_value(c: ir.Constraint, raw: Any) -> tuple[bool, Any, str]:
    """Check one raw header value (one frame's) against a constraint: (ok, actual canonical, detail)."""
    if c.kind == ir.ConstraintKind.PRESENT:
        return (not _missing(raw)), (None if _missing(raw) else dicomio.text(raw)), ("" if not _missing(raw) else "attribute missing")
    if c.measure == "count":
        n = 0 if _missing(raw) else len(dicomio.as_list(raw))
        ok = _numeric_ok(c, float(n))
        return ok, f"{n} value(s)", "" if ok else "out of constraint"
    if _missing(raw):
        if c.if_present:
            return True, None, "absent (constraint applies if present)"
        if c.kind == ir.ConstraintKind.NOT_CONTAINS:
            return True, None, ""
        return False, None, "attribute missing"
    values = dicomio.as_list(raw)
    if c.kind in _MULTI:
        ok = _multi_ok(c, values)
        return ok, "\\".join(dicomio.text(v) for v in values), "" if ok else "out of constraint"
    if c.index is not None:
        if c.index >= len(values):
            return False, None, f"attribute has {len(values)} value(s), no index {c.index}"
        values = [values[c.index]]
    if _is_numeric_constraint(c):
        nums = [_as_float(v) for v in values]
        if any(n is None for n in nums):
            return False, dicomio.text(raw), "not a number"
        canon = [units.from_dicom(n, c.keyword) for n in nums]
        ok = all(_numeric_ok(c, x) for x in canon)
        actual = canon[0] if len(canon) == 1 else canon
        return ok, actual, "" if ok else "out of constraint"
    # string constraints: the whole (backslash-joined) value first, e.g. ScanningSequence "GR\IR",
    # then each value of a multi-valued attribute on its own
    joined = "\\".join(dicomio.text(v) for v in values)
    if _text_ok(c, joined):
        return True, joined, ""
    if len(values) > 1 and c.kind in (ir.ConstraintKind.SET_OF, ir.ConstraintKind.MATCHES) \
            and all(_text_ok(c, dicomio.text(v)) for v in values):
        return True, joined, ""
    return False, joined, "out of constraint"


def _written_unit(c: ir.Constraint) -> Optional[tuple[float, str]]:
    """(canonical units per written unit, the unit) of the constraint's first value written in another unit
    than the canonical one (``60 min``, ``185 MBq``), so the actual value reads in the unit the protocol uses."""
    q = next((v for v in c.values if isinstance(v, ir.Quantity) and v.source_unit and v.source_value), None)
    if q is None or q.source_unit == q.unit or c.measure == "count":
        return None
    return q.value / q.source_value, q.source_unit


def _fmt_actual(c: ir.Constraint, actual: Any) -> str:
    if actual is None:
        return "absent" if c.if_present else "missing"
    unit = units.DICOM_UNITS.get(c.keyword, ("none", ""))[0]
    canon = units.CANONICAL.get(unit, "")
    written = _written_unit(c)
    if written is not None and isinstance(actual, (float, list)) and canon != "%":
        scale, shown = written
        vals = actual if isinstance(actual, list) else [actual]
        if all(isinstance(a, float) for a in vals):
            text = ", ".join(f"{a / scale:g}" for a in vals)
            return (f"[{text}]" if isinstance(actual, list) else text) + f" {shown}"
    if isinstance(actual, list):
        return "[" + ", ".join(f"{a:g}" if isinstance(a, float) else str(a) for a in actual) + "]" + (f" {canon}" if canon else "")
    if isinstance(actual, float):
        return f"{actual:g} {canon}".rstrip() if canon != "%" else f"{actual:g}%"
    return str(actual)


def evaluate_constraint(c: ir.Constraint, raw_values: Sequence[Any], *,
                        results: Optional[list[tuple[bool, Any, str]]] = None) -> dict[str, Any]:
    """One parameter row: every distinct raw value (per frame) must satisfy the constraint
    (or pass the evaluations already made, ``results``)."""
    if results is None:
        results = [evaluate_value(c, r) for r in raw_values] or [evaluate_value(c, dicomio.MISSING)]
    ok = all(r[0] for r in results)
    actuals = [r[1] for r in results]
    actual = actuals[0] if len(actuals) == 1 else actuals
    return {
        "parameter": source.parameter(c),
        "keyword": c.keyword,
        "index": c.index,
        "kind": c.kind.value,
        "expected": expected_text(c),
        "actual": actual,
        "actual_text": _fmt_actual(c, actual) if len(actuals) == 1 else "; ".join(_fmt_actual(c, a) for a in actuals),
        "ok": ok,
        "significance": c.significance.value,
        "modifiable": c.modifiable,
        # why it failed; for a row that holds, why it holds when that needs saying ('absent (… if present)')
        "detail": next((r[2] for r in results if not r[0]), next((r[2] for r in results if r[2]), "")),
    }


def verdict_of(rows: Iterable[dict[str, Any]]) -> str:
    """fail (error violated) > warn (warning violated) > pass; info violations do not change it."""
    v = "pass"
    for r in rows:
        if r.get("ok", True):
            continue
        sig = r.get("significance", r.get("severity"))
        if sig == "error":
            return "fail"
        if sig == "warning":
            v = "warn"
    return v


def _variant_info(var: Optional[ir.Variant], versions: Any = None) -> Optional[dict[str, Any]]:
    """A variant as the results name it; with the header's SoftwareVersions, how its software glob matched."""
    if var is None:
        return None
    info: dict[str, Any] = {"vendor": var.vendor, "model": var.model, "software": var.software}
    if var.site or var.device:  # a site or device variant: say which (it has no vendor)
        info.update({k: v for k, v in (("site", var.site), ("device", var.device)) if v})
    if var.software and versions is not None:
        info["software_match"] = describe_software_match(software_match(var.software, versions))
    return info


def select_constraints(protocol: ir.Protocol, ident: dict[str, Any], *, site: Optional[str] = None,
                       device: Optional[str] = None) -> tuple[list[ir.Constraint], Optional[ir.Variant]]:
    """The device's effective constraints, from the identity the header reports (and the inventory
    device it matched, for site and device variants)."""
    return ir.effective_constraints(protocol, normalize_vendor(ident.get("manufacturer")),
                                    ident.get("software") or None, ident.get("model") or None, site=site, device=device)


def _all_constraints(p: ir.Protocol) -> list[ir.Constraint]:
    """Every constraint of a protocol, its variants and 'when' blocks, conditions included."""
    out = list(p.constraints) + [c for v in p.variants for c in v.constraints]
    for w in list(p.conditionals) + [w for v in p.variants for w in v.conditionals]:
        out += [w.condition] + list(w.constraints)
    return out


def _constraint_tags(constraints: Iterable[ir.Constraint]) -> tuple[int, ...]:
    """The top-level elements a constraint reads: its keyword (and aliases), the first step of a path,
    a derived quantity's sources, a bare nested keyword's sequence, every slot of a private group."""
    from ..derived import DERIVED
    from ..nested import NESTED

    tags: set[int] = set()
    for c in constraints:
        first = c.path[0] if c.path else None
        if first is not None and first.tag:
            group = int(first.tag[1:5], 16)
            tags.update((group << 16) | b for b in range(0x10, 0x100))
            low = int(first.tag[-3:-1], 16)
            tags.update((group << 16) | (b << 8) | low for b in range(0x10, 0x100))
            continue
        kws = list(dicomio._keywords(first.keyword if first is not None else c.keyword))
        if c.keyword in DERIVED:
            kws += list(DERIVED[c.keyword].sources)
        kws += [home for table in NESTED.values() for k, (home, _) in table.items() if k == c.keyword]
        for kw in kws:
            t = tag_for_keyword(kw)
            if t is not None:
                tags.add(t)
    return tuple(sorted(tags))


def study_tags(trial: ir.Trial) -> tuple[int, ...]:
    """Every element any protocol or variant of the study constrains (for ``classify.scan`` fingerprints)."""
    cons = [c for p in trial.protocols for c in _all_constraints(p)]
    derived_from = {tag_for_keyword(kw) for kw in dicomio.DERIVED_FROM}  # classic values derived from Enhanced MR ones
    return tuple(sorted(set(_constraint_tags(cons)) | derived_from))


def _groups(headers: Sequence[Dataset], tags: tuple[int, ...]) -> list[tuple[Dataset, int]]:
    """(representative header, instance count) per distinct fingerprint; Enhanced objects stand alone."""
    groups: dict[Any, list[Dataset]] = {}
    for i, ds in enumerate(headers):
        fp = dicomio.fingerprint(ds, tags)
        groups.setdefault(fp if fp is not None else ("enhanced", i), []).append(ds)
    return [(g[0], len(g)) for g in groups.values()]


def _instance_groups(series: Any) -> list[tuple[Dataset, int]]:
    """The same from a ``classify.Series`` scanned with ``keep_headers=False``."""
    counts: dict[Any, int] = {}
    for inst in series.instances:
        if inst.fingerprint is not None:
            counts[inst.fingerprint] = counts.get(inst.fingerprint, 0) + 1
    return [(inst.header, counts[inst.fingerprint] if inst.fingerprint is not None else 1)
            for inst in series.instances if inst.header is not None]


class _Any(list):
    """The leaf values of a path with an ``[any]`` selector: one of them satisfying is enough."""


def _header_values(ds: Dataset, c: ir.Constraint, frame: Optional[int] = None) -> list[Any]:
    """The raw values one constraint reads from one header: one entry per frame (or per distinct
    frame value) for a plain keyword; for a path, its leaf values (an :class:`_Any` for ``[any]``)."""
    from ..derived import DERIVED, compute

    if c.path:
        frames = [frame] if frame is not None else (range(dicomio.frame_count(ds)) if _path_per_frame(ds, c) else [None])
        out = []
        for f in frames:
            leaves, mode = dicomio.path_values(ds, c.path, frame=f)
            if mode == "any":
                out.append(_Any(leaves))
            else:
                out.extend(leaves or [dicomio.MISSING])
        return out
    if c.keyword in DERIVED and not (c.keyword == "TemporalResolution" and "TemporalResolution" in ds):
        return [compute(c.keyword, ds, frame=frame)]
    vals = [dicomio.get_param(ds, c.keyword, frame=frame)] if frame is not None else dicomio.get_param_values(ds, c.keyword)
    if all(v is dicomio.MISSING for v in vals):
        home = dicomio.nested_home(c.keyword, dicomio.text(dicomio.get_param(ds, "Modality")))
        if home is not None:  # a bare keyword that lives in a sequence: where scanners put it
            leaves, _ = dicomio.path_values(ds, [ir.PathStep(keyword=home), ir.PathStep(keyword=c.keyword, item=c.index)])
            return leaves or [dicomio.MISSING]
    return vals


def _path_per_frame(ds: Dataset, c: ir.Constraint) -> bool:
    """Does the path start in the Per-frame Functional Groups (so each frame has its own value)?"""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if not per_frame or len(per_frame) < 2 or dicomio._step_elem(ds, c.path[0]) is not None:
        return False
    shared = ds.get("SharedFunctionalGroupsSequence")
    return not (shared and dicomio._step_elem(shared[0], c.path[0]) is not None)


def _eval_raw(c: ir.Constraint, raw: Any) -> tuple[bool, Any, str]:
    if isinstance(raw, _Any):
        results = [evaluate_value(c, r) for r in raw] or [evaluate_value(c, dicomio.MISSING)]
        return next((r for r in results if r[0]), results[0])
    return evaluate_value(c, raw)


def _row(c: ir.Constraint, reps: list[tuple[Dataset, int]], n: int, values_of) -> dict[str, Any]:
    """One parameter row from the distinct values ``values_of(ds)`` gives over the representatives."""
    distinct: list[Any] = []
    per_rep: list[tuple[list[Any], int]] = []
    for ds, count in reps:
        vals = values_of(ds)
        per_rep.append((vals, count))
        for raw in vals:
            if raw not in distinct:
                distinct.append(raw)
    results = [_eval_raw(c, r) for r in distinct] or [evaluate_value(c, dicomio.MISSING)]
    row = evaluate_constraint(c, [], results=results)
    if not row["ok"] and n > 1:
        bad = [r for r, res in zip(distinct, results) if not res[0]]
        row["instances_failing"] = sum(count for vals, count in per_rep if any(v in bad for v in vals))
    return row


def _conditional_rows(w: ir.Conditional, reps: list[tuple[Dataset, int]], n: int) -> list[dict[str, Any]]:
    """Rows of a 'when' block: its constraints on the frames (Enhanced) or instances where the condition holds."""
    selected: list[tuple[Dataset, int, Optional[int]]] = []
    for ds, count in reps:
        per_frame = ds.get("PerFrameFunctionalGroupsSequence")
        frames = range(len(per_frame)) if per_frame and len(per_frame) > 1 else [None]
        for f in frames:
            if all(_eval_raw(w.condition, r)[0] for r in _header_values(ds, w.condition, frame=f)):
                selected.append((ds, count, f))
    head = source.conditional(w, source.REPORT)
    rows = []
    for c in w.constraints:
        if not selected:  # the block holds, and the report says why (docs/language.md)
            row = evaluate_constraint(c, [], results=[(True, None, "no frame or instance satisfies the condition")])
            row["detail"] = "no frame or instance satisfies the condition"
        else:
            distinct: list[Any] = []
            for ds, _, f in selected:
                distinct += [r for r in _header_values(ds, c, frame=f) if r not in distinct]
            results = [_eval_raw(c, r) for r in distinct]
            row = evaluate_constraint(c, [], results=results)
            row["frames_selected"] = len(selected)
        row["parameter"] = f"{head}: {row['parameter']}"
        row["condition"] = head
        rows.append(row)
    return rows


def check_series(protocol: ir.Protocol, headers: Sequence[Dataset] | Any, ident: Optional[dict[str, Any]] = None,
                 *, site: Optional[str] = None, device: Optional[str] = None) -> dict[str, Any]:
    """Adherence of one series (all its instances) to a protocol.

    ``headers``: the instances' datasets, or a ``classify.Series`` from a scan. Instances whose
    constrained elements carry identical bytes are evaluated once: a series whose instances
    agree costs one evaluation, one that drifts is reported per value. ``site``/``device``: the
    inventory device the exam matched (site and device variants apply to it).
    """
    from_scan = hasattr(headers, "instances")
    first = headers.header if from_scan else (headers[0] if headers else None)
    if first is None:
        raise ValueError("a series has at least one instance")
    ident = ident or dicomio.device_identity(first)
    chain = ir.effective_chain(protocol, normalize_vendor(ident.get("manufacturer")), ident.get("software") or None,
                               ident.get("model") or None, site=site, device=device)
    constraints, variant = select_constraints(protocol, ident, site=site, device=device)
    conditionals = ir.effective_conditionals(protocol, chain)
    if from_scan:
        reps = _instance_groups(headers)
        n = len(headers.instances)
    else:
        reps = _groups(headers, _constraint_tags(constraints + [x for w in conditionals for x in [w.condition, *w.constraints]]))
        n = len(headers)
    rows = [_row(c, reps, n, lambda ds, c=c: _header_values(ds, c)) for c in constraints]
    for w in conditionals:
        rows += _conditional_rows(w, reps, n)
    return {
        "protocol": protocol.name,
        "variant": _variant_info(variant, ident.get("software") or []),
        "verdict": verdict_of(rows),
        "parameters": rows,
        "n_instances": n,
        "distinct_parameter_sets": len(reps),
    }


# --------------------------------------------------------------------------- devices

def match_device(trial: ir.Trial, ident: dict[str, Any]) -> Optional[dict[str, Any]]:
    """The inventory device an exam was acquired on: by serial, then station, then vendor+model."""
    serial = (ident.get("serial") or "").strip()
    station = (ident.get("station") or "").strip()
    model = (ident.get("model") or "").strip().lower()
    vendor = normalize_vendor(ident.get("manufacturer"))
    devices = trial.devices()
    if serial:
        for site, d in devices:
            if d.serial and d.serial.strip() == serial:
                return {"site": site.code, "device": d.id, "matched_by": "serial"}
    if station:
        for site, d in devices:
            if d.station and d.station.strip().lower() == station.lower():
                return {"site": site.code, "device": d.id, "matched_by": "station"}
    if model and vendor:
        hits = [(s, d) for s, d in devices if d.model and d.model.strip().lower() == model and d.vendor == vendor]
        # a serial that contradicts the inventory means another scanner of the same model
        hits = [(s, d) for s, d in hits if not (serial and d.serial and d.serial.strip() != serial)]
        if len(hits) == 1:
            return {"site": hits[0][0].code, "device": hits[0][1].id, "matched_by": "model"}
    return None


def software_agreement(inventory: Optional[str], versions: Sequence[str]) -> Optional[list[SoftwareMatch]]:
    """How a header's SoftwareVersions agrees with the inventory release, value by value, or None.

    The inventory may be written as the header writes it (``5.1.1\\5.1.1.0``) or as a release
    (``R5.7``, a glob, a GE release ``HD16.0_V02_1131.a``); a later build of the same release counts
    (each inventory value is also a prefix: ``R5.7`` agrees with ``R5.7.1``)."""
    if not inventory:
        return []
    if not versions:
        return None
    exact = software_match(inventory, list(versions))
    if exact is not None:
        return exact
    return software_match("\\".join(v + "*" for v in software_values(inventory)), list(versions))


def software_consistent(inventory: Optional[str], versions: Sequence[str]) -> bool:
    """Does a header's SoftwareVersions agree with the inventory release (e.g. 'R5.7' vs ['R5.7.1'])?"""
    return software_agreement(inventory, versions) is not None


def _device(trial: ir.Trial, device_id: str) -> tuple[Optional[ir.Site], Optional[ir.Device]]:
    return next(((s, d) for s, d in trial.devices() if d.id == device_id), (None, None))


def upgrade_coverage(trial: ir.Trial, device: ir.Device, versions: Sequence[str]) -> list[dict[str, Any]]:
    """Per protocol of the device's modality: does a variant cover the release the header reports?"""
    out = []
    for p in trial.protocols:
        if not device.acquires(p.modality):
            continue
        _, old = ir.effective_constraints(p, device.vendor, device.software, device.model)
        _, new = ir.effective_constraints(p, device.vendor, list(versions), device.model)
        if new is not None and new.software:
            covered = True
            why = (f"variant {new.vendor} software '{new.software}' covers it "
                   f"({describe_software_match(software_match(new.software, list(versions)))})")
        elif old is not None and old.software:
            covered = False
            why = (f"variant {old.vendor} software '{old.software}' no longer applies; "
                   + (f"falls back to variant {new.vendor}" if new is not None else "falls back to the base constraints"))
        else:
            covered, why = None, "no release-specific variant; the same constraints apply"
        out.append({"protocol": p.name, "covered": covered, "detail": why,
                    "variant_before": _variant_info(old), "variant_now": _variant_info(new, list(versions))})
    return out


def device_findings(trial: ir.Trial, ident: dict[str, Any]) -> tuple[Optional[dict[str, Any]], list[dict[str, Any]]]:
    """(matched device or None, findings) for an exam's reported device identity."""
    findings: list[dict[str, Any]] = []
    hit = match_device(trial, ident)
    desc = f"{ident.get('manufacturer') or '?'} {ident.get('model') or '?'} serial {ident.get('serial') or '?'} station {ident.get('station') or '?'}"
    if hit is None:
        findings.append({"code": "unknown_device", "severity": "error",
                         "message": f"device not in the study inventory: {desc}",
                         "device": None, "reported": ident})
        return None, findings
    site, dev = _device(trial, hit["device"])
    assert dev is not None
    if hit["matched_by"] != "serial" and ident.get("serial") and dev.serial and ident["serial"] != dev.serial:
        findings.append({"code": "device_serial_mismatch", "severity": "warning", "device": dev.id,
                         "message": f"matched {dev.id} by {hit['matched_by']}, but serial {ident['serial']} != inventory {dev.serial}"})
    versions = software_values(ident.get("software") or [])
    agreement = software_agreement(dev.software, versions)
    if agreement:  # how the inventory's release was recognised in the header (value, release or word)
        hit = {**hit, "software_match": describe_software_match(agreement)}
    if dev.software and agreement is None:
        shown = "\\".join(versions) or "(none)"
        cov = upgrade_coverage(trial, dev, versions)
        uncovered = [c["protocol"] for c in cov if c["covered"] is False]
        findings.append({
            "code": "software_upgrade", "severity": "warning", "device": dev.id,
            "message": (f"{dev.id}: SoftwareVersions {shown} differs from inventory "
                        f"'{dev.software}' (possible upgrade)"
                        + (f"; no variant covers the new release for {', '.join(uncovered)}" if uncovered else "")),
            "inventory": dev.software, "reported": list(versions), "coverage": cov,
            "requalify": bool(trial.qualification and trial.qualification.requalify_on_upgrade),
        })
    return hit, findings


def same_device_finding(trial: ir.Trial, device_id: Optional[str], prior: dict[str, Sequence[str]],
                        modalities: Iterable[str]) -> Optional[dict[str, Any]]:
    """The schedule's same-device rule against the subject's earlier exams, modality by modality
    (None when satisfied or not applicable): a same-day MR and CT of one subject are no device change."""
    rule = trial.schedule.same_device if trial.schedule else "none"
    if rule == "none" or device_id is None:
        return None
    changed = {m: sorted({d for d in prior.get(m, []) if d}) for m in sorted(set(modalities))}
    changed = {m: ds for m, ds in changed.items() if ds and device_id not in ds}
    if not changed:
        return None
    earlier = sorted({d for ds in changed.values() for d in ds})
    return {"code": "same_device", "severity": "error" if rule == "required" else "warning",
            "device": device_id, "prior_devices": earlier, "modalities": sorted(changed),
            "message": f"same-device rule ({rule}): {'/'.join(sorted(changed))} exam on {device_id}, "
                       f"earlier visits on {', '.join(earlier)}"}


# --------------------------------------------------------------------------- exams

def check_exam(trial: ir.Trial, classification: dict[str, Any], headers_by_series: dict[str, Any], *,
               prior_devices: Optional[dict[str, Sequence[str]]] = None, modalities: Iterable[str] = (),
               device: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Adherence of one exam: per matched series, plus device/software/same-device findings.

    ``headers_by_series``: series UID -> the instances' datasets, or the ``classify.Series`` of a
    scan (``classify.scan(..., keep_headers=False, fingerprint_tags=study_tags(trial))`` keeps one
    header per distinct parameter set, which is what large folders want).
    """
    first = next((h.header if hasattr(h, "instances") else h[0] for h in headers_by_series.values() if h), None)
    if device:  # the original headers' identity (site-side exam.json): de-identified headers may lack it
        ident = device
    else:
        ident = dicomio.device_identity(first) if first is not None else dict(classification.get("device") or {})
    hit, findings = device_findings(trial, ident) if ident else (None, [])
    sd = same_device_finding(trial, hit["device"] if hit else None, prior_devices or {}, modalities)
    if sd:
        findings.append(sd)
    series_out = []
    for entry in classification.get("series", []):
        if entry.get("status") != "matched":
            continue
        proto = trial.protocol(entry["protocol"])
        headers = headers_by_series.get(entry["series_uid"]) or []
        if proto is None or not headers:
            continue
        res = check_series(proto, headers, device or dicomio.device_identity(headers.header if hasattr(headers, "instances") else headers[0]),
                           site=hit["site"] if hit else None, device=hit["device"] if hit else None)
        if hit and not proto.applies_to(hit["site"], hit["device"]):
            findings.append({"code": "protocol_out_of_scope", "severity": "warning", "device": hit["device"],
                             "protocol": proto.name,
                             "message": f"protocol {proto.name} is for {_scope_text(proto.scope)}, "
                                        f"but series {entry.get('series_number') or entry['series_uid']} was acquired on "
                                        f"{hit['device']} at site {hit['site']}"})
        res.update({"series_uid": entry["series_uid"], "series_number": entry.get("series_number"),
                    "series_description": entry.get("series_description")})
        series_out.append(res)
    verdict = "pass"
    for v in [s["verdict"] for s in series_out] + [{"error": "fail", "warning": "warn"}.get(f["severity"], "pass") for f in findings]:
        if v == "fail":
            verdict = "fail"
            break
        if v == "warn":
            verdict = "warn"
    return {
        "device": ident, "device_match": hit, "findings": findings, "series": series_out, "verdict": verdict,
        "summary": {"series": len(series_out), "pass": sum(s["verdict"] == "pass" for s in series_out),
                    "warn": sum(s["verdict"] == "warn" for s in series_out),
                    "fail": sum(s["verdict"] == "fail" for s in series_out), "findings": len(findings)},
    }


def _scope_text(scope: Optional[ir.Scope]) -> str:
    if scope is None:
        return "every site"
    return ", ".join([f"site {s}" for s in scope.sites] + [f"device {d}" for d in scope.devices])


def headers_for(classification: dict[str, Any], root: Path, *, matched_only: bool = True) -> dict[str, list[Dataset]]:
    """Header-only reads of the files the classification lists, per series."""
    out: dict[str, list[Dataset]] = {}
    for entry in classification.get("series", []):
        if matched_only and entry.get("status") != "matched":
            continue
        hs = []
        for rel in entry.get("files", []):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    hs.append(dicomio.read_header(root / rel))
            except Exception:  # classification already vetted these; a vanished file is skipped, not fatal
                continue
        out[entry["series_uid"]] = hs
    return out


# --------------------------------------------------------------------------- schedule (subject level)

def _window(v: ir.Visit) -> tuple[float, float]:
    lo = v.offset.days - (v.window_before.days if v.window_before else 0.0)
    hi = v.offset.days + (v.window_after.days if v.window_after else 0.0)
    return min(lo, hi), max(lo, hi)


def visit_findings(trial: ir.Trial, exam_dates: Sequence[_dt.date], as_of: _dt.date) -> dict[str, Any]:
    """Which scheduled visits of one subject were received, are missing or out of window.

    The baseline is the exam date that places the most exams inside visit windows
    (earliest on ties), so a screening exam before baseline is recognized.
    """
    # an event-driven visit is never missing: it happens when its event does (imtrial assign --visit)
    visits = [v for v in trial.schedule.visits if v.scheduled()] if trial.schedule else []
    dates = sorted(set(exam_dates))
    if not visits or not dates:
        return {"baseline": None, "visits": [], "findings": []}
    base_off = next((v.offset.days for v in visits if v.kind == "baseline"), 0.0)

    def assign(baseline: _dt.date):
        got: dict[str, _dt.date] = {}
        stray = []
        for d in dates:
            rel = (d - baseline).days + base_off
            v = next((v for v in visits if v.name not in got and _window(v)[0] <= rel <= _window(v)[1]), None)
            if v is None:
                stray.append(d)
            else:
                got[v.name] = d
        return got, stray

    best = min(dates, key=lambda b: (len(assign(b)[1]), b))
    got, stray = assign(best)
    rows, findings = [], []
    for v in visits:
        lo, hi = _window(v)
        opens = best + _dt.timedelta(days=lo - base_off)
        closes = best + _dt.timedelta(days=hi - base_off)
        if v.name in got:
            status = "received"
        elif as_of > closes:
            status = "missing" if not v.optional else "skipped_optional"
        elif as_of >= opens:
            status = "window_open"
        else:
            status = "upcoming"
        rows.append({"visit": v.name, "status": status, "opens": opens.isoformat(), "closes": closes.isoformat(),
                     "date": got[v.name].isoformat() if v.name in got else None})
        if status == "missing":
            findings.append({"code": "missing_visit", "severity": "error", "visit": v.name,
                             "message": f"visit {v.name}: window {opens} .. {closes} closed, nothing received"})
    for d in stray:
        findings.append({"code": "out_of_window", "severity": "warning", "date": d.isoformat(),
                         "message": f"exam on {d} is inside no visit window"})
    return {"baseline": best.isoformat(), "visits": rows, "findings": findings}


# --------------------------------------------------------------------------- step

def _exam_json_device(exam: dict) -> Optional[dict[str, Any]]:
    """Device identity ingest recorded from the ORIGINAL headers (exam.json), or None."""
    dev = dict(exam.get("device") or {})
    if not dev:
        return None
    sw = dev.get("software")
    dev["software"] = [str(v).strip() for v in (sw if isinstance(sw, list) else str(sw).split("\\") if sw else [])]
    return {k: ("" if v is None else v) for k, v in dev.items()}


def adherence_step(ctx) -> dict:
    """Check every matched series against its protocol (variant by vendor/software) and the device rules."""
    from ..deid.results import scrub_device_identity
    from ..workdir import ADHERENCE, CLASSIFICATION
    from .classify import original_series

    cls = ctx.read_json(CLASSIFICATION, {})
    ident = ctx.identity
    headers = original_series(ctx)      # the original headers at the site, by de-identified series UID
    result = check_exam(ctx.trial, cls, headers, prior_devices=ident.get("prior_devices") or {},
                        modalities=ident.get("modalities") or [], device=_exam_json_device(ctx.exam_info))
    result = scrub_device_identity(result, ctx.exam_info)
    result["exam"] = ctx.key
    ctx.write_json(ADHERENCE, result)
    return {"verdict": result["verdict"], **result["summary"]}
