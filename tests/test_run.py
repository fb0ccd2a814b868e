"""End-to-end runs: the whole per-exam pipeline on real DICOM, re-runs, the step/status commands."""
from __future__ import annotations

import csv
import hashlib
import json
import os
from pathlib import Path

import pydicom
import pytest

from imtrial_dsl.compiler import compile_file
from imtrial_dsl import cli
from imtrial_dsl.runner.archive import verify
from imtrial_dsl.runner.run import run_study
from imtrial_dsl.store import Store as State
from imtrial_dsl.tools import volume
from imtrial_dsl.tools.minicorpus import make_corpus

KEY = "runner-test-key-0123456789"


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    """The mini study and corpus, run once (module scope: the run is the expensive part)."""
    os.environ["IMTRIAL_KEY"] = KEY
    base = tmp_path_factory.mktemp("mini")
    m = make_corpus(base, subjects=2, slices=4)
    # damaged files next to the good ones: they must be quarantined, not lost
    (Path(m["inbox"]) / "junk").mkdir()
    (Path(m["inbox"]) / "junk" / "readme.txt").write_text("not an image")
    good = Path(m["inbox"]) / m["files"][0]
    (Path(m["inbox"]) / "junk" / "cut.dcm").write_bytes(good.read_bytes()[:-2000])
    trial = compile_file(m["study"]).trial
    work = base / "work"
    summary = run_study(trial, inbox=m["inbox"], workdir=work, jobs=1, progress=False)
    return {"m": m, "trial": trial, "work": work, "summary": summary, "base": base}


def test_every_exam_runs_through_every_step(mini):
    s, work = mini["summary"], mini["work"]
    assert s["exams"] == 4 and s["exam_status"] == {"done": 4} and not s["failed"]
    assert s["subjects"] == 2 and s["series"] == 8 and s["instances"] == 32
    assert s["classification"] == {"matched": 8}
    assert s["quarantined"] == 2 and s["quarantine_reasons"] == {"not_dicom": 1, "truncated": 1}
    st = State(work)
    for e in st.exams():
        assert set(e["steps"]) == {"ingest", "identify", "deidentify", "classify", "adherence", "qc:t2_snr", "archive",
                                   "analysis:t2vol"}
        order = list(e["steps"])   # in the order they ran: every node after the nodes it reads from
        assert order.index("deidentify") < order.index("classify") < order.index("adherence") < order.index("archive")
        assert order.index("qc:t2_snr") < order.index("archive")
        assert all(v["status"] == "done" and v["fingerprint"] for v in e["steps"].values())
        assert e["in_window"] is True and e["visit"] in ("baseline", "m06")
        assert all(sr["protocol"] in ("T2w", "FLAIR") and sr["qc"]["verdict"] for sr in e["series"])
        for name in ("identity", "classification", "adherence", "qc/t2_snr", "archived"):
            assert (work / "exams" / e["exam_key"] / "results" / f"{name}.json").is_file()
    visits = sorted((e["subject_id"], e["visit"]) for e in st.exams())
    assert [v for _, v in visits] == ["baseline", "m06", "baseline", "m06"]
    assert len({sid for sid, _ in visits}) == 2
    st.close()


def test_measurements_are_real_numbers_from_the_deidentified_series(mini):
    work = mini["work"]
    rows = list(csv.DictReader(open(work / "measurements.csv")))
    assert [r["measurement"] for r in rows] == ["tissue_volume"] * 4
    assert {(r["protocol"], r["analysis"], r["unit"]) for r in rows} == {("T2w", "t2vol", "mm3")}
    st = State(work)
    by_exam = {m["exam_key"]: m for m in st.measurements()}
    assert len(by_exam) == 4
    for key, m in by_exam.items():
        # recompute from the archived/de-identified series independently of the subprocess run
        series_dir = work / "exams" / key / "analyses" / "t2vol" / "inputs" / "t2"
        expected = volume.measure(series_dir)["value"]
        assert m["value"] == pytest.approx(expected)
        n_vox = 64 * 64 * 4
        assert 0 < m["value"] < n_vox * 0.3125 * 0.3125 * 0.8
    js = json.loads((work / "measurements.json").read_text())
    assert js["columns"][:3] == ["subject", "visit", "site"] and len(js["rows"]) == 4
    st.close()


