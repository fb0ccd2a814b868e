"""The local runner: walks the compiled graph over a workdir, resumably.

The graph (``imtrial_dsl.graph``, built from the step table) is cut into *phases* in topological order:

* a study node (``ingest``, ``measurements``) runs once, here in the parent process;
* an ordered node on shared state (``identify``, which hands out subject IDs) runs here too, exam by
  exam in exam-date order;
* a maximal run of the other exam nodes is one *segment*: each worker process takes one exam (or, when
  the segment has an analysis, one subject's exams in date order: a follow-up's analysis may read the
  baseline's output), largest first, and walks the segment's subgraph for it. The built-in steps run
  one at a time (they hold the GIL); an analysis, another program, runs beside them and beside other
  analyses that do not depend on it. The archive node writes shared state too; the archive's own lock
  serializes it.

Resume and re-judging: every node of every exam is recorded in ``W/state.sqlite`` with a
*fingerprint* — a hash of what its result was computed from: the exam's ingested content, the parts
of the study the step reads (``Step.study_parts``; the QC check or analysis itself for per-check
nodes; source positions do not count), and the fingerprints of the nodes it reads from. A node
runs when it has no record, failed, or its fingerprint changed (a study edit, new instances), and
then every node downstream of it runs too. So ``kill -9`` at any point followed by a re-run redoes
only what was not recorded, and fixing a constraint in the study re-judges exactly the archived
exams it concerns (the archive keeps both versions of each changed sidecar).
"""
from __future__ import annotations

import hashlib
import importlib
import json
import multiprocessing
import sys
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, ThreadPoolExecutor, as_completed, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import networkx as nx

from .. import ir, pipeline
from ..diagnostics import ImtrialError
from ..files import read_json, try_lock
from ..graph import build_graph, pipeline_nodes
from ..store import Store
from ..workdir import ADHERENCE, CLASSIFICATION, EXAM_JSON, IDENTITY, QC, ExamDir, Workdir
from .context import ExamCache, ExamContext, StudyContext, call_node, short

THREADS_PER_EXAM = 2


class RunLocked(ImtrialError):
    """Another ``imtrial run`` holds this workdir."""

    code = "E803"


def _quiet_pydicom() -> None:
    """pydicom warns for every out-of-spec value it reads (e.g. an over-long SH); in a run over thousands of
    files that drowns the summary, and such values are judged by the adherence step, not by the reader."""
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom\.")


def _die_with_parent() -> None:
    """Pool initializer: a worker must not outlive a killed run (it would race the next run)."""
    _quiet_pydicom()
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the per-exam lock still prevents two writers
        pass


# ----------------------------------------------------------------------------- the plan of a run

@dataclass
class Phase:
    kind: str            # "study" | "ordered" | "segment"
    nodes: list[pipeline.Node]


@dataclass
class Plan:
    """A study's graph as the runner walks it."""

    graph: nx.DiGraph
    nodes: dict[str, pipeline.Node]
    phases: list[Phase]
    static: dict[str, str]          # node id -> hash of the study parts it reads

    def preds(self, nid: str) -> list[str]:
        return sorted(p for p in self.graph.predecessors(nid) if p in self.nodes)

    def descendants(self, nid: str) -> set[str]:
        return {d for d in nx.descendants(self.graph, nid) if d in self.nodes}

    code = "E804"


def _runs_here(n: pipeline.Node) -> bool:
    return n.scope == "study" or n.step.ordered


def _strip_spans(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _strip_spans(v) for k, v in obj.items() if k != "span"}
    if isinstance(obj, list):
        return [_strip_spans(v) for v in obj]
    return obj


def _dump(value: Any) -> Any:
    if isinstance(value, list):
        return [_dump(v) for v in value]
    if hasattr(value, "model_dump"):
        return _strip_spans(value.model_dump(mode="json"))
    return value


