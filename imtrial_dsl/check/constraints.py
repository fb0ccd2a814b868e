"""Constraint values: text or number against the attribute's VR (E407), units (E401), empty ranges and
negative tolerances (E402), constraints on one attribute that cannot hold together (E403), regular
expressions (E408)."""
from __future__ import annotations

import re
from collections import defaultdict
from typing import Any, Optional

from .. import ir, source, units
from ..dicom_tables import NUMERIC_VRS
from .context import Context
from .names import keyword, vr_of

_NUMERIC_KINDS = {
    ir.ConstraintKind.RANGE_INCL, ir.ConstraintKind.RANGE_EXCL, ir.ConstraintKind.GREATER_OR_EQUAL,
    ir.ConstraintKind.LESS_OR_EQUAL, ir.ConstraintKind.GREATER_THAN, ir.ConstraintKind.LESS_THAN,
}


def _text(c: ir.Constraint) -> str:
    return source.text(c, source.MESSAGE)


# --------------------------------------------------------------------------- numeric feasibility

class _Feasible:
    """The set of numbers a list of constraints on one value allows: an interval, excluded points, a finite set."""

    def __init__(self) -> None:
        self.lo, self.lo_open = float("-inf"), False
        self.hi, self.hi_open = float("inf"), False
        self.excluded: set[float] = set()
        self.only: Optional[set[float]] = None
        self.strings_eq: Optional[set[str]] = None
        self.strings_ne: set[str] = set()

    def copy(self) -> "_Feasible":
        f = _Feasible()
        f.__dict__.update({k: (set(v) if isinstance(v, set) else v) for k, v in self.__dict__.items()})
        return f

    def lower(self, v: float, open_: bool) -> None:
        if v > self.lo or (v == self.lo and open_):
            self.lo, self.lo_open = v, open_

    def upper(self, v: float, open_: bool) -> None:
        if v < self.hi or (v == self.hi and open_):
            self.hi, self.hi_open = v, open_

    def inside(self, x: float) -> bool:
        lo_ok = x > self.lo or (x == self.lo and not self.lo_open)
        hi_ok = x < self.hi or (x == self.hi and not self.hi_open)
        return lo_ok and hi_ok and x not in self.excluded

    def empty(self) -> bool:
        if self.strings_eq is not None and not (self.strings_eq - self.strings_ne):
            return True
        if self.only is not None:
            return not any(self.inside(x) for x in self.only)
        if self.lo > self.hi:
            return True
        if self.lo == self.hi:
            return self.lo_open or self.hi_open or self.lo in self.excluded
        return False

    def add(self, c: ir.Constraint) -> bool:
        """Narrow by ``c``; False when ``c`` is not something this model understands (then it is ignored)."""
        nums = [v.value for v in c.values if isinstance(v, ir.Quantity)]
        strs = [v for v in c.values if isinstance(v, str)]
        k = c.kind
        if k == ir.ConstraintKind.MATCHES:
            return False
        if strs and not nums:
            if k == ir.ConstraintKind.EQUAL:
                self.strings_eq = {strs[0]} if self.strings_eq is None else self.strings_eq & {strs[0]}
            elif k == ir.ConstraintKind.SET_OF:
                self.strings_eq = set(strs) if self.strings_eq is None else self.strings_eq & set(strs)
            elif k == ir.ConstraintKind.NOT_EQUAL:
                self.strings_ne.add(strs[0])
            else:
                return False
            return True
        if not nums or len(nums) != len(c.values):
            return False
        if k == ir.ConstraintKind.EQUAL:
            v = nums[0]
            tol = 0.0
            if c.tolerance is not None:
                tol = abs(v) * c.tolerance.value / 100.0 if c.tolerance.relative else abs(c.tolerance.value)
            if tol:
                self.lower(v - tol, False)
                self.upper(v + tol, False)
            else:
                self.only = {v} if self.only is None else self.only & {v}
        elif k == ir.ConstraintKind.NOT_EQUAL:
            self.excluded.add(nums[0])
        elif k in (ir.ConstraintKind.RANGE_INCL, ir.ConstraintKind.RANGE_EXCL) and len(nums) == 2:
            open_ = k == ir.ConstraintKind.RANGE_EXCL
            self.lower(nums[0], open_)
            self.upper(nums[1], open_)
        elif k == ir.ConstraintKind.GREATER_OR_EQUAL:
            self.lower(nums[0], False)
        elif k == ir.ConstraintKind.GREATER_THAN:
            self.lower(nums[0], True)
        elif k == ir.ConstraintKind.LESS_OR_EQUAL:
            self.upper(nums[0], False)
        elif k == ir.ConstraintKind.LESS_THAN:
            self.upper(nums[0], True)
        elif k == ir.ConstraintKind.SET_OF:
            self.only = set(nums) if self.only is None else self.only & set(nums)
        else:
            return False
        return True


