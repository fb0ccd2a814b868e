"""What a step function receives: the study, the node it runs as, and where its paths live.

A step is ``func(ctx) -> dict``. An exam-scope step gets an :class:`ExamContext` and reads and writes
exam-folder paths (``ctx.path("results/identity.json")``, ``ctx.out("deid/")``); a study-scope step
gets a :class:`StudyContext`. Three callers build contexts over the same code:

* the local runner: every path is inside ``W/exams/<key>/``; the store is ``W/state.sqlite``;
* ``imtrial step NAME --workdir W --exam KEY``: the same, for one node;
* a CWL tool: ``imtrial step NAME --in REL=PATH … --out DIR``: each input path is wherever the
  engine staged it and outputs go under ``DIR`` at their exam-relative path (no exam folder is copied).

:func:`call_node` is the one place that runs a node: it builds folder outputs beside their final
place and renames them in, so a killed step never leaves half a folder; and it propagates a *skip*
(an exam that could not be identified, or whose upstream step was skipped) to every output, so a CWL
engine, which runs every tool of every exam, carries the skip through instead of failing.
"""
from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path
from typing import Any, Iterator, Optional

from .. import ir
from ..files import atomic_write_json, read_json
from ..pipeline import Node, covers
from ..workdir import EXAM_JSON, IDENTITY, ExamDir, Workdir

SKIP_MARK = ".skipped.json"   # inside a skipped folder output


class ExamContext:
    """One exam as one node sees it."""

    def __init__(self, trial: ir.Trial, exam: ExamDir, node: Optional[Node] = None, *,
                 inputs: Optional[dict[str, Path]] = None, out_root: Optional[Path] = None,
                 workdir: Optional[Workdir] = None, store=None, batch: Optional[list[dict]] = None,
                 cache: Optional["ExamCache"] = None, archive: Optional[Path] = None,
                 exam_key: Optional[str] = None):
        self.trial = trial
        self.exam = exam
        self.node = node
        self.inputs = inputs          # CWL: exam-relative path -> where the engine staged it
        self.out_root = out_root      # CWL: outputs go to out_root/<rel>
        self.workdir = workdir        # local runs: the workdir (archive, quarantine, state DB)
        self.store = store            # a Store for steps on shared state (the registry)
        self.batch = batch or []      # ordered shared steps: every exam.json of the batch, in order
        self.cache = cache if cache is not None else ExamCache()
        self._archive = archive       # CWL: the archive folder a batch adds to
        self._key = exam_key          # staged: the exam key (the folder is the engine's, not the exam's)
        self._partial: dict[str, Path] = {}

    @property
    def archive_root(self) -> Path:
        return self._archive if self._archive is not None else self.workdir.archive

    @property
    def key(self) -> str:
        return self._key or self.exam.key

    @property
    def ref(self) -> Optional[str]:
        return self.node.ref if self.node else None

    # ------------------------------------------------------------------ paths
    def path(self, rel: str) -> Path:
        """Where input ``rel`` is (staged file, staged folder, or inside the exam folder)."""
        if self.inputs is not None:
            if rel in self.inputs:
                return self.inputs[rel]
            if self.out_root is not None and (self.out_root / rel.rstrip("/")).exists():
                return self.out_root / rel.rstrip("/")  # written by an earlier node of the same tool
            return self.exam.path(rel)
        return self.exam.path(rel)

    def under(self, folder: str) -> dict[str, Path]:
        """Every input file under exam folder ``folder`` (e.g. ``results/qc/``), by exam-relative path."""
        out: dict[str, Path] = {}
        if self.inputs is not None:
            out.update({r: p for r, p in self.inputs.items() if r.startswith(folder) and not r.endswith("/")})
        for base in ([self.out_root] if self.out_root is not None else []) + [self.exam.root]:
            d = base / folder.rstrip("/")
            if d.is_dir():
                for p in sorted(d.iterdir()):
                    if p.is_file() and not p.name.startswith("."):
                        out.setdefault(folder + p.name, p)
        return dict(sorted(out.items()))

    def out(self, rel: str) -> Path:
        """Where to write output ``rel``. A folder output is built in a partial folder that
        :func:`call_node` renames into place when the step returns."""
        if rel in self._partial:
            return self._partial[rel]
        base = self.out_root if self.out_root is not None else self.exam.root
        return base / rel.rstrip("/")

    def final(self, rel: str) -> Path:
        base = self.out_root if self.out_root is not None else self.exam.root
        return base / rel.rstrip("/")

    # ------------------------------------------------------------------ JSON results
    def read_json(self, rel: str, default: Any = None) -> Any:
        return self.cache.json(self.path(rel), default)

    def write_json(self, rel: str, obj: Any) -> None:
        p = self.out(rel)
        atomic_write_json(p, obj)
        self.cache.forget(p)

    @property
    def identity(self) -> dict:
        return self.read_json(IDENTITY, {}) or {}

    @property
    def exam_info(self) -> dict:
        return self.read_json(EXAM_JSON, {}) or {}