def static_fingerprint(trial: ir.Trial, node: pipeline.Node) -> str:
    """What a node's result depends on in the study: the step's study parts, and its QC check / analysis."""
    parts: dict[str, Any] = {"step": node.step.name, "ref": node.ref, "inputs": list(node.inputs),
                             "outputs": list(node.outputs)}
    for f in node.step.study_parts:
        parts[f] = _dump(getattr(trial, f))
    if node.step.per == "qc":
        parts["check"] = _dump(next(q for q in trial.qc if q.name == node.ref))
        parts["protocols"] = [_dump(trial.protocol(p)) for p in node.protocols]
    elif node.step.per == "analysis":
        parts["analysis"] = _dump(trial.analysis(node.ref))
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def compiled_hash(trial: ir.Trial) -> str:
    """A hash of the compiled study (the IR without source positions or the source file's own name/hash): equal
    for studies that mean the same, so an edited comment is not a change, a moved threshold is."""
    doc = {k: v for k, v in _dump(trial).items() if k not in ("source_file", "source_sha256")}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def make_plan(trial: ir.Trial, graph: Optional[nx.DiGraph] = None) -> Plan:
    """Cut the graph into phases: study/ordered nodes alone, the exam nodes between them as segments."""
    g = graph if graph is not None else build_graph(trial)
    by_id = {n.id: n for n in pipeline.nodes(trial)}
    ids = [n for n in pipeline_nodes(g) if n in by_id]
    # a topological order that takes an exam node whenever one is ready, so that segments are maximal
    sub = g.subgraph(ids)
    table = list(pipeline.STEPS)
    order = list(nx.lexicographical_topological_sort(
        sub, key=lambda n: (_runs_here(by_id[n]), table.index(by_id[n].step.name), n)))
    phases: list[Phase] = []
    for nid in order:
        n = by_id[nid]
        if _runs_here(n):
            phases.append(Phase("study" if n.scope == "study" else "ordered", [n]))
        elif phases and phases[-1].kind == "segment":
            phases[-1].nodes.append(n)
        else:
            phases.append(Phase("segment", [n]))
    return Plan(g, {i: by_id[i] for i in ids}, phases, {i: static_fingerprint(trial, by_id[i]) for i in ids})


def exam_fingerprints(plan: Plan, content: str, assigned: str = "") -> dict[str, str]:
    """Every exam node's fingerprint for an exam whose ingested content hashes to ``content``.

    ``assigned``: what an operator assigned the exam (``Store.assignment_token``); it is part of the
    registry step's fingerprint, so an assignment re-identifies the exam and re-runs all that follows."""
    out: dict[str, str] = {}
    for ph in plan.phases:
        for n in ph.nodes:
            if n.scope != "exam":
                continue
            ups = [out.get(p, content) for p in plan.preds(n.id)]   # a study node upstream: the content itself
            own = [assigned] if assigned and n.step.shared == "registry" else []
            out[n.id] = hashlib.sha256("\n".join([plan.static[n.id], content, *ups, *own]).encode()).hexdigest()
    return out


def exam_node_fingerprints(plan: Plan, store: Store, exam_key: str) -> dict[str, str]:
    """:func:`exam_fingerprints` of one exam of a workdir: its content and its assignments."""
    from .ingest import exam_content_hash

    return exam_fingerprints(plan, exam_content_hash(store, exam_key), store.assignment_token(exam_key))


# ----------------------------------------------------------------------------- walking one exam