# --------------------------------------------------------------------------- checks

def regex(ctx: Context, node: Any, pattern: str) -> bool:
    try:
        re.compile(pattern)
        return True
    except re.error as exc:
        at = ""
        if exc.pos is not None:  # the failing character, shown in place: IR may come without source text
            at = f" at position {exc.pos}: \"{pattern[:exc.pos]}\" ▸ \"{pattern[exc.pos:]}\""
        ctx.error("E408", node, f"invalid regular expression \"{pattern}\": {exc.msg}{at}",
                  "patterns use Python syntax; escape special characters with a backslash")
        return False


_MULTI = {ir.ConstraintKind.CONTAINS, ir.ConstraintKind.NOT_CONTAINS, ir.ConstraintKind.CONTAINS_ALL,
          ir.ConstraintKind.CONTAINS_ANY, ir.ConstraintKind.PRESENT}


def _csa_field_ok(ctx: Context, st: ir.PathStep) -> bool:
    """E320: a named field inside a private element is read from a Siemens CSA header, so only the two CSA
    elements of creator 'SIEMENS CSA HEADER' have fields."""
    from ..csa import CREATOR, ELEMENTS

    if st.field is None:
        return True
    low = int(st.tag[-3:-1], 16)
    if (st.creator or "").strip() == CREATOR and st.tag[1:5] == "0029" and low in ELEMENTS:
        return True
    ctx.error("E320", st, f"'{st.field}' names a field inside private element {st.tag} of '{st.creator}', but only the "
              f"Siemens CSA headers have named fields",
              f'write private "{CREATOR}" (0029,xx10) "{st.field}" (CSA Image Header) or (0029,xx20) (CSA Series '
              f"Header), or drop the field name to read the element's own value")
    return False


def _path_ok(ctx: Context, c: ir.Constraint, where: str) -> bool:
    """Every keyword of a path is a DICOM keyword; the steps before the last are sequences (E317)."""
    ok = True
    for i, st in enumerate(c.path):
        if st.tag:
            ok = _csa_field_ok(ctx, st) and ok
            continue
        if not keyword(ctx, st, st.keyword, f"constraint of {where}"):
            ok = False
        elif i < len(c.path) - 1 and vr_of(st.keyword) != "SQ":
            ctx.error("E317", st, f"{st.keyword} is not a sequence (VR {vr_of(st.keyword)}), so '{source.parameter(c)}' "
                      "cannot step into it", "only sequences (VR SQ) have items to step into")
            ok = False
        elif i == len(c.path) - 1 and vr_of(st.keyword) == "SQ":
            ctx.error("E317", st, f"{st.keyword} is a sequence: constrain an attribute inside it",
                      f"e.g. {st.keyword}[0].<Keyword>")
            ok = False
    return ok


def constraints(ctx: Context, cons: list[ir.Constraint], where: str, modality: str = "") -> None:
    """Each constraint on its own, then those on one attribute together."""
    from ..derived import DERIVED
    from ..nested import NESTED

    by_key: dict[str, list[ir.Constraint]] = defaultdict(list)
    for c in cons:
        if c.path:
            if not _path_ok(ctx, c, where):
                continue
        elif c.keyword not in DERIVED and not keyword(ctx, c, c.keyword, f"constraint of {where}"):
            continue
        if not c.path and c.keyword in NESTED.get(modality.upper(), {}):
            seq, module = NESTED[modality.upper()][c.keyword]
            ctx.warning("W408", c, f"{c.keyword} occurs only inside {seq} in {modality} images (PS3.3 {module}); "
                        f"it is read from the sequence's items",
                        f"write {seq}[0].{c.keyword} (or [any] / [every]) to say which item")
        if not constraint(ctx, c):
            continue
        if c.measure == "value" and c.kind not in _MULTI and not c.if_present:
            by_key[source.parameter(c) if c.path else c.keyword].append(c)
    for group in by_key.values():
        contradictions(ctx, group)


