"""One call from source to checked IR and dependency graph: load (parse, lower, imports) → check → graph."""
from __future__ import annotations

import gc
import hashlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import networkx as nx
from pydantic import ValidationError

from . import ir
from .diagnostics import CompileErrors, Diagnostic, Severity, Span, cap


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
_ALSO_LOWERING |= {"E314"}  # a QC parameter the lowering rejected (unknown unit) is not also "missing"


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
    res = CompileResult(trial=trial, diagnostics=cap(diags), sources=dict(sources))
    if res.ok:
        res.graph = build_graph(trial)
    return res


@contextmanager
def _collector_paused():
    """Pause the cyclic garbage collector: a study's syntax tree and IR are hundreds of thousands of objects
    in no cycle, and the collector's repeated passes over them grew faster than the study (3,000 protocols:
    10.7 s CPU to load with it, 4.5 s without; docs/benchmarks.md). Reference counting still frees them."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def compile_file(path: str | Path) -> CompileResult:
    """Load ``path`` (with its imports), check it and build its graph."""
    from .loader import load

    with _collector_paused():
        trial, diags, sources = load(Path(path))
        return _finish(trial, diags, sources)


def compile_text(text: str, filename: str = "<string>") -> CompileResult:
    """Like :func:`compile_file` for text in memory (imports resolve against the stdlib and ``filename``'s folder)."""
    from .loader import load_text

    with _collector_paused():
        trial, diags, sources = load_text(text, filename)
        return _finish(trial, diags, sources)


def unreadable(path: str | Path) -> Optional[Diagnostic]:
    """E001 when ``path`` is not a file that can be read (missing, or a folder), else None."""
    p = Path(path)
    if p.is_file():
        return None
    why = "no such file" if not p.exists() else "not a file"
    return Diagnostic(code="E001", message=f"cannot read '{path}': {why}")


def load_trial(path: str | Path) -> ir.Trial:
    """The checked Trial of IR JSON (``*.json``, as ``imtrial compile`` writes it) or of an ``.imtrial`` file.

    Prints nothing. Raises :class:`CompileErrors` when the file cannot be read, is not IR JSON (E003), or
    the study has errors (the exception carries every diagnostic, warnings too).
    """
    miss = unreadable(path)
    if miss:
        raise CompileErrors([miss])
    p = Path(path)
    if p.suffix != ".json":
        res = compile_file(p)
        if not res.ok:
            raise CompileErrors(res.diagnostics)
        return res.trial
    data = p.read_bytes()
    try:
        trial = ir.Trial.model_validate_json(data)
    except ValidationError as exc:  # also JSON that does not parse
        first = exc.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        more = exc.error_count() - 1
        raise CompileErrors([Diagnostic(
            code="E003", message=f"'{path}' is not imtrial IR JSON: {where + ': ' if where else ''}{first['msg']}"
            + (f" (and {more} more)" if more else ""), hint="write it with 'imtrial compile STUDY -o FILE.json'")]) from None
    if not trial.source_sha256:
        trial.source_sha256 = hashlib.sha256(data).hexdigest()
    return trial


def _declared(trial) -> str:
    """'2 protocols, 1 site': what a file without a study block does declare."""
    parts = [(len(trial.protocols), "protocol", "protocols"), (len(trial.sites), "site", "sites"),
             (len(trial.analyses), "analysis", "analyses"), (len(trial.qc), "QC check", "QC checks")]
    return ", ".join(f"{n} {one if n == 1 else many}" for n, one, many in parts if n)


def study_file_problems(res: CompileResult, path: str | Path) -> list[Diagnostic]:
    """What makes a file no study at all, both errors: E113 an empty file, E114 no ``study`` block (files meant
    to be imported, such as the stdlib's, are not studies; ``imtrial check`` asks this of its files)."""
    text = res.sources.get(str(path))
    if text is None:
        text = next((t for f, t in res.sources.items() if Path(f).resolve() == Path(path).resolve()), None)
    if text is None or any(d.code == "E001" for d in res.diagnostics):
        return []
    where = Span(file=str(path), line=1, col=1, end_line=1, end_col=2)
    body = "\n".join(line.split("#", 1)[0] for line in text.splitlines()).strip()
    if not body:
        return [Diagnostic(code="E113", message="empty file: there is no study to check", span=where,
                           hint="start with a 'study CODE \"Title\" { … }' block; see docs/language.md")]
    syntax_broken = any(d.code.startswith("E1") and d.severity == Severity.ERROR for d in res.diagnostics)
    if res.trial is not None and res.trial.study is None and not syntax_broken:  # a parse error hides the block
        what = _declared(res.trial)
        return [Diagnostic(code="E114", message="no 'study' block: this file declares no study"
                           + (f" (only {what})" if what else ""), span=where,
                           hint="add 'study CODE \"Title\" { … }' at the top; a file of shared declarations is not checked "
                                "alone but imported ('import \"file.imtrial\"') by the study file that has it")]
    return []
