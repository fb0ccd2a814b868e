"""Load a study: parse and lower the main file and its imports into one :class:`ir.Trial`.

``import "x.imtrial"`` resolves relative to the importing file first; a path starting
with ``stdlib/`` then resolves against the folder holding the packaged stdlib, so
``import "stdlib/deid/ps315.imtrial"`` works from any folder and from an installed wheel.
Each file is loaded once; imported declarations come before the importer's own. Problems
are diagnostics at the import line: E220 file not found, E221 import cycle, E222 a
single-valued block (study, schedule, ...) defined twice, E223 unreadable file.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Optional, Union

from . import ir
from .diagnostics import Diagnostic, Span, did_you_mean
from .lower import lower
from .parser import parse
from .paths import stdlib_root

_LISTS = ("imports", "sites", "protocols", "deid_profiles", "qc", "analyses", "transfers", "roles", "reports")
_SINGLES = ("study", "schedule", "deidentify", "identifiers", "archive", "qualification")
_LISTS += ("reads",)          # image interpretation (check/reads.py)
_SINGLES += ("changelog",)    # document control: version history and approvers

Sources = dict[str, str]


def _display(path: Path) -> str:
    """How a file is named in spans and messages: relative to the cwd when that is shorter."""
    try:
        rel = os.path.relpath(path)
    except ValueError:  # other drive on Windows
        return str(path)
    return rel if not rel.startswith("..") else str(path)


def _decode(data: bytes, name: str, diags: list[Diagnostic]) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        diags.append(Diagnostic(code="E223", message=f"file is not valid UTF-8 ({exc.reason} at byte {exc.start})",
                                span=Span(file=name, line=1, col=1)))
        text = data.decode("utf-8", errors="replace")
    return text[1:] if text.startswith("\ufeff") else text


def stdlib_files() -> list[str]:
    """Importable stdlib paths, as written in an import ("stdlib/qc/common.imtrial", ...)."""
    root = stdlib_root()
    return sorted("stdlib/" + p.relative_to(root).as_posix() for p in root.rglob("*.imtrial"))


def resolve_import(path: str, importer_dir: Optional[Path]) -> tuple[Optional[Path], list[Path]]:
    """(resolved path or None, the candidates tried)."""
    tried: list[Path] = []
    p = Path(path)
    if p.is_absolute():
        tried.append(p)
    else:
        base = importer_dir if importer_dir is not None else Path.cwd()
        tried.append(base / p)
        parts = p.parts
        if parts and parts[0] == "stdlib":
            tried.append(stdlib_root().parent / p)
    for cand in tried:
        if cand.is_file():
            return cand.resolve(), tried
    return None, tried


class _Loader:
    def __init__(self):
        self.diags: list[Diagnostic] = []
        self.sources: Sources = {}
        self.done: dict[Path, ir.Trial] = {}
        self.stack: list[Path] = []

    def load_file(self, path: Path, text: str, name: str) -> ir.Trial:
        self.sources[name] = text
        tree, pdiags = parse(text, name)
        self.diags.extend(pdiags)
        trial, ldiags = lower(tree, name)
        self.diags.extend(ldiags)
        self.stack.append(path)
        merged = ir.Trial(span=trial.span)
        own_imports = list(trial.imports)
        for imp in own_imports:
            self.import_one(imp, path.parent if path is not None else None, merged)
        self.merge(merged, trial, own_imports=True)
        self.stack.pop()
        return merged

    def import_one(self, imp: ir.Import, base: Optional[Path], into: ir.Trial) -> None:
        resolved, tried = resolve_import(imp.path, base)
        if resolved is None:
            hint = did_you_mean(imp.path, stdlib_files()) if imp.path.startswith("stdlib/") else None
            self.diags.append(Diagnostic(code="E220", message=f"cannot find imported file '{imp.path}'", span=imp.span,
                                         hint=hint or "looked in: " + ", ".join(_display(t) for t in tried)))
            into.imports.append(imp)
            return
        imp = imp.model_copy(update={"resolved": str(resolved)})
        into.imports.append(imp)
        if resolved in self.stack:
            chain = " -> ".join(_display(p) for p in self.stack[self.stack.index(resolved):] + [resolved])
            self.diags.append(Diagnostic(code="E221", message=f"import cycle: {chain}", span=imp.span,
                                         hint="remove one of the imports in the cycle"))
            return
        if resolved in self.done:
            return  # loaded once; its declarations are already merged
        name = _display(resolved)
        try:
            data = resolved.read_bytes()
        except OSError as exc:
            self.diags.append(Diagnostic(code="E223", message=f"cannot read '{imp.path}': {exc.strerror or exc}",
                                         span=imp.span))
            return
        text = _decode(data, name, self.diags)
        sub = self.load_file(resolved, text, name)
        self.done[resolved] = sub
        self.merge(into, sub, import_span=imp.span, import_path=imp.path)

    def merge(self, into: ir.Trial, part: ir.Trial, own_imports: bool = False,
              import_span: Optional[Span] = None, import_path: str = "") -> None:
        for field in _LISTS:
            if field == "imports" and own_imports:
                continue  # already recorded (with resolved paths) by import_one
            getattr(into, field).extend(getattr(part, field))
        for field in _SINGLES:
            new = getattr(part, field)
            if new is None:
                continue
            old = getattr(into, field)
            if old is None:
                setattr(into, field, new)
                continue
            # the importer's own block wins; the clash is reported where it is visible
            where = import_span if import_span is not None else new.span
            first = old.span if import_span is None else new.span
            msg = (f"imported file '{import_path}' also defines '{field}'" if import_span is not None
                   else f"'{field}' is already defined by an imported file")
            self.diags.append(Diagnostic(code="E222", message=msg, span=where,
                                         hint=f"the other one is at {first}" if first else None))
            if import_span is None:
                setattr(into, field, new)


def _finish(trial: ir.Trial, diags: list[Diagnostic], sources: Sources) -> tuple[ir.Trial, list[Diagnostic], Sources]:
    return trial, sorted(diags, key=Diagnostic.sort_key), sources


def load(path: Union[str, os.PathLike]) -> tuple[ir.Trial, list[Diagnostic], Sources]:
    """Load a study file and its imports; never raises for bad input."""
    p = Path(path)
    name = str(path)
    ld = _Loader()
    try:
        data = p.read_bytes()
    except OSError as exc:
        return _finish(ir.Trial(source_file=name), [Diagnostic(code="E223", message=f"cannot read '{name}': {exc.strerror or exc}",
                                                              span=Span(file=name))], {})
    text = _decode(data, name, ld.diags)
    resolved = p.resolve()
    trial = ld.load_file(resolved, text, name)
    trial.source_file = name
    trial.source_sha256 = hashlib.sha256(data).hexdigest()
    return _finish(trial, ld.diags, ld.sources)


def load_text(text: str, filename: str = "<string>", base_dir: Union[str, os.PathLike, None] = None
              ) -> tuple[ir.Trial, list[Diagnostic], Sources]:
    """Like :func:`load` for text in memory; imports resolve against ``base_dir`` (default: the
    folder of ``filename`` when it names one, else the current directory)."""
    ld = _Loader()
    if base_dir is not None:
        base = Path(base_dir).resolve()
    elif filename and not filename.startswith("<"):
        base = Path(filename).resolve().parent
    else:
        base = Path.cwd()
    pseudo = base / (Path(filename).name if filename and not filename.startswith("<") else "<string>")
    if not isinstance(text, str):
        text = _decode(bytes(text), filename, ld.diags)
    trial = ld.load_file(pseudo, text, filename)
    trial.source_file = filename
    trial.source_sha256 = hashlib.sha256(text.encode("utf-8", errors="surrogatepass")).hexdigest()
    return _finish(trial, ld.diags, ld.sources)
