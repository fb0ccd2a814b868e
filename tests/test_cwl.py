"""CWL exporter: valid CWL v1.2, inert study strings, and the same results as the local runner."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from imtrial_dsl.compiler import compile_file, compile_text
from imtrial_dsl.exporters import cwl as cwl_export

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.imtrial"))
BIN = Path(sys.executable).parent
KEY_ENV = {"IMTRIAL_KEY": "cwl-test-key-0123456789abcdef", "CENTRAL_TOKEN": "unused"}


def _env():
    env = dict(os.environ, **KEY_ENV)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


def _export(path: Path, out: Path) -> list[Path]:
    res = compile_file(path)
    assert res.ok, [str(d) for d in res.diagnostics]
    return cwl_export.export(res.trial, res.graph, out)


def _validate(wf: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "cwltool"), "--validate", str(wf)], capture_output=True, text=True, env=_env())


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_every_example_exports_valid_cwl(example, tmp_path):
    written = _export(example, tmp_path)
    assert (tmp_path / "workflow.cwl") in written
    proc = _validate(tmp_path / "workflow.cwl")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "is valid CWL" in proc.stdout + proc.stderr
    assert "previously defined" not in proc.stderr
    tools = {p.stem for p in (tmp_path / "tools").glob("*.cwl")}
    res = compile_file(example)
    # one tool per node of the compiled graph, generated from the step table
    nodes = {n.replace(":", "_") for n, d in res.graph.nodes(data=True) if d["kind"] != "study_task"}
    assert tools == nodes
    assert {"ingest", "identify", "deidentify", "classify", "adherence", "archive", "measurements"} <= tools
    assert {f"analysis_{a.name}" for a in res.trial.analyses} <= tools
    # The compiled IR shipped beside the workflow is the study, byte for byte in meaning.
    ir_doc = json.loads((tmp_path / "study.ir.json").read_text())
    assert ir_doc["source_sha256"] == res.trial.source_sha256


def test_key_never_written_and_named_for_the_engine(tmp_path, monkeypatch):
    monkeypatch.setenv("IMTRIAL_KEY", "super-secret-value-123")
    _export(ROOT / "examples" / "amyloid_mri.imtrial", tmp_path)
    text = "".join(p.read_text() for p in tmp_path.rglob("*") if p.is_file())
    assert "super-secret-value-123" not in text
    assert "--preserve-environment IMTRIAL_KEY" in (tmp_path / "workflow.cwl").read_text()


HOSTILE = r'''
study EVIL "Injection \"; rm -rf ~ # $(touch /tmp/pwned) ${x}" { version "1" }
site S1 "Site; rm -rf ~" { device D1 { modality MR vendor Siemens model "X" software "XA30" } }
protocol T1 modality MR "\"; rm -rf ~ # $(touch /tmp/imtrial_pwned)" {
  match SeriesDescription ~ "t1"
  RepetitionTime = 2300 ms
}
analysis hostile "$(touch /tmp/imtrial_pwned) `id`" {
  input t1 from T1
  output o file
  run "echo $(touch /tmp/imtrial_pwned) {o}"
  measure m count "x"
}
'''


def test_study_strings_cannot_inject(tmp_path):
    res = compile_text(HOSTILE, "evil.imtrial")
    assert res.ok, [str(d) for d in res.diagnostics]
    cwl_export.export(res.trial, res.graph, tmp_path)
    proc = _validate(tmp_path / "workflow.cwl")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for p in (tmp_path / "tools").glob("*.cwl"):
        text = p.read_text()
        assert "ShellCommandRequirement" not in text
        # every parameter reference left in the documents is one the exporter wrote, never study text
        for line in text.splitlines():
            if "$(" in line and "\\$(" not in line:
                assert "=$(self.path)" in line, f"{p.name}: {line}"
    assert not Path("/tmp/imtrial_pwned").exists()


def test_tools_carry_what_a_scheduler_needs(tmp_path):
    import yaml

    res = compile_file(ROOT / "examples" / "amyloid_mri.imtrial")
    cwl_export.export(res.trial, res.graph, tmp_path, docker_image="example.org/imtrial:0.1.0")
    for p in (tmp_path / "tools").glob("*.cwl"):
        doc = yaml.safe_load(p.read_text())
        req = {r["class"]: r for r in doc["requirements"]}
        assert req["ResourceRequirement"]["coresMin"] >= 1 and req["ResourceRequirement"]["ramMin"] >= 512, p.name
        hints = {h["class"]: h for h in doc["hints"]}
        assert hints["SoftwareRequirement"]["packages"][0]["package"] == "imtrial"
        assert hints["DockerRequirement"]["dockerPull"] == "example.org/imtrial:0.1.0"
    timed = [a for a in res.trial.analyses if a.timeout]   # an analysis' timeout is its tool's time limit
    assert timed
    for a in timed:
        doc = yaml.safe_load((tmp_path / "tools" / f"analysis_{a.name}.cwl").read_text())
        assert {r["class"]: r for r in doc["requirements"]}["ToolTimeLimit"]["timelimit"] == int(a.timeout.value / 1000)
    # analyses are wired by their data: aria_read does not wait for hipvol
    sub = yaml.safe_load(next(tmp_path.glob("exam_pipeline_*.cwl")).read_text())
    aria = next(s for s in sub["steps"] if s["id"] == "analysis_aria_read")
    assert not any("hipvol" in str(i.get("source")) for i in aria["in"])


# ----------------------------------------------------------------------------- runs

def _corpus(base: Path, example: str, **synth) -> Path:
    """A small synthetic inbox for one example, its local run, and its CWL exports (both granularities)."""
    study = ROOT / "examples" / example
    imtrial = str(BIN / "imtrial")
    args = [imtrial, "synth", str(study), "--out", str(base / "inbox"), "--subjects", "1", "--small", "--seed", "7", "--no-phi"]
    for k, v in synth.items():
        args += [f"--{k}", v]
    subprocess.run(args, check=True, env=_env(), capture_output=True)
    run = subprocess.run([imtrial, "run", str(study), "--inbox", str(base / "inbox"), "--workdir", str(base / "local"),
                          "--jobs", "1", "--no-progress", "--json"], env=_env(), capture_output=True, text=True)
    (base / "local.json").write_text(run.stdout)
    for g in ("step", "exam"):
        proc = subprocess.run([imtrial, "export", "cwl", str(study), "-o", str(base / f"cwl-{g}"), "--granularity", g],
                              env=_env(), capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
    (base / "job.json").write_text(json.dumps({
        "study": {"class": "File", "path": str(base / "cwl-step" / "study.ir.json")},
        "inbox": {"class": "Directory", "path": str(base / "inbox")}}))
    return base


def _objects(archive: Path) -> set[str]:
    return {p.name for p in (archive / "objects").rglob("*") if p.is_file()}


def _records(archive: Path) -> dict:
    """Every archived sidecar's content (adherence and QC verdicts per series and exam), by key and version."""
    out = {}
    for p in (archive / "records").rglob("v*.json"):
        d = json.loads(p.read_text())
        out[(d["key"], d["version"])] = d["content"]
    return out


