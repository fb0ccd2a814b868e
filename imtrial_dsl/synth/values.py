"""Header values for one constraint: a raw DICOM value that satisfies it, or one clearly outside it."""
from __future__ import annotations

import math
import re
from typing import Any, Optional

from pydicom.datadict import dictionary_VR

from .. import ir, source, units
from ..dicom_tables import INTEGER_VRS
from ..runner import dicomio
from ..runner.adherence import evaluate_value


def regex_example(pattern: str) -> Optional[str]:
    """A string that ``re.search``-matches a simple pattern (first alternative, literals kept)."""
    p = re.sub(r"^\(\?[a-zA-Z]+\)", "", pattern)
    # innermost groups first: each becomes its first alternative
    inner = re.compile(r"(?<!\\)\((?:\?:)?([^()]*)(?<!\\)\)")
    while inner.search(p):
        p = inner.sub(lambda m: m.group(1).split("|")[0], p)
    depth, cut = 0, len(p)
    for i, ch in enumerate(p):
        if ch == "(" and (i == 0 or p[i - 1] != "\\"):
            depth += 1
        elif ch == ")" and (i == 0 or p[i - 1] != "\\"):
            depth -= 1
        elif ch == "|" and depth == 0:
            cut = i
            break
    p = p[:cut].strip("^$")
    p = re.sub(r"\[([^\]\\])[^\]]*\]", r"\1", p)
    p = p.replace("\\d", "1").replace("\\s", " ").replace("\\w", "a").replace(".*", "").replace(".+", "x")
    p = re.sub(r"\{\d+(,\d*)?\}", "", p)
    p = re.sub(r"(?<!\\)[()?*+]", "", p).replace("|", "")
    p = re.sub(r"(?<!\\)\.", "x", p)
    p = re.sub(r"\\(.)", r"\1", p)
    try:
        return p if re.search(pattern, p) else None
    except re.error:
        return None


def _dicom(c: ir.Constraint, canonical: float) -> float:
    return round(units.to_dicom(canonical, c.keyword), 6)


def _num(v: ir.Value) -> float:
    return float(v.value) if isinstance(v, ir.Quantity) else float(v)


def _integral(c: ir.Constraint, raw: Any) -> Any:
    """Integer-valued attributes (IS, US, …) get the nearest integer that still satisfies ``c``."""
    try:
        vr = dictionary_VR(c.keyword)
    except (KeyError, ValueError):  # a private element's tag text or a derived quantity: no dictionary VR
        return raw
    if vr not in INTEGER_VRS or not isinstance(raw, (int, float)):
        return raw
    for cand in (round(raw), math.floor(raw), math.ceil(raw)):
        if evaluate_value(c, int(cand))[0]:
            return int(cand)
    return int(round(raw))


def satisfying_value(c: ir.Constraint, default: Any = dicomio.MISSING) -> Any:
    """A raw header value that satisfies ``c`` (the default when it already does)."""
    if default is not dicomio.MISSING and evaluate_value(c, default)[0]:
        return default
    k, vals = c.kind, c.values
    if k in _MULTI or k == ir.ConstraintKind.PRESENT or c.measure == "count":
        return _multi_value(c, default)
    if k == ir.ConstraintKind.MATCHES:
        return regex_example(str(vals[0])) or str(vals[0])
    if any(isinstance(v, str) for v in vals):
        if k == ir.ConstraintKind.NOT_EQUAL:
            return "OTHER"
        first = str(vals[0])
        return first.split("\\") if "\\" in first else first
    if any(isinstance(v, bool) for v in vals):
        return source.header_text(vals[0])
    n = [_num(v) for v in vals]
    if k == ir.ConstraintKind.EQUAL or k == ir.ConstraintKind.SET_OF:
        x = n[0]
    elif k in (ir.ConstraintKind.RANGE_INCL, ir.ConstraintKind.RANGE_EXCL):
        x = (n[0] + n[1]) / 2
    elif k in (ir.ConstraintKind.GREATER_OR_EQUAL, ir.ConstraintKind.GREATER_THAN):
        x = n[0] * 1.1 if n[0] > 0 else n[0] + 1
    elif k in (ir.ConstraintKind.LESS_OR_EQUAL, ir.ConstraintKind.LESS_THAN):
        x = n[0] * 0.85 if n[0] > 0 else n[0] - 1
    elif k == ir.ConstraintKind.NOT_EQUAL:
        x = n[0] * 1.2 + 1
    else:
        x = n[0]
    raw = _integral(c, _dicom(c, x))
    if c.index is not None or isinstance(default, list):
        base = list(default) if isinstance(default, list) else [raw] * (c.index + 1)
        if c.index is None:
            return [raw] * len(base)
        base = base + [raw] * (c.index + 1 - len(base))
        if c.keyword == "PixelSpacing":  # square pixels
            return [raw] * len(base)
        base[c.index] = raw
        return base
    return raw


