"""The step table is the one source of execution: a step added to it appears in the graph, in
`imtrial run` and in the CWL workflow with no other edit; a changed study re-judges what it concerns."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from imtrial_dsl import cli, pipeline
from imtrial_dsl.compiler import compile_file
from imtrial_dsl.exporters import cwl as cwl_export
from imtrial_dsl.runner.archive import verify
from imtrial_dsl.runner.run import run_study
from imtrial_dsl.store import Store
from imtrial_dsl.tools.minicorpus import make_corpus

KEY = "pipeline-test-key-0123456789"


def count_series(ctx) -> dict:
    """The toy step: how many series the classification found, and how many instances are in deid/."""
    cls = ctx.read_json("results/classification.json", {})
    n_files = sum(1 for p in ctx.path("deid/").rglob("*.dcm"))
    ctx.write_json("results/series_count.json", {"series": len(cls.get("series", [])), "instances": n_files})
    return {"series": len(cls.get("series", []))}


@pytest.fixture()
def toy_step():
    step = pipeline.register(pipeline.Step(
        "count_series", "Count series", "A toy step registered by a test.", scope="exam",
        func=f"{__name__}:count_series", inputs=("deid/", "results/classification.json"),
        outputs=("results/series_count.json",)))
    try:
        yield step
    finally:
        pipeline.unregister("count_series")


@pytest.fixture()
def mini(tmp_path, monkeypatch):
    monkeypatch.setenv("IMTRIAL_KEY", KEY)
    return make_corpus(tmp_path / "corpus", subjects=1, slices=3)


def test_a_step_added_to_the_table_is_drawn_run_and_exported(toy_step, mini, tmp_path, capsys):
    res = compile_file(mini["study"])
    g = res.graph
    assert "count_series" in g and g.has_edge("classify", "count_series") and g.has_edge("deidentify", "count_series")
    assert cli.main(["graph", mini["study"], "--format", "mermaid"]) == 0
    assert "Count series" in capsys.readouterr().out

    summary = run_study(res.trial, inbox=mini["inbox"], workdir=tmp_path / "w", jobs=1)
    assert not summary["failed"] and summary["exams"] == 2
    with Store(tmp_path / "w") as st:
        for e in st.exams():
            assert e["steps"]["count_series"]["status"] == "done"
            out = json.loads((tmp_path / "w" / "exams" / e["exam_key"] / "results" / "series_count.json").read_text())
            assert out == {"series": 2, "instances": 6}

    written = cwl_export.export(res.trial, g, tmp_path / "cwl")
    assert tmp_path / "cwl" / "tools" / "count_series.cwl" in written
    sub = next((tmp_path / "cwl").glob("exam_pipeline_*.cwl")).read_text()
    assert "count_series" in sub and "classify/results_classification_json" in sub


def test_independent_nodes_of_an_exam_run_side_by_side(mini, tmp_path):
    """Two analyses that do not depend on each other overlap in time (each sleeps 1 s in its program)."""
    study = Path(mini["study"])
    sleeper = tmp_path / "sleeper.py"
    sleeper.write_text("import json, sys, time\ntime.sleep(1)\nopen(sys.argv[1], 'w').write(json.dumps({'n': 1}))\n")
    text = study.read_text() + "".join(
        f'analysis {name} "sleeps" {{ input t2 from T2w  output o file  run "python3 {sleeper} {{o}}"  measure n count "x" }}\n'
        for name in ("slow_a", "slow_b"))
    study.write_text(text)
    res = compile_file(study)
    assert res.ok, [str(d) for d in res.diagnostics]
    summary = run_study(res.trial, inbox=mini["inbox"], workdir=tmp_path / "w", jobs=1)
    assert not summary["failed"], summary["failed"]
    with Store(tmp_path / "w") as st:
        for e in st.exams():
            a, b = e["steps"]["analysis:slow_a"], e["steps"]["analysis:slow_b"]
            assert a["started"] < b["finished"] and b["started"] < a["finished"], (a, b)


def test_built_in_steps_of_an_exam_run_one_at_a_time(mini, tmp_path):
    """The built-in steps hold the GIL: two side by side would only contend for it, so an exam runs them one
    at a time (the QC checks too); the state DB's times of one exam's built-in nodes never overlap."""
    res = compile_file(Path(mini["study"]))
    summary = run_study(res.trial, inbox=mini["inbox"], workdir=tmp_path / "w", jobs=2)
    assert not summary["failed"], summary["failed"]
    with Store(tmp_path / "w") as st:
        for e in st.exams():
            spans = sorted((v["started"], v["finished"], n) for n, v in e["steps"].items()
                           if n not in ("ingest", "identify", "measurements") and not n.startswith("analysis:")
                           and v["started"] is not None)
            assert len(spans) >= 4
            for (s0, f0, a), (s1, f1, b) in zip(spans, spans[1:]):
                assert f0 <= s1, (a, b)


def test_a_changed_constraint_rejudges_archived_exams(mini, tmp_path):
    study = Path(mini["study"])
    trial = compile_file(study).trial
    w = tmp_path / "w"
    first = run_study(trial, inbox=mini["inbox"], workdir=w, jobs=1)
    assert first["adherence"] == {"pass": 4}
    # a comment moves every line: nothing is stale
    study.write_text("# edited\n" + study.read_text())
    again = run_study(compile_file(study).trial, inbox=mini["inbox"], workdir=w, jobs=1)
    assert again["this_run"]["exams_processed"] == 0
    # a constraint the T2 series break: every exam is judged again, and the archive keeps both versions
    study.write_text(study.read_text().replace("RepetitionTime in 3000 .. 5000 ms", "RepetitionTime in 100 .. 200 ms", 1))
    before = time.time()
    changed = run_study(compile_file(study).trial, inbox=mini["inbox"], workdir=w, jobs=1)
    assert changed["this_run"]["exams_processed"] == 2 and changed["adherence"] == {"fail": 2, "pass": 2}
    with Store(w) as st:
        for e in st.exams():
            ran = {n for n, v in e["steps"].items() if v["finished"] > before and v["status"] == "done"}
            assert {"adherence", "archive"} <= ran
            t2 = next(s for s in e["series"] if s["protocol"] == "T2w")
            assert t2["adherence"]["verdict"] == "fail"
    log = [json.loads(x) for x in (w / "archive" / "audit.log.jsonl").read_text().splitlines()]
    corrected = [r for r in log if r["action"] == "record.correct"]
    assert len(corrected) >= 2 and all(r["version"] == 2 for r in corrected)
    assert verify(w / "archive")["ok"]
    objects = [r for r in log if r["action"] == "object.add"]
    assert len(objects) == 12   # the instances were not stored again