def walk_exam(trial: ir.Trial, W: Optional[Workdir], store: Optional[Store], exam_key: str,
              nodes: list[pipeline.Node], preds: dict[str, list[str]], todo: set[str], fps: dict[str, str],
              threads: int = THREADS_PER_EXAM, context: Optional[Callable] = None) -> dict[str, str]:
    """Run the ``todo`` nodes of one exam in dependency order, independent ones side by side.

    Records each node in ``store`` (when given). ``context(node, cache)`` builds a node's context
    (default: the exam's folder in workdir ``W``). Returns node id -> done | skipped | failed | blocked
    (a node whose input failed does not run)."""
    cache = ExamCache()
    state: dict[str, str] = {}
    waiting = [n for n in nodes if n.id in todo]
    started: dict[str, float] = {}
    make = context or (lambda n, c: ExamContext(trial, W.exam(exam_key), n, workdir=W, cache=c))

    def record(nid: str, status: str, detail: Any, **kw) -> None:
        if store is not None:
            store.set_step(exam_key, nid, status, detail, **kw)

    def run(n: pipeline.Node) -> dict:
        return call_node(n, make(n, cache))

    with ThreadPoolExecutor(max_workers=max(1, threads)) as ex:
        running: dict[Any, pipeline.Node] = {}
        while waiting or running:
            for n in list(waiting):
                deps = [p for p in preds[n.id] if p in todo]
                if any(state.get(p) in ("failed", "blocked") for p in deps):
                    state[n.id] = "blocked"
                    record(n.id, "blocked", {"error": "an input of this step failed"})
                    waiting.remove(n)
                elif all(state.get(p) in ("done", "skipped") for p in deps):
                    # the built-in steps are Python holding the GIL: two side by side only contend for it (measured
                    # 25 % more CPU), so one runs at a time; an analysis (another program) runs beside them
                    if n.step.kind != "analysis" and any(r.step.kind != "analysis" for r in running.values()):
                        continue
                    started[n.id] = time.time()
                    running[ex.submit(run, n)] = n
                    waiting.remove(n)
            if not running:
                continue
            finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for fut in finished:
                n = running.pop(fut)
                try:
                    detail = fut.result()
                except Exception as exc:  # one node's failure is recorded; the exam's other branches go on
                    state[n.id] = "failed"
                    record(n.id, "failed",
                                   {"error": _error_text(exc), "trace": traceback.format_exc(limit=3)},
                                   started=started[n.id], fingerprint=fps.get(n.id))
                    continue
                state[n.id] = "skipped" if detail.get("status") == "skipped" else "done"
                record(n.id, state[n.id], short(detail), started=started[n.id], fingerprint=fps.get(n.id))
    return state


def _error_text(exc: BaseException) -> str:
    """A failed node's error: an environment error (full disk, read-only path …) says so, with its code."""
    from ..diagnostics import environment_error

    env = environment_error(exc)
    if env is not None:
        return f"environment error [{env[0]}]: {env[1]}"
    return f"{type(exc).__name__}: {exc}"


def process_subject(trial: ir.Trial, workdir: str, nodes: list[pipeline.Node], preds: dict[str, list[str]],
                    exams: list[tuple[str, list[str], dict[str, str]]]) -> list[dict]:
    """One subject's exams (key, nodes to run, fingerprints), in date order; in a worker process."""
    _quiet_pydicom()
    W = Workdir(workdir)
    store = Store(W.root)
    out = []
    try:
        for key, todo, fps in exams:
            lock = try_lock(W.exam(key).lock)
            if lock is None:
                out.append({"exam_key": key, "status": "busy", "nodes": {}})
                continue
            try:
                state = walk_exam(trial, W, store, key, nodes, preds, set(todo), fps)
                record_exam(store, trial, key)
            finally:
                lock.close()
            out.append({"exam_key": key, "nodes": state})
    finally:
        store.close()
    return out


# ----------------------------------------------------------------------------- the whole run

def run_study(trial: ir.Trial, *, inbox: Optional[str | Path], workdir: str | Path, jobs: int = 1, move: bool = False,
              progress: Optional[Callable[[str, int], Any]] = None, log: Callable[[str], None] = lambda s: None,
              exams: Optional[list[str]] = None, fork: bool = False,
              pool: Optional[ProcessPoolExecutor] = None) -> dict:
    """Run every node that is not done (or whose inputs changed); returns the summary (also in table ``runs``).

    ``fork``: the caller has no state database (or other SQLite file) open and no other thread, so worker
    processes may be forked (:func:`worker_pool`); the command line says so, a library caller need not.
    ``pool``: workers the caller started (the command line starts them before it compiles the study, so that
    they import the steps' modules meanwhile); the run shuts them down.

    ``progress(description, total)``, when given, returns a bar with ``update(n)`` and ``close()``.
    ``inbox=None`` ingests nothing (the workdir's exams only); ``exams`` limits the run to these exam keys
    (``imtrial assign`` processes one exam onward)."""
    _quiet_pydicom()
    W = Workdir(Path(workdir).resolve()).create()   # analyses run in their own cwd: every path is absolute
    pool = pool if pool is not None else worker_pool(jobs, fork)
    lock = try_lock(W.run_lock)
    if lock is None:
        if pool is not None:
            pool.shutdown()
        raise RunLocked(f"another 'imtrial run' is using {W.root}")
    try:
        return _run_locked(trial, W, Path(inbox).resolve() if inbox is not None else None, jobs, move, progress, log,
                           set(exams) if exams is not None else None, pool)
    finally:
        if pool is not None:
            pool.shutdown()
        lock.close()