_MULTI = (ir.ConstraintKind.CONTAINS, ir.ConstraintKind.NOT_CONTAINS, ir.ConstraintKind.CONTAINS_ALL,
          ir.ConstraintKind.CONTAINS_ANY)


def _multi_value(c: ir.Constraint, default: Any) -> Any:
    """has / !has / has all / has any / present / count: the default's values with what is asked added or
    taken out (so ImageType keeps the vendor's other values)."""
    have = [] if default is dicomio.MISSING or default is None else list(dicomio.as_list(default))
    want = [source.header_text(v) if not isinstance(v, ir.Quantity) else _dicom(c, v.value) for v in c.values]
    k = c.kind
    if c.measure == "count":
        lo = {ir.ConstraintKind.GREATER_THAN: 1, ir.ConstraintKind.NOT_EQUAL: 1}.get(k, 0)
        n = max(int(math.ceil(_num(c.values[0]))) + lo, 0) if c.values else len(have)
        while not evaluate_value(c, (have + [have[-1] if have else "1"] * n)[:n] if n else dicomio.MISSING)[0] and n < 64:
            n += 1
        return (have + [have[-1] if have else "1"] * n)[:n]
    if k == ir.ConstraintKind.PRESENT:
        return have or "1"
    if k == ir.ConstraintKind.NOT_CONTAINS:
        have = [v for v in have if dicomio.text(v) != want[0]]
    elif k == ir.ConstraintKind.CONTAINS_ANY:
        have = have + ([] if any(dicomio.text(v) in want for v in have) else want[:1])
    else:
        have = have + [w for w in want if w not in [dicomio.text(v) for v in have]]
    return have if len(have) != 1 else have[0]


def violating_value(c: ir.Constraint, current: Any) -> Optional[Any]:
    """A raw value clearly outside a numeric constraint (for the ``param_off`` deviation)."""
    if not all(isinstance(v, ir.Quantity) for v in c.values):
        return None
    n = [_num(v) for v in c.values]
    k = c.kind
    if k == ir.ConstraintKind.EQUAL:
        tol = 0.0
        if c.tolerance:
            tol = abs(n[0]) * c.tolerance.value / 100 if c.tolerance.relative else c.tolerance.value
        x = n[0] + max(3 * tol, 0.25 * abs(n[0]), 1.0)
    elif k in (ir.ConstraintKind.RANGE_INCL, ir.ConstraintKind.RANGE_EXCL):
        x = n[1] + max(0.5 * (n[1] - n[0]), 0.1 * abs(n[1]), 0.5)
    elif k in (ir.ConstraintKind.GREATER_OR_EQUAL, ir.ConstraintKind.GREATER_THAN):
        x = n[0] * 0.5 if n[0] > 0 else n[0] - 10
    elif k in (ir.ConstraintKind.LESS_OR_EQUAL, ir.ConstraintKind.LESS_THAN):
        x = n[0] * 1.5 + 1
    elif k == ir.ConstraintKind.SET_OF:
        x = max(n) + 1
    else:
        return None
    raw = _dicom(c, x)
    if c.index is not None:
        base = list(current) if isinstance(current, list) else [raw] * (c.index + 1)
        base[c.index] = raw
        return base
    return [raw] * len(current) if isinstance(current, list) else raw
