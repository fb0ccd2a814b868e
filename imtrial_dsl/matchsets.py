"""Decide whether series-selection rules can hold for one common string (used by the checker).

Each regular expression is parsed with Python's own regex parser (``re._parser``)
and turned into a Thompson NFA over character predicates. Conjunctions of
patterns (and negations, for ``!~``) are decided by a breadth-first search of
the product of their on-the-fly subset automata, over a small alphabet that
holds a representative of every character class the patterns distinguish.
The search is exact for the regex subset trial files use (literals, classes,
alternation, groups, repetition, ``^``/``$``, inline flags). Constructs outside
it (look-arounds, back-references, ``\\b``) are over-approximated, and every
witness the search finds is confirmed with :mod:`re` itself, so a reported
witness is always real. See ``docs/diagnostics.md`` (E405) for how the checker
uses this.
"""
from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional

try:  # Python >= 3.11
    import re._constants as _c
    import re._parser as _p
except ImportError:  # pragma: no cover - Python 3.10
    import sre_constants as _c  # type: ignore
    import sre_parse as _p  # type: ignore

_REPEAT_CAP = 24          # larger bounded repeats become unbounded (over-approximation)
_STATE_LIMIT = 4000       # product states explored before giving up ("undecided")

# DICOM string values (LO, SH, CS, ...) hold no control characters, so witnesses use printable text only.
_FIXED_ALPHABET = "aAzZmM019_ -./\\*+()é~"

Pred = Callable[[str], bool]


def _cat(cat) -> Pred:
    table = {
        _c.CATEGORY_DIGIT: lambda ch: ch.isdecimal(),
        _c.CATEGORY_NOT_DIGIT: lambda ch: not ch.isdecimal(),
        _c.CATEGORY_SPACE: lambda ch: ch.isspace(),
        _c.CATEGORY_NOT_SPACE: lambda ch: not ch.isspace(),
        _c.CATEGORY_WORD: lambda ch: ch.isalnum() or ch == "_",
        _c.CATEGORY_NOT_WORD: lambda ch: not (ch.isalnum() or ch == "_"),
    }
    return table.get(cat, lambda ch: True)


def _fold(pred: Pred, ignorecase: bool) -> Pred:
    if not ignorecase:
        return pred
    return lambda ch: pred(ch) or pred(ch.lower()) or pred(ch.upper())