class StudyContext:
    """The whole study as a study-scope node sees it: the workdir, and every exam in it."""

    def __init__(self, trial: ir.Trial, workdir: Workdir, node: Optional[Node] = None, *, store=None,
                 inbox: Optional[Path] = None, move: bool = False, pool=None, progress=None,
                 exams: Optional[list[ExamContext]] = None, outputs: Optional[dict[str, Path]] = None):
        self.trial = trial
        self.workdir = workdir
        self.node = node
        self.store = store
        self.inbox = inbox
        self.move = move
        self.pool = pool
        self.progress = progress
        self._exams = exams
        self.outputs = outputs or {}   # study output object -> path (default: inside the workdir)

    def exams(self) -> Iterator[ExamContext]:
        """Every exam (CWL: the staged ones, in order; local: the workdir's exam folders)."""
        if self._exams is not None:
            yield from self._exams
            return
        if self.workdir.exams.is_dir():
            for d in sorted(p for p in self.workdir.exams.iterdir() if p.is_dir()):
                yield ExamContext(self.trial, ExamDir(d), self.node, workdir=self.workdir)

    def output(self, name: str) -> Path:
        return self.outputs.get(name, self.workdir.root / name.rstrip("/"))


class ExamCache:
    """What the nodes of one exam share inside one process: parsed JSON results, DICOM headers.

    Thread-safe: the runner runs independent nodes of an exam side by side."""

    def __init__(self):
        self._lock = threading.Lock()
        self._json: dict[Path, Any] = {}
        self.data: dict[Any, Any] = {}
        self._making: dict[Any, threading.Lock] = {}

    def json(self, path: Path, default: Any = None) -> Any:
        with self._lock:
            if path in self._json:
                return self._json[path]
        val = read_json(path, None)
        if val is not None:
            with self._lock:
                self._json[path] = val
        return default if val is None else val

    def forget(self, path: Path) -> None:
        with self._lock:
            self._json.pop(path, None)

    def get(self, key: Any, make) -> Any:
        """A value shared by the exam's nodes, made once (e.g. the series' headers).

        Made once even when two nodes ask at the same time (the QC checks of an exam run side by side and
        read the same series): the second waits for the first instead of decoding the pixels again."""
        with self._lock:
            if key in self.data:
                return self.data[key]
            making = self._making.setdefault(key, threading.Lock())
        with making:
            with self._lock:
                if key in self.data:
                    return self.data[key]
            val = make()
            with self._lock:
                self._making.pop(key, None)
                return self.data.setdefault(key, val)


# --------------------------------------------------------------------------- running one node

def skip_reason(ctx: ExamContext, node: Node) -> Optional[str]:
    """Why ``node`` must not run for this exam: an input says the exam was skipped upstream."""
    for rel in node.inputs:
        if rel.endswith("/"):
            if rel in ("original/",):
                continue
            mark = ctx.path(rel) / SKIP_MARK
            if mark.is_file():
                return (read_json(mark, {}) or {}).get("skipped") or "skipped upstream"
            for r, p in ctx.under(rel).items():
                doc = ctx.read_json(r) if p.suffix == ".json" else None
                if isinstance(doc, dict) and doc.get("skipped"):
                    return doc["skipped"]
        elif rel.endswith(".json"):
            doc = ctx.read_json(rel)
            if isinstance(doc, dict) and doc.get("skipped"):
                return doc["skipped"]
    return None


def write_skip(ctx: ExamContext, node: Node, reason: str) -> None:
    """Every output of ``node`` says the exam was skipped (and why)."""
    for rel in node.outputs:
        if rel.endswith("/"):
            d = ctx.final(rel)
            if d.exists():
                shutil.rmtree(d)
            d.mkdir(parents=True)
            atomic_write_json(d / SKIP_MARK, {"skipped": reason})
        else:
            atomic_write_json(ctx.final(rel), {"skipped": reason})
            ctx.cache.forget(ctx.final(rel))


def call_node(node: Node, ctx: ExamContext) -> dict:
    """Run one exam node: skip propagation, then the step function with atomic folder outputs."""
    ctx.node = node
    reason = skip_reason(ctx, node)
    if reason:
        write_skip(ctx, node, reason)
        return {"status": "skipped", "reason": reason}
    folders = [r for r in node.outputs if r.endswith("/")]
    for rel in folders:
        part = ctx.final(rel).with_name(ctx.final(rel).name + ".partial")
        if part.exists():
            shutil.rmtree(part)
        part.mkdir(parents=True)
        ctx._partial[rel] = part
    try:
        detail = node.step.function()(ctx) or {}
        for rel in folders:
            final = ctx.final(rel)
            if final.exists():
                shutil.rmtree(final)
            ctx._partial[rel].replace(final)
    finally:
        for rel in folders:
            part = ctx._partial.pop(rel)
            if part.exists():
                shutil.rmtree(part, ignore_errors=True)
    missing = [r for r in node.outputs if not ctx.final(r).exists()]
    if missing:  # the contract every engine relies on: a node writes all of its outputs
        raise RuntimeError(f"step {node.step.name} did not write {', '.join(missing)}")
    return detail


def short(detail: Any, limit: int = 2000) -> Any:
    """Keep a node's recorded detail small in the state DB (full outputs live in the exam folder)."""
    if isinstance(detail, dict):
        return {k: (v if not isinstance(v, (list, dict)) or len(json.dumps(v, default=str)) < limit else f"<{len(v)} items>")
                for k, v in detail.items()}
    return detail


def node_reads(node: Node, rel: str) -> bool:
    return any(covers(rel, r) or covers(r, rel) for r in node.inputs)