def test_no_original_identifiers_leave_the_site_side(mini):
    work = mini["work"]
    markers = [b"PAT0001", b"PAT0002", b"Doe^Patient", b"HOS-MRN", b"19600101"]
    for sub in ("archive",):
        for p in (work / sub).rglob("*"):
            if p.is_file():
                data = p.read_bytes()
                assert not any(mk in data for mk in markers), p
    for p in (work / "exams").glob("*/results/*.json"):
        data = p.read_bytes()
        assert not any(mk in data for mk in markers), p
    for p in (work / "exams").glob("*/deid/*.dcm"):   # (deid/conformance.json: the conformance report)
        ds = pydicom.dcmread(p)
        assert ds.PatientIdentityRemoved == "YES" and ds.PatientID.startswith("MINI01-HOS-")
    assert (work / "measurements.csv").read_bytes().count(b"PAT") == 0


def test_archive_holds_each_instance_once_and_verifies(mini):
    work = mini["work"]
    res = verify(work / "archive")
    assert res["ok"], res["errors"]
    deid = [p for p in (work / "exams").glob("*/deid/*.dcm")]
    assert res["objects"] == len(deid) == 32
    shas = {hashlib.sha256(p.read_bytes()).hexdigest() for p in deid}
    log = [json.loads(x) for x in (work / "archive" / "audit.log.jsonl").read_text().splitlines()]
    assert {r["sha256"] for r in log if r["action"] == "object.add"} == shas
    records = [r for r in log if r["action"].startswith("record.")]
    assert len(records) == 4 + 8 and all(r["version"] == 1 for r in records)   # one exam + one per series


def test_rerun_processes_only_what_is_new(mini, tmp_path):
    trial, work, m = mini["trial"], mini["work"], mini["m"]
    log_before = (work / "archive" / "audit.log.jsonl").read_bytes()
    again = run_study(trial, inbox=m["inbox"], workdir=work, jobs=1, progress=False)
    assert again["this_run"]["ingest"]["new_paths"] == 0 and again["this_run"]["exams_processed"] == 0
    assert (work / "archive" / "audit.log.jsonl").read_bytes() == log_before
    # a new subject arrives in a second inbox: only its exams are processed, IDs continue the sequence
    extra = make_corpus(tmp_path / "extra", subjects=3, slices=4, visits=(("baseline", 0),))
    third = [f for f in extra["files"] if f.startswith("PAT0003/")]
    box = tmp_path / "inbox2"
    for f in third:
        (box / f).parent.mkdir(parents=True, exist_ok=True)
        (box / f).write_bytes((Path(extra["inbox"]) / f).read_bytes())
    # one image flagged as carrying burned-in annotation: de-identification must refuse it (quarantine)
    burned = box / third[0]
    ds = pydicom.dcmread(burned)
    ds.BurnedInAnnotation = "YES"
    ds.save_as(burned)
    # the same files of subject 1 under another name are duplicates, not new instances
    dup = Path(m["inbox"]) / m["files"][0]
    (box / "dup_of_subject1.dcm").write_bytes(dup.read_bytes())
    objects_before = verify(work / "archive")["objects"]
    res = run_study(trial, inbox=box, workdir=work, jobs=1, progress=False)
    assert res["this_run"]["exams_processed"] == 1 and res["this_run"]["ingest"]["ingested"] == 8
    assert res["this_run"]["ingest"]["duplicates"] == 1 and res["duplicates"] == 1
    assert res["quarantine_reasons"].get("burned_in_annotation") == 1 and not res["failed"]
    burned_sha = hashlib.sha256(burned.read_bytes()).hexdigest()
    reason = json.loads((work / "quarantine" / burned_sha / "reason.json").read_text())
    assert reason["reason"] == "burned_in_annotation"
    assert verify(work / "archive")["objects"] == objects_before + 7
    st = State(work)
    ids = sorted(s["subject_id"] for s in st.subjects())
    assert len(ids) == 3 and ids[2].startswith("MINI01-HOS-003")
    st.close()
    assert verify(work / "archive")["ok"]


