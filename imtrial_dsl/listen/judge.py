"""The verdict on one received series, computed by the pipeline's own steps.

Nothing here classifies, checks a parameter or measures a pixel: the series goes through the nodes of
the study's graph that classification, adherence and QC need (``classify``, ``adherence``, every
``qc:*`` node and whatever they read — today ingest, identify, deidentify), each run staged like a CWL
tool (:mod:`imtrial_dsl.runner.invoke`) in a scratch folder. When another engineer changes what those
steps read, the set of nodes follows from the graph.

Identification runs on a *copy* of the site's registry (SQLite backup API), so the verdict sees the
subject's earlier exams (same-device rule, visit) and the real registry is not touched: the images
flow on to the inbox, and ``imtrial run`` identifies them for good.
"""
from __future__ import annotations

import shutil
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Optional

from .. import ir
from ..files import read_json
from ..workdir import ADHERENCE, CLASSIFICATION, EXAM_JSON, IDENTITY, QC, ExamDir, Workdir

TARGET_STEPS = ("classify", "adherence", "qc")


def _registry_copy(site_db: Path, dest: Path) -> None:
    """A consistent copy of the site's state database (WAL included), or a new one."""
    from ..store import connect

    dst = connect(dest)
    if site_db.exists():
        src = sqlite3.connect(str(site_db), timeout=60)
        try:
            src.backup(dst)
        finally:
            src.close()
    dst.close()


def needed_nodes(trial: ir.Trial):
    """(plan, the nodes to run in graph order): the target steps and every node they read from."""
    import networkx as nx

    from ..runner.run import make_plan

    plan = make_plan(trial)
    targets = {nid for nid, n in plan.nodes.items() if n.step.name in TARGET_STEPS}
    need = set(targets)
    for t in targets:
        need |= {a for a in nx.ancestors(plan.graph, t) if a in plan.nodes}
    order = [n for ph in plan.phases for n in ph.nodes if n.id in need]
    return plan, order


def judge_series(trial: ir.Trial, series_dir: Path, workdir: Path, *, scratch: Optional[Path] = None) -> dict:
    """Run the pipeline's nodes on one series' files; returns the verdict (see :func:`verdict_of`)."""
    from ..runner.context import ExamContext
    from ..runner.invoke import run_staged
    from ..runner.run import walk_exam

    t0 = time.time()
    own = scratch is None
    scratch = Path(tempfile.mkdtemp(prefix="imtrial-listen-")) if own else Path(scratch)
    try:
        plan, order = needed_nodes(trial)
        ingest_out, ident_out, exam_out = scratch / "ingest", scratch / "identify", scratch / "exam"
        inputs: dict[str, Path] = {}
        key: Optional[str] = None
        segment = []
        for n in order:
            if n.scope == "study":  # ingest: the series folder is its inbox
                run_staged(trial, n, [], ingest_out, study_inputs={"inbox/": series_dir})
                keys = sorted(p.name for p in (ingest_out / "exams").iterdir()) if (ingest_out / "exams").is_dir() else []
                if len(keys) != 1:
                    return {"verdict": "error", "message": f"the series' files were not ingested ({len(keys)} exams)",
                            "seconds": round(time.time() - t0, 3)}
                key = keys[0]
                E = ExamDir(ingest_out / "exams" / key)
                for rel in n.outputs:
                    inputs[rel] = E.path(rel)
            elif n.step.shared == "registry":  # identify, on a copy of the site's registry
                ident_out.mkdir(parents=True, exist_ok=True)
                _registry_copy(Workdir(workdir).state_db, ident_out / "state.sqlite")
                run_staged(trial, n, [(r, inputs[r]) for r in n.inputs if r in inputs], ident_out)
                for rel in n.outputs:
                    inputs[rel] = ident_out / key / rel
            else:
                segment.append(n)
        exam_out.mkdir(parents=True, exist_ok=True)
        ids = {n.id for n in segment}
        preds = {n.id: [p for p in plan.preds(n.id) if p in ids] for n in segment}
        state = walk_exam(trial, None, None, key, segment, preds, ids, {},
                          context=lambda n, cache: ExamContext(trial, ExamDir(exam_out), n, inputs=inputs,
                                                               out_root=exam_out, exam_key=key, cache=cache))
        res = verdict_of(trial, exam_out, inputs.get(IDENTITY), state)
        res["seconds"] = round(time.time() - t0, 3)
        res["exam_info"] = read_json(inputs[EXAM_JSON], {}) if EXAM_JSON in inputs else {}
        return res
    finally:
        if own:
            shutil.rmtree(scratch, ignore_errors=True)


