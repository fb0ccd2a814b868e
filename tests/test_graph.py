"""The dependency graph: its shape follows the IR (docs/graph.md), renderers agree with it."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from imtrial_dsl import graph as G  # noqa: E402
from imtrial_dsl.compiler import compile_file, compile_text  # noqa: E402

EXAMPLES = sorted((ROOT / "examples").glob("*.imtrial"))
KINDS = {"step", "qc", "analysis", "study_task"}
STEP_NAMES = {"ingest", "identify", "deidentify", "classify", "adherence", "qc", "archive", "analysis",
              "measurements", "qualify", "visit"}


def _compiled(path: Path):
    res = compile_file(path)
    assert res.ok, [str(d) for d in res.diagnostics]
    return res.trial, res.graph


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_graph_shape_follows_the_ir(path: Path) -> None:
    trial, g = _compiled(path)
    assert nx.is_directed_acyclic_graph(g)
    for n, d in g.nodes(data=True):
        assert d["kind"] in KINDS and d["step"] in STEP_NAMES and d["scope"] in ("exam", "study") and d["label"], n
    # the exam chain
    for a, b in zip(G.EXAM_CHAIN, G.EXAM_CHAIN[1:]):
        assert g.has_edge(a, b)
    assert g.has_edge("adherence", "archive")
    # one node per QC check that applies to some protocol, between adherence and archive
    for q in trial.qc:
        prots = [p.name for p in trial.protocols if q in trial.qc_for(p)]
        nid = f"qc:{q.name}"
        assert (nid in g) == bool(prots)
        if prots:
            assert g.nodes[nid]["protocols"] == prots and g.nodes[nid]["ref"] == q.name
            assert g.has_edge("adherence", nid) and g.has_edge(nid, "archive")
    # analyses after archive, after the QC of the protocols they read, after the analyses they consume
    for a in trial.analyses:
        nid = f"analysis:{a.name}"
        assert g.has_edge("archive", nid) and g.has_edge(nid, "measurements")
        for i in a.inputs:
            if i.protocol:
                p = trial.protocol(i.protocol.name)
                for q in trial.qc_for(p):
                    assert g.has_edge(f"qc:{q.name}", nid)
            if i.analysis_output:
                assert g.has_edge(f"analysis:{i.analysis_output.name.split('.')[0]}", nid)
    # study tasks
    devices = [f"qualify:{s.code}/{d.id}" for s, d in trial.devices()]
    schedule = trial.schedule.visits if trial.schedule else []
    visits = [f"visit:{v.name}" for v in sorted(schedule, key=lambda v: v.offset.days)]
    assert sorted(n for n, d in g.nodes(data=True) if d["scope"] == "study") == sorted(devices + visits)
    for a, b in zip(visits, visits[1:]):
        assert g.has_edge(a, b)
    for q in devices:
        assert not visits or g.has_edge(q, visits[0])


def test_exam_steps_exist_in_the_runner_registry() -> None:
    from imtrial_dsl.runner import steps

    registry = steps.load_all()
    _, g = _compiled(EXAMPLES[0])
    missing = {d["step"] for _, d in g.nodes(data=True) if d["scope"] == "exam"} - set(registry)
    assert not missing


STUDY = """
protocol T1w modality MR { match SeriesDescription ~ "(?i)t1w" }
protocol FLAIR modality MR { match SeriesDescription ~ "(?i)flair" }
protocol CT_chest modality CT { match SeriesDescription ~ "(?i)chest" }
qc snr on T1w uses snr(min = 10)
qc mr_ghost on modality MR uses ghosting(max = 0.2)
qc pet_noise on modality PT uses noise(max = 3)
analysis seg { input t1 from T1w  output labels file  run "seg {t1} {labels}" }
analysis vol { input labels from seg.labels  input flair from FLAIR  output v file  run "vol {labels} {flair} {v}" }
analysis report { input v from vol.v  output r file  run "rep {v} {r}" }
"""


def test_analysis_chain_and_modality_qc() -> None:
    res = compile_text(STUDY, "chain.imtrial")
    assert res.ok, [str(d) for d in res.diagnostics]
    g = res.graph
    assert "qc:pet_noise" not in g  # no PT protocol: nothing to run
    assert g.nodes["qc:mr_ghost"]["protocols"] == ["T1w", "FLAIR"]
    assert g.has_edge("analysis:seg", "analysis:vol") and g.has_edge("analysis:vol", "analysis:report")
    assert g.has_edge("qc:snr", "analysis:seg") and not g.has_edge("qc:snr", "analysis:vol")
    assert g.has_edge("qc:mr_ghost", "analysis:vol")
    order = G.exam_order(g)
    assert order[:5] == list(G.EXAM_CHAIN)
    assert order.index("analysis:seg") < order.index("analysis:vol") < order.index("analysis:report") < order.index("measurements")
    assert not [n for n, d in g.nodes(data=True) if d["scope"] == "study"]  # no devices, no schedule


def test_no_analyses_means_archive_feeds_measurements() -> None:
    res = compile_text('protocol T1w modality MR { match SeriesDescription ~ "t1" }', "x.imtrial")
    assert res.ok and res.graph.has_edge("archive", "measurements")


def test_renderers_agree_with_graph() -> None:
    _, g = _compiled(EXAMPLES[0])
    data = json.loads(G.to_json(g))
    back = nx.node_link_graph(data, edges="edges")
    assert set(back.nodes) == set(g.nodes) and set(back.edges) == set(g.edges)
    assert dict(back.nodes["ingest"]) == dict(g.nodes["ingest"])
    dot = G.to_dot(g)
    assert dot.count(" -> ") == g.number_of_edges()
    for n in g.nodes:
        assert f'"{n}"' in dot
    mer = G.to_mermaid(g)
    assert mer.startswith("flowchart TD") and mer.count(" --> ") == g.number_of_edges()


def test_image_rendering_or_error_value(monkeypatch) -> None:
    _, g = _compiled(EXAMPLES[0])
    if shutil.which("dot"):
        svg, err = G.render_image(g, "svg")
        assert err is None and b"<svg" in svg
        png, err = G.render_image(g, "png")
        assert err is None and png.startswith(b"\x89PNG")
    monkeypatch.setattr(G.shutil, "which", lambda _name: None)
    data, err = G.render_image(g, "svg")
    assert data is None and err.code == "E601" and "not installed" in err.message