def worker_pool(jobs: int, fork: bool = False) -> Optional[ProcessPoolExecutor]:
    """The run's worker processes (None for one job), started now.

    With ``fork`` (and on Linux, and no other thread running: a lock another thread held at the fork would
    stay locked in the child) they are forked — in milliseconds, with every module the parent imported; a
    spawned interpreter takes about 0.6 s CPU to import them again — *before* the run opens its lock file and
    the state database: a child holding a copy of an open SQLite connection could close it, and a closing
    connection may checkpoint and remove the write-ahead log under the parent. Otherwise spawned."""
    if jobs <= 1:
        return None
    import threading

    fork = (fork and "fork" in multiprocessing.get_all_start_methods() and sys.platform.startswith("linux")
            and threading.active_count() == 1)
    ctx = multiprocessing.get_context("fork" if fork else "spawn")
    pool = ProcessPoolExecutor(max_workers=jobs, initializer=_die_with_parent, mp_context=ctx)
    if ctx.get_start_method() == "fork":
        # the first task forks every worker (now, before the DB opens); each then imports what the steps use
        # while this process lists the inbox, instead of on its first file
        for _ in range(jobs):
            pool.submit(_import_steps)
    return pool


def _import_steps() -> None:
    for n in {s.func.partition(":")[0] for s in pipeline.STEPS.values()}:
        importlib.import_module(n)


_DONE = ("done", "skipped")


