"""Running one node of the graph outside ``imtrial run``: what ``imtrial step`` and the CWL tools call.

Two ways to say where a node's paths are:

* **in a workdir** (``workdir`` + ``exam``): the node runs in place, is recorded in the state DB like a
  run would record it, and the exam's verdicts are refreshed (``imtrial status`` shows them);
* **staged** (``inputs`` + ``out``): each input path is given where the engine staged it
  (``REL=PATH``) and outputs are written under ``out`` at their exam-relative path. A node that
  works on several exams at once (a study step, or a step on shared state, which a CWL engine runs as
  one batch) gets each input path once per exam, in the same exam order; the outputs of exam *k* go
  to ``out/<exam key>/``.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Optional

from .. import ir, pipeline
from ..diagnostics import ImtrialError
from ..files import read_json
from ..pipeline import Node
from ..store import Store
from ..workdir import EXAM_JSON, IDENTITY, ExamDir, Workdir
from .context import ExamContext, StudyContext, call_node, short
from .run import exam_node_fingerprints, make_plan, record_exam, walk_exam


class StepError(ImtrialError):
    """``imtrial step`` was given a node or paths it cannot run."""

    code = "E804"


def find_node(trial: ir.Trial, name: str, ref: Optional[str] = None) -> Node:
    """The graph node ``name`` (``qc`` + ref ``snr``, or the id ``qc:snr``) of this study."""
    from ..diagnostics import did_you_mean

    plan = make_plan(trial)
    nid = name if ref is None or ":" in name else f"{name}:{ref}"
    if nid in plan.nodes:
        return plan.nodes[nid]
    hint = did_you_mean(nid, plan.nodes)
    raise StepError(f"the study has no pipeline node {nid!r}" + (f"; {hint}" if hint else "")
                    + f" (nodes: {', '.join(plan.nodes)})")


def segment(trial: ir.Trial, index: int) -> tuple[list[Node], dict[str, list[str]]]:
    """Staged phase ``index`` of the graph, when it is a per-exam segment (``imtrial step exam --ref N``):
    its nodes in order and each node's predecessors inside it.

    Builds the graph alone, not the runner's plan: a staged exam has no state DB, so the static
    fingerprints :func:`make_plan` hashes for every node would be thrown away (one such process runs per exam)."""
    from ..graph import build_graph, staged_phases

    graph = build_graph(trial)
    phases = staged_phases(graph)
    if not 0 <= index < len(phases) or phases[index][0]:
        segs = [str(k) for k, (batch, _) in enumerate(phases) if not batch]
        raise StepError(f"phase {index} is not a per-exam segment of this study (segments: {', '.join(segs)})")
    ids = phases[index][1]
    by_id = {n.id: n for n in pipeline.nodes(trial)}
    preds = {i: sorted(p for p in graph.predecessors(i) if p in ids) for i in ids}
    return [by_id[i] for i in ids], preds


def _exam_key(paths: dict[str, Path], fallback: str) -> str:
    for rel in (IDENTITY, EXAM_JSON):
        if rel in paths:
            key = (read_json(paths[rel], {}) or {}).get("exam_key")
            if key:
                return str(key)
    return fallback


def staged_exams(inputs: list[tuple[str, Path]]) -> list[dict[str, Path]]:
    """Per-exam input maps from ``REL=PATH`` pairs: the k-th occurrence of a path belongs to exam k."""
    exams: list[dict[str, Path]] = []
    seen: dict[str, int] = {}
    for rel, path in inputs:
        k = seen.get(rel, 0)
        seen[rel] = k + 1
        while len(exams) <= k:
            exams.append({})
        exams[k][rel] = Path(path).resolve()
    counts = set(seen.values())
    if len(counts) > 1:
        raise StepError("every input path must be given once per exam: got " +
                        ", ".join(f"{r} ×{n}" for r, n in sorted(seen.items())))
    return exams


def run_in_workdir(trial: ir.Trial, node: Node, workdir: Path, exam_key: Optional[str]) -> dict:
    """Run one node in a workdir and record it (as ``imtrial run`` would)."""
    W = Workdir(Path(workdir).resolve())
    if not W.state_db.exists():
        raise StepError(f"no workdir at {W.root} (run 'imtrial run' first)")
    store = Store(W.root)
    try:
        plan = make_plan(trial)
        t0 = time.time()
        if node.scope == "study":
            detail = node.step.function()(StudyContext(trial, W, node, store=store)) or {}
            store.set_step("", node.id, "done", short(detail), started=t0, fingerprint=plan.static[node.id])
            return detail
        if not exam_key:
            raise StepError(f"step {node.id} runs on one exam: give --exam KEY")
        keys = [k for k in store.exam_keys() if k.startswith(exam_key)]
        if len(keys) != 1:
            raise StepError(f"no exam {exam_key!r} in {W.root}" if not keys else f"exam key {exam_key!r} is ambiguous")
        key = keys[0]
        fp = exam_node_fingerprints(plan, store, key).get(node.id)
        batch = [read_json(W.exam(key).exam_json, {}) | {"exam_key": key}] if node.step.ordered else None
        ctx = ExamContext(trial, W.exam(key), node, workdir=W, store=store, batch=batch)
        try:
            detail = call_node(node, ctx)
        except Exception as exc:
            store.set_step(key, node.id, "failed", {"error": f"{type(exc).__name__}: {exc}"}, started=t0, fingerprint=fp)
            record_exam(store, trial, key)
            raise
        store.set_step(key, node.id, "skipped" if detail.get("status") == "skipped" else "done", short(detail),
                       started=t0, fingerprint=fp)
        record_exam(store, trial, key)
        return detail
    finally:
        store.close()


def run_staged(trial: ir.Trial, node: Node, inputs: list[tuple[str, Path]], out: Path, *,
               study_inputs: Optional[dict[str, Path]] = None, registry: Optional[Path] = None,
               registry_dir: Optional[Path] = None, archive: Optional[Path] = None) -> dict:
    """Run one node on staged inputs (a CWL tool), writing its outputs under ``out``.

    A registry step uses ``registry_dir/state.sqlite`` in place (the site's registry, which never travels with
    the outputs), else a copy of ``registry`` (or a new registry) in ``out``."""
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    study_inputs = {k: Path(v).resolve() for k, v in (study_inputs or {}).items()}
    W = Workdir(out)
    if node.scope == "study":
        store = Store(out)
        try:
            exams = [ExamContext(trial, ExamDir(out / _exam_key(m, str(i))), node, inputs=m, out_root=out / _exam_key(m, str(i)),
                                 exam_key=_exam_key(m, str(i)))
                     for i, m in enumerate(staged_exams(inputs))]
            ctx = StudyContext(trial, W.create(), node, store=store, inbox=study_inputs.get("inbox/"), exams=exams)
            return node.step.function()(ctx) or {}
        finally:
            store.close()
    per_exam = staged_exams(inputs)
    if node.step.shared is None:
        if len(per_exam) != 1:
            raise StepError(f"step {node.id} runs on one exam at a time; got inputs of {len(per_exam)}")
        m = per_exam[0]
        ctx = ExamContext(trial, ExamDir(out), node, inputs=m, out_root=out, exam_key=_exam_key(m, out.name))
        return call_node(node, ctx)
    # shared state: one batch over every exam, the state itself staged into `out`
    store = None
    if node.step.shared == "registry":
        if registry_dir is not None:
            store = Store(Path(registry_dir).resolve())
        else:
            if registry is not None and registry.resolve() != W.state_db:
                shutil.copyfile(registry, W.state_db)
            store = Store(out)
    if node.step.shared == "archive" and archive is not None and not (out / "archive").exists():
        shutil.copytree(archive, out / "archive")
    keyed = [(_exam_key(m, f"exam{i:04d}"), m) for i, m in enumerate(per_exam)]
    infos = [read_json(m[EXAM_JSON], {}) | {"exam_key": k} for k, m in keyed if EXAM_JSON in m]
    if node.step.ordered:  # the registry hands out sequence numbers in exam-date order
        when = {e["exam_key"]: (e.get("study_date") or "") for e in infos}
        keyed.sort(key=lambda km: (when.get(km[0], ""), km[0]))
    results = {}
    try:
        for key, m in keyed:
            ctx = ExamContext(trial, ExamDir(out / key), node, inputs=m, out_root=out / key, store=store,
                              batch=infos, archive=out / "archive", exam_key=key)
            results[key] = short(call_node(node, ctx))
    finally:
        if store is not None:
            store.close()
    if node.step.shared == "archive":
        (out / "archive").mkdir(exist_ok=True)  # an archive output even when no exam had anything to store
    return {"exams": results}


def run_exam_segment(trial: ir.Trial, index: int, inputs: list[tuple[str, Path]], out: Path) -> dict:
    """A fused per-exam segment on one staged exam (the CWL exam-granularity tool)."""
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    nodes, preds = segment(trial, index)
    per_exam = staged_exams(inputs)
    if len(per_exam) != 1:
        raise StepError(f"the exam pipeline runs on one exam; got inputs of {len(per_exam)}")
    m = per_exam[0]
    ids = {n.id for n in nodes}
    state = walk_exam(trial, None, None, _exam_key(m, out.name), nodes, preds, ids, {},
                      context=lambda n, cache: ExamContext(trial, ExamDir(out), n, inputs=m, out_root=out,
                                                           exam_key=_exam_key(m, out.name), cache=cache))
    bad = {k: v for k, v in state.items() if v in ("failed", "blocked")}
    if bad:
        raise StepError("the exam pipeline failed at " + ", ".join(f"{k} ({v})" for k, v in sorted(bad.items())))
    return {"nodes": state}
