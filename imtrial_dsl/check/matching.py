"""Can two protocols of one modality both match a series? A witness series (E405) from the match-set
decision procedure in ``imtrial_dsl/matchsets.py``, or W405 where it cannot decide."""
from __future__ import annotations

import bisect
import re
from collections import defaultdict
from typing import Optional

from .. import ir
from ..matchsets import Term, alphabet_for, common_string, literal_prefix
from ..diagnostics import SHOWN_PER_CODE
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
    """Every pair of protocols of one modality that can overlap (E405/W405); protocols with a broken regex
    are left out (E408).

    Linear-ish in protocols: protocols with the same modality and match rules form one class, decided once
    per pair of classes; only pairs of classes whose anchored literal prefixes agree on every attribute
    (:func:`_prefixes`) are searched for a witness. At most ``SHOWN_PER_CODE`` diagnostics of each code are
    built; the rest are counted (:meth:`Context.omit`)."""
    broken = {id(p) for p in ctx.trial.protocols for r in p.match
              if r.op in (ir.MatchOp.MATCHES, ir.MatchOp.NOT_MATCHES) and not _valid_regex(r.value)}
    protos = [p for p in ctx.trial.protocols if id(p) not in broken]
    classes: dict[tuple, list[int]] = {}
    alts: list[list] = []
    for k, p in enumerate(protos):
        a = _alternatives(p)
        alts.append(a)
        sig = (p.modality.upper(), tuple(tuple((attr, tuple(rules)) for attr, rules in alt.items()) for alt in a))
        classes.setdefault(sig, []).append(k)
    members = list(classes.values())
    by_mod: dict[str, list[int]] = defaultdict(list)
    for c, m in enumerate(members):
        by_mod[protos[m[0]].modality.upper()].append(c)
    todo: list[tuple[int, int]] = [(c, c) for c, m in enumerate(members) if len(m) > 1]
    for cls in by_mod.values():
        keys = [_prefixes(alts[members[c][0]]) for c in cls]
        todo += [(cls[x], cls[y]) for x, y in sorted(_candidate_pairs(keys))]
    # one alphabet for every search, from the patterns of the pairs searched, so their automata share memos
    involved = sorted({c for pair in todo for c in pair})
    alphabet = alphabet_for(sorted({(val, mode) for c in involved for alt in alts[members[c][0]] for rules in alt.values()
                                    for op, val in rules for mode in _MODES[op]}))
    verdict: dict[tuple[int, int], tuple] = {}   # (class, class) -> ("E405", …) | ("W405",), both orders
    for a, b in todo:
        res = _decide(alts[members[a][0]], alts[members[b][0]], alphabet)
        if res is not None:
            verdict[(a, b)] = verdict[(b, a)] = res
    if verdict:
        _report(ctx, protos, alts, members, verdict, alphabet)


def _report(ctx: Context, protos: list[ir.Protocol], alts: list, members: list[list[int]], verdict: dict,
            alphabet: str) -> None:
    """Diagnostics for every overlapping pair (p earlier, q later), in the order of q, then p; built up to
    ``SHOWN_PER_CODE`` per code, counted beyond it."""
    cls_of = {k: c for c, m in enumerate(members) for k in m}
    partners: dict[int, list[int]] = defaultdict(list)
    for a, b in verdict:
        partners[b].append(a)
    total = {"E405": 0, "W405": 0}
    for (a, b), res in verdict.items():
        if a < b:
            total[res[0]] += len(members[a]) * len(members[b])
        elif a == b:
            total[res[0]] += len(members[a]) * (len(members[a]) - 1) // 2
    # pairs of one name are a duplicate-name error (E310), not an ambiguity
    by_name: dict[str, list[int]] = defaultdict(list)
    for k, p in enumerate(protos):
        by_name[p.name].append(k)
    for ks in by_name.values():
        for n, i in enumerate(ks):
            for j in ks[n + 1:]:
                res = verdict.get((cls_of[i], cls_of[j]))
                if res is not None:
                    total[res[0]] -= 1
    shown = {"E405": 0, "W405": 0}
    for j, q in enumerate(protos):
        if all(shown[c] >= SHOWN_PER_CODE for c in shown):
            break
        earlier = sorted(i for c in partners.get(cls_of[j], ()) for i in members[c][:bisect.bisect_left(members[c], j)])
        for i in earlier:
            p = protos[i]
            code = verdict[(cls_of[i], cls_of[j])][0]
            if p.name == q.name or shown[code] >= SHOWN_PER_CODE:
                continue
            shown[code] += 1
            _emit(ctx, p, q, _decide(alts[i], alts[j], alphabet))
    for code in shown:
        if total[code] > shown[code]:
            ctx.omit(code, total[code] - shown[code])