def _run_locked(trial: ir.Trial, W: Workdir, inbox: Optional[Path], jobs: int, move: bool, progress, log,
                only: Optional[set[str]] = None, pool: Optional[ProcessPoolExecutor] = None) -> dict:
    started = time.time()
    swept = W.sweep_temp()
    if swept:
        log(f"removed {swept} temporary file(s) left by an interrupted run")
    plan = make_plan(trial)
    store = Store(W.root)
    with store.tx() as db:
        run_id = db.execute("INSERT INTO runs(started, study, study_sha256, inbox) VALUES (?, ?, ?, ?)",
                            (started, trial.source_file, trial.source_sha256, str(inbox or ""))).lastrowid
    ran: dict[str, set[str]] = {}        # exam key -> nodes that ran in this run
    failed: set[str] = set()             # exams with a node that failed in this run
    this_run: dict[str, Any] = {"ingest": {}, "identified": 0, "exams_processed": 0,
                                "study": {"compiled_sha256": compiled_hash(trial)}}
    row = store.db.execute("SELECT summary FROM runs WHERE finished IS NOT NULL AND summary IS NOT NULL "
                           "ORDER BY id DESC LIMIT 1").fetchone()
    last = (((json.loads(row["summary"]) if row else {}).get("this_run") or {}).get("study") or {}).get("compiled_sha256")
    recorded = store.fingerprints()
    fps: dict[str, dict[str, str]] = {}

    def fingerprints(key: str) -> dict[str, str]:
        if key not in fps:
            fps[key] = exam_node_fingerprints(plan, store, key)
        return fps[key]

    def exam_keys() -> list[str]:
        return [k for k in store.exam_keys() if only is None or k in only]

    def stale(key: str, nid: str) -> bool:
        status, fp = recorded.get((key, nid), (None, None))
        return status not in _DONE or fp != fingerprints(key).get(nid) or any(p in ran.get(key, ()) for p in plan.preds(nid))

    try:
        for ph in plan.phases:
            if ph.kind == "study":
                node = ph.nodes[0]
                if inbox is None and "inbox/" in node.step.study_inputs:
                    continue  # nothing to ingest: the workdir's exams only
                if not _study_node_due(node, plan, store, W, ran):
                    continue
                ctx = StudyContext(trial, W, node, store=store, inbox=inbox, move=move, pool=pool, progress=progress)
                t0 = time.time()
                detail = node.step.function()(ctx) or {}
                store.set_step("", node.id, "done", short(detail), started=t0, fingerprint=plan.static[node.id])
                if node.id == "ingest":
                    this_run["ingest"] = {k: v for k, v in detail.items() if not isinstance(v, list) or k == "not_removed"}
                    log(f"ingest: {detail.get('ingested', 0)} new instance(s), {detail.get('quarantined', 0)} "
                        f"quarantined, {detail.get('duplicates', 0)} duplicate(s)")
                    fps.clear()
                if node.outputs:  # a study step that writes exam folders (ingest): recorded per exam
                    from .ingest import exam_content_hash

                    for e in store.exam_keys():
                        content = exam_content_hash(store, e)
                        if recorded.get((e, node.id), (None, None))[1] != content:
                            store.set_step(e, node.id, "done", {}, started=t0, fingerprint=content)
                            ran.setdefault(e, set()).add(node.id)
            elif ph.kind == "ordered":
                node = ph.nodes[0]
                keys = [k for k in exam_keys() if k not in failed and W.exam(k).exam_json.exists() and stale(k, node.id)]
                infos = sorted((read_json(W.exam(k).exam_json, {}) | {"exam_key": k} for k in keys),
                               key=lambda e: (e.get("study_date") or "", e["exam_key"]))
                for info in infos:
                    key = info["exam_key"]
                    ctx = ExamContext(trial, W.exam(key), node, workdir=W, store=store, batch=infos)
                    t0 = time.time()
                    try:
                        detail = call_node(node, ctx)
                    except Exception as exc:
                        store.set_step(key, node.id, "failed", {"error": _error_text(exc)}, started=t0,
                                       fingerprint=fingerprints(key)[node.id])
                        failed.add(key)
                        record_exam(store, trial, key)
                        continue
                    store.set_step(key, node.id, "done", short(detail), started=t0, fingerprint=fingerprints(key)[node.id])
                    ran.setdefault(key, set()).add(node.id)
                    if node.step.name == "identify" and detail.get("identified"):
                        this_run["identified"] += 1
            else:
                this_run["exams_processed"] += _run_segment(trial, W, plan, ph, store, pool, progress, stale,
                                                            fingerprints, ran, failed, exam_keys())
    finally:
        if pool is not None:
            pool.shutdown()
    if (W.archive / "audit.log.jsonl").exists():  # anchor the chain as this run leaves it (archive.py)
        from .archive import anchor, checkpoint_key

        anchor(W.archive, key=checkpoint_key(trial), store=store)
    this_run["seconds"] = round(time.time() - started, 2)
    if last and last != this_run["study"]["compiled_sha256"]:  # say so: verdicts of archived exams may change
        rerun = {k: sorted(v - {"ingest"}) for k, v in ran.items() if v - {"ingest"}}
        this_run["study"].update(changed=True, previous_sha256=last, exams_rejudged=len(rerun),
                                 nodes_rerun=sum(len(v) for v in rerun.values()))
        log(f"the compiled study changed since the last run: {this_run['study']['nodes_rerun']} node(s) re-run "
            f"on {len(rerun)} exam(s)")
    summary = summarize(store, this_run=this_run)
    with store.tx() as db:
        db.execute("UPDATE runs SET finished=?, summary=? WHERE id=?", (time.time(), json.dumps(summary, default=str), run_id))
    store.close()
    return summary


def _study_node_due(node: pipeline.Node, plan: Plan, store: Store, W: Workdir, ran: dict[str, set[str]]) -> bool:
    """A study node runs when it reads the inbox, when an exam node ran in this run, when an output is
    missing, or when the study parts it reads changed."""
    if any(r == "inbox/" for r in node.step.study_inputs):
        return True
    if any(ids - {"ingest"} for ids in ran.values()):
        return True
    if any(not (W.root / o.rstrip("/")).exists() for o in node.step.study_outputs):
        return True
    row = store.db.execute("SELECT fingerprint FROM steps WHERE exam_key='' AND step=?", (node.id,)).fetchone()
    return row is None or row["fingerprint"] != plan.static[node.id]