def test_status_and_step_commands(mini, capsys, tmp_path):
    work = mini["work"]
    assert cli.main(["status", "--workdir", str(work)]) == 0
    out = capsys.readouterr().out
    assert "exams" in out and "archive:done" in out and "MINI01-HOS-" in out
    st = State(work)
    key = st.exams()[0]["exam_key"]
    st.close()
    assert cli.main(["status", "--workdir", str(work), "--exam", key[:8]]) == 0
    out = capsys.readouterr().out
    assert key in out and "series" in out and "adherence" in out

    assert cli.main(["step", "--list"]) == 0
    listing = capsys.readouterr().out
    for name in ("ingest", "identify", "deidentify", "classify", "adherence", "qc", "archive", "analysis", "measurements"):
        assert name in listing

    # a node run alone in place: recorded in the workdir as a run records it
    assert cli.main(["step", "classify", "--study", mini["m"]["study"], "--workdir", str(work), "--exam", key[:8]]) == 0
    assert json.loads(capsys.readouterr().out)["matched"] == 2
    # ... and staged, as the CWL tools run it: inputs where they are, outputs under --out
    E = work / "exams" / key
    out = tmp_path / "staged"
    assert cli.main(["step", "classify", "--study", mini["m"]["study"], "--in", f"original/={E / 'original'}",
                          "--in", f"exam.json={E / 'exam.json'}",
                          "--in", f"results/identity.json={E / 'results' / 'identity.json'}", "--out", str(out)]) == 0
    capsys.readouterr()
    assert json.loads((out / "results" / "classification.json").read_text())["summary"]["matched"] == 2
    assert cli.main(["step", "clasify", "--study", mini["m"]["study"], "--out", str(out)]) == 1
    assert "did you mean 'classify'" in capsys.readouterr().err

    assert cli.main(["verify", "--workdir", str(work)]) == 0
    assert capsys.readouterr().out.startswith("OK:")


def test_nodes_staged_as_the_cwl_workflow_stages_them_give_the_same_archive(mini, tmp_path, capsys):
    """Every node through `imtrial step` in the CWL export's phases and staging (batch nodes once over all
    exams, per-exam nodes one exam at a time, each input passed where the producer wrote it): the archive
    holds the same bytes as `imtrial run`, and the measurements are the same."""
    from imtrial_dsl.graph import staged_phases
    from imtrial_dsl.pipeline import covers

    trial, study, w = mini["trial"], mini["m"]["study"], tmp_path
    g = compile_file(study).graph
    where: dict[str, list[Path]] = {}          # exam path -> its location for every exam, in exam order

    def step(*argv):
        assert cli.main(["step", *argv, "--study", study]) == 0, capsys.readouterr().err
        capsys.readouterr()

    def ins(nid, k=None):
        reads = [rel for rel in where for r in g.nodes[nid]["inputs"] if covers(rel, r)]
        pairs = [(rel, where[rel][i]) for rel in reads for i in (range(len(where[rel])) if k is None else [k])]
        return [f"--in={rel}={p}" for rel, p in pairs]

    for batch, ids in staged_phases(g):
        for nid in ids:
            d = g.nodes[nid]
            ref = [f"--ref={d['ref']}"] if d["ref"] else []
            if batch:
                out = w / nid.replace(":", "_")
                extra = ["--study-in", f"inbox/={mini['m']['inbox']}"] if "inbox/" in d["study_inputs"] else []
                step(d["step"], *ref, *ins(nid), *extra, f"--out={out}")
                root = out / "exams" if d["scope"] == "study" else out
                for rel in d["outputs"]:
                    where[rel] = sorted(e / rel.rstrip("/") for e in root.iterdir() if (e / rel.rstrip("/")).exists())
            else:
                n = len(where["exam.json"])
                outs = [w / f"exam{k}" for k in range(n)]
                for k in range(n):
                    step(d["step"], *ref, *ins(nid, k), f"--out={outs[k]}")
                for rel in d["outputs"]:
                    where[rel] = [o / rel.rstrip("/") for o in outs]
    res = verify(w / "archive" / "archive")
    assert res["ok"] and res["objects"] == 32
    cwl_objects = {p.parent.name + p.name for p in (w / "archive" / "archive" / "objects").rglob("*") if p.is_file()}
    local_objects = {p.parent.name + p.name for p in (mini["work"] / "archive" / "objects").rglob("*") if p.is_file()}
    assert cwl_objects <= local_objects
    local_rows = [r for r in csv.DictReader(open(mini["work"] / "measurements.csv")) if not r["subject"].startswith("MINI01-HOS-003")]
    assert list(csv.DictReader(open(w / "measurements" / "measurements.csv"))) == local_rows


