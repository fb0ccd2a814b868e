"""Can two protocols of one modality both match a series? A witness series (E405) from the match-set
decision procedure in ``imtrial_dsl/matchsets.py``, or W405 where it cannot decide."""
from __future__ import annotations

import re
from collections import defaultdict
from typing import Optional

from .. import ir
from ..matchsets import Term, alphabet_for, common_string
from .context import Context

# ImageType value 1 is ORIGINAL or DERIVED, value 2 PRIMARY or SECONDARY (PS3.3 C.7.6.1.1.2); an MR
# image is one complex component, which classic headers flag with one of M, P, R, I (Siemens value 3,
# Philips value 4: the magnitude and phase series of a field map; Enhanced MR's ComplexImageComponent).
_EXCLUSIVE_IMAGE_TYPE = ({"ORIGINAL", "DERIVED"}, {"PRIMARY", "SECONDARY"}, {"M", "P", "R", "I"})
_MODES = {"has": (), "!has": (), "search": ("search", "full"), "full": ("full",), "equal": ("equal",), "not": ("search",)}


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
            rules[r.attribute].append(("has", r.value.strip()))
        elif r.op == ir.MatchOp.NOT_CONTAINS:
            rules[r.attribute].append(("!has", r.value.strip()))
    return [dict(rules)]


def _typical_witness(a: dict, b: dict, alphabet: str) -> tuple[Optional[dict[str, str]], bool]:
    """A series typical of rule set ``a`` (some attribute value that one of a's patterns matches in full)
    that also satisfies ``b``: (witness per attribute or None, decided)."""
    witness: dict[str, str] = {}
    for attr in sorted(set(a) | set(b)):
        decided = True  # per attribute: one attribute proven disjoint decides the pair
        has = {v for op, v in a.get(attr, []) + b.get(attr, []) if op == "has"}
        hasnt = {v for op, v in a.get(attr, []) + b.get(attr, []) if op == "!has"}
        if has & hasnt:
            return None, True
        if attr == "ImageType" and any(len(group & has) > 1 for group in _EXCLUSIVE_IMAGE_TYPE):
            return None, True
        ra = [r for r in a.get(attr, []) if r[0] not in ("has", "!has")]
        rb = [r for r in b.get(attr, []) if r[0] not in ("has", "!has")]
        if not ra and not rb:
            if has:  # the witness carries every value a 'has' rule asks for
                witness[attr] = "\\".join(sorted(has))
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
            res = common_string(terms, alphabet)
            if res.witness is not None:
                found = res.witness
                break
            decided = decided and res.decided
        if found is None:
            return None, decided
        if has:
            # a multi-valued witness: the 'has' values, then the text the patterns accept; it must still
            # satisfy every rule of both protocols as the classifier reads them
            found = "\\".join(sorted(has) + [found]) if found else "\\".join(sorted(has))
            if not _holds(a.get(attr, []) + b.get(attr, []), found):
                return None, False
        witness[attr] = found
    return witness, True


def _holds(rules: list[tuple[str, str]], value: str) -> bool:
    """Do these rules hold for one attribute value, as ``runner.classify.rule_matches`` reads them?"""
    parts = value.split("\\")
    for op, v in rules:
        if op == "has" and v not in parts:
            return False
        if op == "!has" and v in parts:
            return False
        if op == "equal" and value != v:
            return False
        if op in ("search", "full") and re.search(v, value) is None:
            return False
        if op == "not" and re.search(v, value) is not None:
            return False
    return True


def check(ctx: Context) -> None:
    """Every pair of protocols of one modality (E405/W405); protocols with a broken regex are left out (E408)."""
    by_mod: dict[str, list[ir.Protocol]] = defaultdict(list)
    broken = {id(p) for p in ctx.trial.protocols for r in p.match
              if r.op in (ir.MatchOp.MATCHES, ir.MatchOp.NOT_MATCHES) and not _valid_regex(r.value)}
    for p in ctx.trial.protocols:
        if id(p) not in broken:
            by_mod[p.modality.upper()].append(p)
    patterns = [(val, mode) for p in ctx.trial.protocols if id(p) not in broken for alt in _alternatives(p)
                for rules in alt.values() for op, val in rules for mode in _MODES[op]]
    alphabet = alphabet_for(patterns)
    for group in by_mod.values():
        alts = [_alternatives(p) for p in group]
        for j in range(len(group)):
            for i in range(j):
                _pair(ctx, group[i], alts[i], group[j], alts[j], alphabet)


def _pair(ctx: Context, p: ir.Protocol, pa: list, q: ir.Protocol, qa: list, alphabet: str) -> None:
    if p.name == q.name:
        return  # already a duplicate-name error
    undecided = False
    for a in pa:
        for b in qa:
            for x, y, typical in ((a, b, p), (b, a, q)):
                w, decided = _typical_witness(x, y, alphabet)
                if w is not None:
                    shown = ", ".join(f"{k} \"{v}\"" for k, v in w.items()) or "any series"
                    node = q.match[0] if q.match else q
                    ctx.error("E405", node,
                              f"protocols {p.name} and {q.name} can both match one {p.modality} series: {shown} "
                              f"(typical of {typical.name})",
                              f"narrow the match rules, e.g. anchor the pattern (^…$) or add "
                              f"'match SeriesDescription !~ \"…\"' to one of them")
                    return
                undecided = undecided or not decided
    if undecided:
        ctx.warning("W405", q.match[0] if q.match else q,
                    f"could not decide whether protocols {p.name} and {q.name} can match one series",
                    "the patterns use constructs the checker approximates (look-around, back-references, \\b)")


def _valid_regex(pattern: str) -> bool:
    try:
        re.compile(pattern)
        return True
    except re.error:
        return False