def _run_segment(trial, W: Workdir, plan: Plan, ph: Phase, store: Store, pool, progress, stale, fingerprints,
                 ran: dict[str, set[str]], failed: set[str], keys: list[str]) -> int:
    """Dispatch one segment: one task per subject (its exams in date order), subjects in parallel."""
    preds = {n.id: plan.preds(n.id) for n in ph.nodes}
    # a subject's exams go to one worker, in date order, only when a node may read another exam's output (an
    # analysis at a follow-up reads the baseline's); otherwise every exam is a task of its own (better balance)
    chained = any(n.step.kind == "analysis" for n in ph.nodes)
    by_subject: dict[str, list[tuple[str, str, list[str], dict[str, str]]]] = {}
    for key in keys:
        if key in failed or not W.exam(key).exam_json.exists():
            continue
        todo: list[str] = []
        for n in ph.nodes:  # topological order: a node runs when stale or when something it reads runs
            if stale(key, n.id) or any(p in todo for p in preds[n.id]):
                todo.append(n.id)
        if not todo:
            continue
        ident = read_json(W.exam(key).path(IDENTITY), {}) or {}
        subject = f"{ident.get('trial')}/{ident['subject_id']}" if ident.get("subject_id") else f"exam/{key}"
        if not chained:
            subject = f"exam/{key}"
        date = (read_json(W.exam(key).exam_json, {}) or {}).get("study_date") or ""
        by_subject.setdefault(subject, []).append((date, key, todo, fingerprints(key)))
    tasks = [[(k, t, f) for _, k, t, f in sorted(items)] for items in by_subject.values()]
    # the largest first, so that the last task to start is a short one (the workers finish together)
    size = {k: (W.exam(k).exam_json.stat().st_size if W.exam(k).exam_json.exists() else 0) for k in keys}
    tasks.sort(key=lambda t: -sum(size.get(k, 0) for k, _, _ in t))
    bar = progress("exams", sum(len(t) for t in tasks)) if progress else None
    results: list[dict] = []
    if pool is not None and len(tasks) > 1:
        futs = [pool.submit(process_subject, trial, str(W.root), ph.nodes, preds, t) for t in tasks]
        for f in as_completed(futs):
            res = f.result()
            results.extend(res)
            if bar:
                bar.update(len(res))
    else:
        for t in tasks:
            res = process_subject(trial, str(W.root), ph.nodes, preds, t)
            results.extend(res)
            if bar:
                bar.update(len(res))
    if bar:
        bar.close()
    for r in results:
        ran.setdefault(r["exam_key"], set()).update(n for n, s in r["nodes"].items() if s in ("done", "skipped", "failed"))
        if any(s in ("failed", "blocked") for s in r["nodes"].values()):
            failed.add(r["exam_key"])
    return len(results)


def record_exam(store: Store, trial: ir.Trial, exam_key: str) -> None:
    """Copy an exam's per-series verdicts from its results into the state DB and set its status."""
    from .qc import merge_by_series

    E = Workdir(store.workdir).exam(exam_key)
    ident = read_json(E.path(IDENTITY), {}) or {}
    cls, adh = read_json(E.path(CLASSIFICATION)), read_json(E.path(ADHERENCE))
    qc_dir = E.path(QC)
    qc = merge_by_series(read_json(p) for p in sorted(qc_dir.glob("*.json"))) if qc_dir.is_dir() else None
    steps = store.steps(exam_key)
    if any(v["status"] in ("failed", "blocked") for v in steps.values()):
        status = "failed"
    elif ident.get("held"):
        status = "held"        # waits for imtrial assign
    elif ident.get("skipped"):
        status = "unmatched"
    else:
        status = "done"
    _record_exam(store, exam_key, ident, cls, adh, qc, status, trial)


def _qualification_warning(trial, st, exam: dict, ident: dict, cls: Any) -> Optional[dict]:
    """Exams whose device is not qualified for a protocol that needs qualification (decisions of imtrial qualify)."""
    q = trial.qualification
    site, device = ident.get("exam_site") or exam.get("site"), exam.get("device")
    if not q or not q.protocols or not device or not isinstance(cls, dict):
        return None
    from .qualification import is_qualified
    needed = {r.name for r in q.protocols}
    present = sorted({s.get("protocol") for s in cls.get("series", []) if s.get("protocol") in needed})
    code = trial.study.code if trial.study else None
    missing = [p for p in present if not is_qualified(st.workdir, site, device, p, trial=code)]
    if not missing:
        return None
    return {"code": "unqualified_device", "detail": f"{device} is not qualified for {', '.join(missing)}",
            "source": "qualification"}