def test_synthetic_multisite_corpus_reports_every_injected_deviation(tmp_path):
    """The amyloid example, 3 sites x 3 vendors, with deviations injected by `synth`: each is reported
    (about 5 s on an idle 2-core machine, 30-40 s when it is busy)."""
    from imtrial_dsl.synth import synthesize

    os.environ["IMTRIAL_KEY"] = KEY
    trial = compile_file(Path(__file__).resolve().parent.parent / "examples" / "amyloid_mri.imtrial").trial
    inbox = tmp_path / "inbox"
    manifest = synthesize(trial, inbox, subjects_per_site=1, seed=3, small=True, visits=["baseline", "m12"],
                          deviations=["param_off", "ghosting", "corrupt_file", "unknown_device", "software_upgrade",
                                      "wrong_device"])
    work = tmp_path / "work"
    s = run_study(trial, inbox=inbox, workdir=work, jobs=2, progress=False)
    assert not s["failed"] and s["unmatched"] == []
    st = State(work)
    from imtrial_dsl.runner.identify import find_subject

    # the registry holds keyed hashes only: the way from a PatientID to its subject needs the study's key
    assert not any(r["source_value"] == d["patient_id"] for r in st.audit_map() for d in manifest["deviations"])
    issuer = {s["patient_id"]: s["issuer"] for s in manifest["subjects"]}
    subject_of = {d["patient_id"]: find_subject(trial, st.db, {"PatientID": d["patient_id"]}, issuer[d["patient_id"]])
                  for d in manifest["deviations"] if d.get("patient_id")}
    exams = {(e["subject_id"], e["visit"]): e for e in st.exams()}
    quarantined = {q["reason"]["original_path"]: q["reason"]["reason"] for q in st.quarantined()}
    for dev in manifest["deviations"]:
        e = exams.get((subject_of.get(dev["patient_id"]), dev["visit"]))
        kind = dev["type"]
        if kind == "corrupt_file":
            assert quarantined.get(dev["file"]) == "truncated", dev
            continue
        assert e is not None, dev
        codes = {w["code"] for w in e["warnings"]}
        if kind == "param_off":
            bad = [sr for sr in e["series"] if sr["protocol"] == dev["protocol"]]
            assert bad and bad[0]["adherence"]["verdict"] == "fail" and dev["parameter"] in bad[0]["adherence"]["failed"], dev
        elif kind == "ghosting":
            bad = [sr for sr in e["series"] if sr["protocol"] == dev["protocol"]]
            assert bad and bad[0]["qc"]["verdict"] in ("fail", "warn"), dev
            assert any(c["check"] == "t1_motion" and c["verdict"] != "pass" for c in bad[0]["qc"]["checks"]), dev
        elif kind == "unknown_device":
            assert "unknown_device" in codes, (dev, codes)
        elif kind == "software_upgrade":
            assert "software_upgrade" in codes, (dev, codes)
        elif kind == "wrong_device":
            assert "same_device" in codes, (dev, codes)
    # and nothing else: exams without an injected device deviation carry no device warnings
    device_devs = {(subject_of[d["patient_id"]], d["visit"]) for d in manifest["deviations"]
                   if d["type"] in ("unknown_device", "software_upgrade", "wrong_device")}
    for key, e in exams.items():
        if key not in device_devs:
            assert not {w["code"] for w in e["warnings"]} & {"unknown_device", "software_upgrade", "same_device"}, key
    st.close()
    assert verify(work / "archive")["ok"]


