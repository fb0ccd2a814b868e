"""The ``imtrial`` command line, run as a user would: ``python -m imtrial_dsl`` in a subprocess."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

EXAMPLE = ROOT / "examples" / "amyloid_mri.imtrial"
BAD = ROOT / "tests" / "scenarios" / "undefined_names.imtrial"


def imtrial(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "IMTRIAL_DEBUG")}
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "imtrial_dsl", *args], capture_output=True, text=True,
                          env=e, cwd=cwd or ROOT, timeout=300)


def no_traceback(p: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in p.stderr and "Traceback" not in p.stdout, p.stderr


def test_check_clean_and_bad_files() -> None:
    p = imtrial("check", str(EXAMPLE), str(BAD))
    no_traceback(p)
    assert p.returncode == 1
    lines = p.stdout.splitlines()
    assert lines == [f"{EXAMPLE}: ok", f"{BAD}: 13 errors"]
    expected = (BAD.with_suffix(".expected")).read_text().splitlines()
    for exp in expected:  # every expected diagnostic, with its file prefix, caret line and hint
        assert f"{BAD}:{exp}" in p.stderr
    assert "^~~" in p.stderr and "hint: did you mean 'T1w'?" in p.stderr
    assert "\x1b[" not in p.stderr  # piped: plain text


def test_check_json_and_werror(tmp_path: Path) -> None:
    p = imtrial("check", "--format", "json", str(ROOT / "tests" / "scenarios" / "reminder_roles.imtrial"))
    assert p.returncode == 0  # warnings only
    data = json.loads(p.stdout)
    assert {d["code"] for d in data} == {"W416"} and all(d["severity"] == "warning" for d in data)
    p = imtrial("check", "--werror", str(ROOT / "tests" / "scenarios" / "reminder_roles.imtrial"))
    assert p.returncode == 1 and "error[W416]: reminders of site B reach nobody there" in p.stderr


def test_a_file_without_a_study_is_an_error(tmp_path: Path) -> None:
    """E113 (empty) and E114 (no study block) are errors: 'ok' means a study was checked."""
    p = imtrial("check", "--format", "json", str(ROOT / "tests" / "scenarios" / "identifiers_check_digit.imtrial"))
    assert p.returncode == 1
    data = json.loads(p.stdout)
    assert [(d["code"], d["severity"]) for d in data] == [("E114", "error"), ("W406", "warning")]
    assert data[0]["message"] == "no 'study' block: this file declares no study"
    only = tmp_path / "only.imtrial"
    only.write_text('protocol T1w modality MR { EchoTime = 3 ms }\n')
    p = imtrial("check", str(only))
    assert p.returncode == 1 and "error[E114]: no 'study' block: this file declares no study (only 1 protocol)" in p.stderr
    empty = tmp_path / "empty.imtrial"
    empty.write_text("# nothing here\n\n")
    p = imtrial("check", str(empty))
    assert p.returncode == 1 and "error[E113]: empty file" in p.stderr


def test_colour_forced_and_no_color() -> None:
    p = imtrial("--color", "always", "check", str(BAD))
    assert "\x1b[31m" in p.stderr
    p = imtrial("check", str(BAD), env={"NO_COLOR": "1"})
    assert "\x1b[" not in p.stderr


def test_bad_input_never_tracebacks(tmp_path: Path) -> None:
    junk = tmp_path / "junk.imtrial"
    junk.write_bytes(bytes(range(256)) * 4 + b'protocol { "unterminated')
    p = imtrial("check", str(junk), str(tmp_path / "missing.imtrial"), str(tmp_path))
    no_traceback(p)
    assert p.returncode == 1
    assert f"{tmp_path / 'missing.imtrial'}: 1 error" in p.stdout
    assert "cannot read" in p.stderr and "no such file" in p.stderr and "not a file" in p.stderr


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    assert imtrial().returncode == 2
    p = imtrial("frobnicate")
    assert p.returncode == 2 and "invalid choice" in p.stderr
    p = imtrial("export", "nosuch", str(EXAMPLE), "-o", str(tmp_path))
    no_traceback(p)
    assert p.returncode == 2 and "unknown export target 'nosuch'" in p.stderr and "eprotocol" in p.stderr


def test_compile_graph_schema(tmp_path: Path) -> None:
    from imtrial_dsl import ir

    out = tmp_path / "ir.json"
    p = imtrial("compile", str(EXAMPLE), "-o", str(out))
    assert p.returncode == 0, p.stderr
    trial = ir.Trial.model_validate_json(out.read_text())
    assert trial.study.code == "AMY01" and trial.protocol("T1w") is not None
    p = imtrial("graph", str(EXAMPLE), "--format", "json")
    assert p.returncode == 0 and any(n["id"] == "qc:t1_snr" for n in json.loads(p.stdout)["nodes"])
    if shutil.which("dot"):
        svg = tmp_path / "g.svg"
        p = imtrial("graph", str(EXAMPLE), "--format", "svg", "-o", str(svg))
        assert p.returncode == 0 and svg.read_text().lstrip().startswith(("<?xml", "<svg"))
    p = imtrial("schema")
    schema = json.loads(p.stdout)
    assert schema["title"] == "Trial" and "protocols" in schema["properties"]
    p = imtrial("compile", str(BAD))
    assert p.returncode == 1 and p.stdout == ""


def test_fmt_write_then_check(tmp_path: Path) -> None:
    study = tmp_path / "study.imtrial"
    study.write_text("protocol T1w modality MR {match SeriesDescription ~ \"t1\"    EchoTime in 2 .. 3 ms}\n")
    p = imtrial("fmt", "--check", str(study))
    assert p.returncode == 1 and p.stdout.strip() == f"would reformat {study}"
    printed = imtrial("fmt", str(study)).stdout
    p = imtrial("fmt", "--write", str(study))
    assert p.returncode == 0 and study.read_text() == printed
    assert imtrial("fmt", "--check", str(study)).returncode == 0
    bad = tmp_path / "bad.imtrial"
    bad.write_text("protocl T1w modality MR {}\n")
    p = imtrial("fmt", "--check", str(bad))
    no_traceback(p)
    assert p.returncode == 1 and "did you mean 'protocol'?" in p.stderr


def test_export_and_import_eprotocol(tmp_path: Path) -> None:
    p = imtrial("export", "eprotocol", str(EXAMPLE), "-o", str(tmp_path / "ep"))
    assert p.returncode == 0, p.stderr
    written = [Path(x) for x in p.stdout.splitlines()]
    assert written and all(w.exists() for w in written)
    one = next(w for w in written if w.name.startswith("AMY01_T1w") and w.suffix == ".json")
    p = imtrial("import", "eprotocol", str(one))
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith('study AMY01 "Longitudinal amyloid MRI study" { }') and "\nprotocol T1w modality MR" in p.stdout
    # what import prints is valid source that checks clean
    src = tmp_path / "imported.imtrial"
    src.write_text(p.stdout)
    assert imtrial("check", str(src)).returncode == 0


def test_load_study_helper(tmp_path: Path, capsys) -> None:
    from imtrial_dsl.cli.common import load_study

    trial, graph = load_study(EXAMPLE)
    assert trial.study.code == "AMY01" and "ingest" in graph
    with pytest.raises(SystemExit) as exc:
        load_study(BAD)
    assert exc.value.code == 1
    assert "undefined protocol 'T1'" in capsys.readouterr().err


def test_library_errors_are_diagnostics_not_internal_errors(tmp_path: Path) -> None:
    """Every ImtrialError a command meets is printed as a diagnostic (exit 1), never as an internal error."""
    from imtrial_dsl.store import Store

    p = imtrial("status", "--workdir", str(tmp_path / "nothing"))
    assert p.returncode == 1 and "no state database" in p.stderr and "internal error" not in p.stderr
    bad_ir = tmp_path / "study.json"
    bad_ir.write_text('{"study": 3}')
    for study, says in ((bad_ir, "is not imtrial IR JSON: study: "), (tmp_path / "missing.json", "cannot read")):
        p = imtrial("run", str(study), "--inbox", str(tmp_path), "--workdir", str(tmp_path / "w"))
        no_traceback(p)
        assert p.returncode == 1 and says in p.stderr and "internal error" not in p.stderr, p.stderr
    Store(tmp_path / "w").close()
    enrol = tmp_path / "enrol.csv"
    enrol.write_text("subject_id,site,enrolled_on\nX,TOK,not-a-date\n")
    for csv in (enrol, tmp_path / "no-such.csv"):
        p = imtrial("expected", str(EXAMPLE), "--workdir", str(tmp_path / "w"), "--enrollment", str(csv))
        no_traceback(p)
        assert p.returncode == 1 and p.stderr.startswith("error[E842]: ") and str(csv) in p.stderr, p.stderr


def test_ir_json_runs_like_its_source(tmp_path: Path) -> None:
    from imtrial_dsl.compiler import load_trial

    ir_json = tmp_path / "amy.json"
    assert imtrial("compile", str(EXAMPLE), "-o", str(ir_json)).returncode == 0
    assert load_trial(ir_json).model_dump(exclude={"source_sha256"}) == load_trial(EXAMPLE).model_dump(exclude={"source_sha256"})
    from imtrial_dsl.store import Store

    Store(tmp_path / "w").close()                       # an empty workdir: the destination is checked first
    p = imtrial("transfer", str(ir_json), "--workdir", str(tmp_path / "w"), "--to", "centrl")
    assert p.returncode == 2 and "did you mean 'central'?" in p.stderr, p.stderr