def constraint(ctx: Context, c: ir.Constraint) -> bool:
    """Units, types and ranges of one constraint; False when it is too broken to reason about further."""
    ok = True
    if c.kind == ir.ConstraintKind.PRESENT:
        return True
    if c.measure == "count":  # the number of values: plain numbers
        for q in c.values:
            if not isinstance(q, ir.Quantity) or q.dimension != "none":
                ctx.error("E401", c, f"'{_text(c)}' counts values: write a plain number", "e.g. ImageType count >= 3")
                return False
        return True
    last = c.path[-1] if c.path else None
    dim_unit = units.DICOM_UNITS.get(c.keyword) if last is None or not last.tag else None
    vr = vr_of(c.keyword) if last is None or not last.tag else None
    numeric_vr = vr is not None and any(x in NUMERIC_VRS for x in vr.split(" or "))
    quantities = [v for v in c.values if isinstance(v, ir.Quantity)]
    strings = [v for v in c.values if isinstance(v, str)]
    if c.kind == ir.ConstraintKind.MATCHES:
        return all(regex(ctx, c, v) for v in strings)
    if quantities and vr is not None and not numeric_vr:
        ctx.error("E407", c, f"{c.keyword} is text (VR {vr}) but '{_text(c)}' compares a number",
                  f'quote the value, e.g. {c.keyword} = "..."')
        return False
    if strings and numeric_vr:
        ctx.error("E407", c, f"{c.keyword} is numeric (VR {vr}) but '{_text(c)}' compares text",
                  f"write a number{' with a unit, e.g. ' + units.CANONICAL[dim_unit[0]] if dim_unit and dim_unit[1] else ''}")
        return False
    if c.kind in _MULTI:
        return ok
    if strings and c.kind in _NUMERIC_KINDS:
        ctx.error("E407", c, f"'{_text(c)}' compares text with a numeric operator", "use = , != , in {…} or ~ for text")
        return False
    if dim_unit is not None:
        dim = dim_unit[0]
        for q in quantities:
            if q.dimension == dim:
                continue
            if dim == "none":
                ctx.error("E401", q, f"{c.keyword} has no unit but '{q.text()}' is {units.dimension_words(q.dimension)}",
                          f"write the number without a unit")
            elif q.dimension == "none":
                ctx.error("E401", q, f"{c.keyword} is {units.dimension_words(dim)} but '{q.text()}' has no unit",
                          f"write e.g. {q.text()} {dim_unit[1] or units.CANONICAL[dim]}")
            else:
                ctx.error("E401", q, f"unit mismatch: {c.keyword} is {units.dimension_words(dim)} but '{q.text()}' is {units.dimension_words(q.dimension)}",
                          f"use a {dim} unit such as {units.CANONICAL[dim]}")
            ok = False
        t = c.tolerance
        if t is not None and not t.relative and t.source_unit:
            tdim = units.dimension_of(t.source_unit)
            if tdim is not None and tdim != dim:
                ctx.error("E401", t, f"unit mismatch: tolerance '{t.source_value:g} {t.source_unit}' is {units.dimension_words(tdim)} "
                          f"but {c.keyword} is {units.dimension_words(dim)}", f"use a {dim} unit or a percentage")
                ok = False
    elif numeric_vr:
        written = [q for q in quantities if q.dimension != "none"]
        if written:
            # the header's number is compared with the canonical value: right only if DICOM stores that unit
            q = written[0]
            ctx.warning("W415", q, f"imtrial does not know the unit DICOM stores {c.keyword} in; '{q.text()}' is compared "
                        f"with the header's number as {q.value:g} {q.unit}",
                        f"write the number in the unit PS3.3 gives for {c.keyword} (or add it to units.DICOM_UNITS)")
    if c.tolerance is not None and c.tolerance.value < 0:
        ctx.error("E402", c.tolerance, f"negative tolerance in '{_text(c)}'", "a tolerance is a distance: write a positive value")
        ok = False
    if c.kind in (ir.ConstraintKind.RANGE_INCL, ir.ConstraintKind.RANGE_EXCL) and len(quantities) == 2 and ok:
        lo, hi = quantities
        if lo.value > hi.value:
            ctx.error("E402", c, f"empty range in '{_text(c)}': low end is above high end",
                      f"write {c.keyword} in {hi.text()} .. {lo.text()}")
            ok = False
        elif lo.value == hi.value and c.kind == ir.ConstraintKind.RANGE_EXCL:
            ctx.error("E402", c, f"empty range in '{_text(c)}': an exclusive range with equal ends holds no value",
                      f"write {c.keyword} = {lo.text()} for one exact value")
            ok = False
    return ok


def contradictions(ctx: Context, group: list[ir.Constraint]) -> None:
    by_index: dict[Optional[int], list[ir.Constraint]] = defaultdict(list)
    for c in group:
        by_index[c.index].append(c)
    common = by_index.pop(None, [])
    slots = [common] + [common + cs for cs in by_index.values()] if by_index else [common]
    reported: set[int] = set()
    for slot in slots:
        slot = sorted(slot, key=lambda c: (c.span.line, c.span.col) if c.span else (0, 0))
        feas = _Feasible()
        seen: list[ir.Constraint] = []
        for c in slot:
            trial_f = feas.copy()
            if not trial_f.add(c):
                continue
            if trial_f.empty():
                if id(c) not in reported:
                    reported.add(id(c))
                    if seen:
                        others = "', '".join(_text(s) for s in seen)
                        ctx.error("E403", c, f"contradictory constraints: '{_text(c)}' cannot hold together with '{others}'",
                                  "keep one constraint per attribute, or make the ranges overlap")
                    else:
                        ctx.error("E402", c, f"'{_text(c)}' allows no value", "check the values")
                continue
            feas = trial_f
            seen.append(c)
