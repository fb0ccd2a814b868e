"""The dependency graph of a checked trial: what work runs, in which order (a networkx DAG).

Built from the step table (``imtrial_dsl.pipeline``) plus the study's own QC checks and analyses:
one node per step (``qc:<check>`` and ``analysis:<name>`` per check and analysis), and an edge
A → B whenever B reads an exam-folder path or workdir object that A writes. The local runner walks
this graph and the CWL exporter generates its workflow from it, so the two cannot disagree on
order. Study tasks that people do rather than programs — ``qualify:<site>/<device>`` per device and
``visit:<name>`` per scheduled visit — are drawn beside the pipeline (``kind="study_task"``); the
runner does not execute them. Node attributes are documented in ``docs/graph.md``.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from dataclasses import asdict
from typing import Optional

import networkx as nx

from . import ir, pipeline
from .diagnostics import Diagnostic, Severity
from .secrets import subprocess_env

GRAPH_VERSION = "2"


def build_graph(trial: ir.Trial) -> nx.DiGraph:
    """The DAG of work for ``trial`` (assumed checked: references resolve, no analysis cycles)."""
    g = nx.DiGraph(study=trial.study.code if trial.study else None, graph_version=GRAPH_VERSION,
                   ir_version=trial.ir_version)
    nodes = pipeline.nodes(trial)
    for n in nodes:
        st = n.step
        attrs = dict(kind=st.kind, step=st.name, scope=st.scope, ref=n.ref, label=n.label,
                     inputs=list(n.inputs), outputs=list(n.outputs),
                     study_inputs=list(st.study_inputs), study_outputs=list(st.study_outputs),
                     shared=st.shared, ordered=st.ordered, resources=asdict(n.resources),
                     secrets=list(st.secrets))
        if st.per:
            attrs["protocols"] = list(n.protocols)
        attrs.update(n.extra)
        g.add_node(n.id, **attrs)
    for b in nodes:
        for a in nodes:
            if a is b:
                continue
            exam_dep = any(pipeline.covers(w, r) for w in a.outputs for r in b.inputs)
            # a study object: written by one step, read by another (the registry is read and written by
            # identify alone, which is no edge)
            study_dep = any(pipeline.covers(w, r) for w in a.step.study_outputs for r in b.step.study_inputs)
            if exam_dep or study_dep:
                g.add_edge(a.id, b.id)
    _study_tasks(g, trial)
    if not nx.is_directed_acyclic_graph(g):  # a step table bug, not a study error
        raise ValueError(f"the step table has a cycle: {nx.find_cycle(g)}")
    return g


def _study_tasks(g: nx.DiGraph, trial: ir.Trial) -> None:
    """Devices qualify before the first visit; visits follow the schedule."""
    visits = sorted(trial.schedule.visits, key=lambda v: v.offset.days) if trial.schedule else []
    common = dict(kind="study_task", scope="study", inputs=[], outputs=[], study_inputs=[], study_outputs=[],
                  shared=None, ordered=False, resources=None, secrets=[])
    for s, d in trial.devices():
        g.add_node(f"qualify:{s.code}/{d.id}", step="qualify", ref=f"{s.code}/{d.id}",
                   label=f"Qualify {d.id} at {s.code}", site=s.code, device=d.id, **common)
    for v in visits:
        g.add_node(f"visit:{v.name}", step="visit", ref=v.name, label=f"Visit {v.name} (day {v.offset.days:g})",
                   protocols=[r.name for r in v.acquire], **common)
    for a, b in zip(visits, visits[1:]):
        g.add_edge(f"visit:{a.name}", f"visit:{b.name}")
    if visits:
        for s, d in trial.devices():
            g.add_edge(f"qualify:{s.code}/{d.id}", f"visit:{visits[0].name}")


def pipeline_nodes(g: nx.DiGraph) -> list[str]:
    """The nodes the runner executes (everything but the study tasks), in a stable topological order."""
    sub = g.subgraph([n for n, d in g.nodes(data=True) if d["kind"] != "study_task"])
    table = list(pipeline.STEPS)
    return list(nx.lexicographical_topological_sort(
        sub, key=lambda n: (table.index(g.nodes[n]["step"]) if g.nodes[n]["step"] in table else len(table), n)))


def staged_phases(g: nx.DiGraph) -> list[tuple[bool, list[str]]]:
    """The pipeline cut for an engine that stages every input read-only (CWL): ``(batch, node ids)``.

    A *batch* phase is one node that runs once over every exam — a study node, or an exam node on
    shared state (the registry, the archive), which such an engine cannot share between jobs; the
    other phases are maximal runs of exam nodes without shared state, which scatter over exams.
    Phases are numbered from 0 in this order (``imtrial step exam --ref N`` runs phase N fused)."""
    ids = pipeline_nodes(g)
    table = list(pipeline.STEPS)

    def batch(n: str) -> bool:
        d = g.nodes[n]
        return d["scope"] == "study" or d["shared"] is not None

    order = list(nx.lexicographical_topological_sort(
        g.subgraph(ids), key=lambda n: (batch(n), table.index(g.nodes[n]["step"]), n)))
    phases: list[tuple[bool, list[str]]] = []
    for n in order:
        if batch(n) or not phases or phases[-1][0]:
            phases.append((batch(n), [n]))
        else:
            phases[-1][1].append(n)
    return phases


def exam_order(g: nx.DiGraph) -> list[str]:
    """Per-exam nodes in the stable topological order the runner uses."""
    return [n for n in pipeline_nodes(g) if g.nodes[n]["scope"] == "exam"]


# --------------------------------------------------------------------------- renderers

def drawn(g: nx.DiGraph) -> nx.DiGraph:
    """The graph as pictures show it: without the edges that other paths already imply (the transitive
    reduction), so that each step points at what it comes right before."""
    red = nx.transitive_reduction(g)
    red.add_nodes_from(g.nodes(data=True))
    red.graph.update(g.graph)
    return red


def _q(s: str) -> str:
    return '"' + str(s).replace("\\", "\\\\").replace('"', '\\"') + '"'


_DOT_STYLE = {
    "step": 'shape=box, style="rounded,filled", fillcolor="#dbe9f6"',
    "qc": 'shape=box, style="rounded,filled", fillcolor="#fde9c9"',
    "analysis": 'shape=box, style="rounded,filled", fillcolor="#d9f0d3"',
    "study_task": 'shape=box, style="rounded,dashed"',
}


def to_dot(g: nx.DiGraph) -> str:
    """Graphviz DOT text: exam pipeline top to bottom, study tasks in their own cluster."""
    g = drawn(g)
    name = g.graph.get("study") or "trial"
    out = [f"digraph {_q(name)} {{", "  rankdir=TB;", '  node [fontname="Helvetica", fontsize=10];',
           '  edge [color="#555555"];']
    for scope, title in (("pipeline", "pipeline (per exam, and over the study)"), ("tasks", "study tasks")):
        nodes = sorted(n for n, d in g.nodes(data=True) if (d["kind"] == "study_task") == (scope == "tasks"))
        if not nodes:
            continue
        out.append(f"  subgraph cluster_{scope} {{")
        out.append(f"    label={_q(title)}; fontname=\"Helvetica\"; color=\"#bbbbbb\";")
        for n in nodes:
            d = g.nodes[n]
            out.append(f"    {_q(n)} [label={_q(d['label'])}, {_DOT_STYLE[d['kind']]}];")
        out.append("  }")
    for a, b in sorted(g.edges):
        out.append(f"  {_q(a)} -> {_q(b)};")
    out.append("}")
    return "\n".join(out) + "\n"


def to_mermaid(g: nx.DiGraph) -> str:
    """Mermaid flowchart text (renders in GitHub Markdown)."""
    g = drawn(g)
    ids: dict[str, str] = {}
    for n in sorted(g.nodes):
        base = re.sub(r"[^A-Za-z0-9_]", "_", n)
        ident = base
        while ident in ids.values():
            ident += "_"
        ids[n] = ident

    def label(n: str) -> str:
        return g.nodes[n]["label"].replace('"', "#quot;")

    out = ["flowchart TD"]
    for scope, title in (("pipeline", "pipeline"), ("tasks", "study tasks")):
        nodes = sorted(n for n, d in g.nodes(data=True) if (d["kind"] == "study_task") == (scope == "tasks"))
        if not nodes:
            continue
        out.append(f'  subgraph {scope}["{title}"]')
        for n in nodes:
            shape = ('(["', '"])') if g.nodes[n]["kind"] == "study_task" else ('["', '"]')
            out.append(f"    {ids[n]}{shape[0]}{label(n)}{shape[1]}")
        out.append("  end")
    for a, b in sorted(g.edges):
        out.append(f"  {ids[a]} --> {ids[b]}")
    return "\n".join(out) + "\n"


def to_json(g: nx.DiGraph) -> str:
    """Node-link JSON (``nodes``/``edges``), sorted for stable diffs."""
    data = nx.node_link_data(g, edges="edges")
    data["nodes"] = sorted(data["nodes"], key=lambda n: n["id"])
    data["edges"] = sorted(data["edges"], key=lambda e: (e["source"], e["target"]))
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def render_image(g: nx.DiGraph, fmt: str) -> tuple[Optional[bytes], Optional[Diagnostic]]:
    """SVG or PNG bytes through graphviz ``dot``; a Diagnostic instead when ``dot`` is missing or fails."""
    if fmt not in ("svg", "png"):
        return None, Diagnostic(code="E601", message=f"unknown image format '{fmt}'", hint="use svg or png")
    exe = shutil.which("dot")
    if exe is None:
        return None, Diagnostic(code="E601", message="graphviz 'dot' is not installed, so svg/png cannot be drawn",
                                hint="install graphviz (e.g. apt-get install graphviz), or use --format dot|mermaid|json")
    try:
        proc = subprocess.run([exe, f"-T{fmt}"], input=to_dot(g).encode(), capture_output=True, timeout=60,
                              env=subprocess_env())   # no key or token reaches graphviz
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, Diagnostic(code="E602", message=f"graphviz 'dot' failed: {exc}", hint=None)
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip().splitlines()
        return None, Diagnostic(severity=Severity.ERROR, code="E602",
                                message=f"graphviz 'dot' failed: {err[-1] if err else proc.returncode}", hint=None)
    return proc.stdout, None


RENDERERS = {"dot": to_dot, "mermaid": to_mermaid, "json": to_json}