def _expected(text: str) -> str:
    text = (text or "").strip()
    return text[2:] if text.startswith("= ") else text


def verdict_of(trial: ir.Trial, exam_out: Path, identity_path: Optional[Path], state: dict) -> dict:
    """PASS / WARN / FAIL for the series, with the technologist's sentence."""
    ident = read_json(identity_path, {}) if identity_path else {}
    failed = sorted(k for k, v in state.items() if v in ("failed", "blocked"))
    cls = read_json(exam_out / CLASSIFICATION, {}) or {}
    adh = read_json(exam_out / ADHERENCE, {}) or {}
    qc_docs = [read_json(p, {}) for p in sorted((exam_out / QC).glob("*.json"))] if (exam_out / QC).is_dir() else []
    series = (cls.get("series") or [{}])[0]
    protocol = series.get("protocol")
    label = protocol or series.get("series_description") or "series"
    base = {"protocol": protocol, "series_description": series.get("series_description"),
            "series_number": series.get("series_number"), "n_instances": series.get("n_instances"),
            "subject_id": ident.get("subject_id"), "visit": ident.get("visit"), "site": ident.get("exam_site") or ident.get("site"),
            "device": ident.get("device")}
    if ident.get("skipped"):
        return {**base, "verdict": "ERROR", "problems": [ident["skipped"]],
                "message": f"{label}: NOT CHECKED — {ident['skipped']}"}
    if failed:
        return {**base, "verdict": "ERROR", "problems": [f"step {k} failed" for k in failed],
                "message": f"{label}: NOT CHECKED — step {', '.join(failed)} failed"}
    if not protocol:
        status = series.get("status") or "unmatched"
        return {**base, "verdict": "WARN", "problems": [f"no protocol matched ({status})"],
                "message": f"{series.get('series_description') or 'series'}: WARN matches no protocol of the study "
                           f"({status}) — check the protocol chosen"}
    fails, warns = [], []
    a = next((s for s in adh.get("series", []) if s.get("protocol") == protocol), None) or {}
    for p in a.get("parameters", []):
        if p.get("ok") is False:
            text = f"{p.get('keyword') or p.get('parameter')} {p.get('actual_text') or p.get('actual')}, expected " \
                   f"{_expected(p.get('expected'))}"
            (fails if p.get("significance") == "error" else warns).append(text)
    for f in adh.get("findings", []):
        text = f.get("message") or f.get("detail") or f.get("code")
        (fails if f.get("severity") == "error" else warns).append(str(text))
    for doc in qc_docs:
        for s in doc.get("series", []):
            for c in s.get("checks", []):
                if c.get("verdict") in ("fail", "warn", "error"):
                    text = (f"QC {c.get('check')} {c.get('metric')} {c.get('measured')}, "
                            f"{c.get('parameter')} {c.get('threshold')}")
                    (fails if c.get("verdict") == "fail" and c.get("severity") == "error" else warns).append(text)
    if fails:
        verdict, tail = "FAIL", " — repeat the series"
    elif warns:
        verdict, tail = "WARN", " — check before the subject leaves"
    else:
        verdict, tail = "PASS", ""
    detail = "; ".join(fails + warns)
    return {**base, "verdict": verdict, "problems": fails + warns,
            "message": f"{label}: {verdict}" + (f" {detail}" if detail else "") + tail}
