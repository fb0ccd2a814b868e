"""Archive: content addressing, immutability, versioned corrections, the hash-chained audit log."""
from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import stat
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file

from imtrial_dsl.runner.archive import Archive, verify

FILES = ["MR_small.dcm", "CT_small.dcm", "rtplan.dcm"]


def _sha(p) -> str:
    return hashlib.sha256(Path(p).read_bytes()).hexdigest()


def _lines(arch: Archive) -> list[dict]:
    return [json.loads(x) for x in arch.log.read_text().splitlines()]


def test_objects_are_content_addressed_and_stored_once(tmp_path):
    arch = Archive(tmp_path / "a")
    srcs = [get_testdata_file(n) for n in FILES]
    first = [arch.put_object(s, subject="S1") for s in srcs]
    assert [added for _, added in first] == [True, True, True]
    assert [sha for sha, _ in first] == [_sha(s) for s in srcs]
    again = [arch.put_object(s) for s in srcs]                        # same bytes: never twice
    assert [added for _, added in again] == [False, False, False]
    copy = tmp_path / "copy.dcm"
    copy.write_bytes(Path(srcs[0]).read_bytes())
    assert arch.put_object(copy) == (_sha(srcs[0]), False)            # same bytes, other name
    for sha, _ in first:
        p = arch.object_path(sha)
        assert p == tmp_path / "a" / "objects" / "sha256" / sha[:2] / sha[2:]
        assert _sha(p) == sha
        assert not (p.stat().st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))   # read-only
    assert sum(r["action"] == "object.add" for r in _lines(arch)) == 3
    res = arch.verify()
    assert res["ok"] and res["records"] == 3 and res["objects"] == 3


def test_corrections_are_new_versions_referencing_the_old(tmp_path):
    arch = Archive(tmp_path / "a")
    prov = {"tool": "imtrial", "time": "t1"}
    v1, added = arch.put_record("S1/baseline/series-1", {"qc": {"verdict": "fail"}}, prov)
    assert added and v1["version"] == 1 and v1["supersedes"] is None
    same, added = arch.put_record("S1/baseline/series-1", {"qc": {"verdict": "fail"}}, {**prov, "time": "t2"})
    assert not added and same["version"] == 1                          # unchanged content: no new version
    v2, added = arch.put_record("S1/baseline/series-1", {"qc": {"verdict": "pass"}}, prov, reason="re-read")
    assert added and v2["version"] == 2 and v2["action"] == "record.correct"
    assert v2["supersedes"] == {"version": 1, "sha256": v1["sha256"]}
    old = arch.read_record("S1/baseline/series-1", version=1)
    new = arch.read_record("S1/baseline/series-1")
    assert old["content"] == {"qc": {"verdict": "fail"}}                # the old version is still there, unchanged
    assert new["content"]["qc"]["verdict"] == "pass" and new["reason"] == "re-read"
    assert _sha(tmp_path / "a" / v1["path"]) == v1["sha256"]
    # stored read-only (root ignores modes; the audit chain's hashes catch any change, see below)
    assert not ((tmp_path / "a" / v1["path"]).stat().st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    assert arch.verify()["ok"]


def test_verify_detects_tampering(tmp_path):
    arch = Archive(tmp_path / "a")
    sha, _ = arch.put_object(get_testdata_file("MR_small.dcm"))
    arch.put_object(get_testdata_file("CT_small.dcm"))
    arch.put_record("S1/v/series-1", {"x": 1}, {})
    assert verify(tmp_path / "a")["ok"]

    obj = arch.object_path(sha)
    os.chmod(obj, 0o644)
    good = obj.read_bytes()
    obj.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))                 # one bit flipped in a stored instance
    res = verify(tmp_path / "a")
    assert not res["ok"] and any("content does not match" in e for e in res["errors"])
    assert verify(tmp_path / "a", deep=False)["ok"]                     # the chain itself is intact
    obj.write_bytes(good)

    lines = arch.log.read_text().splitlines()
    rec = json.loads(lines[1])
    rec["user"] = "mallory"                                             # an edited log record
    tampered = lines[:1] + [json.dumps(rec, sort_keys=True, separators=(",", ":"))] + lines[2:]
    arch.log.write_text("\n".join(tampered) + "\n")
    res = verify(tmp_path / "a")
    assert not res["ok"] and any("record hash mismatch" in e for e in res["errors"])

    arch.log.write_text("\n".join([lines[0], lines[2]]) + "\n")         # a deleted record
    res = verify(tmp_path / "a", deep=False)
    assert not res["ok"] and any("chain broken" in e for e in res["errors"])


def test_torn_last_line_is_cut_before_the_next_append(tmp_path):
    arch = Archive(tmp_path / "a")
    arch.put_object(get_testdata_file("MR_small.dcm"))
    with open(arch.log, "ab") as fh:                                     # a writer killed mid-append
        fh.write(b'{"seq":2,"action":"object.add","sha')
    assert not verify(tmp_path / "a")["ok"]
    arch2 = Archive(tmp_path / "a")
    arch2.put_object(get_testdata_file("CT_small.dcm"))
    res = verify(tmp_path / "a")
    assert res["ok"] and res["records"] == 2


def _writer(root: str, names: list[str]) -> None:
    arch = Archive(root)
    for n in names:
        arch.put_object(get_testdata_file(n))
        arch.put_record(f"S/{n}", {"n": n}, {})


def test_concurrent_writers_keep_one_chain(tmp_path):
    root = str(tmp_path / "a")
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(root, FILES)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    res = verify(root)
    assert res["ok"]
    recs = _lines(Archive(root))
    assert sorted(r["sha256"] for r in recs if r["action"] == "object.add") == sorted(_sha(get_testdata_file(n)) for n in FILES)
    assert sum(r["action"].startswith("record.") for r in recs) == len(FILES)