def _emit(ctx: Context, p: ir.Protocol, q: ir.Protocol, res: tuple) -> None:
    node = q.match[0] if q.match else q
    if res[0] == "W405":
        ctx.warning("W405", node, f"could not decide whether protocols {p.name} and {q.name} can match one series",
                    "the patterns use constructs the checker approximates (look-around, back-references, \\b)")
        return
    _code, w, typical_is_p = res
    shown = ", ".join(f"{k} \"{v}\"" for k, v in w.items()) or "any series"
    ctx.error("E405", node,
              f"protocols {p.name} and {q.name} can both match one {p.modality} series: {shown} "
              f"(typical of {(p if typical_is_p else q).name})",
              f"narrow the match rules, e.g. anchor the pattern (^…$) or add "
              f"'match SeriesDescription !~ \"…\"' to one of them")


def _decide(pa: list, qa: list, alphabet: str) -> Optional[tuple]:
    """("E405", witness, typical-of-first) when a series typical of one rule set satisfies the other;
    ("W405",) when that cannot be decided; None when the two are disjoint."""
    undecided = False
    for a in pa:
        for b in qa:
            for x, y, first in ((a, b, True), (b, a, False)):
                w, decided = _typical_witness(x, y, alphabet)
                if w is not None:
                    return ("E405", w, first)
                undecided = undecided or not decided
    return ("W405",) if undecided else None


def _prefixes(alts: list[dict]) -> Optional[dict[str, str]]:
    """Per attribute, a lower-cased literal prefix every value selected by these rules starts with (from an
    anchored or whole-value positive rule); None when the protocol has several alternatives.

    Two rule sets whose prefixes for one attribute are not prefixes of one another cannot select one series:
    the pair needs no witness search. Lower-casing keeps the test sound for case-insensitive patterns."""
    if len(alts) != 1:
        return None
    out: dict[str, str] = {}
    for attr, rules in alts[0].items():
        best = ""
        for op, val in rules:
            if op == "equal":
                pre = _ascii_lower_prefix(val)
            elif op in ("search", "full"):
                pre = literal_prefix(val, anchored=op == "full")
            else:
                continue
            if len(pre) > len(best):
                best = pre
        if best:
            out[attr] = best
    return out


def _ascii_lower_prefix(text: str) -> str:
    out = []
    for ch in text:
        if not ch.isascii():
            break
        out.append(ch.lower())
    return "".join(out)


def _candidate_pairs(keys: list[Optional[dict[str, str]]]) -> set[tuple[int, int]]:
    """Index pairs (x < y) whose prefixes agree on every attribute both constrain.

    One attribute (the one most entries constrain) is indexed: in prefix order, the entries whose prefix
    extends an entry's prefix (or equals it) are one range, so every agreeing pair is found from its shorter
    side. Entries without a prefix there pair with every entry; every candidate is then filtered on the other
    attributes."""
    n = len(keys)
    counts: dict[str, int] = defaultdict(int)
    for k in keys:
        for attr in k or ():
            counts[attr] += 1
    if not counts:
        return {(x, y) for y in range(n) for x in range(y)}
    attr = max(sorted(counts), key=lambda a: counts[a])
    keyed = sorted((k[attr], x) for x, k in enumerate(keys) if k and attr in k)
    prefixes = [pre for pre, _ in keyed]
    loose = [x for x, k in enumerate(keys) if not (k and attr in k)]

    def agree(x: int, y: int) -> bool:
        kx, ky = keys[x], keys[y]
        if not kx or not ky:
            return True
        for a, px in kx.items():
            py = ky.get(a)
            if py is not None and not (px.startswith(py) or py.startswith(px)):
                return False
        return True

    out: set[tuple[int, int]] = set()
    for pos, (pre, x) in enumerate(keyed):
        hi = bisect.bisect_left(prefixes, pre + "\U0010ffff", pos)
        for _, y in keyed[pos + 1:hi]:
            if agree(x, y):
                out.add((min(x, y), max(x, y)))
    is_loose = set(loose)
    for x in loose:
        for y in range(n):
            if y != x and (y not in is_loose or y > x) and agree(x, y):
                out.add((min(x, y), max(x, y)))
    return out


def _valid_regex(pattern: str) -> bool:
    try:
        re.compile(pattern)
        return True
    except re.error:
        return False