class Nfa:
    """A Thompson NFA with character-predicate edges and ^/$ assertion edges."""

    def __init__(self) -> None:
        self.eps: list[list[int]] = []
        self.chars: list[list[tuple[Pred, int]]] = []
        self.bol: list[list[int]] = []
        self.eol: list[list[int]] = []
        self.alphabet: set[str] = set()
        self.approx = False
        self.start = 0
        self.accept = 0
        self.sticky_accept = False  # accept state loops on every char (search mode)
        self._step: dict = {}
        self._moves: dict = {}
        self._initial: Optional[frozenset] = None
        self.live: frozenset = frozenset()
        self._acc: dict = {}

    def new(self) -> int:
        for lst in (self.eps, self.chars, self.bol, self.eol):
            lst.append([])
        return len(self.eps) - 1

    def note_chars(self, *chars: str) -> None:
        for ch in chars:
            self.alphabet.update({ch, ch.lower(), ch.upper()})

    # ---------------------------------------------------------------- construction
    def build(self, items, flags: int) -> tuple[int, int]:
        s = self.new()
        cur = s
        for op, av in items:
            a, b = self.build_item(op, av, flags)
            self.eps[cur].append(a)
            cur = b
        return s, cur

    def edge(self, pred: Pred, flags: int) -> tuple[int, int]:
        a, b = self.new(), self.new()
        self.chars[a].append((pred, b))
        return a, b

    def build_item(self, op, av, flags: int) -> tuple[int, int]:
        ic = bool(flags & _c.SRE_FLAG_IGNORECASE)
        if op is _c.LITERAL:
            ch = chr(av)
            self.note_chars(ch)
            return self.edge(_fold(lambda x, ch=ch: x == ch, ic), flags)
        if op is _c.NOT_LITERAL:
            ch = chr(av)
            self.note_chars(ch)
            eq = _fold(lambda x, ch=ch: x == ch, ic)
            return self.edge(lambda x: not eq(x), flags)
        if op is _c.ANY:
            dotall = bool(flags & _c.SRE_FLAG_DOTALL)
            return self.edge((lambda x: True) if dotall else (lambda x: x != "\n"), flags)
        if op is _c.IN:
            return self.edge(self.set_pred(av, ic), flags)
        if op is _c.BRANCH:
            s, e = self.new(), self.new()
            for alt in av[1]:
                a, b = self.build(alt, flags)
                self.eps[s].append(a)
                self.eps[b].append(e)
            return s, e
        if op is _c.SUBPATTERN:
            _group, add, dele, sub = av
            return self.build(sub, (flags | add) & ~dele)
        if op in (_c.MAX_REPEAT, _c.MIN_REPEAT) or op is getattr(_c, "POSSESSIVE_REPEAT", None):
            lo, hi, sub = av
            if op is getattr(_c, "POSSESSIVE_REPEAT", None):
                self.approx = True
            if lo > _REPEAT_CAP:
                lo, hi, self.approx = _REPEAT_CAP, _c.MAXREPEAT, True
            if hi is not _c.MAXREPEAT and hi != _c.MAXREPEAT and hi - lo > _REPEAT_CAP:
                hi, self.approx = _c.MAXREPEAT, True
            s = self.new()
            cur = s
            for _ in range(lo):
                a, b = self.build(sub, flags)
                self.eps[cur].append(a)
                cur = b
            if hi == _c.MAXREPEAT:
                a, b = self.build(sub, flags)
                self.eps[cur].append(a)
                self.eps[b].append(cur)
                return s, cur
            e = self.new()
            self.eps[cur].append(e)
            for _ in range(hi - lo):
                a, b = self.build(sub, flags)
                self.eps[cur].append(a)
                self.eps[b].append(e)
                cur = b
            return s, e
        if op is _c.AT:
            s, e = self.new(), self.new()
            if av in (_c.AT_BEGINNING, _c.AT_BEGINNING_STRING) and not (
                av is _c.AT_BEGINNING and flags & _c.SRE_FLAG_MULTILINE
            ):
                self.bol[s].append(e)
            elif av in (_c.AT_END, _c.AT_END_STRING) and not (av is _c.AT_END and flags & _c.SRE_FLAG_MULTILINE):
                self.eol[s].append(e)
            else:  # word boundaries, multiline anchors: over-approximate as "always"
                self.approx = True
                self.eps[s].append(e)
            return s, e
        if op is getattr(_c, "ATOMIC_GROUP", None):
            self.approx = True
            return self.build(av, flags)
        if op is _c.GROUPREF_EXISTS:
            self.approx = True
            _g, yes, no = av
            s, e = self.new(), self.new()
            for branch in (yes, no):
                a, b = self.build(branch or [], flags)
                self.eps[s].append(a)
                self.eps[b].append(e)
            return s, e
        # look-arounds, back-references: anything (over-approximation)
        self.approx = True
        s = self.new()
        if op is _c.GROUPREF:
            self.chars[s].append((lambda x: True, s))
        return s, s

    def set_pred(self, items, ic: bool) -> Pred:
        parts: list[Pred] = []
        negate = False
        for op, av in items:
            if op is _c.NEGATE:
                negate = True
            elif op is _c.LITERAL:
                ch = chr(av)
                self.note_chars(ch)
                parts.append(lambda x, ch=ch: x == ch)
            elif op is _c.NOT_LITERAL:
                ch = chr(av)
                self.note_chars(ch)
                eq = _fold(lambda x, ch=ch: x == ch, ic)
                parts.append(lambda x, eq=eq: not eq(x))
            elif op is _c.RANGE:
                lo, hi = av
                for cp in (lo - 1, lo, hi, hi + 1):
                    if 0 <= cp < 0x110000:
                        self.note_chars(chr(cp))
                parts.append(lambda x, lo=lo, hi=hi: lo <= ord(x) <= hi)
            elif op is _c.CATEGORY:
                parts.append(_cat(av))
            else:
                self.approx = True
                parts.append(lambda x: True)
        parts = [_fold(p, ic) for p in parts]
        if negate:
            return lambda x: not any(p(x) for p in parts)
        return lambda x: any(p(x) for p in parts)

    # ---------------------------------------------------------------- subset automaton
    def closure(self, states, at_start: bool) -> frozenset:
        seen = set(states)
        stack = list(states)
        while stack:
            s = stack.pop()
            nxt = self.eps[s] + (self.bol[s] if at_start else [])
            for t in nxt:
                if t not in seen:
                    seen.add(t)
                    stack.append(t)
        return frozenset(seen)

    def finish(self) -> None:
        """Compute ``live``: states from which acceptance is reachable without a '^' edge."""
        rev: list[list[int]] = [[] for _ in self.eps]
        for s in range(len(self.eps)):
            for t in self.eps[s] + self.eol[s] + [t for _, t in self.chars[s]]:
                rev[t].append(s)
        live = {self.accept}
        stack = [self.accept]
        while stack:
            t = stack.pop()
            for s in rev[t]:
                if s not in live:
                    live.add(s)
                    stack.append(s)
        self.live = frozenset(live)

    def initial(self) -> frozenset:
        if self._initial is None:
            self._initial = self.closure([self.start], True)
        return self._initial

    def step(self, S: frozenset, ch: str) -> frozenset:
        key = (S, ch)
        hit = self._step.get(key)
        if hit is None:
            nxt = [t for s in S for pred, t in self.chars[s] if pred(ch)]
            # states that can no longer reach acceptance (e.g. before a '^' we are past) are dropped,
            # so an anchored pattern's automaton dies as soon as the text diverges
            hit = (self.closure(nxt, False) & self.live) if nxt else frozenset()
            self._step[key] = hit
        return hit

    def moves(self, S: frozenset, alphabet: str) -> list[tuple[str, frozenset]]:
        """(char, next state) for every char of ``alphabet`` that leads somewhere (memoized)."""
        key = (S, alphabet)
        hit = self._moves.get(key)
        if hit is None:
            hit = [(ch, T) for ch in alphabet for T in (self.step(S, ch),) if T]
            self._moves[key] = hit
        return hit

    def accepting(self, S: frozenset, at_start: bool = False) -> bool:
        hit = self._acc.get((S, at_start))
        if hit is None:
            seen = set(S)
            stack = list(S)
            while stack:
                s = stack.pop()
                for t in self.eps[s] + self.eol[s] + (self.bol[s] if at_start else []):
                    if t not in seen:
                        seen.add(t)
                        stack.append(t)
            hit = self.accept in seen
            self._acc[(S, at_start)] = hit
        return hit


