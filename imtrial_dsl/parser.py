"""Source text -> lark syntax tree, with syntax errors as positioned diagnostics.

:func:`parse` never raises: every lark exception (and anything unexpected) becomes a
:class:`~imtrial_dsl.diagnostics.Diagnostic` with code E1xx. It keeps parsing after an
error (panic-mode recovery on lark's interactive parser) so one run reports several
independent syntax errors; when there is any error the tree is ``None``.

Codes: E101 unexpected character, E102 unterminated string, E103 unexpected token,
E104 unexpected end of file, E105 too many errors (parsing stopped), E199 internal error.
"""
from __future__ import annotations

import os
import re
import threading
from collections import OrderedDict
from functools import lru_cache
from typing import Optional

from lark import Lark, Token, Tree
from lark.exceptions import UnexpectedCharacters, UnexpectedInput, UnexpectedToken
from lark.lexer import PatternStr

from .diagnostics import Diagnostic, Severity, Span, did_you_mean
from .paths import grammar_file

MAX_ERRORS = 25
# After an error, further errors are suppressed until this many tokens parse cleanly
# (the classic yacc rule): the tokens right after an error are usually its echo.
_RESYNC_TOKENS = 3

_TERMINAL_WORDS = {
    "NAME": "a name",
    "ATTR": "a DICOM attribute keyword (CamelCase)",
    "UNIT": "a unit",
    "CUNIT": "a unit",
    "NUMBER": "a number",
    "STRING": 'a string ("...")',
    "EMAIL": "an e-mail address (<user@host>)",
    "DATE": "a date (YYYY-MM-DD)",
    "TAG": "a DICOM tag such as (0010,0010)",
    "ACTION": "an action code (D, Z, X, K, C, U, X/Z, ...)",
    "$END": "end of file",
}

_local = threading.local()
_CACHE_LOCK = threading.Lock()


def _comment_sink(tok: Token) -> Token:
    sink = getattr(_local, "comments", None)
    if sink is not None:
        sink.append(tok)
    return tok


class _TokenCounter:
    """Post-lexer that counts the tokens handed to the parser (for error-echo suppression)."""

    always_accept = ()

    def process(self, stream):
        for tok in stream:
            _local.lexed = getattr(_local, "lexed", 0) + 1
            _local.last_tok = tok
            yield tok


