"""IR values and constraints as text: the one renderer, in each style a reader needs.

- :data:`SOURCE`: the language's own syntax (``imtrial import eprotocol`` prints ``.imtrial``);
- :data:`REPORT`: that syntax with plain quotes, for adherence reports' "expected" column;
- :data:`MESSAGE`: the same for diagnostics that quote a constraint, each range end with its unit;
- :data:`PROSE`: the plain-language requirement of e-protocols and scanner cards ('at least 20 ms');
- :data:`DOCUMENT`: the requirement column of the charter and site manual ('≥ 20 ms'); the docs
  exporter gives it its Markdown quoting.

Tolerances and accepted intervals (:func:`tolerance_amount`, :func:`accepted_interval`) are shared
by every style, so a number reads the same wherever it is shown.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Optional

from . import ir

_K = ir.ConstraintKind


def quote(s: str) -> str:
    """A string literal of the language (backslashes and quotes escaped)."""
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def plain_quote(s: str) -> str:
    """A string as a reader sees it in a report (no escapes)."""
    return f'"{s}"'


def value(v: ir.Value, q: Callable[[str], str] = quote) -> str:
    """'2.3 s', 'yes', and text through ``q`` (default: a string literal of the language)."""
    if isinstance(v, ir.Quantity):
        return v.text()
    if isinstance(v, bool):
        return "yes" if v else "no"
    return q(str(v))


def _written_unit(v: ir.Quantity) -> str:
    return v.source_unit if v.source_unit is not None else v.unit


def values_text(values) -> str:
    """A multi-valued header value as people read it: ``R6.7.1 / R6.7.1.2``. DICOM stores the values
    separated by a backslash (and the state database keeps them so); a report or message never shows it."""
    if isinstance(values, str):
        values = values.split("\\")
    return " / ".join(str(v).strip() for v in values if str(v).strip())


def header_text(v: ir.Value) -> str:
    """A value as a DICOM header writes it, padding aside: code strings YES/NO, numbers canonical."""
    if isinstance(v, bool):
        return "YES" if v else "NO"
    if isinstance(v, ir.Quantity):
        return f"{v.value:g}"
    return str(v).strip()


def step(s: ir.PathStep) -> str:
    """One path step as written: 'RadiopharmaceuticalInformationSequence[0]', 'private "GEMS_PARM_01" (0043,xx39)',
    'private "SIEMENS CSA HEADER" (0029,xx10) "B_value"'."""
    head = (f"private {quote(s.creator or '')} {s.tag}" + (f" {quote(s.field)}" if s.field else "")) if s.tag else (s.keyword or "")
    return head + (f"[{s.item}]" if s.item is not None else "")


def parameter(c: ir.Constraint) -> str:
    """The constrained attribute as written: 'EchoTime', 'PixelSpacing[0]', 'Seq[0].Keyword'."""
    if c.path:
        return ".".join(step(s) for s in c.path)
    return c.keyword + (f"[{c.index}]" if c.index is not None else "")


# --------------------------------------------------------------------------- tolerances

def tolerance_abs(c: ir.Constraint) -> Optional[float]:
    """The tolerance of a numeric EQUAL as a distance in the canonical unit (None without one)."""
    if c.tolerance is None or not c.values or not isinstance(c.values[0], ir.Quantity):
        return None
    nominal = c.values[0].value
    return abs(nominal) * c.tolerance.value / 100.0 if c.tolerance.relative else c.tolerance.value


def tolerance_amount(c: ir.Constraint) -> str:
    """'1%', '0.05 MHz' (as the author wrote it, else in the canonical unit); '' without a tolerance."""
    t = c.tolerance
    if t is None:
        return ""
    if t.relative:
        return f"{t.value:g}%"
    if t.source_value is not None and t.source_unit:
        return f"{t.source_value:g} {t.source_unit}"
    v0 = c.values[0] if c.values else None
    return ir.Quantity(value=t.value, unit=v0.unit if isinstance(v0, ir.Quantity) else "").text()


def accepted_interval(c: ir.Constraint, *, written: bool = False) -> str:
    """What EQUAL ± tolerance accepts: '2277 ms – 2323 ms' in the canonical unit, or with ``written``
    in the author's unit, named once ('2.277 – 2.323 s'); '' when the constraint has no numeric tolerance."""
    tol = tolerance_abs(c)
    if tol is None or c.kind != _K.EQUAL:
        return ""
    q, t = c.values[0], c.tolerance
    if not written:
        lo, hi = (ir.Quantity(value=x, unit=q.unit).text() for x in (q.value - tol, q.value + tol))
        return f"{lo} – {hi}"
    nominal = q.source_value if q.source_value is not None else q.value
    # relative: a share of the written value; absolute: the canonical distance scaled to the written unit
    delta = abs(nominal) * t.value / 100.0 if t.relative else t.value * (nominal / q.value if q.value else 1.0)
    return f"{round(nominal - delta, 6):g} – {round(nominal + delta, 6):g} {_written_unit(q)}".strip()