def _record_exam(st, exam_key: str, ident: dict, cls: Any, adh: Any, qc: Any, status: str, trial) -> None:
    from .archive import _series_entry

    exam = st.exam(exam_key) or {}
    findings = [{"code": f.get("code"), "detail": f.get("message") or f.get("detail") or "", "source": "adherence",
                 "severity": f.get("severity")} for f in ((adh or {}).get("findings", []) if isinstance(adh, dict) else [])]
    codes = {f["code"] for f in findings}
    # identify's own warnings, minus those the adherence step reports in more detail (e.g. unknown_device)
    warnings = [w for w in exam.get("warnings", []) if w.get("source") not in ("adherence", "qualification")
                and w.get("code") not in codes]
    if ident.get("skipped"):  # identify wrote no registry row: the reason it stopped is the exam's warning
        warnings = [w for w in warnings if w.get("source") != "identify"] + [
            {**w, "source": "identify"} for w in ident.get("warnings", [])]
    warnings += findings
    qual = _qualification_warning(trial, st, exam, ident, cls) if exam else None
    if qual:
        warnings.append(qual)
    with st.tx() as db:
        cls_series = (cls or {}).get("series", []) if isinstance(cls, dict) else []
        if cls_series:  # from now on the series are the de-identified ones the results speak of
            db.execute("DELETE FROM series WHERE exam_key=?", (exam_key,))
        for s in cls_series:
            uid = s.get("series_uid")
            a, q = _series_entry(adh, uid), _series_entry(qc, uid)
            orig = db.execute("SELECT original FROM deid_audit WHERE kind='uid' AND pseudonym=?", (uid,)).fetchone()
            db.execute("INSERT OR IGNORE INTO series(exam_key, series_uid, original_series_uid) VALUES (?, ?, ?)",
                       (exam_key, uid, orig[0] if orig else None))
            db.execute("UPDATE series SET series_number=?, description=?, modality=?, n_instances=?, protocol=?, "
                       "classification=?, adherence=?, qc=? WHERE exam_key=? AND series_uid=?",
                       (s.get("series_number"), s.get("series_description"), s.get("modality"), s.get("n_instances"),
                        s.get("protocol"), json.dumps({k: s.get(k) for k in ("status", "protocol", "candidates")}),
                        json.dumps({"verdict": a.get("verdict"), "failed": [r.get("keyword") for r in a.get("parameters", [])
                                                                     if isinstance(r, dict) and r.get("ok") is False]}) if a else None,
                        json.dumps({"verdict": q.get("verdict"), "checks": [{"check": c.get("check"), "verdict": c.get("verdict"), "measured": c.get("measured")} for c in q.get("checks", [])]}) if q else None,
                        exam_key, uid))
        db.execute("UPDATE exams SET status=?, warnings=?, updated=? WHERE exam_key=?",
                   (status, json.dumps(warnings), time.time(), exam_key))



def preflight(trial, workdir: Optional[str | Path] = None) -> list[str]:
    """Problems that would fail every exam, found before anything is written: a key the study names but the
    environment lacks, a key too weak to use (E703), or a key other than the one ``workdir`` was first run with
    (E704; the workdir is only read)."""
    from ..secrets import SecretError, key_fingerprint, read_key
    from ..store import check_key_fingerprint, connect

    problems = []
    keys = {}
    for what, src in (("identifiers", trial.identifiers.key if trial.identifiers else None),
                      ("deidentify", trial.deidentify.key if trial.deidentify else None)):
        if src is None:
            continue
        label = "identifiers key" if what == "identifiers" else "de-identification key"
        try:
            keys[what] = read_key(src, study_file=trial.source_file, what=label)
        except SecretError as err:
            msg = err.diagnostic.message
            problems.append(f"{what}: {msg.split(': ', 1)[1] if msg.startswith(label + ': ') else msg}")
    db_path = Workdir(workdir).state_db if workdir is not None else None
    if keys and db_path is not None and db_path.is_file():
        db = connect(db_path, create=False)
        try:
            code = trial.study.code if trial.study else "TRIAL"
            for what, key in keys.items():
                try:
                    check_key_fingerprint(db, code, what, key_fingerprint(key, what, code), record=False)
                except SecretError as err:
                    problems.append(f"{what}: {err.diagnostic.message}")
        finally:
            db.close()
    return sorted(set(problems))


