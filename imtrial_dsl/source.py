"""IR values and constraints written back in the language's own syntax.

One renderer for everything that shows a constraint the way an author writes it:
imported e-protocols printed as ``.imtrial``, adherence reports' "expected" column.
"""
from __future__ import annotations

from typing import Callable, Sequence

from . import ir


def quote(s: str) -> str:
    """A string literal of the language (backslashes and quotes escaped)."""
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def plain_quote(s: str) -> str:
    """A string as a reader sees it in a report (no escapes)."""
    return f'"{s}"'


def value(v: ir.Value, q: Callable[[str], str] = quote) -> str:
    if isinstance(v, ir.Quantity):
        return v.text()
    if isinstance(v, bool):
        return "yes" if v else "no"
    return q(str(v))


def tolerance(c: ir.Constraint) -> str:
    """' ± 1%' / ' ± 10 ms' for an EQUAL constraint with a tolerance, else ''."""
    t = c.tolerance
    if t is None:
        return ""
    if t.relative:
        return f" ± {t.value:g}%"
    v0 = c.values[0] if c.values else None
    tv = t.source_value if t.source_value is not None else t.value
    tu = t.source_unit if t.source_unit is not None else (v0.unit if isinstance(v0, ir.Quantity) else "")
    return f" ± {tv:g} {tu}".rstrip()


def range_text(vals: Sequence[ir.Value], q: Callable[[str], str] = quote) -> str:
    """'2 .. 3.5 ms' (one unit for both ends when they share it)."""
    lo, hi = vals[0], vals[1]
    if isinstance(lo, ir.Quantity) and isinstance(hi, ir.Quantity):
        lu = lo.source_unit if lo.source_unit is not None else lo.unit
        hu = hi.source_unit if hi.source_unit is not None else hi.unit
        lv = lo.source_value if lo.source_value is not None else lo.value
        if lu == hu:
            return f"{lv:g} .. {hi.text()}"
    return f"{value(lo, q)} .. {value(hi, q)}"


_OPS = {ir.ConstraintKind.GREATER_OR_EQUAL: ">=", ir.ConstraintKind.LESS_OR_EQUAL: "<=",
        ir.ConstraintKind.GREATER_THAN: ">", ir.ConstraintKind.LESS_THAN: "<", ir.ConstraintKind.NOT_EQUAL: "!="}


def rhs(c: ir.Constraint, q: Callable[[str], str] = quote, exclusive: str = "exclusive") -> str:
    """The constraint after its keyword: '= 2300 ms ± 1%', 'in 2 .. 3.5 ms', 'in {"GR", "IR"}', '~ "t1"'."""
    k, vals = c.kind, c.values
    if k == ir.ConstraintKind.EQUAL:
        return f"= {value(vals[0], q)}{tolerance(c)}"
    if k in (ir.ConstraintKind.RANGE_INCL, ir.ConstraintKind.RANGE_EXCL):
        return f"in {range_text(vals, q)}" + (f" {exclusive}" if k == ir.ConstraintKind.RANGE_EXCL else "")
    if k == ir.ConstraintKind.SET_OF:
        return "in {" + ", ".join(value(v, q) for v in vals) + "}"
    if k == ir.ConstraintKind.MATCHES:
        return f"~ {q(str(vals[0]))}"
    return f"{_OPS[k]} {value(vals[0], q)}"


def constraint(c: ir.Constraint) -> str:
    """A whole constraint statement, modifiers included, as the formatter would lay it out."""
    lhs = c.keyword + (f"[{c.index}]" if c.index is not None else "")
    tail = ""
    if c.significance != ir.Significance.ERROR:
        tail += f"   severity {c.significance.value}"
    if c.modifiable:
        tail += "   modifiable"
    if c.note:
        tail += f"   note {quote(c.note)}"
    return f"{lhs} {rhs(c)}{tail}"
