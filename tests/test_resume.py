"""Kill-and-resume: `imtrial run` killed with SIGKILL in every phase, then re-run, loses nothing and
archives every input exactly once, with the same bytes as an uninterrupted run."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from imtrial_dsl.compiler import compile_file
from imtrial_dsl.runner.archive import verify
from imtrial_dsl.runner.run import run_study
from imtrial_dsl.tools.minicorpus import make_corpus

ROOT = Path(__file__).resolve().parent.parent
KEY = "resume-test-key-0123456789"


def _count(db: Path, sql: str) -> int:
    if not db.exists():
        return 0
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)
        try:
            return con.execute(sql).fetchone()[0]
        finally:
            con.close()
    except sqlite3.Error:
        return 0


def _log_lines(work: Path) -> int:
    p = work / "archive" / "audit.log.jsonl"
    return p.read_bytes().count(b"\n") if p.exists() else 0


def _files(work: Path, pattern: str) -> int:
    return sum(1 for _ in (work / "exams").glob(pattern)) if (work / "exams").exists() else 0


# Kill points, in pipeline order: a progress measure and how far past its value at the start of the run
# it must get before the SIGKILL (so each run is killed while doing new work, not on leftovers).
KILL_POINTS = [
    ("mid-ingest", lambda w: _files(w, "*/original/*/*.dcm"), 5),
    ("after identify", lambda w: _count(w / "state.sqlite", "SELECT COUNT(*) FROM steps WHERE step='identify'"), 1),
    ("mid-deidentify", lambda w: _files(w, "*/deid.partial/*") + _files(w, "*/deid/*"), 3),
    ("mid-archive", _log_lines, 5),
    ("mid-analyses", lambda w: _files(w, "*/analyses/*/inputs"), 1),
    ("late", lambda w: _count(w / "state.sqlite", "SELECT COUNT(*) FROM steps WHERE step='analyses'"), 1),
]


def _start(study: str, inbox: str, work: Path) -> subprocess.Popen:
    env = dict(os.environ, IMTRIAL_KEY=KEY, PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-m", "imtrial_dsl", "run", study, "--inbox", inbox,
                             "--workdir", str(work), "--jobs", "2", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, start_new_session=True)


def _kill_when(proc: subprocess.Popen, measure, delta: int, work: Path, timeout: float = 90) -> bool:
    """SIGKILL the run's whole process group once ``measure(work)`` grew by ``delta`` during this run;
    False if the run ended first."""
    start = measure(work)
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            return False
        if measure(work) >= start + delta:
            os.killpg(proc.pid, signal.SIGKILL)
            print(f"  progress measure {start} -> {measure(work)}", end=" ")
            proc.wait()
            return True
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    raise AssertionError("the run neither finished nor reached the kill point")


def test_kill_9_at_every_phase_then_resume(tmp_path):
    m = make_corpus(tmp_path / "corpus", subjects=2, slices=5)
    inbox_files = sorted(Path(m["inbox"]).rglob("*.dcm"))
    assert len(inbox_files) == 40
    work = tmp_path / "work"
    killed = []
    for name, measure, delta in KILL_POINTS:
        t0 = time.time()
        proc = _start(m["study"], m["inbox"], work)
        if _kill_when(proc, measure, delta, work):
            killed.append(name)
        print(f"{name}: {'killed' if killed and killed[-1] == name else 'finished first'} after {time.time() - t0:.1f} s")
    assert len(killed) >= 4, f"too few kill points were reached: {killed}"

    proc = _start(m["study"], m["inbox"], work)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err.decode()
    summary = json.loads(out)
    assert summary["exam_status"] == {"done": 4} and not summary["failed"]

    # nothing lost: every inbox file is recorded as ingested
    con = sqlite3.connect(work / "state.sqlite")
    recorded = {r[0] for r in con.execute("SELECT sha256 FROM files WHERE status='ingested'")}
    assert recorded == {hashlib.sha256(p.read_bytes()).hexdigest() for p in inbox_files}
    assert con.execute("SELECT COUNT(*) FROM subjects").fetchone()[0] == 2          # no subject assigned twice
    assert con.execute("SELECT COUNT(*) FROM measurements").fetchone()[0] == 4
    con.close()

    # every input archived exactly once, chain intact, no spurious corrections
    res = verify(work / "archive")
    assert res["ok"], res["errors"]
    log = [json.loads(x) for x in (work / "archive" / "audit.log.jsonl").read_text().splitlines()]
    added = [r["sha256"] for r in log if r["action"] == "object.add"]
    assert len(added) == len(set(added)) == 40
    assert all(r["version"] == 1 for r in log if r["action"].startswith("record."))
    assert not list(work.rglob("*.tmp")) and not list(work.rglob("deid.partial"))

    # the same archive content as an uninterrupted run
    os.environ["IMTRIAL_KEY"] = KEY
    ref = run_study(compile_file(m["study"]).trial, inbox=m["inbox"], workdir=tmp_path / "ref", jobs=1, progress=False)
    assert ref["exam_status"] == {"done": 4}
    ref_log = [json.loads(x) for x in (tmp_path / "ref" / "archive" / "audit.log.jsonl").read_text().splitlines()]
    assert sorted(added) == sorted(r["sha256"] for r in ref_log if r["action"] == "object.add")
    assert (work / "measurements.csv").read_text() == (tmp_path / "ref" / "measurements.csv").read_text()


def test_second_run_on_a_locked_workdir_is_refused(tmp_path):
    from imtrial_dsl.files import try_lock
    from imtrial_dsl.runner.run import RunLocked
    from imtrial_dsl.workdir import Workdir

    m = make_corpus(tmp_path / "corpus", subjects=1, slices=2, visits=(("baseline", 0),))
    work = tmp_path / "work"
    held = try_lock(Workdir(work).run_lock)                # as a running `imtrial run` holds it
    try:
        with pytest.raises(RunLocked):
            run_study(compile_file(m["study"]).trial, inbox=m["inbox"], workdir=work, jobs=1, progress=False)
    finally:
        held.close()
    assert not (work / "state.sqlite").exists() or _count(work / "state.sqlite", "SELECT COUNT(*) FROM files") == 0