_CACHE: dict[tuple[str, str], Nfa] = {}


def compile_nfa(pattern: str, mode: str) -> Nfa:
    """NFA for ``pattern``; mode 'search' (re.search), 'full' (re.fullmatch) or 'equal' (literal string).

    Raises ``re.error`` for an invalid pattern.
    """
    key = (pattern, mode)
    hit = _CACHE.get(key)
    if hit is not None:
        return hit
    n = Nfa()
    if mode == "equal":
        items = [(_c.LITERAL, ord(ch)) for ch in pattern]
        flags = 0
    else:
        parsed = _p.parse(pattern)
        items, flags = list(parsed), parsed.state.flags
    a, b = n.build(items, flags)
    if mode == "search":
        n.start = n.new()
        n.chars[n.start].append((lambda x: True, n.start))
        n.eps[n.start].append(a)
        n.accept = n.new()
        n.chars[n.accept].append((lambda x: True, n.accept))
        n.sticky_accept = True
    else:
        n.start = a
        n.accept = b
    n.eps[b].append(n.accept) if b != n.accept else None
    n.finish()
    if len(_CACHE) > 4096:
        _CACHE.clear()
    _CACHE[key] = n
    return n


@dataclass
class Term:
    """One condition on a string: ``pattern`` matched in ``mode``; ``negated`` for '!~'."""

    pattern: str
    mode: str = "search"          # search | full | equal
    negated: bool = False

    def holds(self, s: str) -> bool:
        if self.mode == "equal":
            ok = s == self.pattern
        elif self.mode == "full":
            ok = re.fullmatch(self.pattern, s) is not None
        else:
            ok = re.search(self.pattern, s) is not None
        return ok != self.negated


@dataclass
class Result:
    """``witness`` is a string satisfying every term (confirmed with :mod:`re`), or None.

    ``decided`` is False when the search gave up or approximations left the answer open.
    """

    witness: Optional[str]
    decided: bool = True
    approximate: bool = field(default=False)


def alphabet_for(patterns: list[tuple[str, str]]) -> str:
    """A representative alphabet for (pattern, mode) pairs; pass it to many :func:`common_string`
    calls over those patterns so their automata share memoized transitions."""
    chars = set(_FIXED_ALPHABET)
    for pattern, mode in patterns:
        chars |= compile_nfa(pattern, mode).alphabet
    return "".join(sorted(ch for ch in chars if ch.isprintable()))


