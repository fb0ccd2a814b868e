"""Positions and diagnostics: errors are values that carry where they happened.

Every stage (parser, lowering, checker, runner) reports problems as
:class:`Diagnostic` values. Only the CLI prints them (see :func:`render`).
"""
from __future__ import annotations

import difflib
from enum import Enum
from typing import Iterable, Optional, Sequence

from pydantic import BaseModel, ConfigDict


class Span(BaseModel):
    """A source range: 1-based line and column, end exclusive."""

    model_config = ConfigDict(frozen=True)

    file: str = "<string>"
    line: int = 0
    col: int = 0
    end_line: int = 0
    end_col: int = 0

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}"


class Severity(str, Enum):
    ERROR = "error"
    WARNING = "warning"
    NOTE = "note"


class Diagnostic(BaseModel):
    """One problem with a position, a message, and an optional hint."""

    severity: Severity = Severity.ERROR
    code: str = "E000"
    message: str
    span: Optional[Span] = None
    hint: Optional[str] = None
    omitted: int = 0   # on a summary: how many more diagnostics of this code were left out (see :func:`cap`)

    def sort_key(self):
        s = self.span or Span()
        return (s.file, s.line, s.col, self.severity != Severity.ERROR, self.message)

    def label(self) -> str:
        """``error[E301]``: the severity with the code, as every rendering shows it."""
        return f"{self.severity.value}[{self.code}]"

    def __str__(self) -> str:
        where = f"{self.span}: " if self.span else ""
        return f"{where}{self.label()}: {self.message}"


class ImtrialError(Exception):
    """The root of every error imtrial raises on purpose: it carries a :class:`Diagnostic`.

    ``ImtrialError(node_or_span, message, hint)`` for a problem at a place in the study (anything
    with ``.span``); ``ImtrialError(message, code=..., hint=...)`` for one that has no source
    position (a missing key, a locked workdir). The library raises; only the CLI renders.
    """

    code = "E000"
    severity = Severity.ERROR

    def __init__(self, node_or_message, message: Optional[str] = None, hint: Optional[str] = None, *,
                 code: Optional[str] = None):
        if message is None:
            node, message = None, str(node_or_message)
        else:
            node = node_or_message
        span = node if isinstance(node, Span) or node is None else getattr(node, "span", None)
        if code is not None:
            self.code = code
        self.diagnostic = Diagnostic(severity=self.severity, code=self.code, message=message, span=span, hint=hint)
        super().__init__(str(self.diagnostic))


class CompileErrors(ImtrialError):
    """Several diagnostics at once (a study that does not compile), sorted by position."""

    def __init__(self, diagnostics: Sequence[Diagnostic]):
        self.diagnostics = sorted(diagnostics, key=Diagnostic.sort_key)
        self.diagnostic = self.diagnostics[0] if self.diagnostics else Diagnostic(message="no diagnostics")
        Exception.__init__(self, "\n".join(str(d) for d in self.diagnostics))


# Diagnostics of one code shown before the rest are summarized (docs/diagnostics.md, "How many are shown").
SHOWN_PER_CODE = 10


def cap(diags: Sequence[Diagnostic], omitted: Optional[dict[str, int]] = None,
        per_code: int = SHOWN_PER_CODE) -> list[Diagnostic]:
    """``diags`` sorted by position, with at most ``per_code`` of each (code, severity); the rest of a code
    become one summary after its last shown diagnostic ("… and N more like this"), so every kind stays
    visible. ``omitted`` adds counts of diagnostics a check left out without building them; summaries
    already in ``diags`` are merged, so capping twice changes nothing."""
    more: dict[tuple[str, Severity], int] = {}
    for code, n in (omitted or {}).items():
        key = (code, Severity.WARNING if code.startswith("W") else Severity.ERROR)
        more[key] = more.get(key, 0) + n
    kept: list[Diagnostic] = []
    seen: dict[tuple[str, Severity], int] = {}
    last: dict[tuple[str, Severity], Diagnostic] = {}
    for d in sorted(diags, key=Diagnostic.sort_key):
        key = (d.code, d.severity)
        if d.omitted:
            more[key] = more.get(key, 0) + d.omitted
            continue
        if seen.get(key, 0) >= per_code:
            more[key] = more.get(key, 0) + 1
            continue
        seen[key] = seen.get(key, 0) + 1
        last[key] = d
        kept.append(d)
    for key, n in more.items():
        if n <= 0:
            continue
        code, sev = key
        anchor = last.get(key)
        what = "error" if sev == Severity.ERROR else "warning" if sev == Severity.WARNING else "note"
        kept.append(Diagnostic(
            severity=sev, code=code, span=anchor.span if anchor else None, omitted=n,
            message=f"… and {n:,} more {what}{'' if n == 1 else 's'} [{code}] like this, not shown",
            hint=f"only the first {per_code} of each code are shown; fix these and check again"))
    return sorted(kept, key=Diagnostic.sort_key)


