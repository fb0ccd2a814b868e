"""Nothing lost, nothing wrong (issue 10, points 1–9): inbox edge cases, every transfer syntax pydicom reads,
environment errors, precise quarantine reasons, corrected instances, re-judging, an anchored audit chain and
analyses that die with a killed run. Real DICOM from pydicom-data throughout."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
from hypothesis import given, settings
from hypothesis import strategies as hs
from pydicom.data import get_testdata_file

from imtrial_dsl.compiler import compile_file
from imtrial_dsl.runner.archive import Archive, verify
from imtrial_dsl.runner.ingest import check_dataset, ingest_inbox, path_bytes, path_text
from imtrial_dsl.runner.run import run_study
from imtrial_dsl.store import Store
from imtrial_dsl.tools.minicorpus import make_corpus
from imtrial_dsl.transfer.objects import archived_objects
from syntax_corpus import SYNTAXES, UNDECODABLE, transfer_syntax_inbox  # tests/syntax_corpus.py

ROOT = Path(__file__).resolve().parent.parent
KEY = "integrity-test-key-0123456789"


def _cli(*args: str, env: dict | None = None, wrap: list[str] | None = None, timeout: float = 300):
    cmd = [sys.executable, "-m", "imtrial_dsl", *args]
    if wrap:  # run inside e.g. `unshare -m sh -c '… && exec "$@"'`
        cmd = [*wrap, *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "IMTRIAL_KEY": KEY, "PYTHONPATH": str(ROOT), **(env or {})})


@pytest.fixture
def mini(tmp_path, monkeypatch):
    monkeypatch.setenv("IMTRIAL_KEY", KEY)
    return make_corpus(tmp_path / "corpus", subjects=1, slices=3)


# ----------------------------------------------------------------------------- 1. non-UTF-8 names

@settings(max_examples=300, deadline=None)
@given(hs.binary(min_size=1, max_size=40))
def test_path_text_is_lossless(raw):
    text = path_text(raw)
    assert path_bytes(text) == raw
    text.encode("utf-8")  # storable as TEXT in SQLite and JSON


def test_a_non_utf8_file_name_is_recorded_losslessly_and_processed(tmp_path):
    box = tmp_path / "inbox"
    box.mkdir()
    mr = Path(get_testdata_file("MR_small.dcm")).read_bytes()
    ct = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    bad = os.fsencode(box) + b"/caf\xe9 \xff.dcm"      # Latin-1 and a stray byte: not UTF-8
    with open(bad, "wb") as fh:
        fh.write(mr)
    (box / "back\\slash.dcm").write_bytes(ct)            # a literal backslash survives too
    res = ingest_inbox(None, box, tmp_path / "w")
    assert res["ingested"] == 2 and res["quarantined"] == 0
    with Store(tmp_path / "w") as st:
        paths = set(st.known_paths(box))
    assert paths == {"caf\\xe9 \\xff.dcm", "back\\\\slash.dcm"}
    assert {path_bytes(p) for p in paths} == {b"caf\xe9 \xff.dcm", b"back\\slash.dcm"}
    again = ingest_inbox(None, box, tmp_path / "w", move=True)   # unchanged: not read again; --move finds it
    assert again["new_paths"] == 0 and not again["not_removed"]
    assert not os.path.exists(bad) and not list(box.iterdir())


# ----------------------------------------------------------------------------- 2. every transfer syntax

def test_every_transfer_syntax_pydicom_reads_goes_through_the_pipeline(mini, tmp_path):
    uids = transfer_syntax_inbox(mini)
    trial = compile_file(mini["study"]).trial
    summary = run_study(trial, inbox=mini["inbox"], workdir=tmp_path / "w", jobs=1)
    assert not summary["failed"]
    assert summary["quarantine_reasons"] == {"undecodable": 1}
    with Store(tmp_path / "w") as st:
        q = st.quarantined()
        assert q[0]["first_path"].endswith(UNDECODABLE) and "cannot be decoded" in q[0]["reason"]["detail"]
        assert "1.2.840.10008.1.2.4.51" in q[0]["reason"]["detail"]
        series = {s["description"]: s for e in st.exams() for s in e["series"]}
    for name in SYNTAXES:
        s = series[f"t2 {name}"]
        assert s["protocol"] == "T2w", name
        assert s["adherence"]["verdict"] == "pass", name
        assert s["qc"]["verdict"] == "pass", (name, s["qc"])   # QC decoded the pixels
        assert s["qc"]["checks"][0]["measured"] > 0, name
    assert f"t2 {UNDECODABLE}" not in series
    # archived with the transfer syntax it arrived in
    got = {}
    for o in archived_objects(tmp_path / "w" / "archive"):
        ds = pydicom.dcmread(o["path"], stop_before_pixels=True)
        got[str(ds.SeriesDescription)] = str(ds.file_meta.TransferSyntaxUID)
    for name, ts in SYNTAXES.items():
        assert got[f"t2 {name}"] == ts


def test_undecodable_pixel_data_is_quarantined_never_done(tmp_path):
    res = check_dataset(Path(get_testdata_file(UNDECODABLE)).read_bytes())
    assert res["reason"] == "undecodable" and "JPEG Extended" in res["detail"]
    import io

    from pydicom.encaps import encapsulate, generate_frames

    for name in ("MR_small_jp2klossless.dcm", "MR_small_RLE.dcm"):     # a cut-short compressed frame
        ds = pydicom.dcmread(get_testdata_file(name))
        frame = next(generate_frames(ds.PixelData, number_of_frames=1))
        ds.PixelData = encapsulate([frame[: len(frame) // 3]])
        buf = io.BytesIO()
        ds.save_as(buf)
        res = check_dataset(buf.getvalue())
        assert not res["ok"] and res["reason"] == "undecodable" and ds.file_meta.TransferSyntaxUID in res["detail"], res


# ----------------------------------------------------------------------------- 3. FIFOs, links, loops

def test_every_entry_not_read_is_in_the_summary_and_loops_are_followed_once(mini, tmp_path):
    inbox = Path(mini["inbox"])
    n_files = sum(1 for p in inbox.rglob("*") if p.is_file())
    os.mkfifo(inbox / "pipe")
    os.symlink(inbox / "nowhere.dcm", inbox / "dangling.dcm")
    os.symlink("self", inbox / "self")
    os.symlink("..", inbox / "PAT0001" / "up")                     # a folder loop
    os.symlink(inbox / "PAT0001", inbox / "again")                 # the same folder twice
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(inbox / "sock"))
    try:
        summary = run_study(compile_file(mini["study"]).trial, inbox=inbox, workdir=tmp_path / "w", jobs=1)
    finally:
        srv.close()
    assert summary["instances"] == n_files and summary["duplicates"] == 0
    reasons = {k["path"]: k["reason"] for k in summary["skipped_entries"]}
    assert reasons == {"pipe": "fifo", "dangling.dcm": "dangling_symlink", "self": "symlink_loop",
                       "PAT0001/up": "directory_loop", "again": "directory_seen", "sock": "socket"}
    assert summary["skip_reasons"]["fifo"] == 1
    r = _cli("status", "--workdir", str(tmp_path / "w"))
    assert "not read     6 inbox entries" in r.stdout and "pipe: fifo" in r.stdout, r.stdout


# ----------------------------------------------------------------------------- 4. environment errors

def _unshare_ok() -> None:
    r = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    assert r.returncode == 0, "these tests need mount namespaces (util-linux unshare, root): " + r.stderr.decode()


def test_move_on_a_read_only_inbox_is_an_environment_error_and_loses_nothing(mini, tmp_path):
    _unshare_ok()
    inbox, w = Path(mini["inbox"]), tmp_path / "w"
    before = sorted(p for p in inbox.rglob("*") if p.is_file())
    ro = ["unshare", "-m", "sh", "-c", f"mount --bind '{inbox}' '{inbox}' && mount -o remount,bind,ro '{inbox}' "
                                       '&& exec "$@"', "sh"]
    r = _cli("run", mini["study"], "--inbox", str(inbox), "--workdir", str(w), "--move", "--no-progress", wrap=ro)
    assert r.returncode == 4, r.stdout + r.stderr
    assert "internal error" not in r.stderr and "E854" in r.stderr and "Read-only file system" in r.stderr
    assert sorted(p for p in inbox.rglob("*") if p.is_file()) == before   # nothing removed, nothing lost
    with Store(w) as st:
        assert {e["status"] for e in st.exams()} == {"done"}                # the exams were processed anyway
        assert len(st.files("ingested")) == len(before)
    r = _cli("run", mini["study"], "--inbox", str(inbox), "--workdir", str(w), "--move", "--no-progress")
    assert r.returncode == 0 and not any(p.is_file() for p in inbox.rglob("*"))  # writable again: removed


def test_a_full_disk_is_an_environment_error(mini, tmp_path):
    _unshare_ok()
    w = tmp_path / "small"
    w.mkdir()
    full = ["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size=160k tmpfs '{w}' && exec \"$@\"", "sh"]
    r = _cli("run", mini["study"], "--inbox", mini["inbox"], "--workdir", str(w / "w"), "--no-progress", wrap=full)
    assert r.returncode == 4, r.stdout + r.stderr
    assert "internal error" not in r.stderr
    assert "environment error" in (r.stderr + r.stdout) and "E850" in (r.stderr + r.stdout)
    ro = ["unshare", "-m", "sh", "-c", f"mount --bind '{w}' '{w}' && mount -o remount,bind,ro '{w}' && exec \"$@\"", "sh"]
    r = _cli("run", mini["study"], "--inbox", mini["inbox"], "--workdir", str(w / "w"), "--no-progress", wrap=ro)
    assert r.returncode == 4 and "E851" in r.stderr and "read-only" in r.stderr, r.stderr


# ----------------------------------------------------------------------------- 5. precise header reasons

@pytest.mark.parametrize("cut, reason, words", [
    (132, "truncated_header", "right after the DICM prefix"),
    (200, "truncated_header", "inside File Meta element (0002,0003)"),
    (500, "truncated_header", "inside element (0008,0018) SOPInstanceUID"),
    (1200, "truncated_header", "ImageOrientationPatient"),
    (2000, "truncated", "inside Pixel Data"),
])
def test_a_truncated_header_gets_a_precise_reason(cut, reason, words):
    data = Path(get_testdata_file("MR_small.dcm")).read_bytes()[:cut]
    res = check_dataset(data)
    assert res["reason"] == reason and words in res["detail"], res


def test_random_bytes_after_dicm_are_a_corrupt_header(tmp_path):
    import random

    rnd = random.Random(10)
    mr = Path(get_testdata_file("MR_small.dcm")).read_bytes()
    for junk in (bytes(rnd.randrange(256) for _ in range(3000)),
                 b"\x02\x00\x00\x00UL\x04\x00" + bytes(rnd.randrange(256) for _ in range(3000)),
                 mr[132:320] + bytes(rnd.randrange(256) for _ in range(3000))):
        res = check_dataset(mr[:128] + b"DICM" + junk)
        assert res["reason"] == "corrupt_header", res
    box = tmp_path / "inbox"
    box.mkdir()
    (box / "junk.dcm").write_bytes(mr[:128] + b"DICM" + bytes(rnd.randrange(256) for _ in range(500)))
    (box / "cut.dcm").write_bytes(mr[:500])
    res = ingest_inbox(None, box, tmp_path / "w")
    assert {q["path"]: q["reason"] for q in res["quarantined_files"]} == {"junk.dcm": "corrupt_header",
                                                                          "cut.dcm": "truncated_header"}


# ----------------------------------------------------------------------------- 6. corrected instances

def _correct(path: Path, dest: Path, *, same_size: bool) -> str:
    """Write a corrected version of ``path`` (same SOPInstanceUID, other content) to ``dest``."""
    ds = pydicom.dcmread(path)
    if same_size:   # one character of a value changed: the file keeps its size
        ds.ImageComments = "corrected A"
        ds.save_as(dest)
        size = dest.stat().st_size
        ds.ImageComments = "corrected B"
        ds.save_as(dest)
        assert dest.stat().st_size == size
    else:
        ds.PatientWeight = 71.5
        ds.ImageComments = "corrected: weight was wrong"
        ds.save_as(dest)
    return str(ds.SOPInstanceUID)


@pytest.mark.parametrize("how", ["new name", "same name, size and mtime"])
def test_a_corrected_instance_is_a_new_version_that_supersedes(mini, tmp_path, how):
    trial = compile_file(mini["study"]).trial
    inbox, w = Path(mini["inbox"]), tmp_path / "w"
    first = run_study(trial, inbox=inbox, workdir=w, jobs=1)
    n = first["instances"]
    src = sorted(inbox.rglob("t2_*.dcm"))[0]
    if how == "new name":
        if (src.parent / "a_first.dcm").exists():
            pass
        uid = _correct(src, src.parent / "zz_correction.dcm", same_size=False)
    else:
        st0 = src.stat()
        uid = _correct(src, src, same_size=True)
        os.utime(src, ns=(st0.st_atime_ns, st0.st_mtime_ns))            # cp -p / rsync -t keep the mtime
    again = run_study(trial, inbox=inbox, workdir=w, jobs=1)
    assert again["instances"] == n and again["this_run"]["ingest"]["ingested"] == 1
    with Store(w) as st:
        rows = st.db.execute("SELECT status, stored_path FROM files WHERE sop_uid=? ORDER BY rowid", (uid,)).fetchall()
        assert [r["status"] for r in rows] == ["superseded", "ingested"]
        key = st.db.execute("SELECT exam_key FROM files WHERE sop_uid=?", (uid,)).fetchone()[0]
    exam = w / "exams" / key
    assert (exam / rows[0]["stored_path"]).exists() and rows[0]["stored_path"].startswith("superseded/")
    assert len(list((exam / "original").rglob("*.dcm"))) == n // 2        # only current versions are read
    log = [json.loads(x) for x in (w / "archive" / "audit.log.jsonl").read_text().splitlines()]
    versions = [r for r in log if r["action"] == "object.add" and r.get("supersedes")]
    assert len(versions) == 1 and versions[0]["version"] == 2
    new = versions[0]
    old = next(r for r in log if r["action"] == "object.add" and r["sha256"] == new["supersedes"])
    assert old["sop_uid"] == new["sop_uid"]                                 # the same (de-identified) instance
    assert (w / "archive" / old["path"]).exists() and (w / "archive" / new["path"]).exists()   # both kept
    current = {o["sop_uid"]: o["sha256"] for o in archived_objects(w / "archive")}
    assert len(current) == n and current[new["sop_uid"]] == new["sha256"]  # transfer sees the newest only
    assert "corrected" in str(pydicom.dcmread(w / "archive" / new["path"]).ImageComments)
    series = [json.loads((w / "archive" / r["path"]).read_text()) for r in log
              if r["action"] == "record.correct" and "/series-" in r["key"]]
    assert any(i["sha256"] == new["sha256"] for s in series for i in s["content"]["instances"])  # the report's newest
    assert verify(w / "archive", state=w)["ok"]
    third = run_study(trial, inbox=inbox, workdir=w, jobs=1)                 # nothing new: nothing happens
    assert third["this_run"]["exams_processed"] == 0


def test_both_versions_in_one_delivery_keep_the_later_one(mini, tmp_path):
    inbox = Path(mini["inbox"])
    src = sorted(inbox.rglob("t2_*.dcm"))[0]
    uid = _correct(src, src.parent / "zz_resent.dcm", same_size=False)   # listed after the original
    w = tmp_path / "w"
    for _ in range(4):  # the same answer every time
        shutil.rmtree(w, ignore_errors=True)
        run_study(compile_file(mini["study"]).trial, inbox=inbox, workdir=w, jobs=2)
        with Store(w) as st:
            assert [r["first_path"].rsplit("/", 1)[1] for r in st.db.execute(
                "SELECT first_path FROM files WHERE sop_uid=? AND status='ingested'", (uid,))] == ["zz_resent.dcm"]


# ----------------------------------------------------------------------------- 7. re-judging, status

def test_a_manual_step_after_a_study_edit_shows_in_status_and_a_run_warns(mini, tmp_path):
    study, w = Path(mini["study"]), tmp_path / "w"
    assert _cli("run", str(study), "--inbox", mini["inbox"], "--workdir", str(w), "--no-progress").returncode == 0
    edited = tmp_path / "edited.imtrial"
    edited.write_text(study.read_text().replace("RepetitionTime in 3000 .. 5000 ms", "RepetitionTime in 100 .. 200 ms", 1))
    with Store(w) as st:
        key = st.exams()[0]["exam_key"]
    r = _cli("step", "adherence", "--study", str(edited), "--workdir", str(w), "--exam", key[:8])
    assert r.returncode == 0, r.stderr
    r = _cli("status", "--workdir", str(w), "--exam", key, "--json")
    exam = json.loads(r.stdout)[0]
    t2 = next(s for s in exam["series"] if s["protocol"] == "T2w")
    assert t2["adherence"]["verdict"] == "fail"                         # the manual step's verdict, not the old one
    r = _cli("run", str(edited), "--inbox", mini["inbox"], "--workdir", str(w), "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "the compiled study changed since the last run" in r.stdout
    r = _cli("run", str(edited), "--inbox", mini["inbox"], "--workdir", str(w), "--no-progress", "--json")
    assert not json.loads(r.stdout)["this_run"]["study"].get("changed")  # once


# ----------------------------------------------------------------------------- 8. an anchored audit chain

@pytest.fixture
def archived(mini, tmp_path):
    w = tmp_path / "w"
    run_study(compile_file(mini["study"]).trial, inbox=mini["inbox"], workdir=w, jobs=1)
    return mini["study"], w


def _verify(study, w, *extra):
    r = _cli("verify", "--workdir", str(w), "--study", str(study), "--json", *extra)
    return r.returncode, json.loads(r.stdout)


def test_verify_passes_an_intact_archive_and_checks_the_mac(archived):
    study, w = archived
    rc, res = _verify(study, w)
    assert rc == 0 and res["ok"] and res["anchored"]["the state database"] == res["records"], res
    assert json.loads((w / "archive" / "checkpoint.json").read_text())["mac"]
    r = _cli("verify", "--workdir", str(w), "--study", str(study), env={"IMTRIAL_KEY": "another key"})
    assert r.returncode == 1 and "MAC does not match" in r.stdout


def test_verify_catches_an_emptied_log_and_removed_last_records(archived):
    study, w = archived
    log = w / "archive" / "audit.log.jsonl"
    lines = log.read_bytes().splitlines(keepends=True)
    log.write_bytes(b"".join(lines[:-3]))                               # the last three records removed
    rc, res = _verify(study, w, "--shallow")
    assert rc == 1 and any("records were removed" in e for e in res["errors"]), res
    log.write_bytes(b"")                                                # emptied
    rc, res = _verify(study, w, "--shallow")
    assert rc == 1 and any(f"the log has 0 record(s)" in e for e in res["errors"]), res


def test_verify_catches_a_consistent_rewrite_and_an_unlogged_object(archived):
    from imtrial_dsl.runner.archive import _canon
    from imtrial_dsl.files import sha256_bytes

    study, w = archived
    root = w / "archive"
    log = root / "audit.log.jsonl"
    good = log.read_bytes()
    recs = [json.loads(x) for x in good.splitlines()]
    prev = "0" * 64
    for r in recs:                                                     # every hash recomputed: a consistent chain
        if r["seq"] == 2:
            r["user"] = "mallory"
        r["prev"] = prev
        r["hash"] = sha256_bytes(_canon({k: v for k, v in r.items() if k != "hash"}))
        prev = r["hash"]
    log.write_bytes(b"".join(_canon(r) + b"\n" for r in recs))
    chain_only = Archive(root).verify(deep=False)["errors"]             # the chain alone cannot tell
    assert not any("chain broken" in e or "record hash" in e for e in chain_only), chain_only
    rc, res = _verify(study, w, "--shallow")
    assert rc == 1 and sum("the chain was rewritten" in e for e in res["errors"]) == 2, res   # checkpoint and DB
    cp = json.loads((root / "checkpoint.json").read_text())              # … and a re-written checkpoint
    cp["head"] = prev                                                    # without the key fails its MAC
    (root / "checkpoint.json").write_text(json.dumps(cp))
    rc, res = _verify(study, w, "--shallow")
    assert rc == 1 and any("MAC does not match" in e for e in res["errors"])
    log.write_bytes(good)
    (root / "checkpoint.json").unlink()
    one = next((root / "objects").rglob("*"))
    stray = next(p for p in (root / "objects" / "sha256").iterdir() if p.is_dir()) / ("f" * 62)
    stray.write_bytes(b"not in any record")
    rc, res = _verify(study, w, "--shallow")
    assert rc == 1 and any("stored but not in the audit log" in e for e in res["errors"]), res
    stray.unlink()
    assert one.exists()
    rc, res = _verify(study, w)
    assert rc == 0, res


# ----------------------------------------------------------------------------- 9. analyses die with the run

HANG = '''import os, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
with open(os.environ["PIDS_FILE"] + ".tmp", "w") as fh:
    fh.write(f"{os.getpid()} {child.pid}")
os.replace(os.environ["PIDS_FILE"] + ".tmp", os.environ["PIDS_FILE"])
time.sleep(300)
'''


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat").read_text() if Path(f"/proc/{pid}/stat").exists() else ""
    return " Z " not in stat   # a zombie is dead


def _hang_study(mini, tmp_path, timeout: str) -> Path:
    hang = tmp_path / "hang.py"
    hang.write_text(HANG)
    study = tmp_path / "hang.imtrial"
    study.write_text(Path(mini["study"]).read_text()
                     .replace('run "python3 -m imtrial_dsl.tools.volume {t2} {volume}"', f'run "python3 {hang} {{t2}} {{volume}}"')
                     .replace("timeout 2 min", f"timeout {timeout}\n  env PIDS_FILE"))   # analyses get only what they name
    return study


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_analyses_die_with_a_killed_run(mini, tmp_path, jobs):
    study = _hang_study(mini, tmp_path, "2 min")
    pids_file = tmp_path / "pids"
    proc = subprocess.Popen([sys.executable, "-m", "imtrial_dsl", "run", str(study), "--inbox", mini["inbox"],
                             "--workdir", str(tmp_path / "w"), "--jobs", jobs, "--no-progress"],
                            env={**os.environ, "IMTRIAL_KEY": KEY, "PIDS_FILE": str(pids_file), "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not pids_file.exists():
            assert proc.poll() is None and time.time() < deadline, "the analysis never started"
            time.sleep(0.05)
        pids = [int(x) for x in pids_file.read_text().split()]
        assert all(_alive(p) for p in pids)
        os.kill(proc.pid, signal.SIGKILL)                               # the run only, not its process group
        proc.wait()
        deadline = time.time() + 15
        while any(_alive(p) for p in pids) and time.time() < deadline:
            time.sleep(0.1)
        assert not any(_alive(p) for p in pids), "analysis processes outlived the killed run"
    finally:
        if proc.poll() is None:
            proc.kill()
        for p in ([int(x) for x in pids_file.read_text().split()] if pids_file.exists() else []):
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_an_analysis_timeout_kills_what_it_started(mini, tmp_path, monkeypatch):
    study = _hang_study(mini, tmp_path, "2 s")
    pids_file = tmp_path / "pids"
    monkeypatch.setenv("PIDS_FILE", str(pids_file))
    t0 = time.time()
    summary = run_study(compile_file(study).trial, inbox=mini["inbox"], workdir=tmp_path / "w", jobs=1)
    assert time.time() - t0 < 60     # the grandchild holding the output pipes does not hang the run
    assert summary["failed"] and "timed out" in json.dumps(summary["failed"])
    pids = [int(x) for x in pids_file.read_text().split()]
    time.sleep(0.5)
    assert not any(_alive(p) for p in pids)