def common_string(terms: list[Term], alphabet: Optional[str] = None) -> Result:
    """Find a shortest string satisfying all terms, or prove there is none.

    ``alphabet`` (from :func:`alphabet_for`) must cover every pattern among ``terms``.
    """
    if not terms:
        return Result("")
    # most selective first, so most product steps die at the first component
    terms = sorted(terms, key=lambda t: (t.negated, t.mode == "search"))
    nfas = [compile_nfa(t.pattern, t.mode) for t in terms]
    approx = any(n.approx for n in nfas)
    if alphabet is None:
        alphabet = alphabet_for([(t.pattern, t.mode) for t in terms])
    neg = [t.negated for t in terms]
    lead, rest = nfas[0], list(zip(nfas[1:], neg[1:]))
    lead_positive = not neg[0]

    def dead(state) -> bool:
        for n, S, ng in zip(nfas, state, neg):
            if not ng and not S:
                return True
            if ng and n.sticky_accept and n.accept in S:
                return True  # a '!~' pattern already matched: no extension can undo it
        return False

    def accepted(state, at_start: bool) -> bool:
        return all(n.accepting(S, at_start) != ng for n, S, ng in zip(nfas, state, neg))

    start = tuple(n.initial() for n in nfas)
    if dead(start):
        return Result(None, True, approx)
    parent: dict = {start: None}
    queue = deque([start])
    undecided = False
    while queue:
        state = queue.popleft()
        if accepted(state, state == start and parent[state] is None):
            w = _witness(parent, state)
            if all(t.holds(w) for t in terms):
                return Result(w, True, approx)
            undecided = True  # an over-approximated candidate: keep looking
        firsts = lead.moves(state[0], alphabet) if lead_positive else [(ch, lead.step(state[0], ch)) for ch in alphabet]
        for ch, T0 in firsts:
            parts = [T0]
            for (n, ng), S in zip(rest, state[1:]):
                T = n.step(S, ch)
                if not ng and not T:
                    break
                parts.append(T)
            else:
                nxt = tuple(parts)
                if nxt in parent or dead(nxt):
                    continue
                parent[nxt] = (state, ch)
                if len(parent) > _STATE_LIMIT:
                    return Result(None, False, approx)
                queue.append(nxt)
            continue
    # An over-approximated positive pattern only adds strings, so "no common string" stays
    # exact; a negated one removes too many, and rejected candidates leave the answer open.
    loose = any(n.approx for n, ng in zip(nfas, neg) if ng)
    return Result(None, not (undecided or loose), approx)


def _witness(parent: dict, state) -> str:
    out = []
    while parent[state] is not None:
        state, ch = parent[state]
        out.append(ch)
    return "".join(reversed(out))


_PREFIX_CACHE: dict[tuple[str, bool], str] = {}


def literal_prefix(pattern: str, anchored: bool) -> str:
    """The lower-cased ASCII text every match of ``pattern`` starts with, for a match at the start of the
    string ('' when ``pattern`` is neither ``anchored`` (matched in full) nor starts with ``^``/``\\A``, or
    starts with a class, a repeat or an alternation). Raises ``re.error`` for an invalid pattern."""
    key = (pattern, anchored)
    hit = _PREFIX_CACHE.get(key)
    if hit is not None:
        return hit
    parsed = _p.parse(pattern)
    items = list(parsed)
    flags = parsed.state.flags
    if not anchored:
        if items and items[0][0] is _c.AT and (items[0][1] is _c.AT_BEGINNING_STRING or (
                items[0][1] is _c.AT_BEGINNING and not flags & _c.SRE_FLAG_MULTILINE)):
            items = items[1:]
        else:
            _PREFIX_CACHE[key] = ""
            return ""
    chars: list[str] = []

    def walk(seq) -> bool:
        for op, av in seq:
            if op is _c.LITERAL:
                ch = chr(av)
                if not ch.isascii():
                    return False
                chars.append(ch.lower())
            elif op is _c.SUBPATTERN and not (av[1] | av[2]) & ~_c.SRE_FLAG_IGNORECASE:
                if not walk(av[3]):
                    return False
            else:
                return False
        return True

    walk(items)
    _PREFIX_CACHE[key] = hit = "".join(chars)
    return hit
