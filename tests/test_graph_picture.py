"""The graph picture of every example is readable: the per-exam pipeline and the study-level tasks are drawn
as separate clusters, no edge that other paths already imply is drawn, and a stdlib QC check that applies
to none of the study's protocols is not in it."""
from __future__ import annotations

import re
from pathlib import Path

import networkx as nx
import pytest

from imtrial_dsl.compiler import compile_file
from imtrial_dsl.graph import drawn, to_dot, to_mermaid

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.imtrial"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_graph_picture(path):
    res = compile_file(path)
    g, trial = res.graph, res.trial
    dot = to_dot(g)
    clusters = dict(re.findall(r"subgraph cluster_(\w+) \{(.*?)\n  \}", dot, flags=re.S))
    assert set(clusters) == {"pipeline", "tasks"}
    in_tasks = set(re.findall(r'^\s+"([^"]+)" \[label=', clusters["tasks"], flags=re.M))
    in_pipeline = set(re.findall(r'^\s+"([^"]+)" \[label=', clusters["pipeline"], flags=re.M))
    assert in_tasks == {n for n, d in g.nodes(data=True) if d["kind"] == "study_task"}
    assert in_pipeline == {n for n, d in g.nodes(data=True) if d["kind"] != "study_task"}
    assert not in_tasks & in_pipeline
    # only the edges of the transitive reduction are drawn
    edges = set(re.findall(r'^  "([^"]+)" -> "([^"]+)";', dot, flags=re.M))
    assert edges == set(nx.transitive_reduction(g).edges) == set(drawn(g).edges)
    assert to_mermaid(g).count(" --> ") == len(edges)
    # a QC check drawn applies to at least one protocol of the study; modality-wide stdlib checks of a
    # modality the study does not acquire are left out
    modalities = {p.modality for p in trial.protocols}
    for n, d in g.nodes(data=True):
        if d["step"] == "qc":
            assert d["protocols"], n
    for q in trial.qc:
        if q.modality and q.modality not in modalities:
            assert f"qc:{q.name}" not in g, q.name
    assert any(q.modality and q.modality not in modalities for q in trial.qc) == (path.stem not in ("phantom_qualification", "cardiac_sarcoid_mr_petct"))  # every QC check of these is of a modality they acquire
