"""Syntax tree -> IR (:class:`imtrial_dsl.ir.Trial`), collecting errors instead of raising.

Every IR node gets the :class:`Span` of the text it came from. Quantities are
normalized with :func:`units.to_canonical` (the written value/unit is kept), calendar
offsets become :class:`ir.Days`, vendors are canonicalized, ``run`` commands are split
into argv with :func:`shlex.split` (never a shell).

Codes: E201 unknown unit, E202 incompatible units, E203 invalid number, E204 unknown
keyword value (kind, severity, status, ...), E205 duplicate property or block,
E206 invalid regular expression, E207 invalid date, E208 invalid command line,
E209 window/shift does not contain the target, E210 missing required property,
E211 unknown de-identification option, E212 invalid de-identification action code.
"""
from __future__ import annotations

import datetime as _dt
import math
import re
import shlex
from typing import Any, Iterable, Optional, Union

from lark import Token, Tree

from . import ir
from .diagnostics import Diagnostic, Severity, Span, did_you_mean
from .units import CALENDAR, DICOM_UNITS, UNITS, to_canonical, units_of
from .vendors import normalize_vendor

ACTION_CODES = ("D", "Z", "X", "K", "C", "U", "X/Z", "X/D", "X/Z/D", "Z/D", "X/Z/U*")
VISIT_KINDS = ("screening", "baseline", "followup", "unscheduled")
ENDPOINT_KINDS = ("primary", "secondary", "exploratory", "safety")
IRB_STATUS = ("approved", "pending", "expired", "not_required")
SEVERITIES = ("error", "warning", "info")
SAME_DEVICE = ("required", "preferred", "none")
CHECK_DIGITS = ("luhn", "mod11", "mod97", "iso7064")
OUTPUT_KINDS = ("file", "directory")
TRANSFER_KINDS = ("dicom", "dicomweb", "folder")
ROLE_KINDS = ("central", "site", "reader", "sponsor", "monitor", "statistician")
SCOPES = ("all", "own")
REPORT_KINDS = ("management", "qc", "adherence", "enrollment", "qualification")
ARCHIVE_HASHES = ("sha256",)
MATCH_OPS = {"~": ir.MatchOp.MATCHES, "!~": ir.MatchOp.NOT_MATCHES, "=": ir.MatchOp.EQUALS, "has": ir.MatchOp.CONTAINS,
             "!has": ir.MatchOp.NOT_CONTAINS}
CMP_KINDS = {">=": ir.ConstraintKind.GREATER_OR_EQUAL, "<=": ir.ConstraintKind.LESS_OR_EQUAL,
             ">": ir.ConstraintKind.GREATER_THAN, "<": ir.ConstraintKind.LESS_THAN}
_ESCAPES = {"n": "\n", "t": "\t", '"': '"', "\\": "\\"}

Item = Union[Tree, Token]


def unquote(text: str) -> str:
    """A STRING token's value: ``\\"``, ``\\\\``, ``\\n``, ``\\t`` are escapes; other backslashes stay
    (so regexes such as ``"\\d+"`` need no doubling)."""
    body = text[1:-1] if len(text) >= 2 and text[0] == text[-1] == '"' else text
    return re.sub(r"\\(.)", lambda m: _ESCAPES.get(m.group(1), m.group(0)), body)


