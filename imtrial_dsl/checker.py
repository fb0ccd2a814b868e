"""Semantic checks on a lowered trial: every problem at once, each with a span, a message and a hint.

Codes: E3xx names (undefined, duplicate, unknown), E4xx semantics, W4xx warnings.
Every code is documented in ``docs/diagnostics.md``. The checker never raises
for a well-typed IR; it only reads the IR, never the syntax tree.
"""
from __future__ import annotations

import json
import re
import string
from collections import defaultdict
from typing import Any, Iterable, Optional, get_args

from . import ir, units
from .deid.plan import resolve_action
from .diagnostics import Diagnostic, Severity, Span, did_you_mean
from .matchsets import Term, alphabet_for, common_string
from .qc_metrics import QC_METRICS
from .vendors import software_matches


SUBJECT_FIELDS = {"site", "seq", "check", "study"}
NUMERIC_VRS = {"DS", "IS", "US", "SS", "UL", "SL", "FL", "FD", "UV", "SV", "OF", "OD"}
_NUMERIC_KINDS = {
    ir.ConstraintKind.RANGE_INCL, ir.ConstraintKind.RANGE_EXCL, ir.ConstraintKind.GREATER_OR_EQUAL,
    ir.ConstraintKind.LESS_OR_EQUAL, ir.ConstraintKind.GREATER_THAN, ir.ConstraintKind.LESS_THAN,
}
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_TAG = re.compile(r"\(([0-9A-Fa-fx]{4}),([0-9A-Fa-fx]{4})\)\Z")
_DEID_OPTIONS = [o.value for o in ir.DeidOption]

# ImageType value 1 is ORIGINAL or DERIVED, value 2 PRIMARY or SECONDARY (PS3.3 C.7.6.1.1.2).
_EXCLUSIVE_IMAGE_TYPE = ({"ORIGINAL", "DERIVED"}, {"PRIMARY", "SECONDARY"})
_MODES = {"has": (), "search": ("search", "full"), "full": ("full",), "equal": ("equal",), "not": ("search",)}
_keyword_cache: Optional[dict[str, list]] = None


def _dicom_keywords() -> dict[str, list]:
    """DICOM keyword -> [tag, VR], from the generated table (scripts/gen_dicom_keywords.py)."""
    global _keyword_cache
    if _keyword_cache is None:
        from importlib import resources

        text = resources.files("imtrial_dsl").joinpath("data/dicom_keywords.json").read_text()
        _keyword_cache = json.loads(text)["keywords"]
    return _keyword_cache


def _vr(keyword: str) -> Optional[str]:
    entry = _dicom_keywords().get(keyword)
    return entry[1] if entry else None


# --------------------------------------------------------------------------- text of IR values for messages

def _vtext(v: Any) -> str:
    if isinstance(v, ir.Quantity):
        return v.text()
    if isinstance(v, bool):
        return "yes" if v else "no"
    return f'"{v}"'


def _ctext(c: ir.Constraint) -> str:
    kw = c.keyword + (f"[{c.index}]" if c.index is not None else "")
    k, vals = c.kind, c.values
    ops = {
        ir.ConstraintKind.EQUAL: "=", ir.ConstraintKind.NOT_EQUAL: "!=", ir.ConstraintKind.GREATER_OR_EQUAL: ">=",
        ir.ConstraintKind.LESS_OR_EQUAL: "<=", ir.ConstraintKind.GREATER_THAN: ">", ir.ConstraintKind.LESS_THAN: "<",
        ir.ConstraintKind.MATCHES: "~",
    }
    if k in (ir.ConstraintKind.RANGE_INCL, ir.ConstraintKind.RANGE_EXCL) and len(vals) == 2:
        text = f"{kw} in {_vtext(vals[0])} .. {_vtext(vals[1])}"
        return text + (" exclusive" if k == ir.ConstraintKind.RANGE_EXCL else "")
    if k == ir.ConstraintKind.SET_OF:
        return f"{kw} in {{{', '.join(_vtext(v) for v in vals)}}}"
    text = f"{kw} {ops.get(k, k.value)} {', '.join(_vtext(v) for v in vals)}"
    if c.tolerance is not None:
        t = c.tolerance
        if t.relative:
            text += f" ± {t.value:g}%"
        else:
            tv = t.source_value if t.source_value is not None else t.value
            text += f" ± {tv:g} {t.source_unit or ''}".rstrip()
    return text


def _days(lo: float, hi: float) -> str:
    return f"days {lo:g} .. {hi:g}"


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


# --------------------------------------------------------------------------- the checker