def did_you_mean(name: str, candidates: Iterable[str]) -> Optional[str]:
    """A hint such as "did you mean 'T1_MPRAGE'?", or None."""
    cands = list(candidates)
    best = difflib.get_close_matches(name, cands, n=1, cutoff=0.6)
    if not best:
        low = {c.lower(): c for c in cands}
        best = difflib.get_close_matches(name.lower(), list(low), n=1, cutoff=0.6)
        best = [low[b] for b in best]
    return f"did you mean '{best[0]}'?" if best else None


def render(diags: Sequence[Diagnostic], sources: dict[str, str], color: bool = False) -> str:
    """Render diagnostics compiler-style: ``file:line:col: error[E301]: message``, source line, caret, hint.

    The code in brackets is what ``imtrial explain-code`` explains."""
    red, yellow, cyan, bold, reset = (
        ("\x1b[31m", "\x1b[33m", "\x1b[36m", "\x1b[1m", "\x1b[0m") if color else ("",) * 5
    )
    out = []
    for d in sorted(diags, key=Diagnostic.sort_key):
        sev_col = red if d.severity == Severity.ERROR else yellow if d.severity == Severity.WARNING else cyan
        where = f"{d.span}: " if d.span else ""
        out.append(f"{bold}{where}{reset}{sev_col}{d.severity.value}{reset}[{d.code}]: {d.message}")
        if d.span and d.span.line > 0:
            text = sources.get(d.span.file)
            lines = text.splitlines() if text is not None else []
            if 0 < d.span.line <= len(lines):
                src = lines[d.span.line - 1].replace("\t", " ")
                out.append(f"  {src}")
                width = 1
                if d.span.end_line == d.span.line and d.span.end_col > d.span.col:
                    width = d.span.end_col - d.span.col
                out.append("  " + " " * max(d.span.col - 1, 0) + sev_col + "^" + "~" * (width - 1) + reset)
        if d.hint:
            out.append(f"  {cyan}hint{reset}: {d.hint}")
    return "\n".join(out)


# An OSError / SQLite error caused by the machine, not by imtrial or its input: (code, what) by errno.
_ENV_ERRNO = {28: ("E850", "no space left on device"), 122: ("E850", "disk quota exceeded"),
              30: ("E851", "read-only file system"), 13: ("E852", "permission denied"),
              1: ("E852", "operation not permitted"), 5: ("E853", "input/output error")}
_ENV_SQLITE = (("database or disk is full", "E850", "no space left on device (state database)"),
               ("readonly database", "E851", "the state database is read-only"),
               ("unable to open database", "E852", "the state database cannot be opened"),
               ("disk i/o error", "E853", "input/output error (state database)"))


def environment_error(exc: BaseException) -> Optional[tuple[str, str]]:
    """``(code, message)`` when ``exc`` is a problem of the environment — a full disk, a read-only path,
    missing permissions, an I/O error — rather than a bug or bad input; else None (docs/diagnostics.md E850–E853)."""
    import sqlite3

    if isinstance(exc, sqlite3.OperationalError):
        text = str(exc).lower()
        for needle, code, what in _ENV_SQLITE:
            if needle in text:
                return code, f"{what}: {exc}"
        return None
    if isinstance(exc, OSError) and exc.errno is not None:
        code, what = _ENV_ERRNO.get(exc.errno, ("E853", exc.strerror or "operating-system error"))
        where = f": {exc.filename}" if exc.filename else ""
        return code, f"{what}{where}"
    return None