def _cache_file(keep_all_tokens: bool) -> Optional[str]:
    """Per-user cache of the analysed grammar (lark pickles it): start-up ~4x faster.

    Only a folder the user owns is used (never a shared temp dir), because lark unpickles it.
    Set IMTRIAL_NO_CACHE=1 to disable, IMTRIAL_CACHE_DIR to move it.
    """
    if os.environ.get("IMTRIAL_NO_CACHE"):
        return None
    base = os.environ.get("IMTRIAL_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "imtrial")
    try:
        os.makedirs(base, mode=0o700, exist_ok=True)
        if hasattr(os, "getuid") and os.stat(base).st_uid != os.getuid():
            return None
    except OSError:
        return None
    if not os.access(base, os.W_OK):
        return None
    return os.path.join(base, f"lark-{'tokens' if keep_all_tokens else 'tree'}.cache")


@lru_cache(maxsize=None)
def get_lark(keep_all_tokens: bool = False) -> Lark:
    """The (memoized) LALR parser; ``keep_all_tokens`` is for the formatter."""
    text = grammar_file().read_text(encoding="utf-8")
    kwargs = dict(parser="lalr", lexer="contextual", propagate_positions=True, maybe_placeholders=True,
                  keep_all_tokens=keep_all_tokens, lexer_callbacks={"COMMENT": _comment_sink},
                  postlex=_TokenCounter())
    cache = _cache_file(keep_all_tokens)
    if cache:
        try:
            return Lark(text, cache=cache, **kwargs)
        except Exception:  # unreadable or stale cache: build from scratch
            pass
    return Lark(text, **kwargs)


@lru_cache(maxsize=None)
def keywords() -> frozenset[str]:
    """Every keyword of the language (for did-you-mean and documentation)."""
    out = set()
    for t in get_lark().terminals:
        if isinstance(t.pattern, PatternStr) and re.fullmatch(r"[a-z_]+", t.pattern.value):
            out.add(t.pattern.value)
    return frozenset(out)


def _terminal_text(lark: Lark, name: str) -> str:
    if name in _TERMINAL_WORDS:
        return _TERMINAL_WORDS[name]
    try:
        pat = lark.get_terminal(name).pattern
    except KeyError:
        return name
    return f"'{pat.value}'" if isinstance(pat, PatternStr) else name.lower()


def _literal(lark: Lark, name: str) -> Optional[str]:
    try:
        pat = lark.get_terminal(name).pattern
    except KeyError:
        return None
    return pat.value if isinstance(pat, PatternStr) else None


def _expected_words(lark: Lark, expected) -> str:
    names = sorted(set(expected or ()))
    lits = sorted(_terminal_text(lark, n) for n in names if _literal(lark, n) is not None)
    others = sorted(_terminal_text(lark, n) for n in names if _literal(lark, n) is None)
    items = others + lits
    if len(items) > 12:
        items = items[:12] + [f"... ({len(names) - 12} more)"]
    if not items:
        return ""
    if len(items) == 1:
        return f"expected {items[0]}"
    return "expected one of: " + ", ".join(items)


def _describe(lark: Lark, tok: Token) -> str:
    if tok.type == "$END":
        return "end of file"
    lit = _literal(lark, tok.type)
    val = str(tok.value)
    if len(val) > 40:
        val = val[:37] + "..."
    if lit is not None:
        return f"keyword '{val}'" if re.fullmatch(r"[a-z_]+", lit) else f"'{val}'"
    kind = {"NAME": "name", "ATTR": "name", "UNIT": "word", "CUNIT": "unit", "NUMBER": "number", "STRING": "string", "EMAIL": "e-mail address",
            "DATE": "date", "TAG": "tag", "ACTION": "action code"}.get(tok.type, tok.type.lower())
    return f"{kind} '{val}'" if tok.type != "STRING" else f"string {val}"


class _Errors:
    """Collects diagnostics during one parse and drives recovery."""

    def __init__(self, lark: Lark, text: str, filename: str):
        self.lark, self.text, self.filename = lark, text, filename
        self.diags: list[Diagnostic] = []
        self.last_err_lexed: Optional[int] = None
        self.last_char_err: Optional[int] = None
        self.stopped = False

    def _span(self, line, col, width=1) -> Span:
        line = line or 1
        col = col or 1
        return Span(file=self.filename, line=line, col=col, end_line=line, end_col=col + max(width, 1))

    def _eof_span(self) -> Span:
        lines = self.text.split("\n")
        return self._span(len(lines), len(lines[-1]) + 1)

    def add(self, code, message, span, hint=None):
        if len(self.diags) >= MAX_ERRORS:
            if not self.stopped:
                self.stopped = True
                self.diags.append(Diagnostic(code="E105", message=f"too many syntax errors; stopped after {MAX_ERRORS}",
                                             span=span))
            return
        self.diags.append(Diagnostic(severity=Severity.ERROR, code=code, message=message, span=span, hint=hint))

    def _suppressed(self, tok: Optional[Token] = None) -> bool:
        """True while fewer than _RESYNC_TOKENS tokens were accepted since the previous error."""
        lexed = getattr(_local, "lexed", 0)
        # a token the parser rejected went through the counter; one the lexer rejected did not
        counted = 1 if tok is not None and getattr(_local, "last_tok", None) is tok else 0
        quiet = self.last_err_lexed is not None and lexed - self.last_err_lexed - counted < _RESYNC_TOKENS
        self.last_err_lexed = lexed
        return quiet

    # -- lark on_error callback
    def __call__(self, e: UnexpectedInput) -> bool:
        if len(self.diags) >= MAX_ERRORS:
            self.add("E105", "", self._span(getattr(e, "line", 1), getattr(e, "column", 1)))
            return False
        if isinstance(e, UnexpectedCharacters):
            self._chars(e)
            return True
        if isinstance(e, UnexpectedToken):
            if e.token.type == "$END":
                if not self._suppressed(e.token):
                    self._token(e)
                return False
            quiet = self._suppressed(e.token)
            if not quiet:
                self._token(e)
            self._recover(e)
            return True
        return False

    def _chars(self, e: UnexpectedCharacters) -> None:
        pos = e.pos_in_stream
        adjacent = self.last_char_err is not None and pos == self.last_char_err + 1
        self.last_char_err = pos
        quiet = self._suppressed() or adjacent
        ch = self.text[pos] if 0 <= pos < len(self.text) else ""
        if ch == '"':
            end = self.text.find("\n", pos)
            end = len(self.text) if end < 0 else end
            # skip the rest of the line: its words are string content, not code
            try:
                e.interactive_parser.lexer_thread.state.line_ctr.feed(self.text[pos:end])
            except Exception:
                pass
            if not quiet:
                self.add("E102", "unterminated string", self._span(e.line, e.column, end - pos),
                         'close the string with " on the same line (strings cannot span lines)')
            return
        if quiet:
            return
        shown = ch if ch.isprintable() and ch.strip() else repr(ch).strip("'")
        hint = _expected_words(self.lark, e.allowed) or None
        if not ch.isascii() and ch.isspace():
            self.add("E101", f"unexpected character U+{ord(ch):04X} (a non-ASCII space, e.g. pasted from a document)",
                     self._span(e.line, e.column), "write a plain space; outside \"strings\" the file is ASCII")
            return
        if ch in "\u201c\u201d\u201e\u2018\u2019":
            self.add("E101", f"unexpected character '{shown}': a typographic quote", self._span(e.line, e.column),
                     'strings are written between straight double quotes: "..."')
            return
        if not ch.isascii() and (ch.isalnum() or ch == "_"):
            self.add("E101", f"unexpected character '{shown}': names must be ASCII", self._span(e.line, e.column),
                     "names use the letters A-Z and a-z, digits and '_'; put other text in a \"string\"")
            return
        self.add("E101", f"unexpected character '{shown}'", self._span(e.line, e.column), hint)

    def _token(self, e: UnexpectedToken) -> None:
        tok = e.token
        if tok.type == "$END":
            exp = _expected_words(self.lark, self._accepts(e))
            opened = _open_block(self.text) if "RBRACE" in (e.expected or ()) else None
            if opened is not None:
                head, line = opened
                self.add("E104", f"unexpected end of file: the '{head}' block opened at line {line} is never closed",
                         self._eof_span(), f"add the closing '}}' of '{head}'" + (f"; {exp}" if exp else ""))
                return
            self.add("E104", "unexpected end of file" + (f", {exp}" if exp else ""), self._eof_span(),
                     "a '{' block may be missing its closing '}'" if "RBRACE" in (e.expected or ()) else None)
            return
        width = (tok.end_column - tok.column) if (tok.end_line == tok.line and tok.end_column) else 1
        span = self._span(tok.line, tok.column, width)
        after = self.text[tok.end_pos] if tok.end_pos is not None and tok.end_pos < len(self.text) else ""
        if after and not after.isascii() and (after.isalnum() or after == "_"):
            # 'protocöl' lexes as 'protoc' then 'ö': the word was cut at a character names cannot hold
            word = re.match(r"\w*", self.text[tok.start_pos:]).group(0)
            self.add("E101", f"unexpected character '{after}' in '{word}': names and keywords must be ASCII",
                     self._span(tok.end_line, tok.end_column),
                     "names use the letters A-Z and a-z, digits and '_'; put other text in a \"string\"")
            return
        opened = self._left_open(tok, e)
        if opened is not None:
            head, line = opened
            self.add("E103", f"unexpected {_describe(self.lark, tok)}: the '{head}' block opened at line {line} is not closed",
                     span, f"add the closing '}}' of '{head}' before line {tok.line}")
            return
        hints = []
        expected = self._accepts(e)
        exp = _expected_words(self.lark, expected)
        if exp:
            hints.append(exp)
        dym = self._did_you_mean(tok, expected, tok.start_pos)
        if dym:
            hints.insert(0, dym)
        self.add("E103", f"unexpected {_describe(self.lark, tok)}", span, "; ".join(hints) or None)

    def _left_open(self, tok: Token, e: UnexpectedToken) -> Optional[tuple[str, int]]:
        """The block a missing '}' left open, when a declaration keyword starts a line inside it ('protocol'
        inside a protocol): its head and line, else None."""
        if "RBRACE" not in (e.expected or ()) or str(tok.value) not in _top_keywords(self.lark):
            return None
        line_start = self.text.rfind("\n", 0, tok.start_pos) + 1
        if self.text[line_start:tok.start_pos].strip():
            return None
        return _open_block(self.text[:tok.start_pos])

    @staticmethod
    def _accepts(e: UnexpectedToken):
        """Terminals really acceptable here (LALR's lookahead sets over-approximate)."""
        try:
            acc = e.interactive_parser.accepts() if e.interactive_parser is not None else None
        except Exception:
            acc = None
        return acc or e.expected

    def _did_you_mean(self, tok: Token, expected, pos) -> Optional[str]:
        exp_kw = [v for v in (_literal(self.lark, n) for n in (expected or ())) if v and re.fullmatch(r"[a-z_]+", v)]
        if isinstance(tok.value, str) and re.fullmatch(r"[A-Za-z_]\w*", tok.value):
            hit = did_you_mean(tok.value, exp_kw)
            if hit:
                return hit
        # A misspelt keyword is often taken as a name (e.g. `mach X ~ "..."` looks like a
        # constraint on attribute `mach`), so the error lands on the next token: look back.
        if pos is not None and pos >= 0:
            m = re.search(r"(?:^|\n)[ \t;]*([a-z_][a-z0-9_]*)\s*$", self.text[:pos])
            if m and m.group(1) not in keywords() and _literal(self.lark, tok.type) is None:
                hit = did_you_mean(m.group(1), sorted(keywords()))
                if hit:
                    return f"'{m.group(1)}' is not a keyword here; {hit}"
        return None

    def _recover(self, e: UnexpectedToken) -> None:
        """Pop parser states until one accepts the offending token, then feed it (else it is dropped)."""
        ip = e.interactive_parser
        if ip is None:
            return
        ps = ip.parser_state
        states = ps.parse_conf.states
        tok = e.token
        # the root lexer may have typed a keyword as a name/unit: try the keyword's type too
        types = [tok.type]
        kw = _keyword_types(self.lark).get(str(tok.value))
        if kw and kw != tok.type:
            types.insert(0, kw)
        best = None
        for ttype in types:
            for top in range(len(ps.state_stack) - 1, -1, -1):
                if ttype in states[ps.state_stack[top]]:
                    if best is None or top > best[0]:
                        best = (top, ttype)
                    break
        if best is None or best[0] == len(ps.state_stack) - 1:
            return
        top, ttype = best
        saved_s, saved_v = list(ps.state_stack), list(ps.value_stack)
        del ps.state_stack[top + 1:]
        del ps.value_stack[top:]
        try:
            ip.feed_token(Token.new_borrow_pos(ttype, tok.value, tok) if ttype != tok.type else tok)
        except Exception:
            ps.state_stack[:], ps.value_stack[:] = saved_s, saved_v


def _open_block(text: str) -> Optional[tuple[str, int]]:
    """The innermost '{' left open at the end of ``text`` (strings and comments skipped): the
    first two words of the statement it opens ('protocol T1w') and its line."""
    stack: list[int] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch == '"':
            j = i + 1
            while j < n and text[j] not in '"\n':
                j += 2 if text[j] == "\\" else 1
            i = j + 1
            continue
        if ch == "#":
            j = text.find("\n", i)
            i = n if j < 0 else j
            continue
        if ch == "{":
            stack.append(i)
        elif ch == "}" and stack:
            stack.pop()
        i += 1
    if not stack:
        return None
    pos = stack[-1]
    start = max(text.rfind(c, 0, pos) for c in "{};\n") + 1
    while start > 0 and not text[start:pos].strip():  # '{' on a line of its own: the head is above
        start = max(text.rfind(c, 0, start - 1) for c in "{};\n") + 1
    words = re.sub(r'"[^"\n]*"|#[^\n]*', " ", text[start:pos]).split()
    return " ".join(words[:2]) or "{", text.count("\n", 0, pos) + 1


_TOP: dict[int, frozenset] = {}


def _top_keywords(lark: Lark) -> frozenset:
    """The keywords that start a top-level declaration (protocol, site, schedule, …)."""
    hit = _TOP.get(id(lark))
    if hit is None:
        acc = lark.parse_interactive("").accepts()
        hit = _TOP[id(lark)] = frozenset(v for v in (_literal(lark, n) for n in acc) if v and v.isalpha())
    return hit


@lru_cache(maxsize=None)
def _keyword_types_cached(lark_id: int, lark: Lark) -> dict:
    return {t.pattern.value: t.name for t in lark.terminals if isinstance(t.pattern, PatternStr)}


def _keyword_types(lark: Lark) -> dict:
    return _keyword_types_cached(id(lark), lark)


# Recently parsed texts: stdlib imports (the 621-rule PS3.15 table) are re-parsed on every
# load otherwise. Trees are never mutated downstream, so sharing them is safe.
_CACHE: "OrderedDict[tuple[str, str], tuple[Optional[Tree], list[Diagnostic]]]" = OrderedDict()
_CACHE_SIZE = 32
_CACHE_MIN_CHARS = 2000  # small texts parse faster than they hash-and-compare


def parse(text, filename: str = "<string>") -> tuple[Optional[Tree], list[Diagnostic]]:
    """Parse ``text``; return (tree or None, diagnostics). Never raises."""
    filename = str(filename) if filename else "<string>"
    if isinstance(text, (bytes, bytearray)):
        text = bytes(text).decode("utf-8", errors="replace")
    elif not isinstance(text, str):
        text = str(text)
    if text.startswith("\ufeff"):
        text = " " + text[1:]  # keep columns stable
    if len(text) < _CACHE_MIN_CHARS:
        return _parse(text, filename)
    key = (filename, text)
    with _CACHE_LOCK:
        hit = _CACHE.get(key)
        if hit is not None:
            _CACHE.move_to_end(key)
            return hit[0], list(hit[1])
    result = _parse(text, filename)
    with _CACHE_LOCK:
        _CACHE[key] = result
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return result[0], list(result[1])


def _parse(text: str, filename: str) -> tuple[Optional[Tree], list[Diagnostic]]:
    try:
        lark = get_lark()
    except Exception as exc:  # grammar missing/broken: still a value, not a crash
        return None, [Diagnostic(code="E199", message=f"cannot load the grammar: {exc}", span=Span(file=filename))]
    errors = _Errors(lark, text, filename)
    _local.lexed, _local.last_tok = 0, None
    tree = None
    try:
        tree = lark.parse(text, on_error=errors)
    except UnexpectedInput as e:
        if not errors.diags:
            errors.add("E103", f"syntax error: {type(e).__name__}", errors._span(getattr(e, "line", 1), getattr(e, "column", 1)))
    except RecursionError:
        errors.add("E199", "input is nested too deeply", Span(file=filename, line=1, col=1))
    except Exception as exc:  # lark internals on pathological input: never propagate
        errors.add("E199", f"internal parser error: {type(exc).__name__}: {exc}", Span(file=filename, line=1, col=1))
    if errors.diags:
        return None, errors.diags
    return tree, []


def parse_with_comments(text: str, filename: str = "<string>") -> tuple[Optional[Tree], list[Token], list[Diagnostic]]:
    """Parse keeping every token (for the formatter); also return the comment tokens."""
    _tree, diags = parse(text, filename)
    if diags:
        return None, [], diags
    if text.startswith("\ufeff"):
        text = " " + text[1:]
    _local.comments = []
    try:
        tree = get_lark(keep_all_tokens=True).parse(text)
        comments = list(_local.comments)
    except Exception as exc:
        return None, [], [Diagnostic(code="E199", message=f"internal parser error: {exc}", span=Span(file=filename))]
    finally:
        _local.comments = None
    return tree, comments, []