def waiting(exams: list[dict]) -> list[dict]:
    """Exams that wait for an operator (``imtrial assign``): held ones (nothing after identify ran) and
    ones processed with visit ``unassigned``; each with the reason and the command that resolves it."""
    from .identify import UNASSIGNED

    out = []
    for e in exams:
        if e["status"] == "held":
            kind = "held"
        elif e["visit"] == UNASSIGNED and e["status"] != "failed":
            kind = "unassigned"
        else:
            continue
        codes = ("no_source_identifier", "unmatched") if kind == "held" else ("unassigned_visit",)
        w = next((w for w in e["warnings"] if w.get("code") in codes), {})
        out.append({"exam_key": e["exam_key"], "subject": e["subject_id"], "waiting": kind,
                    "reason": w.get("code"), "detail": w.get("detail", "")})
    return out


def summarize(st, *, this_run: Optional[dict] = None) -> dict:
    """Counts over the whole workdir (not only this run), plus what this run did."""
    exams = st.exams()
    series = [s for e in exams for s in e["series"]]

    def verdicts(kind: str) -> dict:
        out: dict[str, int] = {}
        for s in series:
            v = (s.get(kind) or {}).get("verdict") if s.get(kind) else None
            if v:
                out[v] = out.get(v, 0) + 1
        return out

    warn_counts: dict[str, int] = {}
    warn_list = []
    for e in exams:
        for w in e["warnings"]:
            code = w.get("code") or "warning"
            warn_counts[code] = warn_counts.get(code, 0) + 1
            warn_list.append({"exam_key": e["exam_key"], "subject": e["subject_id"], "visit": e["visit"], **w})
    failed = [{"exam_key": e["exam_key"], "subject": e["subject_id"],
               "step": next((n for n, v in e["steps"].items() if v["status"] == "failed"), None),
               "error": next((v["detail"].get("error") for v in e["steps"].values() if v["status"] == "failed"), None)
               or next((v["detail"].get("error") for v in e["steps"].values() if v["status"] == "blocked"), None)}
              for e in exams if e["status"] == "failed"]
    cls: dict[str, int] = {}
    for s in series:
        c = (s.get("classification") or {}).get("status")
        if c:
            cls[c] = cls.get(c, 0) + 1
    quarantined = st.quarantined()
    q_reasons: dict[str, int] = {}
    for q in quarantined:
        r = (q["reason"] or {}).get("reason", "unknown")
        q_reasons[r] = q_reasons.get(r, 0) + 1
    skipped = st.skipped()
    s_reasons: dict[str, int] = {}
    for k in skipped:
        s_reasons[k["reason"]] = s_reasons.get(k["reason"], 0) + 1
    return {
        "exams": len(exams), "subjects": len({(e["trial"], e["subject_id"]) for e in exams if e["subject_id"]}),
        "series": len(series), "instances": sum(e["n_instances"] or 0 for e in exams),
        "exam_status": {s: sum(e["status"] == s for e in exams) for s in sorted({e["status"] for e in exams})},
        "classification": cls, "adherence": verdicts("adherence"), "qc": verdicts("qc"),
        "quarantined": len(quarantined), "quarantine_reasons": q_reasons, "duplicates": len(st.duplicates()),
        "skipped": len(skipped), "skip_reasons": s_reasons,
        "skipped_entries": [{"inbox": k["inbox"], "path": k["rel_path"], "reason": k["reason"], "detail": k["detail"]}
                            for k in skipped],
        "unmatched": [e["exam_key"] for e in exams if e["status"] == "unmatched"],
        "waiting": waiting(exams),
        "failed": failed, "warnings": warn_counts, "warning_list": warn_list,
        # exams whose visit lacks a protocol it should acquire (the classify step's missing_protocols)
        "incomplete": [{"exam_key": e["exam_key"], "subject": e["subject_id"], "visit": e["visit"], "missing": miss}
                       for e in exams
                       for miss in [(e["steps"].get("classify") or {}).get("detail", {}).get("missing_protocols")]
                       if miss],
        "measurements": len(st.measurements()),
        "this_run": this_run or {"ingest": {}, "identified": 0, "exams_processed": 0, "seconds": None},
    }