class Lowerer:
    """One lowering run over one file's tree."""

    def __init__(self, filename: str):
        self.file = filename
        self.diags: list[Diagnostic] = []
        self.unit_dimension: Optional[str] = None  # the dimension the attribute being lowered needs (for E201 hints)

    # ------------------------------------------------------------------ helpers
    def span(self, item: Optional[Item]) -> Optional[Span]:
        if item is None:
            return None
        if isinstance(item, Token):
            if item.line is None:
                return Span(file=self.file)
            return Span(file=self.file, line=item.line, col=item.column,
                        end_line=item.end_line or item.line, end_col=item.end_column or item.column + len(item))
        meta = item.meta
        if getattr(meta, "empty", True):
            for child in item.children:
                s = self.span(child) if child is not None else None
                if s is not None:
                    return s
            return Span(file=self.file)
        return Span(file=self.file, line=meta.line, col=meta.column, end_line=meta.end_line, end_col=meta.end_column)

    def error(self, code: str, where: Optional[Item], message: str, hint: Optional[str] = None,
              severity: Severity = Severity.ERROR) -> None:
        span = where if isinstance(where, Span) else self.span(where)
        self.diags.append(Diagnostic(severity=severity, code=code, message=message, span=span, hint=hint))

    def choice(self, tok: Token, allowed: Iterable[str], what: str) -> Optional[str]:
        val = str(tok)
        allowed = list(allowed)
        if val in allowed:
            return val
        hint = did_you_mean(val, allowed) or ("expected one of: " + ", ".join(allowed))
        self.error("E204", tok, f"unknown {what} '{val}'", hint)
        return None

    @staticmethod
    def kids(tree: Tree, data: Optional[str] = None) -> list:
        return [c for c in tree.children if isinstance(c, Tree) and (data is None or c.data == data)]

    def once(self, seen: dict, key: str, item: Item, where: str) -> None:
        if key in seen:
            first = seen[key]
            self.error("E205", item, f"duplicate '{key}' in {where}",
                       f"first given at line {first.line}" if first is not None and first.line else None)
        else:
            seen[key] = self.span(item)

    def text(self, tok: Optional[Token]) -> Optional[str]:
        if tok is None:
            return None
        return unquote(str(tok)) if tok.type == "STRING" else str(tok)

    def number(self, tok: Token) -> Optional[float]:
        try:
            v = float(str(tok))
        except (ValueError, OverflowError):
            v = math.inf
        if not math.isfinite(v):
            self.error("E203", tok, f"number {str(tok)[:30]} is out of range")
            return None
        return v

    def integer(self, tok: Token, what: str, lo: Optional[int] = None, hi: Optional[int] = None) -> Optional[int]:
        v = self.number(tok)
        if v is None:
            return None
        if v != int(v) or (lo is not None and v < lo) or (hi is not None and v > hi):
            rng = f" between {lo} and {hi}" if lo is not None and hi is not None else (f" >= {lo}" if lo is not None else "")
            self.error("E203", tok, f"{what} must be a whole number{rng}, got {tok}")
            return None
        return int(v)

    def boolean(self, tree: Tree) -> bool:
        return str(tree.children[0]) in ("yes", "true")

    def regex(self, tok: Token) -> str:
        pattern = self.text(tok)
        try:
            re.compile(pattern)
        except re.error as exc:
            self.error("E206", self.regex_span(tok, exc.pos), f"invalid regular expression: {exc.msg}"
                       + (f" at position {exc.pos}" if exc.pos is not None else ""))
        except (RecursionError, OverflowError) as exc:
            self.error("E206", tok, f"invalid regular expression: {exc}")
        return pattern

    def regex_span(self, tok: Token, pos: Optional[int]) -> Optional[Span]:
        """The column of character ``pos`` of a STRING token's value (escapes counted as written)."""
        span = self.span(tok)
        if pos is None or span is None or span.line is None or tok.type != "STRING":
            return span
        body, i, seen = str(tok)[1:-1], 0, 0
        while i < len(body) and seen < pos:  # a written escape (\" or \\) is one character of the value
            i += 2 if body[i] == "\\" and i + 1 < len(body) and body[i + 1] in '"\\nt' else 1
            seen += 1
        col = span.col + 1 + i
        return Span(file=self.file, line=span.line, col=col, end_line=span.line, end_col=col + 1)

    def date(self, tok: Optional[Token]) -> Optional[str]:
        if tok is None:
            return None
        try:
            _dt.date.fromisoformat(str(tok))
        except ValueError:
            self.error("E207", tok, f"invalid date '{tok}'", "write dates as YYYY-MM-DD")
        return str(tok)

    # ------------------------------------------------------------------ quantities
    def unit_of(self, tok: Optional[Token], calendar: bool = False, dimension: Optional[str] = None) -> Optional[str]:
        """Validate a unit token; None (after an error) if unknown. ``dimension``: what the place needs, when
        the attribute being lowered does not say (a device's field, a timeout)."""
        if tok is None:
            return ""
        u = str(tok)
        table = CALENDAR if calendar else UNITS
        if u in table:
            return u
        other = UNITS if calendar else CALENDAR
        if u in other:
            what = "a calendar unit (d, week, month, year)" if calendar else "a measurement unit"
            self.error("E202", tok, f"'{u}' is not {what} here")
            return None
        self.error("E201", tok, f"unknown unit '{u}'", self._unit_hint(u, calendar, dimension))
        return None

    def _unit_hint(self, u: str, calendar: bool, dimension: Optional[str]) -> str:
        """'did you mean …?' and the units of the dimension the place needs — or, when nothing says which,
        of the dimension of the closest unit; every unknown unit gets a list to choose from."""
        if calendar:
            return "; ".join(x for x in (did_you_mean(u, list(CALENDAR)), "calendar units: " + ", ".join(CALENDAR)) if x)
        dim = dimension or (self.unit_dimension if self.unit_dimension != "none" else None)
        ascii_u = u.replace("\u00b5", "u").replace("\u03bc", "u")  # micro sign, Greek mu
        close = ascii_u if ascii_u != u and ascii_u in UNITS else None
        guess = (f"write '{close}' (units are ASCII: u for micro)" if close else None) or (
            did_you_mean(u, units_of(dim)) if dim else None) or did_you_mean(u, list(UNITS))
        if dim is None:
            near = re.search(r"'([^']+)'", guess or "") if not close else None
            dim = UNITS[close][0] if close else (UNITS[near.group(1)][0] if near and near.group(1) in UNITS else None)
        if dim is None:
            names = sorted({d for d, _ in UNITS.values()} - {"none"})
            return "; ".join(x for x in (guess, "no unit is spelt like it; dimensions: " + ", ".join(names)
                                         + " (docs/language.md lists their units)") if x)
        return "; ".join(x for x in (guess, f"units of {dim}: " + ", ".join(units_of(dim))) if x)

    def quantity(self, tree: Tree, default_unit: Optional[str] = None) -> Optional[ir.Quantity]:
        num_tok, unit_tok = tree.children[0], tree.children[1] if len(tree.children) > 1 else None
        value = self.number(num_tok)
        need = UNITS[default_unit][0] if default_unit in UNITS and self.unit_dimension in (None, "none") else None
        unit = self.unit_of(unit_tok, dimension=need) if unit_tok is not None else (default_unit or "")
        if value is None or unit is None:
            return None
        cv, cu, dim = to_canonical(value, unit)
        if not math.isfinite(cv):
            self.error("E203", tree, f"{num_tok} {unit} is out of range")
            return None
        return ir.Quantity(span=self.span(tree), value=cv, unit=cu, dimension=dim, source_value=value,
                           source_unit=unit if unit else None)

    def days(self, num_tok: Token, unit_tok: Optional[Token], where: Item, default_unit: Optional[str] = None,
             absolute: bool = False) -> Optional[ir.Days]:
        value = self.number(num_tok)
        if unit_tok is None and default_unit is not None and default_unit not in CALENDAR:
            return None  # the other end of the range carries the (bad) unit and reports it
        if unit_tok is None and default_unit is None:
            self.error("E201", where, "missing calendar unit", "write e.g. '7 d', '6 weeks', '12 months'")
            return None
        unit = self.unit_of(unit_tok, calendar=True) if unit_tok is not None else default_unit
        if value is None or unit is None:
            return None
        d = value * CALENDAR[unit]
        if not math.isfinite(d):
            self.error("E203", where, f"{num_tok} {unit} is out of range")
            return None
        if absolute:
            d, value = abs(d), abs(value)
        return ir.Days(span=self.span(where), days=d, source_value=value, source_unit=unit)

    def qdays(self, tree: Tree, **kw) -> Optional[ir.Days]:
        return self.days(tree.children[0], tree.children[1], tree, **kw)

    def calendar_range(self, lo: Tree, hi: Tree, where: Item, what: str) -> tuple[Optional[ir.Days], Optional[ir.Days]]:
        """`a .. b unit` or `a unit .. b unit` in calendar units; the unit of one end applies to a bare other end."""
        lo_u, hi_u = lo.children[1], hi.children[1]
        if hi_u is None and lo_u is None:
            self.error("E201", where, f"{what} needs a calendar unit", "write e.g. '-14 .. +28 d'")
            return None, None
        lo_d = self.days(lo.children[0], lo_u, lo, default_unit=str(hi_u) if lo_u is None else None)
        hi_d = self.days(hi.children[0], hi_u, hi, default_unit=str(lo_u) if hi_u is None else None)
        return lo_d, hi_d

    def value(self, tree: Tree, default_unit: Optional[str] = None):
        if tree.data == "string":
            return self.text(tree.children[0])
        return self.quantity(tree, default_unit)

    # ------------------------------------------------------------------ entry
    def lower(self, tree: Tree) -> ir.Trial:
        trial = ir.Trial(span=self.span(tree) if tree.children else Span(file=self.file, line=1, col=1))
        seen: dict = {}
        for item in self.kids(tree):
            handler = getattr(self, f"_top_{item.data}", None)
            if handler is None:  # grammar and lowering out of step: say so, don't crash
                self.error("E299", item, f"construct '{item.data}' is not supported by the lowering")
                continue
            handler(item, trial, seen)
        return trial

    def _single(self, trial: ir.Trial, field: str, node, item: Tree, seen: dict, keyword: str) -> None:
        if getattr(trial, field) is not None:
            self.once(seen, keyword, item, "the file")
            return
        seen.setdefault(keyword, self.span(item))
        setattr(trial, field, node)

    # ------------------------------------------------------------------ top-level statements
    def _top_import_stmt(self, item, trial, seen):
        trial.imports.append(ir.Import(span=self.span(item), path=self.text(item.children[0])))

    def _top_study(self, item, trial, seen):
        code, title = item.children[0], item.children[1]
        info = ir.StudyInfo(span=self.span(item), code=str(code), title=self.text(title) or "")
        props: dict = {}
        for c in self.kids(item):
            if c.data == "study_prop":
                key, val = str(c.children[0]), self.text(c.children[1])
                if key == "aim":
                    info.aims.append(val)
                    continue
                self.once(props, key, c, f"study {code}")
                setattr(info, key, val)
            elif c.data == "arms":
                self.once(props, "arms", c, f"study {code}")
                info.arms = [self.text(s) for s in c.children[0].children if s is not None]
            elif c.data == "endpoint":
                kind_tok, name, desc, ref = c.children
                kind = self.choice(kind_tok, ENDPOINT_KINDS, "endpoint kind") or "primary"
                info.endpoints.append(ir.Endpoint(span=self.span(c), name=str(name), kind=kind,
                                                  description=self.text(desc) or "",
                                                  measurement=self.ref(ref) if ref is not None else None))
        self._single(trial, "study", info, item, seen, "study")

    def ref(self, tree: Tree) -> ir.Ref:
        parts = [str(t) for t in tree.children if t is not None]
        return ir.Ref(span=self.span(tree), name=".".join(parts))

    def _top_site(self, item, trial, seen):
        code, name = item.children[0], item.children[1]
        site = ir.Site(span=self.span(item), code=str(code), name=self.text(name) or str(code))
        props: dict = {}
        for c in self.kids(item):
            if c.data == "contact":
                role, cname, email, phone = c.children
                site.contacts.append(ir.Contact(span=self.span(c), role=str(role), name=self.text(cname),
                                                email=str(email)[1:-1] if email is not None else None,
                                                phone=self.text(phone)))
            elif c.data == "irb":
                self.once(props, "irb", c, f"site {code}")
                status_tok, ref, date, expires = c.children
                status = self.choice(status_tok, IRB_STATUS, "IRB status") or "pending"
                site.irb = ir.Approval(span=self.span(c), status=status, reference=self.text(ref),
                                       date=self.date(date), expires=self.date(expires))
            elif c.data == "timezone":
                self.once(props, "timezone", c, f"site {code}")
                tz = self.text(c.children[0])
                site.timezone = tz
            elif c.data == "device":
                dev = self.device(c)
                if dev is not None:
                    site.devices.append(dev)
        trial.sites.append(site)

    def device(self, item: Tree) -> Optional[ir.Device]:
        dev_id = str(item.children[0])
        fields: dict[str, Any] = {}
        props: dict = {}
        for c in self.kids(item):
            if c.data == "dev_modality":
                self.once(props, "modality", c, f"device {dev_id}")
                mods = [str(t) for t in c.children]
                fields["modality"] = mods[0]
                if len(mods) > 1:
                    fields["modalities"] = mods
            elif c.data == "dev_vendor":
                self.once(props, "vendor", c, f"device {dev_id}")
                text = self.text(c.children[0].children[0])
                fields["vendor"], fields["vendor_text"] = normalize_vendor(text), text
            elif c.data == "dev_text":
                key = str(c.children[0])
                self.once(props, key, c, f"device {dev_id}")
                fields[key] = self.text(c.children[1])
            elif c.data == "dev_software":  # a list of SoftwareVersions values: held as the header holds them
                self.once(props, "software", c, f"device {dev_id}")
                fields["software"] = "\\".join(self.text(s) for s in c.children[0].children if s is not None) or None
            elif c.data == "dev_field":
                self.once(props, "field", c, f"device {dev_id}")
                q = self.quantity(c.children[0], default_unit="T")
                if q is not None and q.dimension != "field":
                    self.error("E202", c.children[0], f"field strength needs a field unit (T, mT), got '{q.source_unit}'")
                    q = None
                fields["field_strength"] = q
            elif c.data == "dev_coils":
                self.once(props, "coils", c, f"device {dev_id}")
                fields["coils"] = [self.text(s) for s in c.children[0].children if s is not None]
            elif c.data == "dev_agreement":
                self.once(props, "research_agreement", c, f"device {dev_id}")
                fields["research_agreement"] = self.boolean(c.children[0])
        for req in ("modality", "vendor"):
            if req not in fields:
                self.error("E210", item.children[0], f"device {dev_id} has no {req}",
                           f"add '{req} ...' inside the device block")
                fields.setdefault(req, "")
        return ir.Device(span=self.span(item), id=dev_id, **fields)

    # ------------------------------------------------------------------ protocols
    def _top_protocol(self, item, trial, seen):
        name, modality, title = item.children[0], item.children[1], item.children[2]
        proto = ir.Protocol(span=self.span(item), name=str(name), modality=str(modality), title=self.text(title) or "")
        props: dict = {}
        for c in self.kids(item):
            if c.data == "proto_text":
                key, val = str(c.children[0]), self.text(c.children[1])
                if key == "prepare":
                    proto.preparation.append(val)
                elif key == "remark":
                    proto.notes.append(val)
                else:
                    self.once(props, key, c, f"protocol {name}")
                    setattr(proto, key, val)
            elif c.data == "match_rule":
                attr, op, val = c.children
                opv = MATCH_OPS[str(op.children[0])]
                text = self.regex(val) if opv in (ir.MatchOp.MATCHES, ir.MatchOp.NOT_MATCHES) else self.text(val)
                proto.match.append(ir.MatchRule(span=self.span(c), attribute=str(attr), op=opv, value=text))
            elif c.data == "constraint":
                con = self.constraint(c)
                if con is not None:
                    proto.constraints.append(con)
            elif c.data == "variant":
                proto.variants.append(self.variant(c))
            elif c.data == "when":
                w = self.conditional(c)
                if w is not None:
                    proto.conditionals.append(w)
            elif c.data == "scope":
                scope = proto.scope or ir.Scope(span=self.span(c))  # several 'for' lines add up
                for t in c.children:
                    (scope.sites if str(t.children[0]) == "site" else scope.devices).append(str(t.children[1]))
                proto.scope = scope
        trial.protocols.append(proto)

    def conditional(self, item: Tree) -> Optional[ir.Conditional]:
        """'when ATTR COND { constraints }': the condition is lowered like a constraint."""
        attr, cond = item.children[0], item.children[1]
        head = self.constraint_parts(attr, cond, [], item)
        if head is None:
            return None
        w = ir.Conditional(span=self.span(item), condition=head)
        for c in self.kids(item)[2:]:
            con = self.constraint(c)
            if con is not None:
                w.constraints.append(con)
        return w

    def variant(self, item: Tree) -> ir.Variant:
        head = item.children[0]
        if head.data == "var_scope":
            kind, target = str(head.children[0]), str(head.children[1])
            var = ir.Variant(span=self.span(item), **{kind: target})
            body = self.kids(item)[1:]
        else:
            model, software = item.children[1], item.children[2]
            text = self.text(head.children[0])
            var = ir.Variant(span=self.span(item), vendor=normalize_vendor(text), vendor_text=text,
                             model=self.text(model), software=self.text(software))
            body = self.kids(item)[1:]
        for c in body:
            if c.data == "constraint":
                con = self.constraint(c)
                if con is not None:
                    var.constraints.append(con)
            elif c.data == "remove":
                var.remove.extend(str(t) for t in c.children)
            elif c.data == "when":
                w = self.conditional(c)
                if w is not None:
                    var.conditionals.append(w)
        return var

    def path(self, attr: Tree) -> tuple[str, Optional[int], list[ir.PathStep], bool]:
        """(keyword, value index, path steps when not a plain keyword, ok)."""
        steps: list[ir.PathStep] = []
        ok = True
        for st in attr.children:
            sel = st.children[-1]
            item: Any = None
            if sel is not None:
                tok = sel.children[0]
                if tok.type == "NUMBER":
                    item = self.integer(tok, "an item or value index", lo=0)
                    ok = ok and item is not None
                else:
                    item = str(tok)
            if st.data == "private_step":
                creator, tag = self.text(st.children[0]), str(st.children[1])
                if not re.fullmatch(r"\([0-9A-Fa-f]{3}[13579BbDdFf],[xX]{2}[0-9A-Fa-f]{2}\)", tag):
                    self.error("E110", st.children[1], f"'{tag}' is not a private element of a creator's block",
                               "write the private group (odd) and the element's low byte, e.g. (0043,xx39)")
                    ok = False
                if not creator.strip():
                    self.error("E110", st.children[0], "a private element needs its creator", 'e.g. private "GEMS_PARM_01" (0043,xx39)')
                    ok = False
                field = self.text(st.children[2]) if st.children[2] is not None else None
                if field is not None and not field.strip():
                    self.error("E110", st.children[2], "an empty field name inside a private element",
                               'name a CSA header element, e.g. private "SIEMENS CSA HEADER" (0029,xx10) "B_value"')
                    ok = False
                steps.append(ir.PathStep(span=self.span(st), creator=creator, tag=tag.lower(), item=item, field=field))
            else:
                steps.append(ir.PathStep(span=self.span(st), keyword=str(st.children[0]), item=item))
        last = steps[-1]
        if isinstance(last.item, str):
            self.error("E111", attr, f"[{last.item}] selects sequence items; on the last step write a value index",
                       "e.g. ImageType[2], or a 'has' constraint for any value")
            ok = False
        for s_ in steps[:-1]:
            if s_.tag:
                self.error("E111", attr, "a private element can only be the last step of a path")
                ok = False
        keyword = last.keyword or f"private {last.creator} {last.tag}" + (f" {last.field}" if last.field else "")
        index = last.item if isinstance(last.item, int) else None
        plain = len(steps) == 1 and last.tag is None
        return keyword, index, ([] if plain else steps), ok

    def constraint(self, item: Tree) -> Optional[ir.Constraint]:
        return self.constraint_parts(item.children[0], item.children[1], item.children[2:], item)

    def constraint_parts(self, attr: Tree, cond: Tree, modifiers: list, item: Tree) -> Optional[ir.Constraint]:
        keyword, index, steps, ok = self.path(attr)
        fields: dict[str, Any] = {}
        if steps:
            fields["path"] = steps
        if cond.data == "count":
            fields["measure"] = "count"
            cond = cond.children[0]
            self.unit_dimension = "none"
        else:
            self.unit_dimension = DICOM_UNITS.get(keyword, (None, ""))[0]
        try:
            return self._constraint(keyword, index, cond, modifiers, item, fields, ok)
        finally:
            self.unit_dimension = None

    def _constraint(self, keyword, index, cond, modifiers, item, fields, ok) -> Optional[ir.Constraint]:
        if cond.data == "eq":
            val = self.value(cond.children[0])
            fields["kind"], fields["values"] = ir.ConstraintKind.EQUAL, [val]
            ok = val is not None
            if cond.children[1] is not None:
                if not isinstance(val, ir.Quantity):
                    self.error("E202", cond.children[1], "a tolerance needs a numeric value")
                    ok = False
                else:
                    tol = self.tolerance(cond.children[1], val)
                    ok = ok and tol is not None
                    fields["tolerance"] = tol
        elif cond.data == "ne":
            val = self.value(cond.children[0])
            fields["kind"], fields["values"] = ir.ConstraintKind.NOT_EQUAL, [val]
            ok = val is not None
        elif cond.data == "cmp":
            val = self.value(cond.children[1])
            fields["kind"], fields["values"] = CMP_KINDS[str(cond.children[0])], [val]
            ok = val is not None
            if isinstance(val, str):
                self.error("E202", cond.children[1], f"'{cond.children[0]}' compares numbers, got a string")
                ok = False
        elif cond.data == "range":
            lo_t, hi_t, excl = cond.children
            lo, hi = self.num_range(lo_t, hi_t, cond)
            ok = lo is not None and hi is not None
            fields["kind"] = ir.ConstraintKind.RANGE_EXCL if excl is not None else ir.ConstraintKind.RANGE_INCL
            fields["values"] = [lo, hi]
        elif cond.data == "set":
            vals = [self.value(v) for v in cond.children]
            ok = all(v is not None for v in vals)
            fields["kind"], fields["values"] = ir.ConstraintKind.SET_OF, vals
        elif cond.data == "regex":
            fields["kind"], fields["values"] = ir.ConstraintKind.MATCHES, [self.regex(cond.children[0])]
        elif cond.data in ("has", "nhas", "has_all", "has_any"):
            vals = [self.value(v) for v in cond.children]
            ok = ok and all(v is not None for v in vals)
            fields["kind"] = {"has": ir.ConstraintKind.CONTAINS, "nhas": ir.ConstraintKind.NOT_CONTAINS,
                              "has_all": ir.ConstraintKind.CONTAINS_ALL, "has_any": ir.ConstraintKind.CONTAINS_ANY}[cond.data]
            fields["values"] = vals
        elif cond.data == "present":
            fields["kind"], fields["values"] = ir.ConstraintKind.PRESENT, []
        mods: dict = {}
        for m in modifiers:
            self.once(mods, m.data, m, f"the constraint on {keyword}")
            if m.data == "severity":
                sev = self.choice(m.children[0], SEVERITIES, "severity")
                if sev:
                    fields["significance"] = ir.Significance(sev)
            elif m.data == "modifiable":
                fields["modifiable"] = True
            elif m.data == "note":
                fields["note"] = self.text(m.children[0])
            elif m.data == "if_present":
                fields["if_present"] = True
        if not ok:
            return None
        return ir.Constraint(span=self.span(item), keyword=keyword, index=index, **fields)

    def num_range(self, lo_t: Tree, hi_t: Tree, where: Item):
        """`a .. b unit` (the unit applies to both ends) or `a unit .. b unit` (same dimension)."""
        lo_u = lo_t.children[1]
        hi_u = hi_t.children[1]
        lo = self.quantity(lo_t, default_unit=self._unit_text(hi_u) if lo_u is None else None)
        hi = self.quantity(hi_t, default_unit=self._unit_text(lo_u) if hi_u is None else None)
        if lo is not None and hi is not None and lo.dimension != hi.dimension:
            self.error("E202", where, f"incompatible units in range: '{lo.source_unit or ''}' and '{hi.source_unit or ''}'")
            return None, None
        return lo, hi

    def _unit_text(self, tok: Optional[Token]) -> Optional[str]:
        if tok is None:
            return None
        u = str(tok)
        return u if u in UNITS else None  # unknown units are reported at their own end

    def tolerance(self, item: Tree, nominal: ir.Quantity) -> Optional[ir.Tolerance]:
        q_tree = item.children[0]
        unit_tok = q_tree.children[1]
        if unit_tok is not None and str(unit_tok) == "%":
            v = self.number(q_tree.children[0])
            if v is None:
                return None
            return ir.Tolerance(span=self.span(item), value=v, relative=True, source_value=v, source_unit="%")
        q = self.quantity(q_tree, default_unit=nominal.source_unit or "")
        if q is None:
            return None
        if q.dimension != nominal.dimension:
            self.error("E202", item, f"tolerance unit '{q.source_unit or ''}' does not match the value's unit "
                       f"'{nominal.source_unit or ''}'")
            return None
        return ir.Tolerance(span=self.span(item), value=q.value, relative=False, source_value=q.source_value,
                            source_unit=q.source_unit)

    # ------------------------------------------------------------------ schedule
    def _top_schedule(self, item, trial, seen):
        sched = ir.Schedule(span=self.span(item))
        props: dict = {}
        policy: Optional[ir.ReminderPolicy] = None
        for c in self.kids(item):
            if c.data == "visit":
                v = self.visit(c)
                if v is not None:
                    sched.visits.append(v)
            elif c.data == "same_device":
                self.once(props, "same_device", c, "the schedule")
                val = self.choice(c.children[0], SAME_DEVICE, "same_device policy")
                if val:
                    sched.same_device = val
            elif c.data in ("remind", "escalate"):
                self.once(props, c.data, c, "the schedule")
                if policy is None:
                    policy = ir.ReminderPolicy(span=self.span(c))
                d = self.qdays(c.children[0])
                names = [str(t) for t in c.children[1].children] if c.children[1] is not None else []
                if c.data == "remind":
                    policy.before_open, policy.notify = d, names
                else:
                    policy.overdue_after, policy.escalate_to = d, names
        sched.reminders = policy
        self._single(trial, "schedule", sched, item, seen, "schedule")

    def visit(self, item: Tree) -> Optional[ir.Visit]:
        name, kind_tok, offset = item.children[0], item.children[1], item.children[2]
        fields: dict[str, Any] = {}
        if kind_tok is not None:
            kind = self.choice(kind_tok, VISIT_KINDS, "visit kind") or "followup"
        else:
            low = str(name).lower()
            kind = "screening" if low.startswith("screen") else "baseline" if low.startswith("baseline") else "followup"
        if offset.data == "on_event":
            fields["event"] = self.text(offset.children[0])
            if kind_tok is None:
                kind = "unscheduled"
            elif kind != "unscheduled":
                self.error("E112", kind_tok, f"visit {name} is triggered by an event, so it is 'unscheduled', not '{kind}'",
                           f"write 'visit {name} unscheduled on event …' or give it a day with 'at'")
            off = ir.Days(span=self.span(offset), days=0, source_value=0)
        else:
            a, b = offset.children
            num, unit = (b, a) if a.type == "UNIT" else (a, b)
            off = self.days(num, unit, offset)
        props: dict = {}
        for c in self.kids(item)[1:]:
            self.once(props, c.data, c, f"visit {name}")
            if c.data == "window":
                lo, hi = self.calendar_range(c.children[0], c.children[1], c, "a visit window")
                if lo is not None and hi is not None:
                    if lo.days > 0 or hi.days < 0:
                        self.error("E209", c, "a visit window must contain the target day",
                                   "write it as '-before .. +after', e.g. 'window -14 .. +28 d'")
                    else:
                        fields["window_before"] = ir.Days(span=lo.span, days=-lo.days, source_value=-lo.source_value,
                                                          source_unit=lo.source_unit)
                        fields["window_after"] = hi
            elif c.data == "acquire":
                fields["acquire"] = [self.acquisition(t) for t in c.children]
            elif c.data == "optional":
                fields["optional"] = True
        if off is None:
            return None
        return ir.Visit(span=self.span(item), name=str(name), kind=kind, offset=off, **fields)

    def acquisition(self, item: Tree) -> ir.Acquisition:
        opt, name, count = item.children
        at_least = 1
        if count is not None:
            at_least = self.integer(count.children[0], "a series count", lo=1) or 1
        return ir.Acquisition(span=self.span(name), name=str(name), optional=opt is not None, at_least=at_least)

    # ------------------------------------------------------------------ de-identification
    def _top_deidentify(self, item, trial, seen):
        profile, opts = item.children[0], item.children[1]
        deid = ir.Deidentify(span=self.span(item), profile=ir.Ref(span=self.span(profile), name=str(profile)))
        valid = [o.value for o in ir.DeidOption]
        if opts is not None:
            for t in opts.children:
                if str(t) in valid:
                    if ir.DeidOption(str(t)) in deid.options:
                        self.error("E205", t, f"option '{t}' given twice")
                    else:
                        deid.options.append(ir.DeidOption(str(t)))
                else:
                    self.error("E211", t, f"unknown de-identification option '{t}'",
                               did_you_mean(str(t), valid) or "options: " + ", ".join(valid))
        props: dict = {}
        for c in self.kids(item)[1 if opts is not None else 0:]:
            if c.data == "deid_attrs":
                action = str(c.children[0])
                for a in self.kids(c):
                    deid.overrides.append(ir.DeidOverride(span=self.span(a), attribute=str(a.children[0]), action=action))
            elif c.data == "replace":
                deid.overrides.append(ir.DeidOverride(span=self.span(c), attribute=str(c.children[0].children[0]),
                                                      action="replace", value=self.text(c.children[1])))
            elif c.data == "key":
                self.once(props, "key", c, "deidentify")
                deid.key = self.key_source(c.children[0])
            elif c.data == "date_shift":
                self.once(props, "date_shift", c, "deidentify")
                lo, hi = self.calendar_range(c.children[0], c.children[1], c, "a date shift")
                if lo is not None and hi is not None and lo.days > hi.days:
                    self.error("E209", c, "date shift range is empty (low > high)")
                deid.date_shift_min, deid.date_shift_max = lo, hi
            elif c.data == "blank":
                region = self.pixel_region(c)
                if region is not None:
                    deid.pixel_regions.append(region)
            elif c.data == "burned_in":
                self.once(props, "quarantine_burned_in", c, "deidentify")
                deid.quarantine_burned_in = self.boolean(c.children[0])
        self._single(trial, "deidentify", deid, item, seen, "deidentify")

    def key_source(self, tree: Tree) -> ir.KeySource:
        kind = "env" if tree.data == "key_env" else "file"
        return ir.KeySource(span=self.span(tree), kind=kind, ref=self.text(tree.children[0]))

    def pixel_region(self, item: Tree) -> Optional[ir.PixelRegion]:
        coords = [self.integer(t, "a pixel coordinate", lo=0) for t in item.children[:4]]
        if any(c is None for c in coords):
            return None
        x0, y0, x1, y1 = coords
        if x1 <= x0 or y1 <= y0:
            self.error("E209", item, f"empty pixel region {x0},{y0},{x1},{y1}", "write 'blank x0, y0, x1, y1' with x1 > x0 and y1 > y0")
            return None
        sel: dict[str, Any] = {}
        for s in item.children[4:]:
            key, val = str(s.children[0]), s.children[1]
            if key == "vendor":
                sel["vendor"] = normalize_vendor(self.text(val.children[0]))
            elif key in ("rows", "columns"):
                sel[key] = self.integer(val, key, lo=1)
            else:
                sel[key] = self.text(val)
        return ir.PixelRegion(span=self.span(item), x0=x0, y0=y0, x1=x1, y1=y1, **sel)

    def _top_deid_profile(self, item, trial, seen):
        name, title, code = item.children[0], item.children[1], item.children[2]
        prof = ir.DeidProfile(span=self.span(item), name=str(name), title=self.text(title) or "", code=self.text(code))
        for r in self.kids(item):
            tag, kw_tree, rname, action = r.children[:4]
            kw = str(kw_tree.children[0])
            options: dict[str, str] = {}
            for o in r.children[4:]:
                if str(o.children[0]) in options:
                    self.error("E205", o, f"option '{o.children[0]}' given twice in this rule")
                options[str(o.children[0])] = self.action(o.children[1])
            prof.rules.append(ir.ProfileRule(span=self.span(r), tag=str(tag), name=self.text(rname),
                                             keyword=None if kw == "-" else kw, action=self.action(action),
                                             options=options))
        trial.deid_profiles.append(prof)

    def action(self, tok: Token) -> str:
        if str(tok) not in ACTION_CODES:
            self.error("E212", tok, f"unknown action code '{tok}'", "action codes: " + ", ".join(ACTION_CODES))
        return str(tok)

    # ------------------------------------------------------------------ identifiers
    def _top_identifiers(self, item, trial, seen):
        fields: dict[str, Any] = {}
        props: dict = {}
        for c in self.kids(item):
            key = {"id_subject": "subject", "id_check": "check_digit", "id_source": "source",
                   "id_issuer": "issuer", "id_reid": "reidentification_log", "key": "key"}[c.data]
            self.once(props, key, c, "identifiers")
            if c.data == "id_subject":
                fields["subject_format"] = self.text(c.children[0])
            elif c.data == "id_check":
                fields["check_digit"] = self.choice(c.children[0], CHECK_DIGITS, "check digit scheme")
            elif c.data == "id_source":
                fields["source"] = [str(t) for t in c.children[0].children]
            elif c.data == "id_issuer":
                fields["issuer"] = str(c.children[0])
            elif c.data == "id_reid":
                fields["reidentification_log"] = self.boolean(c.children[0])
            elif c.data == "key":
                fields["key"] = self.key_source(c.children[0])
        if "subject_format" not in fields:
            self.error("E210", item, "identifiers block has no 'subject' format",
                       "add e.g. subject \"STUDY-{site}-{seq:04}\"")
            return
        self._single(trial, "identifiers", ir.Identifiers(span=self.span(item), **fields), item, seen, "identifiers")

    # ------------------------------------------------------------------ QC and analyses
    def _top_qc(self, item, trial, seen):
        name, target, metric = item.children[0], item.children[1], item.children[2]
        sev_tree = item.children[-1]
        params: dict[str, Any] = {}
        for p in item.children[3:-1]:
            if p is None:
                continue
            pname = str(p.children[0])
            if pname in params:
                self.error("E205", p, f"parameter '{pname}' given twice")
            val = self.value(p.children[1])
            if val is not None:
                params[pname] = val
        fields: dict[str, Any] = {}
        if target.data == "qc_modality":
            fields["modality"] = str(target.children[0])
        else:
            fields["targets"] = [ir.Ref(span=self.span(t), name=str(t)) for t in target.children[0].children]
        if sev_tree is not None:
            sev = self.choice(sev_tree.children[0], SEVERITIES, "severity")
            if sev:
                fields["severity"] = ir.Significance(sev)
        trial.qc.append(ir.QcCheck(span=self.span(item), name=str(name), metric=str(metric), params=params, **fields))

    def _top_analysis(self, item, trial, seen):
        name, desc = item.children[0], item.children[1]
        an = ir.Analysis(span=self.span(item), name=str(name), description=self.text(desc) or "")
        props: dict = {}
        for c in self.kids(item):
            if c.data == "an_input":
                ref = self.ref(c.children[1])
                inp = ir.AnalysisInput(span=self.span(c), name=str(c.children[0]))
                if "." in ref.name:
                    inp.analysis_output = ref
                else:
                    inp.protocol = ref
                an.inputs.append(inp)
            elif c.data == "an_output":
                kind = "file"
                if c.children[1] is not None:
                    kind = self.choice(c.children[1], OUTPUT_KINDS, "output kind") or "file"
                an.outputs.append(ir.AnalysisOutput(span=self.span(c), name=str(c.children[0]), kind=kind))
            elif c.data == "an_run":
                self.once(props, "run", c, f"analysis {name}")
                try:
                    an.command = shlex.split(self.text(c.children[0]))
                except ValueError as exc:
                    self.error("E208", c.children[0], f"cannot split the command line: {exc}",
                               "quote arguments with matching ' or \" (the command never runs through a shell)")
                if not an.command and not any(d.code == "E208" and d.span == self.span(c.children[0]) for d in self.diags):
                    self.error("E208", c.children[0], "empty command")
            elif c.data == "an_measure":
                mname, unit_tok, mdesc = c.children
                unit = self.unit_of(unit_tok) if unit_tok is not None else ""
                dim = UNITS[unit][0] if unit else "none"
                an.measurements.append(ir.Measurement(span=self.span(c), name=str(mname), unit=unit or "",
                                                      dimension=dim if unit is not None else "none",
                                                      description=self.text(mdesc) or ""))
            elif c.data == "an_timeout":
                self.once(props, "timeout", c, f"analysis {name}")
                q = self.quantity(c.children[0], default_unit="s")
                if q is not None and q.dimension != "time":
                    self.error("E202", c.children[0], f"timeout needs a time unit (s, min), got '{q.source_unit}'")
                    q = None
                an.timeout = q
            elif c.data == "an_description":
                self.once(props, "description", c, f"analysis {name}")
                an.description = self.text(c.children[0])
            elif c.data == "an_env":
                an.env += [str(t) for t in c.children[0].children if str(t) not in an.env]
        trial.analyses.append(an)

    # ------------------------------------------------------------------ transfer, archive, roles, reports
    def _top_transfer(self, item, trial, seen):
        name, kind_tok, positional = item.children[0], item.children[1], item.children[2]
        kind = self.choice(kind_tok, TRANSFER_KINDS, "transfer kind")
        fields: dict[str, Any] = {}
        if positional is not None:
            key = {"dicomweb": "url", "folder": "path", "dicom": "ae_title"}.get(kind or "", "url")
            fields[key] = self.text(positional)
        props: dict = {}
        for o in item.children[3:]:
            key, val = str(o.children[0]), o.children[1]
            self.once(props, key, o, f"transfer {name}")
            if key == "ae":
                fields["ae_title"] = self.text(val)
            elif key == "port":
                fields["port"] = self.integer(val, "port", lo=1, hi=65535)
            elif key == "auth":
                fields["auth"] = self.key_source(val)
            elif key == "via":
                fields["relay"] = ir.Ref(span=self.span(val), name=str(val))
            elif key == "receives":
                fields["identified"] = True
            else:
                fields[key] = self.text(val)
        if kind is None:
            return
        trial.transfers.append(ir.Destination(span=self.span(item), name=str(name), kind=kind, **fields))

    def _top_archive(self, item, trial, seen):
        arch = ir.Archive(span=self.span(item))
        props: dict = {}
        for c in self.kids(item):
            self.once(props, c.data, c, "archive")
            if c.data == "ar_path":
                arch.path = self.text(c.children[0])
            elif c.data == "ar_retention":
                arch.retention = self.qdays(c.children[0])
            elif c.data == "ar_keep":
                arch.keep_originals = self.boolean(c.children[0])
            elif c.data == "ar_hash":
                h = self.choice(c.children[0], ARCHIVE_HASHES, "hash")
                if h:
                    arch.hash = h
        self._single(trial, "archive", arch, item, seen, "archive")

    def _top_role(self, item, trial, seen):
        role = ir.Role(span=self.span(item), name=str(item.children[0]))
        props: dict = {}
        for c in self.kids(item):
            self.once(props, c.data, c, f"role {role.name}")
            if c.data == "role_kind":
                role.kind = self.choice(c.children[0], ROLE_KINDS, "role kind") or role.kind
            elif c.data == "role_scope":
                role.scope = self.choice(c.children[0], SCOPES, "scope") or role.scope
            elif c.data == "role_blinded":
                role.blinded = True
            elif c.data == "role_hide":
                role.hide = [str(t) for t in c.children[0].children]
        trial.roles.append(role)

    def _top_report(self, item, trial, seen):
        name, kind_tok = item.children[0], item.children[1]
        rep = ir.Report(span=self.span(item), name=str(name))
        if kind_tok is not None:
            rep.kind = self.choice(kind_tok, REPORT_KINDS, "report kind") or rep.kind
        props: dict = {}
        for c in self.kids(item):
            if c.data == "audience":
                role_tok, scope_tok = c.children
                scope = self.choice(scope_tok, SCOPES, "scope") if scope_tok is not None else None
                rep.audience.append(ir.ReportAudience(span=self.span(c), role=ir.Ref(span=self.span(role_tok), name=str(role_tok)),
                                                      scope=scope))
            elif c.data == "quantity":
                rep.every = self.qdays(c)
            elif c.data == "sections":
                self.once(props, "sections", c, f"report {name}")
                rep.sections = [str(t) for t in c.children[0].children]
        trial.reports.append(rep)

    def _top_qualification(self, item, trial, seen):
        q = ir.Qualification(span=self.span(item))
        props: dict = {}
        for c in self.kids(item):
            self.once(props, c.data, c, "qualification")
            if c.data == "q_protocols":
                q.protocols = [ir.Ref(span=self.span(t), name=str(t)) for t in c.children[0].children]
            elif c.data == "q_phantom":
                q.phantom = self.text(c.children[0])
            elif c.data == "q_requalify":
                q.requalify_on_upgrade = self.boolean(c.children[0])
        self._single(trial, "qualification", q, item, seen, "qualification")


    # ------------------------------------------------------------------ reads and document control
    def _top_read(self, item, trial, seen):
        name, title = item.children[0], item.children[1]
        rd = ir.Read(span=self.span(item), name=str(name), title=self.text(title) or "")
        props: dict = {}
        where = f"read {name}"
        for c in self.kids(item):
            key = str(c.children[0]) if c.data == "rd_text" else c.data
            if c.data != "rd_window":
                self.once(props, key, c, where)
            if c.data == "rd_images":
                rd.protocols = [ir.Ref(span=self.span(t), name=str(t)) for t in c.children[0].children]
            elif c.data == "rd_timepoints":
                rd.timepoints = [ir.Ref(span=self.span(t), name=str(t)) for t in c.children[0].children]
            elif c.data == "rd_readers":
                rd.clauses["readers"] = self.span(c)
                if c.children[1] is not None:
                    rd.clauses["adjudicators"] = self.span(c.children[1])
                n = self.integer(c.children[0], "the number of readers", lo=1, hi=99)
                rd.readers = n if n is not None else rd.readers
                if c.children[1] is not None:
                    a = self.integer(c.children[1], "the number of adjudicators", lo=0, hi=99)
                    rd.adjudicators = a if a is not None else 0
            elif c.data == "rd_text":
                setattr(rd, key, self.text(c.children[1]))
            elif c.data == "rd_blinded":
                rd.blinded_to = [str(t) for t in c.children[0].children]
                rd.clauses["blinded"] = self.span(c)
                rd.clauses.update({f"blinded:{t}": self.span(t) for t in c.children[0].children})
            elif c.data == "rd_paradigm":
                rd.paradigm = str(c.children[0])
                rd.clauses["paradigm"] = self.span(c.children[0])
            elif c.data == "rd_adjudicate":
                rd.adjudicate_on = [str(t) for t in c.children[0].children]
                rd.adjudication_rule = self.text(c.children[1]) or ""
                rd.clauses["adjudicate"] = self.span(c)
                rd.clauses.update({f"adjudicate:{t}": self.span(t) for t in c.children[0].children})
            elif c.data == "rd_criteria":
                rd.criteria = str(c.children[0])
                rd.clauses["criteria"] = self.span(c.children[0])
                rd.criteria_name = self.text(c.children[1]) or ""
            elif c.data == "rd_window":
                level, width = self.number(c.children[1]), self.number(c.children[2])
                if level is not None and width is not None:
                    rd.windows.append(ir.ReadWindow(span=self.span(c), name=str(c.children[0]), level=level, width=width))
            elif c.data == "rd_variability":
                metric, op, thr, action = c.children
                v = self.number(thr)
                if v is not None:
                    rd.variability = ir.ReaderVariability(span=self.span(c), metric=str(metric), op=str(op.children[0]),
                                                          threshold=v, action=self.text(action) or "")
        trial.reads.append(rd)

    def _top_changelog(self, item, trial, seen):
        log = ir.Changelog(span=self.span(item))
        for c in self.kids(item):
            if c.data == "cl_version":
                log.entries.append(ir.ChangelogEntry(span=self.span(c), version=self.text(c.children[0]),
                                                     date=self.date(c.children[1]), description=self.text(c.children[2])))
            elif c.data == "cl_approver":
                log.approvers.append(ir.Approver(span=self.span(c), title=self.text(c.children[0]),
                                                 name=self.text(c.children[1])))
        self._single(trial, "changelog", log, item, seen, "changelog")

def lower(tree: Optional[Tree], filename: str = "<string>") -> tuple[ir.Trial, list[Diagnostic]]:
    """Lower a syntax tree into an :class:`ir.Trial`; never raises. A None tree gives an empty Trial."""
    low = Lowerer(filename)
    if tree is None:
        return ir.Trial(), []
    try:
        trial = low.lower(tree)
    except RecursionError:
        low.error("E299", Span(file=filename, line=1, col=1), "input is nested too deeply")
        trial = ir.Trial()
    except Exception as exc:  # a lowering bug must still come out as a value
        low.error("E299", Span(file=filename, line=1, col=1), f"internal lowering error: {type(exc).__name__}: {exc}")
        trial = ir.Trial()
    return trial, low.diags