def _with_tolerance(c: ir.Constraint) -> str:
    return f" ± {tolerance_amount(c)}" if c.tolerance is not None else ""


def _with_accepted(c: ir.Constraint) -> str:
    return f" ± {tolerance_amount(c)} ({accepted_interval(c)})" if tolerance_abs(c) is not None else ""


# --------------------------------------------------------------------------- styles

@dataclass(frozen=True)
class Style:
    """One way of writing a constraint. ``forms`` holds a template per kind, with the fields
    {v} (the value), {lo} {hi} (range ends), {vs} (a set, comma-separated), {pattern}, {tol}."""

    forms: Mapping[ir.ConstraintKind, str]
    quote: Callable[[str], str]
    #: how a MATCHES pattern is shown (None: like any text, through ``quote``)
    pattern: Optional[Callable[[str], str]] = None
    #: range ends written in the same unit name it once, on the high end ('2 .. 3.5 ms'), when this holds
    shares_unit: Callable[[str], bool] = lambda unit: False
    tolerance: Callable[[ir.Constraint], str] = _with_tolerance
    #: how a constraint on the number of values starts
    count: str = "count "


_SYNTAX = {
    _K.EQUAL: "= {v}{tol}", _K.NOT_EQUAL: "!= {v}", _K.RANGE_INCL: "in {lo} .. {hi}",
    _K.RANGE_EXCL: "in {lo} .. {hi} exclusive", _K.GREATER_OR_EQUAL: ">= {v}", _K.LESS_OR_EQUAL: "<= {v}",
    _K.GREATER_THAN: "> {v}", _K.LESS_THAN: "< {v}", _K.SET_OF: "in {{{vs}}}", _K.MATCHES: "~ {pattern}",
    _K.CONTAINS: "has {v}", _K.NOT_CONTAINS: "!has {v}", _K.CONTAINS_ALL: "has all {{{vs}}}",
    _K.CONTAINS_ANY: "has any {{{vs}}}", _K.PRESENT: "present",
}
_MULTI_PROSE = {_K.CONTAINS: "includes {v}", _K.NOT_CONTAINS: "does not include {v}", _K.CONTAINS_ALL: "includes all of {vs}",
                _K.CONTAINS_ANY: "includes one of {vs}", _K.PRESENT: "present"}

SOURCE = Style(_SYNTAX, quote, shares_unit=lambda unit: True)
REPORT = Style({**_SYNTAX, _K.RANGE_EXCL: "in {lo} .. {hi} (exclusive)"}, plain_quote, shares_unit=lambda unit: True)
MESSAGE = Style(_SYNTAX, plain_quote)
PROSE = Style({
    _K.EQUAL: "{v}{tol}", _K.NOT_EQUAL: "not {v}", _K.RANGE_INCL: "between {lo} and {hi} (inclusive)",
    _K.RANGE_EXCL: "strictly between {lo} and {hi}", _K.GREATER_OR_EQUAL: "at least {v}", _K.LESS_OR_EQUAL: "at most {v}",
    _K.GREATER_THAN: "more than {v}", _K.LESS_THAN: "less than {v}", _K.SET_OF: "one of {vs}",
    _K.MATCHES: "matches the pattern /{pattern}/", **_MULTI_PROSE,
}, plain_quote, pattern=str, tolerance=_with_accepted, count="number of values: ")
DOCUMENT = Style({
    _K.EQUAL: "= {v}", _K.NOT_EQUAL: "≠ {v}", _K.RANGE_INCL: "{lo} – {hi} (inclusive)",
    _K.RANGE_EXCL: "between {lo} and {hi} (exclusive)", _K.GREATER_OR_EQUAL: "≥ {v}", _K.LESS_OR_EQUAL: "≤ {v}",
    _K.GREATER_THAN: "> {v}", _K.LESS_THAN: "< {v}", _K.SET_OF: "one of {vs}", _K.MATCHES: "matches {pattern}",
    **_MULTI_PROSE,
}, str, shares_unit=lambda unit: unit != "%", count="number of values ")


