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
KEY_ENV = {"IMTRIAL_KEY": "cwl-test-key", "CENTRAL_TOKEN": "unused"}


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
    assert {"ingest", "identify", "deidentify", "classify", "adherence", "qc", "archive", "measurements"} <= tools
    res = compile_file(example)
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
                assert "$(inputs." in line, f"{p.name}: {line}"
    assert not Path("/tmp/imtrial_pwned").exists()


# ----------------------------------------------------------------------------- runs

@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small synthetic inbox (one subject per site, baseline only) and its local run."""
    base = tmp_path_factory.mktemp("cwlrun")
    study = ROOT / "examples" / "amyloid_mri.imtrial"
    imtrial = str(BIN / "imtrial")
    subprocess.run([imtrial, "synth", str(study), "--out", str(base / "inbox"), "--subjects", "1", "--small",
                    "--visits", "baseline", "--seed", "7", "--no-phi"], check=True, env=_env(), capture_output=True)
    subprocess.run([imtrial, "run", str(study), "--inbox", str(base / "inbox"), "--workdir", str(base / "local"),
                    "--jobs", "1", "--no-progress"], env=_env(), capture_output=True, text=True)
    _export(study, base / "cwl")
    (base / "job.json").write_text(json.dumps({
        "study": {"class": "File", "path": str(base / "cwl" / "study.ir.json")},
        "inbox": {"class": "Directory", "path": str(base / "inbox")}}))
    return base


def _objects(archive: Path) -> set[str]:
    return {p.name for p in (archive / "objects").rglob("*") if p.is_file()}


def _verdicts(exams_dir: Path) -> dict:
    out = {}
    for kind in ("adherence", "qc"):
        for p in sorted(exams_dir.glob(f"*/results/{kind}.json")):
            doc = json.loads(p.read_text())
            out[(p.parent.parent.name, kind)] = (doc.get("verdict"), sorted(
                (s.get("series_uid"), s.get("verdict")) for s in doc.get("series", [])))
    return out


def _compare(corpus: Path, outdir: Path):
    local = corpus / "local"
    objs = _objects(local / "archive")
    assert objs, "the local run archived nothing"
    assert _objects(outdir / "archive") == objs
    exams_out = {p.name: p for p in outdir.iterdir() if p.is_dir() and (p / "results").is_dir()}
    stage = outdir.parent / (outdir.name + "-exams")
    stage.mkdir(exist_ok=True)
    for name, p in exams_out.items():
        if not (stage / name).exists():
            (stage / name).symlink_to(p)
    local_v, cwl_v = _verdicts(local / "exams"), _verdicts(stage)
    assert local_v and local_v == cwl_v


@pytest.mark.slow
def test_cwltool_run_matches_local_run(corpus):
    out = corpus / "cwltool-out"
    proc = subprocess.run([str(BIN / "cwltool"), "--no-container", "--preserve-environment", "IMTRIAL_KEY",
                           "--outdir", str(out), str(corpus / "cwl" / "workflow.cwl"), str(corpus / "job.json")],
                          capture_output=True, text=True, env=_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    _compare(corpus, out)


@pytest.mark.slow
def test_toil_run_matches_local_run(corpus):
    out = corpus / "toil-out"
    # Toil 9 does not pass --preserve-environment through to its workers; the whole environment it is.
    proc = subprocess.run([str(BIN / "toil-cwl-runner"), "--no-container", "--preserve-entire-environment",
                           "--jobStore", str(corpus / "jobstore"), "--outdir", str(out), "--logLevel", "WARNING",
                           str(corpus / "cwl" / "workflow.cwl"), str(corpus / "job.json")],
                          capture_output=True, text=True, env=_env(), cwd=corpus)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _compare(corpus, out)
