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
    # the chain every exam goes through, by data: each reads what the one before writes
    # classification reads the originals at the site (beside de-identification, not after it)
    for a, b in [("ingest", "identify"), ("identify", "deidentify"), ("ingest", "classify"), ("identify", "classify"),
                 ("classify", "adherence"), ("adherence", "archive"), ("deidentify", "archive")]:
        assert g.has_edge(a, b), (a, b)
    assert not g.has_edge("deidentify", "classify")
    # one node per QC check that applies to some protocol, between classification and the archive
    for q in trial.qc:
        prots = [p.name for p in trial.protocols if q in trial.qc_for(p)]
        nid = f"qc:{q.name}"
        assert (nid in g) == bool(prots)
        if prots:
            assert g.nodes[nid]["protocols"] == prots and g.nodes[nid]["ref"] == q.name
            assert g.has_edge("classify", nid) and g.has_edge(nid, "archive")
    # analyses after the QC of the protocols they read and the analyses they consume -- and nothing else
    for a in trial.analyses:
        nid = f"analysis:{a.name}"
        assert g.has_edge("deidentify", nid) and g.has_edge(nid, "measurements")
        wanted = {f"qc:{q.name}" for i in a.inputs if i.protocol for q in trial.qc_for(trial.protocol(i.protocol.name))}
        wanted |= {f"analysis:{i.analysis_output.name.split('.')[0]}" for i in a.inputs if i.analysis_output}
        got = {p for p in g.predecessors(nid) if p.startswith(("qc:", "analysis:"))}
        assert got == wanted, (nid, got, wanted)
    # study tasks
    devices = [f"qualify:{s.code}/{d.id}" for s, d in trial.devices()]
    schedule = trial.schedule.visits if trial.schedule else []
    visits = [f"visit:{v.name}" for v in sorted(schedule, key=lambda v: v.offset.days)]
    assert sorted(n for n, d in g.nodes(data=True) if d["kind"] == "study_task") == sorted(devices + visits)
    for a, b in zip(visits, visits[1:]):
        assert g.has_edge(a, b)
    for q in devices:
        assert not visits or g.has_edge(q, visits[0])


def test_independent_analyses_do_not_wait_for_each_other() -> None:
    trial, g = _compiled(ROOT / "examples" / "amyloid_mri.imtrial")
    assert not nx.has_path(g, "analysis:hipvol", "analysis:aria_read")
    assert not nx.has_path(g, "analysis:aria_read", "analysis:hipvol")


def test_every_node_of_the_graph_is_a_step_of_the_table() -> None:
    from imtrial_dsl import pipeline

    _, g = _compiled(EXAMPLES[0])
    missing = {d["step"] for _, d in g.nodes(data=True) if d["kind"] != "study_task"} - set(pipeline.STEPS)
    assert not missing
    for n, d in g.nodes(data=True):
        if d["kind"] != "study_task":
            st = pipeline.STEPS[d["step"]]
            assert d["resources"]["cores"] >= 1 and d["resources"]["ram_mb"] > 0
            assert (d["shared"], d["ordered"]) == (st.shared, st.ordered)


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
    order = G.pipeline_nodes(g)
    assert order[:5] == ["ingest", "identify", "deidentify", "classify", "adherence"]
    assert order.index("analysis:seg") < order.index("analysis:vol") < order.index("analysis:report") < order.index("measurements")
    assert not [n for n, d in g.nodes(data=True) if d["kind"] == "study_task"]  # no devices, no schedule


def test_no_analyses_means_nothing_feeds_measurements_but_identities() -> None:
    res = compile_text('protocol T1w modality MR { match SeriesDescription ~ "t1" }', "x.imtrial")
    assert res.ok and set(res.graph.predecessors("measurements")) == {"identify"}


def test_renderers_agree_with_graph() -> None:
    _, g = _compiled(EXAMPLES[0])
    data = json.loads(G.to_json(g))
    back = nx.node_link_graph(data, edges="edges")
    assert set(back.nodes) == set(g.nodes) and set(back.edges) == set(g.edges)
    assert dict(back.nodes["ingest"]) == dict(g.nodes["ingest"])
    dot = G.to_dot(g)
    assert dot.count(" -> ") == G.drawn(g).number_of_edges()
    for n in g.nodes:
        assert f'"{n}"' in dot
    mer = G.to_mermaid(g)
    assert mer.startswith("flowchart TD") and mer.count(" --> ") == G.drawn(g).number_of_edges()


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