def rhs(c: ir.Constraint, style: Style = SOURCE) -> str:
    """The constraint after its attribute: '= 2300 ms ± 1%', 'in 2 .. 3.5 ms', 'in {"GR", "IR"}', '~ "t1"'."""
    vals = c.values
    fields = {"tol": style.tolerance(c)}
    if c.kind == _K.MATCHES:
        fields["pattern"] = (style.pattern or style.quote)(str(vals[0]))
    elif c.kind in (_K.RANGE_INCL, _K.RANGE_EXCL):
        lo, hi = vals[0], vals[1]
        if (isinstance(lo, ir.Quantity) and isinstance(hi, ir.Quantity)
                and _written_unit(lo) == _written_unit(hi) and style.shares_unit(_written_unit(lo))):
            fields["lo"] = f"{lo.source_value if lo.source_value is not None else lo.value:g}"
        else:
            fields["lo"] = value(lo, style.quote)
        fields["hi"] = value(hi, style.quote)
    elif c.kind in (_K.SET_OF, _K.CONTAINS_ALL, _K.CONTAINS_ANY):
        fields["vs"] = ", ".join(value(v, style.quote) for v in vals)
    elif vals:
        fields["v"] = value(vals[0], style.quote)
    out = style.forms[c.kind].format(**fields)
    if c.measure == "count":
        out = style.count + out
    return out


def text(c: ir.Constraint, style: Style = SOURCE) -> str:
    """Attribute and constraint: 'EchoTime in 2 .. 3 ms' (MESSAGE: 'EchoTime in 2 ms .. 3 ms')."""
    return f"{parameter(c)} {rhs(c, style)}"


def conditional(w: ir.Conditional, style: Style = SOURCE) -> str:
    """The head of a 'when' block: 'when DiffusionBValue = 2500 s/mm2'."""
    return f"when {text(w.condition, style)}"


def constraint(c: ir.Constraint) -> str:
    """A whole constraint statement, modifiers included, as the formatter would lay it out."""
    tail = ""
    if c.significance != ir.Significance.ERROR:
        tail += f"   severity {c.significance.value}"
    if c.modifiable:
        tail += "   modifiable"
    if c.if_present:
        tail += "   if present"
    if c.note:
        tail += f"   note {quote(c.note)}"
    return f"{text(c, SOURCE)}{tail}"


# --------------------------------------------------------------------------- reads and document control

def _num(v: float) -> str:
    return f"{v:g}"


def read(r: ir.Read) -> str:
    """A ``read`` block in the language's syntax (``lower ∘ parse`` gives ``r`` back, spans aside)."""
    lines = [f"read {r.name}" + (f" {quote(r.title)}" if r.title else "") + " {"]
    if r.protocols:
        lines.append("  images " + ", ".join(p.name for p in r.protocols))
    if r.timepoints:
        lines.append("  timepoints " + ", ".join(t.name for t in r.timepoints))
    lines.append(f"  readers {r.readers}" + (f" adjudicators {r.adjudicators}" if r.adjudicators else ""))
    lines.append(f"  paradigm {r.paradigm}")
    if r.adjudicate_on:
        lines.append("  adjudicate when " + ", ".join(r.adjudicate_on)
                     + (f" {quote(r.adjudication_rule)}" if r.adjudication_rule else ""))
    if r.criteria:
        lines.append(f"  criteria {r.criteria}" + (f" {quote(r.criteria_name)}" if r.criteria_name else ""))
    for key in ("qualification", "training", "display", "unevaluable", "lock"):
        if getattr(r, key):
            lines.append(f"  {key} {quote(getattr(r, key))}")
    if r.blinded_to:
        lines.append("  blinded to " + ", ".join(r.blinded_to))
    for w in r.windows:
        lines.append(f"  window {w.name} {_num(w.level)} {_num(w.width)}")
    v = r.variability
    if v is not None:
        lines.append(f"  variability {v.metric} {v.op} {_num(v.threshold)}" + (f" action {quote(v.action)}" if v.action else ""))
    lines.append("}")
    return "\n".join(lines) + "\n"


def changelog(log: ir.Changelog) -> str:
    """A ``changelog`` block in the language's syntax."""
    lines = ["changelog {"]
    for e in log.entries:
        lines.append(f"  version {quote(e.version)} date {e.date} {quote(e.description)}")
    for a in log.approvers:
        lines.append(f"  approver {quote(a.title)}" + (f" {quote(a.name)}" if a.name else ""))
    lines.append("}")
    return "\n".join(lines) + "\n"
