"""The dependency graph of a checked trial: what work runs, in which order (a networkx DAG).

Per-exam pipeline (``scope="exam"``), in data-dependency order::

    ingest → identify → deidentify → classify → adherence → qc:<check> … → archive
           → analysis:<name> … → measurements

plus study-level tasks (``scope="study"``): ``qualify:<site>/<device>`` per device
and ``visit:<name>`` per scheduled visit. Node attributes: ``kind``
(step | qc | analysis | study_task), ``step`` (a name in the runner's step
registry), ``scope``, ``ref`` (IR name or None), ``label``; QC and analysis nodes
also carry ``protocols`` (the protocol names they read). The local runner and the
CWL exporter both walk this graph; its shape is documented in ``docs/graph.md``.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from typing import Optional

import networkx as nx

from . import ir
from .diagnostics import Diagnostic, Severity

GRAPH_VERSION = "1"
EXAM_CHAIN = ("ingest", "identify", "deidentify", "classify", "adherence")


def _node(g: nx.DiGraph, nid: str, kind: str, step: str, scope: str, ref: Optional[str], label: str, **extra) -> None:
    g.add_node(nid, kind=kind, step=step, scope=scope, ref=ref, label=label, **extra)


def _qc_protocols(trial: ir.Trial, q: ir.QcCheck) -> list[str]:
    """The protocols ``q`` applies to: the rule of ``Trial.qc_for``, without its model comparisons."""
    names = {t.name for t in q.targets}
    return [p.name for p in trial.protocols
            if p.name in names or (q.modality and q.modality == p.modality and not q.targets)]


def build_graph(trial: ir.Trial) -> nx.DiGraph:
    """The DAG of steps for ``trial`` (assumed checked: references resolve, no analysis cycles)."""
    g = nx.DiGraph(study=trial.study.code if trial.study else None, graph_version=GRAPH_VERSION,
                   ir_version=trial.ir_version)
    labels = {
        "ingest": "Ingest DICOM", "identify": "Assign research identifiers", "deidentify": "De-identify",
        "classify": "Classify series", "adherence": "Protocol adherence",
    }
    for name in EXAM_CHAIN:
        _node(g, name, "step", name, "exam", None, labels[name])
    for a, b in zip(EXAM_CHAIN, EXAM_CHAIN[1:]):
        g.add_edge(a, b)
    _node(g, "archive", "step", "archive", "exam", None, "Archive")
    g.add_edge("adherence", "archive")

    qc_by_protocol: dict[str, list[str]] = {}
    for q in trial.qc:
        prots = _qc_protocols(trial, q)
        if not prots:
            continue  # a modality-wide check with no protocol of that modality: nothing to run
        nid = f"qc:{q.name}"
        _node(g, nid, "qc", "qc", "exam", q.name, f"QC {q.name} ({q.metric})", protocols=prots, metric=q.metric)
        g.add_edge("adherence", nid)
        g.add_edge(nid, "archive")
        for p in prots:
            qc_by_protocol.setdefault(p, []).append(nid)

    for a in trial.analyses:
        prots = sorted({i.protocol.name for i in a.inputs if i.protocol is not None})
        nid = f"analysis:{a.name}"
        _node(g, nid, "analysis", "analysis", "exam", a.name, a.description or f"Analysis {a.name}", protocols=prots)
        g.add_edge("archive", nid)
        for p in prots:
            for qn in qc_by_protocol.get(p, []):
                g.add_edge(qn, nid)
    for a in trial.analyses:
        for i in a.inputs:
            if i.analysis_output is not None:
                other = i.analysis_output.name.partition(".")[0]
                if f"analysis:{other}" in g:
                    g.add_edge(f"analysis:{other}", f"analysis:{a.name}")

    _node(g, "measurements", "step", "measurements", "exam", None, "Measurements table")
    if trial.analyses:
        for a in trial.analyses:
            g.add_edge(f"analysis:{a.name}", "measurements")
    else:
        g.add_edge("archive", "measurements")

    # Study-level tasks: devices qualify before the first visit; visits follow the schedule.
    visits = sorted(trial.schedule.visits, key=lambda v: v.offset.days) if trial.schedule else []
    for s, d in trial.devices():
        _node(g, f"qualify:{s.code}/{d.id}", "study_task", "qualify", "study", f"{s.code}/{d.id}",
              f"Qualify {d.id} at {s.code}", site=s.code, device=d.id)
    for v in visits:
        _node(g, f"visit:{v.name}", "study_task", "visit", "study", v.name, f"Visit {v.name} (day {v.offset.days:g})",
              protocols=[r.name for r in v.acquire])
    for a, b in zip(visits, visits[1:]):
        g.add_edge(f"visit:{a.name}", f"visit:{b.name}")
    if visits:
        for s, d in trial.devices():
            g.add_edge(f"qualify:{s.code}/{d.id}", f"visit:{visits[0].name}")
    return g


def exam_order(g: nx.DiGraph) -> list[str]:
    """Per-exam nodes in a stable topological order (ties broken by node id)."""
    sub = g.subgraph([n for n, d in g.nodes(data=True) if d["scope"] == "exam"])
    return list(nx.lexicographical_topological_sort(sub, key=lambda n: (_rank(n), n)))


def _rank(n: str) -> int:
    base = n.split(":", 1)[0]
    order = list(EXAM_CHAIN) + ["qc", "archive", "analysis", "measurements"]
    return order.index(base) if base in order else len(order)


# --------------------------------------------------------------------------- renderers

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
    name = g.graph.get("study") or "trial"
    out = [f"digraph {_q(name)} {{", "  rankdir=TB;", '  node [fontname="Helvetica", fontsize=10];',
           '  edge [color="#555555"];']
    for scope, title in (("exam", "per exam"), ("study", "study tasks")):
        nodes = sorted(n for n, d in g.nodes(data=True) if d["scope"] == scope)
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
    for scope, title in (("exam", "per exam"), ("study", "study tasks")):
        nodes = sorted(n for n, d in g.nodes(data=True) if d["scope"] == scope)
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
        proc = subprocess.run([exe, f"-T{fmt}"], input=to_dot(g).encode(), capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, Diagnostic(code="E602", message=f"graphviz 'dot' failed: {exc}", hint=None)
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip().splitlines()
        return None, Diagnostic(severity=Severity.ERROR, code="E602",
                                message=f"graphviz 'dot' failed: {err[-1] if err else proc.returncode}", hint=None)
    return proc.stdout, None


RENDERERS = {"dot": to_dot, "mermaid": to_mermaid, "json": to_json}