class _Checker:
    def __init__(self, trial: ir.Trial) -> None:
        self.t = trial
        self.diags: list[Diagnostic] = []
        self.protocols = {p.name: p for p in trial.protocols}
        self.analyses = {a.name: a for a in trial.analyses}
        self.roles = {r.name: r for r in trial.roles}
        self.destinations = {d.name: d for d in trial.transfers}

    # ---------------------------------------------------------------- reporting
    def add(self, sev: Severity, code: str, node: Any, message: str, hint: Optional[str]) -> None:
        span = node if isinstance(node, Span) or node is None else getattr(node, "span", None)
        self.diags.append(Diagnostic(severity=sev, code=code, message=message, span=span, hint=hint))

    def error(self, code: str, node: Any, message: str, hint: Optional[str]) -> None:
        self.add(Severity.ERROR, code, node, message, hint)

    def warning(self, code: str, node: Any, message: str, hint: Optional[str]) -> None:
        self.add(Severity.WARNING, code, node, message, hint)

    def undefined(self, code: str, ref: ir.Ref, what: str, names: Iterable[str], name: Optional[str] = None) -> None:
        name = name if name is not None else ref.name
        names = list(names)
        hint = did_you_mean(name, names) or (
            f"declared {_plural(what)}: {', '.join(names[:8])}{' …' if len(names) > 8 else ''}" if names else f"no {what} is declared"
        )
        self.error(code, ref, f"undefined {what} '{name}'", hint)

    def keyword(self, node: Any, kw: str, where: str) -> bool:
        """E311 unless ``kw`` is a DICOM keyword (pydicom's data dictionary)."""
        if kw in _dicom_keywords():
            return True
        hint = did_you_mean(kw, _dicom_keywords()) or "use the attribute keyword from DICOM PS3.6 (e.g. EchoTime)"
        self.error("E311", node, f"unknown DICOM keyword '{kw}' in {where}", hint)
        return False

    # ---------------------------------------------------------------- entry
    def run(self) -> list[Diagnostic]:
        self.duplicates()
        self.study()
        self.protocols_check()
        self.ambiguity()
        self.schedule()
        self.deidentify()
        self.identifiers()
        self.qc()
        self.analyses_check()
        self.transfers()
        self.reports()
        self.qualification()
        return sorted(self.diags, key=Diagnostic.sort_key)

    # ---------------------------------------------------------------- duplicates (E310)
    def dup(self, what: str, items: Iterable[tuple[str, Any]]) -> None:
        first: dict[str, Any] = {}
        for name, node in items:
            if name in first:
                prev = getattr(first[name], "span", None)
                where = f" at line {prev.line}" if prev and prev.line else ""
                if prev and prev.file and node is not None and getattr(node, "span", None) and node.span.file != prev.file:
                    where = f" at {prev}"
                self.error("E310", node, f"duplicate {what} '{name}'", f"first declared{where}; {what} names must be unique")
            else:
                first[name] = node

    def duplicates(self) -> None:
        t = self.t
        self.dup("site", ((s.code, s) for s in t.sites))
        self.dup("device", ((d.id, d) for _, d in t.devices()))
        self.dup("protocol", ((p.name, p) for p in t.protocols))
        if t.schedule:
            self.dup("visit", ((v.name, v) for v in t.schedule.visits))
        self.dup("qc check", ((q.name, q) for q in t.qc))
        self.dup("analysis", ((a.name, a) for a in t.analyses))
        self.dup("role", ((r.name, r) for r in t.roles))
        self.dup("transfer destination", ((d.name, d) for d in t.transfers))
        self.dup("report", ((r.name, r) for r in t.reports))
        self.dup("de-identification profile", ((p.name, p) for p in t.deid_profiles))
        if t.study:
            self.dup("endpoint", ((e.name, e) for e in t.study.endpoints))
        for a in t.analyses:
            self.dup(f"input of analysis {a.name}", ((i.name, i) for i in a.inputs))
            self.dup(f"output of analysis {a.name}", ((o.name, o) for o in a.outputs))
            self.dup(f"measurement of analysis {a.name}", ((m.name, m) for m in a.measurements))

    # ---------------------------------------------------------------- study
    def study(self) -> None:
        if not self.t.study:
            return
        for e in self.t.study.endpoints:
            if e.measurement is not None:
                self.analysis_member(e.measurement, "measurement")

    def analysis_member(self, ref: ir.Ref, member: str) -> Optional[ir.Analysis]:
        """Resolve 'analysis.member' (member: 'output' | 'measurement'); report E302/E306."""
        aname, _, mname = ref.name.partition(".")
        a = self.analyses.get(aname)
        if a is None:
            self.undefined("E302", ref, "analysis", self.analyses, aname)
            return None
        if not mname:
            self.error("E302", ref, f"'{ref.name}' names an analysis, not one of its {member}s",
                       f"write {aname}.<{member}>")
            return None
        names = [o.name for o in a.outputs] if member == "output" else [m.name for m in a.measurements]
        if mname not in names:
            code = "E302" if member == "output" else "E306"
            hint = did_you_mean(mname, names) or (
                f"analysis {aname} has {member}s: {', '.join(names)}" if names else f"analysis {aname} declares no {member}s")
            self.error(code, ref, f"analysis '{aname}' has no {member} '{mname}'", hint)
            return None
        return a

    # ---------------------------------------------------------------- protocols
    def protocols_check(self) -> None:
        devices = self.t.devices()
        for p in self.t.protocols:
            for r in p.match:
                self.keyword(r, r.attribute, f"match rule of protocol {p.name}")
                if r.op in (ir.MatchOp.MATCHES, ir.MatchOp.NOT_MATCHES):
                    self.regex(r, r.value)
            self.constraints(p, p.constraints, f"protocol {p.name}")
            for var in p.variants:
                self.constraints(p, var.constraints, f"variant {var.vendor} of protocol {p.name}")
                for kw in var.remove:
                    if kw not in {c.keyword for c in p.constraints}:
                        self.error("E311", var, f"variant {var.vendor} removes '{kw}', which protocol {p.name} does not constrain",
                                   did_you_mean(kw, [c.keyword for c in p.constraints]) or "remove only base constraints")
            self.variants(p, devices)

    def regex(self, node: Any, pattern: str) -> bool:
        try:
            re.compile(pattern)
            return True
        except re.error as exc:
            self.error("E408", node, f"invalid regular expression \"{pattern}\": {exc.msg}",
                       "patterns use Python syntax; escape special characters with a backslash")
            return False

    def constraints(self, p: ir.Protocol, cons: list[ir.Constraint], where: str) -> None:
        by_key: dict[str, list[ir.Constraint]] = defaultdict(list)
        for c in cons:
            if not self.keyword(c, c.keyword, f"constraint of {where}"):
                continue
            if not self.constraint(c):
                continue
            by_key[c.keyword].append(c)
        for kw, group in by_key.items():
            self.contradictions(group)

    def constraint(self, c: ir.Constraint) -> bool:
        """Units, types and ranges of one constraint; False when it is too broken to reason about further."""
        ok = True
        dim_unit = units.DICOM_UNITS.get(c.keyword)
        vr = _vr(c.keyword)
        numeric_vr = vr is not None and any(x in NUMERIC_VRS for x in vr.split(" or "))
        quantities = [v for v in c.values if isinstance(v, ir.Quantity)]
        strings = [v for v in c.values if isinstance(v, str)]
        if c.kind == ir.ConstraintKind.MATCHES:
            return all(self.regex(c, v) for v in strings)
        if quantities and vr is not None and not numeric_vr:
            self.error("E407", c, f"{c.keyword} is text (VR {vr}) but '{_ctext(c)}' compares a number",
                       f'quote the value, e.g. {c.keyword} = "..."')
            return False
        if strings and numeric_vr:
            self.error("E407", c, f"{c.keyword} is numeric (VR {vr}) but '{_ctext(c)}' compares text",
                       f"write a number{' with a unit, e.g. ' + units.CANONICAL[dim_unit[0]] if dim_unit and dim_unit[1] else ''}")
            return False
        if strings and c.kind in _NUMERIC_KINDS:
            self.error("E407", c, f"'{_ctext(c)}' compares text with a numeric operator", "use = , != , in {…} or ~ for text")
            return False
        if dim_unit is not None:
            dim = dim_unit[0]
            for q in quantities:
                if q.dimension == dim:
                    continue
                if dim == "none":
                    self.error("E401", q, f"{c.keyword} has no unit but '{q.text()}' is a {q.dimension}",
                               f"write the number without a unit")
                elif q.dimension == "none":
                    self.error("E401", q, f"{c.keyword} is a {dim} but '{q.text()}' has no unit",
                               f"write e.g. {q.text()} {dim_unit[1] or units.CANONICAL[dim]}")
                else:
                    self.error("E401", q, f"unit mismatch: {c.keyword} is a {dim} but '{q.text()}' is a {q.dimension}",
                               f"use a {dim} unit such as {units.CANONICAL[dim]}")
                ok = False
            t = c.tolerance
            if t is not None and not t.relative and t.source_unit:
                tdim = units.dimension_of(t.source_unit)
                if tdim is not None and tdim != dim:
                    self.error("E401", t, f"unit mismatch: tolerance '{t.source_value:g} {t.source_unit}' is a {tdim} "
                               f"but {c.keyword} is a {dim}", f"use a {dim} unit or a percentage")
                    ok = False
        if c.tolerance is not None and c.tolerance.value < 0:
            self.error("E402", c.tolerance, f"negative tolerance in '{_ctext(c)}'", "a tolerance is a distance: write a positive value")
            ok = False
        if c.kind in (ir.ConstraintKind.RANGE_INCL, ir.ConstraintKind.RANGE_EXCL) and len(quantities) == 2 and ok:
            lo, hi = quantities
            if lo.value > hi.value:
                self.error("E402", c, f"empty range in '{_ctext(c)}': low end is above high end",
                           f"write {c.keyword} in {hi.text()} .. {lo.text()}")
                ok = False
            elif lo.value == hi.value and c.kind == ir.ConstraintKind.RANGE_EXCL:
                self.error("E402", c, f"empty range in '{_ctext(c)}': an exclusive range with equal ends holds no value",
                           f"write {c.keyword} = {lo.text()} for one exact value")
                ok = False
        return ok

    def contradictions(self, group: list[ir.Constraint]) -> None:
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
                            others = "', '".join(_ctext(s) for s in seen)
                            self.error("E403", c, f"contradictory constraints: '{_ctext(c)}' cannot hold together with '{others}'",
                                       "keep one constraint per attribute, or make the ranges overlap")
                        else:
                            self.error("E402", c, f"'{_ctext(c)}' allows no value", "check the values")
                    continue
                feas = trial_f
                seen.append(c)

    def variants(self, p: ir.Protocol, devices: list[tuple[ir.Site, ir.Device]]) -> None:
        mod = p.modality.upper()
        same_mod = [(s, d) for s, d in devices if d.modality.upper() == mod]
        kinds = {(d.vendor, d.software, d.model) for _, d in same_mod}
        for var in p.variants:
            hit = any(
                vendor == var.vendor
                and (not var.model or (model or "").lower() == var.model.lower())
                and software_matches(var.software, software)
                for vendor, software, model in kinds
            )
            if not hit:
                desc = " ".join(x for x in (var.vendor, f'model "{var.model}"' if var.model else "",
                                            f'software "{var.software}"' if var.software else "") if x)
                have = ", ".join(f"{d.id} ({d.vendor} {d.software or ''})".replace(" )", ")") for _, d in same_mod)
                self.warning("W401", var, f"variant {desc} of protocol {p.name} matches no {p.modality} device in the inventory",
                             f"inventory {p.modality} devices: {have}" if have else f"no {p.modality} device is declared")
        if not p.variants:
            return
        uncovered = []
        covered: dict[tuple, bool] = {}  # many devices share vendor/software/model
        for s, d in same_mod:
            key = (d.vendor, d.software, (d.model or "").lower())
            if key not in covered:
                covered[key] = ir.effective_constraints(p, d.vendor, d.software, d.model)[1] is not None
            if not covered[key]:
                uncovered.append((s, d))
        vendors_with_variant = {v.vendor for v in p.variants}
        uncovered_vendors = {d.vendor for _, d in uncovered}
        for s, d in uncovered:
            # The base constraints serve one vendor family; warn when that cannot be the whole story.
            if d.vendor in vendors_with_variant:
                what = " ".join(x for x in (f'model "{d.model}"' if d.model else "",
                                            f'software "{d.software}"' if d.software else "") if x) or "it"
                why = f"device {d.id}: protocol {p.name} has {d.vendor} variants, but none for {what}"
            elif len(uncovered_vendors) > 1:
                why = (f"no variant of protocol {p.name} covers device {d.id} ({d.vendor}); devices of "
                       f"{len(uncovered_vendors)} vendors ({', '.join(sorted(uncovered_vendors))}) would all use the base constraints")
            else:
                continue
            self.warning("W402", d, why, f"add 'variant {d.vendor} software \"{d.software}\" {{ … }}' to protocol {p.name}"
                         if d.software else f"add a '{d.vendor}' variant to protocol {p.name}")

    # ---------------------------------------------------------------- static match ambiguity (E405/W405)
    @staticmethod
    def _alternatives(p: ir.Protocol) -> list[dict[str, list[tuple[str, str]]]]:
        """The protocol's selection rules as alternatives of per-attribute rule lists (op, value).

        Ops: 'search', 'equal', 'not', 'has'. 'has' rules (multi-valued) are satisfiable together,
        except ImageType value 1 / value 2 pairs (ORIGINAL vs DERIVED, PRIMARY vs SECONDARY).
        A protocol without rules is selected by its own name (see the classifier).
        """
        if not p.match:
            # Selected by name; a typical series carries the name in SeriesDescription. (The classifier
            # also accepts it in ProtocolName, an attribute other protocols rarely constrain: counting
            # that would flag every rule-less protocol against every other one.)
            return [{"SeriesDescription": [("full", "(?i)" + re.escape(p.name))]}]
        rules: dict[str, list[tuple[str, str]]] = defaultdict(list)
        for r in p.match:
            if r.op == ir.MatchOp.MATCHES:
                rules[r.attribute].append(("search", r.value))
            elif r.op == ir.MatchOp.NOT_MATCHES:
                rules[r.attribute].append(("not", r.value))
            elif r.op == ir.MatchOp.EQUALS:
                rules[r.attribute].append(("equal", r.value.strip()))
            elif r.op == ir.MatchOp.CONTAINS:
                rules[r.attribute].append(("has", r.value.strip().upper()))
        return [dict(rules)]

    def _typical_witness(self, a: dict, b: dict) -> tuple[Optional[dict[str, str]], bool]:
        """A series typical of rule set ``a`` (some attribute value that one of a's patterns matches in full)
        that also satisfies ``b``: (witness per attribute or None, decided)."""
        witness: dict[str, str] = {}
        for attr in sorted(set(a) | set(b)):
            decided = True  # per attribute: one attribute proven disjoint decides the pair
            has = {v for op, v in a.get(attr, []) + b.get(attr, []) if op == "has"}
            if attr == "ImageType" and any(pair <= has for pair in _EXCLUSIVE_IMAGE_TYPE):
                return None, True
            ra = [r for r in a.get(attr, []) if r[0] != "has"]
            rb = [r for r in b.get(attr, []) if r[0] != "has"]
            if not ra and not rb:
                continue
            positives = [i for i, (op, _) in enumerate(ra) if op in ("search", "equal", "full")]
            choices = positives or [None]
            found = None
            for k in choices:
                terms = []
                for i, (op, val) in enumerate(ra + rb):
                    if i == k:
                        terms.append(Term(val, "equal" if op == "equal" else "full"))
                    elif op == "not":
                        terms.append(Term(val, "search", negated=True))
                    else:
                        terms.append(Term(val, "equal" if op == "equal" else ("full" if op == "full" else "search")))
                res = common_string(terms, self.alphabet)
                if res.witness is not None:
                    found = res.witness
                    break
                decided = decided and res.decided
            if found is None:
                return None, decided
            witness[attr] = found
        return witness, True

    def ambiguity(self) -> None:
        by_mod: dict[str, list[ir.Protocol]] = defaultdict(list)
        broken = {id(p) for p in self.t.protocols for r in p.match
                  if r.op in (ir.MatchOp.MATCHES, ir.MatchOp.NOT_MATCHES) and not _valid_regex(r.value)}
        for p in self.t.protocols:
            if id(p) not in broken:
                by_mod[p.modality.upper()].append(p)
        patterns = [(val, mode) for p in self.t.protocols if id(p) not in broken for alt in self._alternatives(p)
                    for rules in alt.values() for op, val in rules for mode in _MODES[op]]
        self.alphabet = alphabet_for(patterns)
        for group in by_mod.values():
            alts = [self._alternatives(p) for p in group]
            for j in range(len(group)):
                for i in range(j):
                    self.pair(group[i], alts[i], group[j], alts[j])

    def pair(self, p: ir.Protocol, pa: list, q: ir.Protocol, qa: list) -> None:
        if p.name == q.name:
            return  # already a duplicate-name error
        undecided = False
        for a in pa:
            for b in qa:
                for x, y, typical in ((a, b, p), (b, a, q)):
                    w, decided = self._typical_witness(x, y)
                    if w is not None:
                        shown = ", ".join(f"{k} \"{v}\"" for k, v in w.items()) or "any series"
                        node = q.match[0] if q.match else q
                        self.error("E405", node,
                                   f"protocols {p.name} and {q.name} can both match one {p.modality} series: {shown} "
                                   f"(typical of {typical.name})",
                                   f"narrow the match rules, e.g. anchor the pattern (^…$) or add "
                                   f"'match SeriesDescription !~ \"…\"' to one of them")
                        return
                    undecided = undecided or not decided
        if undecided:
            self.warning("W405", q.match[0] if q.match else q,
                         f"could not decide whether protocols {p.name} and {q.name} can match one series",
                         "the patterns use constructs the checker approximates (look-around, back-references, \\b)")

    # ---------------------------------------------------------------- schedule
    def schedule(self) -> None:
        sch = self.t.schedule
        if not sch:
            return
        windows = []
        for v in sch.visits:
            for ref in v.acquire:
                if ref.name not in self.protocols:
                    self.undefined("E301", ref, "protocol", self.protocols)
            before = v.window_before.days if v.window_before else 0.0
            after = v.window_after.days if v.window_after else 0.0
            if before < 0 or after < 0:
                self.error("E402", v, f"visit {v.name} has a window that ends before it starts",
                           "write the window as -before .. +after, e.g. window -14 .. +28 d")
                continue
            windows.append((v.offset.days - before, v.offset.days + after, v))
        windows.sort(key=lambda w: (w[0], w[1]))
        active: list[tuple[float, float, ir.Visit]] = []
        for lo, hi, v in windows:
            for plo, phi, pv in active:
                if lo <= phi:
                    self.error("E404", v, f"window of visit {v.name} ({_days(lo, hi)}) overlaps visit {pv.name} ({_days(plo, phi)})",
                               "an exam date must fall in one visit window: shrink or move one window")
            active = [w for w in active if w[1] >= lo] + [(lo, hi, v)]
        rem = sch.reminders
        if rem:
            allowed = set(get_args(ir.ContactRole)) | set(self.roles) | {"central"}
            for who in list(rem.notify) + list(rem.escalate_to):
                if who not in allowed:
                    self.error("E307", rem, f"unknown recipient '{who}' in reminders",
                               did_you_mean(who, allowed) or f"use a contact role ({', '.join(sorted(get_args(ir.ContactRole)))}) or a role name")

    # ---------------------------------------------------------------- de-identification
    def deidentify(self) -> None:
        for prof in self.t.deid_profiles:
            bad = sorted({o for r in prof.rules for o in r.options if o not in _DEID_OPTIONS})
            for o in bad:
                node = next(r for r in prof.rules if o in r.options)
                self.error("E315", node, f"unknown de-identification option '{o}' in profile {prof.name}",
                           did_you_mean(o, _DEID_OPTIONS) or f"options: {', '.join(_DEID_OPTIONS)}")
        d = self.t.deidentify
        if d is None:
            return
        self.key(d.key, "de-identification key")
        if d.date_shift_min and d.date_shift_max and d.date_shift_min.days > d.date_shift_max.days:
            self.error("E402", d.date_shift_min, f"empty date shift range {d.date_shift_min.days:g} .. {d.date_shift_max.days:g} d",
                       "write the lower bound first")
        for r in d.pixel_regions:
            if r.x0 >= r.x1 or r.y0 >= r.y1:
                self.error("E402", r, f"empty pixel region ({r.x0},{r.y0})-({r.x1},{r.y1})", "x0 < x1 and y0 < y1")
        prof = self.t.profile(d.profile.name)
        if prof is None:
            self.undefined("E305", d.profile, "de-identification profile", [p.name for p in self.t.deid_profiles])
        by_kw = {}
        if prof is not None:
            by_kw = {r.keyword: r for r in prof.rules if r.keyword}
            by_kw.update({r.tag.upper(): r for r in prof.rules})
        chosen = [o.value for o in d.options]
        for ov in d.overrides:
            attr = ov.attribute
            if _TAG.match(attr):
                rule = by_kw.get(attr.upper())
            else:
                if not self.keyword(ov, attr, "de-identification override"):
                    continue
                rule = by_kw.get(attr)
            if rule is None or prof is None:
                continue
            action, via = resolve_action(rule, chosen)
            if ov.action == "keep" and action != "K":
                retaining = [o for o, a in rule.options.items() if a == "K"]
                hint = (f"the option {retaining[0]} retains it; choose that option instead of overriding"
                        if retaining and retaining[0] not in chosen else
                        "remove the override unless the study has a documented need for this identifier")
                self.warning("W404", ov, f"'keep {attr}' contradicts profile {prof.name} "
                             f"(action {action}{' under ' + via if via else ''}): the attribute may identify the subject", hint)
            elif ov.action != "keep" and action == "K" and via:
                self.warning("W403", ov, f"'{ov.action} {attr}' contradicts option {via}, which retains {attr}",
                             f"drop the override, or drop the option {via}")
        if prof is not None:
            self.match_attributes_survive(prof, by_kw, chosen, {ov.attribute for ov in d.overrides if ov.action == "keep"})

    def match_attributes_survive(self, prof: ir.DeidProfile, by_kw: dict, chosen: list[str], kept: set[str]) -> None:
        """Series are classified on de-identified headers: a match rule must read an attribute that survives."""
        seen = set()
        for p in self.t.protocols:
            for m in p.match:
                rule = by_kw.get(m.attribute)
                if rule is None or m.attribute in kept or (p.name, m.attribute) in seen:
                    continue
                action, via = resolve_action(rule, chosen)
                if action in ("K", "C"):  # kept, or kept with identifying text cleaned out
                    continue
                seen.add((p.name, m.attribute))
                cleaning = [o for o, a in rule.options.items() if a in ("K", "C")]
                self.warning("W407", m, f"protocol {p.name} matches on {m.attribute}, which de-identification removes "
                             f"(profile {prof.name}, action {action}); series are classified after de-identification",
                             f"choose the option {cleaning[0]}, or add 'keep {m.attribute}'" if cleaning
                             else f"add 'keep {m.attribute}' or match on another attribute")

    def key(self, key: Optional[ir.KeySource], what: str) -> None:
        if key is None:
            return
        if key.kind == "env" and not key.ref.strip():
            self.error("E316", key, f"{what}: environment variable name is empty", "write e.g. key env IMTRIAL_KEY")
        elif key.kind == "env" and not _ENV_NAME.match(key.ref):
            self.error("E316", key, f"{what}: '{key.ref}' is not a valid environment variable name",
                       "use letters, digits and underscores, not starting with a digit")
        elif key.kind == "file" and not key.ref.strip():
            self.error("E316", key, f"{what}: key file path is empty", "write e.g. key file \"/etc/imtrial/key\"")

    # ---------------------------------------------------------------- identifiers
    def identifiers(self) -> None:
        idf = self.t.identifiers
        if idf is None:
            return
        self.key(idf.key, "identifier key")
        for kw in idf.source:
            self.keyword(idf, kw, "identifier source")
        if idf.issuer:
            self.keyword(idf, idf.issuer, "identifier issuer")
        try:
            fields = [(f, spec) for _, f, spec, _ in string.Formatter().parse(idf.subject_format) if f is not None]
        except ValueError as exc:
            self.error("E309", idf, f"invalid subject ID format \"{idf.subject_format}\": {exc}", "fields look like {seq:04}")
            return
        names = {f for f, _ in fields}
        for f in sorted(names - SUBJECT_FIELDS):
            self.error("E309", idf, f"unknown field '{{{f}}}' in subject ID format",
                       did_you_mean(f, SUBJECT_FIELDS) or f"fields: {', '.join(sorted(SUBJECT_FIELDS))}")
        if names <= SUBJECT_FIELDS:
            try:
                idf.subject_format.format(site="BOS", seq=1, check="0", study="S")
            except (ValueError, IndexError, KeyError) as exc:
                self.error("E309", idf, f"invalid subject ID format \"{idf.subject_format}\": {exc}", "e.g. {seq:04}")
        if "seq" not in names:
            self.error("E410", idf, "subject ID format has no {seq} field: every subject would get the same ID",
                       "add a sequence number, e.g. \"{site}-{seq:04}\"")
        if "check" in names and not idf.check_digit:
            self.error("E410", idf, "subject ID format uses {check} but no check_digit algorithm is chosen",
                       "add e.g. check_digit mod97")
        elif idf.check_digit and "check" not in names:
            self.warning("W406", idf, f"check_digit {idf.check_digit} is chosen but the subject ID format has no {{check}}",
                         "append {check} to the format")

    # ---------------------------------------------------------------- QC
    def qc(self) -> None:
        for q in self.t.qc:
            for ref in q.targets:
                if ref.name not in self.protocols:
                    self.undefined("E301", ref, "protocol", self.protocols)
            spec = QC_METRICS.get(q.metric)
            if spec is None:
                self.error("E312", q, f"unknown QC metric '{q.metric}'",
                           did_you_mean(q.metric, QC_METRICS) or f"metrics: {', '.join(QC_METRICS)}")
                continue
            allowed = {spec.param: spec.dimensions}
            for name, val in q.params.items():
                if name not in allowed:
                    self.error("E313", q, f"unknown parameter '{name}' of QC metric {q.metric}",
                               did_you_mean(name, allowed) or f"{q.metric} takes: {', '.join(allowed)}")
                    continue
                if not isinstance(val, ir.Quantity) or isinstance(val, bool):
                    self.error("E314", q, f"parameter {name} of {q.metric} must be a number, not {_vtext(val)}",
                               f"write e.g. {q.metric}({name} = 0.1)")
                elif val.dimension not in allowed[name]:
                    want = " or ".join(sorted(d if d != "none" else "a plain number" for d in allowed[name]))
                    self.error("E401", val, f"unit mismatch: {q.metric}({name}) takes {want}, not '{val.text()}'",
                               f"write e.g. {q.metric}({name} = {val.source_value if val.source_value is not None else val.value:g})"
                               if "none" in allowed[name] else "use a matching unit")
            for name in allowed:
                if name not in q.params:
                    self.error("E314", q, f"QC metric {q.metric} needs parameter '{name}'", f"write {q.metric}({name} = …)")

    # ---------------------------------------------------------------- analyses
    def analyses_check(self) -> None:
        deps: dict[str, list[tuple[str, ir.Ref]]] = defaultdict(list)
        for a in self.t.analyses:
            for inp in a.inputs:
                if inp.protocol is not None and inp.protocol.name not in self.protocols:
                    other = self.analyses.get(inp.protocol.name)
                    if other is not None:
                        outs = [o.name for o in other.outputs]
                        self.error("E301", inp.protocol, f"undefined protocol '{inp.protocol.name}'",
                                   f"'{other.name}' is an analysis: name one of its outputs, e.g. {other.name}.{outs[0] if outs else 'output'}")
                    else:
                        self.undefined("E301", inp.protocol, "protocol", self.protocols)
                if inp.analysis_output is not None:
                    if self.analysis_member(inp.analysis_output, "output") is not None:
                        deps[a.name].append((inp.analysis_output.name.partition(".")[0], inp.analysis_output))
            names = {i.name for i in a.inputs} | {o.name for o in a.outputs}
            for arg in a.command:
                try:
                    used = [f for _, f, _, _ in string.Formatter().parse(arg) if f is not None]
                except ValueError:
                    self.error("E308", a, f"unbalanced braces in command argument \"{arg}\" of analysis {a.name}",
                               "write {{ and }} for literal braces")
                    continue
                for f in used:
                    if f not in names:
                        self.error("E308", a, f"unknown placeholder '{{{f}}}' in the command of analysis {a.name}",
                                   did_you_mean(f, names) or f"placeholders name inputs and outputs: {', '.join(sorted(names)) or 'none declared'}")
            if not a.command:
                self.error("E308", a, f"analysis {a.name} has no command", "add run \"program {input} {output}\"")
        # cycles among analyses (E406)
        import networkx as nx

        g = nx.DiGraph()
        for a, lst in deps.items():
            for b, ref in lst:
                g.add_edge(b, a, ref=ref)
        order = {a.name: i for i, a in enumerate(self.t.analyses)}
        for comp in nx.strongly_connected_components(g):
            if len(comp) == 1 and not any(g.has_edge(n, n) for n in comp):
                continue
            first = min(comp, key=lambda n: order.get(n, 0))
            cyc = [first]
            cur = first
            while True:
                nxt = sorted((s for s in g.successors(cur) if s in comp), key=lambda n: order.get(n, 0))[0]
                if nxt == first or nxt in cyc:
                    cyc.append(nxt)
                    break
                cyc.append(nxt)
                cur = nxt
            node = self.analyses[first]
            self.error("E406", node, f"analyses depend on each other in a cycle: {' -> '.join(cyc)}",
                       "an analysis can only consume outputs of analyses that do not need its own output")

    # ---------------------------------------------------------------- transfer, reports, qualification
    def transfers(self) -> None:
        for d in self.t.transfers:
            self.key(d.auth, f"transfer {d.name} credentials")
            if d.relay is not None and d.relay.name not in self.destinations:
                self.undefined("E304", d.relay, "transfer destination", self.destinations)
        reported: set[frozenset] = set()
        for d in self.t.transfers:
            chain = [d.name]
            cur = d
            while cur.relay is not None and cur.relay.name in self.destinations:
                nxt = cur.relay.name
                if nxt in chain:
                    loop = chain[chain.index(nxt):]
                    if frozenset(loop) not in reported:
                        reported.add(frozenset(loop))
                        first = self.destinations[loop[0]]
                        self.error("E409", first.relay, f"transfer relays form a loop: {' -> '.join(loop + [loop[0]])}",
                                   "a relay must lead to a final destination")
                    break
                chain.append(nxt)
                cur = self.destinations[nxt]

    def reports(self) -> None:
        for r in self.t.reports:
            for aud in r.audience:
                if aud.role.name not in self.roles:
                    self.undefined("E303", aud.role, "role", self.roles)

    def qualification(self) -> None:
        q = self.t.qualification
        if q is None:
            return
        for ref in q.protocols:
            if ref.name not in self.protocols:
                self.undefined("E301", ref, "protocol", self.protocols)


def _plural(word: str) -> str:
    return word[:-2] + "es" if word.endswith("is") else word + "s"


def _valid_regex(pattern: str) -> bool:
    try:
        re.compile(pattern)
        return True
    except re.error:
        return False


def check(trial: ir.Trial) -> list[Diagnostic]:
    """Every semantic problem of ``trial``, sorted by position."""
    return _Checker(trial).run()