def test_demo_tools_measure_what_was_built_into_the_image():
    """The analysis programs on volumes with known content (numpy phantoms)."""
    import numpy as np

    from imtrial_dsl.tools import count_lesions
    from imtrial_dsl.tools._image import label, otsu

    mask = np.zeros((4, 10, 10), bool)
    mask[0, 0, 0:3] = True               # component 1 (3 voxels)
    mask[2:4, 5:7, 5:7] = True           # component 2 (8 voxels)
    mask[3, 9, 9] = True                 # component 3 (1 voxel), not connected to 2
    lab, n = label(mask)
    assert n == 3 and sorted(np.bincount(lab.ravel())[1:]) == [1, 3, 8]

    rng = np.random.default_rng(1)
    vol = rng.normal(100, 5, (16, 48, 48))
    zz, yy, xx = np.mgrid[:16, :48, :48]
    head = ((zz - 8) / 7.5) ** 2 + ((yy - 24) / 20) ** 2 + ((xx - 24) / 20) ** 2 <= 1
    vol[head] = rng.normal(500, 10, head.sum())
    centres = [(6, 20, 20), (8, 30, 26), (10, 22, 32)]
    for z, y, x in centres:
        vol[z - 1:z + 2, y - 1:y + 2, x - 1:x + 2] = 900        # 27-voxel bright lesions
    assert 100 < otsu(vol) < 500
    found, sizes = count_lesions.count(vol, bright=True)
    assert found == len(centres) and sizes == [27, 27, 27]


def test_an_unknown_node_or_a_missing_key_fails_loudly(mini, monkeypatch, capsys):
    from imtrial_dsl.runner import run as runmod
    from imtrial_dsl.runner.invoke import StepError, find_node

    with pytest.raises(StepError, match="no pipeline node 'qc:no_such_check'"):
        find_node(mini["trial"], "qc", "no_such_check")
    monkeypatch.delenv("IMTRIAL_KEY")
    assert runmod.preflight(mini["trial"]) == ["deidentify: environment variable IMTRIAL_KEY is not set",
                                                "identifiers: environment variable IMTRIAL_KEY is not set"]
    assert cli.main(["run", mini["m"]["study"], "--inbox", mini["m"]["inbox"], "--workdir",
                          str(mini["base"] / "nokey")]) == 1
    assert "IMTRIAL_KEY is not set" in capsys.readouterr().err
    assert not (mini["base"] / "nokey").exists()


def test_a_key_file_next_to_the_study_works_from_another_cwd(tmp_path, monkeypatch):
    """`key file "k.txt"` is read from the study's folder by the preflight, identify and deidentify alike."""
    m = make_corpus(tmp_path / "study", subjects=1, slices=2, visits=(("baseline", 0),))
    study = Path(m["study"])
    study.write_text(study.read_text().replace("key env IMTRIAL_KEY", 'key file "k.txt"'))
    (study.parent / "k.txt").write_text(KEY + "\n")
    monkeypatch.delenv("IMTRIAL_KEY", raising=False)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    work = tmp_path / "work"
    assert cli.main(["run", os.path.relpath(study), "--inbox", m["inbox"], "--workdir", str(work),
                          "--no-progress"]) == 0
    st = State(work)
    exams = st.exams()
    assert len(exams) == 1 and exams[0]["steps"]["deidentify"]["status"] == "done"
    assert exams[0]["subject_id"].startswith("MINI01-HOS-")
    st.close()


def test_workers_are_forked_only_when_the_caller_says_it_can_be():
    """The command line forks its workers (it has no SQLite file open and no other thread); a library caller
    gets spawned ones unless it says so; a process with other threads is never forked."""
    import sys
    import threading

    from imtrial_dsl.runner.run import worker_pool

    assert worker_pool(1, fork=True) is None
    alone = sys.platform.startswith("linux") and threading.active_count() == 1
    for fork, want in ((False, "spawn"), (True, "fork" if alone else "spawn")):
        pool = worker_pool(2, fork=fork)
        try:
            assert pool._mp_context.get_start_method() == want
        finally:
            pool.shutdown()
    stop = threading.Event()
    t = threading.Thread(target=stop.wait)
    t.start()
    try:
        pool = worker_pool(2, fork=True)
        assert pool._mp_context.get_start_method() == "spawn"
        pool.shutdown()
    finally:
        stop.set()
        t.join()
