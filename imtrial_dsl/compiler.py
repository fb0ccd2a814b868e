"""One call from source to checked IR and dependency graph: load (parse, lower, imports) → check → graph."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import networkx as nx

from . import ir
from .diagnostics import Diagnostic, Severity


@dataclass
class CompileResult:
    """``ok`` is True when there is no error (warnings allowed); ``graph`` is built only then."""

    trial: Optional[ir.Trial]
    diagnostics: list[Diagnostic] = field(default_factory=list)
    sources: dict[str, str] = field(default_factory=dict)
    graph: Optional[nx.DiGraph] = None

    @property
    def ok(self) -> bool:
        return self.trial is not None and not any(d.severity == Severity.ERROR for d in self.diagnostics)

    @property
    def errors(self) -> list[Diagnostic]:
        return [d for d in self.diagnostics if d.severity == Severity.ERROR]

    @property
    def warnings(self) -> list[Diagnostic]:
        return [d for d in self.diagnostics if d.severity == Severity.WARNING]


# Checks the lowering may already make on the source text (units, ranges, types, regexes); the
# checker repeats them so IR built in Python is checked too, but one mistake gets one message.
_ALSO_LOWERING = {"E401", "E402", "E407", "E408"}


def _without_repeats(checked: list[Diagnostic], earlier: list[Diagnostic]) -> list[Diagnostic]:
    lines = {(d.span.file, d.span.line) for d in earlier if d.span and d.severity == Severity.ERROR}
    return [d for d in checked if not (d.code in _ALSO_LOWERING and d.span and (d.span.file, d.span.line) in lines)]


def _finish(trial: Optional[ir.Trial], diags: list[Diagnostic], sources: dict[str, str]) -> CompileResult:
    from .check import check
    from .graph import build_graph

    diags = list(diags)
    # Syntax errors (E1xx) leave holes in the IR; checking it would only add follow-on noise.
    syntax_broken = any(d.code.startswith("E1") and d.severity == Severity.ERROR for d in diags)
    if trial is not None and not syntax_broken:
        diags.extend(_without_repeats(check(trial), diags))
    res = CompileResult(trial=trial, diagnostics=sorted(diags, key=Diagnostic.sort_key), sources=dict(sources))
    if res.ok:
        res.graph = build_graph(trial)
    return res


def compile_file(path: str | Path) -> CompileResult:
    """Load ``path`` (with its imports), check it and build its graph."""
    from .loader import load

    trial, diags, sources = load(Path(path))
    return _finish(trial, diags, sources)


def compile_text(text: str, filename: str = "<string>") -> CompileResult:
    """Like :func:`compile_file` for text in memory (imports resolve against the stdlib and ``filename``'s folder)."""
    from .loader import load_text

    trial, diags, sources = load_text(text, filename)
    return _finish(trial, diags, sources)