def _compare(corpus: Path, outdir: Path):
    local = corpus / "local"
    objs = _objects(local / "archive")
    assert objs, "the local run archived nothing"
    assert _objects(outdir / "archive") == objs
    assert _records(outdir / "archive") == _records(local / "archive")
    assert (outdir / "measurements.csv").read_text() == (local / "measurements.csv").read_text()


def _cwltool(corpus: Path, granularity: str) -> Path:
    out = corpus / f"cwltool-{granularity}"
    proc = subprocess.run([str(BIN / "cwltool"), "--no-container", "--preserve-environment", "IMTRIAL_KEY",
                           "--outdir", str(out), str(corpus / f"cwl-{granularity}" / "workflow.cwl"),
                           str(corpus / "job.json")], capture_output=True, text=True, env=_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _toil(corpus: Path, granularity: str) -> Path:
    out = corpus / f"toil-{granularity}"
    # Toil 9 does not pass --preserve-environment through to its workers; the whole environment it is.
    proc = subprocess.run([str(BIN / "toil-cwl-runner"), "--no-container", "--preserve-entire-environment",
                           "--jobStore", str(corpus / f"jobstore-{granularity}"), "--outdir", str(out),
                           "--logLevel", "WARNING", str(corpus / f"cwl-{granularity}" / "workflow.cwl"),
                           str(corpus / "job.json")], capture_output=True, text=True, env=_env(), cwd=corpus)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("example,synth,runs", [
    ("amyloid_mri.imtrial", {"visits": "baseline"}, [("cwltool", "step"), ("toil", "exam")]),
    ("oncology_ct.imtrial", {"visits": "baseline"}, [("cwltool", "exam"), ("toil", "exam")]),
    ("phantom_qualification.imtrial", {"visits": "baseline,m06"}, [("cwltool", "exam"), ("toil", "exam")]),
    ("cardiac_sarcoid_mr_petct.imtrial", {"visits": "baseline"}, [("cwltool", "exam"), ("toil", "exam")])],
    ids=["amyloid_mri", "oncology_ct", "phantom_qualification", "cardiac_sarcoid_mr_petct"])
def test_cwltool_and_toil_match_the_local_run_on_every_example(example, synth, runs, tmp_path):
    """Same archive bytes, same sidecar verdicts, same measurements as ``imtrial run``, through cwltool and
    Toil (step granularity, one tool per node, on the 3-exam amyloid corpus; exam granularity, one tool per
    exam, everywhere). PHQ01 scans each volunteer on an MR and a CT system on the same day, twice: no
    device change, in any engine."""
    corpus = _corpus(tmp_path, example, **synth)
    for engine, granularity in runs:
        _compare(corpus, (_cwltool if engine == "cwltool" else _toil)(corpus, granularity))
    summary = json.loads((corpus / "local.json").read_text())
    assert not summary["failed"] and "same_device" not in summary["warnings"], summary["warnings"]
