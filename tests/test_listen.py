"""Feedback at the scanner: ``imtrial listen`` receives from dcmtk's ``storescu`` and from pynetdicom acting
as a scanner (127.0.0.1), judges each completed series through the pipeline's steps and shows the verdict
(console line, status page, e-mail outbox) within seconds; the images then go on through ``imtrial run``.

The images are pydicom's real MR test image (a Toshiba scanner's file) stacked into series by the
mini corpus; the planted deviation is a RepetitionTime the protocol does not allow.
"""
from __future__ import annotations

import email
import json
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pydicom
import pytest
from dcmtk import dcmtk

from imtrial_dsl.compiler import compile_file
from imtrial_dsl.listen.service import listen
from imtrial_dsl.runner.run import run_study
from imtrial_dsl.store import Store
from imtrial_dsl.tools.minicorpus import MINI_STUDY, make_corpus
from netutil import free_port  # tests/netutil.py

KEY = "listen-test-key-0123456789"
# the protocol written as the example: a target with a relative tolerance
STUDY = MINI_STUDY.replace("  RepetitionTime in 3000 .. 5000 ms\n  EchoTime", "  RepetitionTime = 4000 ms ± 1%\n  EchoTime", 1)


@pytest.fixture()
def site(tmp_path, monkeypatch):
    monkeypatch.setenv("IMTRIAL_KEY", KEY)
    study = tmp_path / "mini.imtrial"
    study.write_text(STUDY)
    res = compile_file(str(study))
    assert res.ok, [d.message for d in res.diagnostics]
    m = make_corpus(tmp_path / "src", subjects=1, slices=6, visits=(("baseline", 0),))
    src = Path(m["inbox"]) / "PAT0001" / "baseline"
    t2 = sorted(src.glob("t2_se_tra_*.dcm"))
    flair = sorted(src.glob("flair_tra_*.dcm"))
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in flair:  # the FLAIR series re-described as T2w with a planted TR deviation
        ds = pydicom.dcmread(f)
        ds.SeriesDescription, ds.RepetitionTime = "t2_se_tra repeat", 2500
        ds.save_as(bad / f.name)
    return {"trial": res.trial, "study": study, "work": tmp_path / "work", "t2": t2, "bad": sorted(bad.glob("*.dcm")),
            "tmp": tmp_path}


def _final(L, files: list[Path], timeout: float = 30) -> dict:
    """The verdict on the whole series of ``files`` (a loaded machine may let the quiet time pass mid-series: that
    partial series is judged too, and judged again when it grows)."""
    uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    deadline = time.time() + timeout
    while time.time() < deadline:
        with L.lock:
            hit = [v for v in L.verdicts if v["series_uid"] == uid and v["received"] == len(files)]
        if hit:
            return hit[-1]
        time.sleep(0.05)
    raise AssertionError(f"no verdict on the complete series {uid} in {timeout} s: {L.verdicts}")


def _storescu(port: int, files: list[Path]) -> float:
    exe = dcmtk("storescu")
    proc = subprocess.run([exe, "-aet", "HOSMR1", "-aec", "IMTRIAL_SCP", "127.0.0.1", str(port), *map(str, files)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return time.time()


def _pynetdicom_scanner(port: int, files: list[Path], mpps_complete: bool = False) -> float:
    from pydicom.dataset import Dataset
    from pydicom.uid import generate_uid
    from pynetdicom import AE
    from pynetdicom.sop_class import ModalityPerformedProcedureStep

    datasets = [pydicom.dcmread(f) for f in files]
    ae = AE(ae_title="HOSMR1")
    ae.add_requested_context(datasets[0].SOPClassUID, datasets[0].file_meta.TransferSyntaxUID)
    ae.add_requested_context(ModalityPerformedProcedureStep)
    assoc = ae.associate("127.0.0.1", port, ae_title="IMTRIAL_SCP")
    assert assoc.is_established
    for ds in datasets:
        assert assoc.send_c_store(ds).Status == 0x0000
    last = time.time()
    if mpps_complete:
        uid = generate_uid()
        mpps = Dataset()
        mpps.PerformedProcedureStepStatus = "IN PROGRESS"
        assert assoc.send_n_create(mpps, ModalityPerformedProcedureStep, uid)[0].Status == 0x0000
        done = Dataset()
        done.PerformedProcedureStepStatus = "COMPLETED"
        series = Dataset()
        series.SeriesInstanceUID = datasets[0].SeriesInstanceUID
        done.PerformedSeriesSequence = [series]
        assert assoc.send_n_set(done, ModalityPerformedProcedureStep, uid)[0].Status == 0x0000
    assoc.release()
    return last


def test_storescu_conformant_pass_and_planted_deviation_fail_within_seconds(site):
    lines: list[str] = []
    L = listen(site["trial"], site["work"], port=free_port(), quiet_s=1.0, notify=lines.append)
    try:
        sent = _storescu(L.port, site["t2"])
        ok = _final(L, site["t2"])
        assert time.time() - sent < 10
        assert ok["verdict"] == "PASS" and ok["message"] == "T2w: PASS" and ok["n_instances"] == 6
        sent = _storescu(L.port, site["bad"])
        v = _final(L, site["bad"])
        assert time.time() - sent < 10 and v["latency_s"] < 10
        assert v["verdict"] == "FAIL"
        assert v["message"] == "T2w: FAIL RepetitionTime 2500 ms, expected 4000 ms ± 1% — repeat the series"
        assert any(v["message"] in line for line in lines)
        # the status page shows it (and refreshes); the JSON has both verdicts
        html = urllib.request.urlopen(f"http://127.0.0.1:{L.http_port}/", timeout=10).read().decode()
        assert 'http-equiv="refresh"' in html and "FAIL" in html and "RepetitionTime 2500 ms" in html
        doc = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{L.http_port}/status.json", timeout=10).read())
        assert [x["verdict"] for x in doc["verdicts"]][0] == "FAIL" and "PASS" in [x["verdict"] for x in doc["verdicts"]]
        # the study's contacts: the site's imaging PI (it lists no technologist) gets the FAIL by e-mail
        emls = sorted((site["work"] / "listen" / "outbox").glob("*.eml"))
        assert emls
        msg = email.message_from_bytes(emls[-1].read_bytes())
        assert msg["To"] == "tester@hos.example" and "FAIL RepetitionTime 2500 ms" in msg["Subject"]
    finally:
        L.stop()
    # the images flow on: the inbox holds every instance, and imtrial run takes them through the pipeline
    assert len(list((site["work"] / "listen" / "inbox").rglob("*.dcm"))) == 12
    run_study(site["trial"], inbox=site["work"] / "listen" / "inbox", workdir=site["work"], jobs=1, progress=False)
    st = Store(site["work"])
    (e,) = st.exams()
    verdicts = {s["description"]: (s["adherence"] or {}).get("verdict") for s in e["series"]}
    st.close()
    assert e["status"] == "done" and verdicts == {"t2_se_tra": "pass", "t2_se_tra repeat": "fail"}


def test_pynetdicom_scanner_mpps_completed_gives_the_verdict_before_the_quiet_time(site):
    L = listen(site["trial"], site["work"], port=free_port(), quiet_s=60.0)
    try:
        last = _pynetdicom_scanner(L.port, site["bad"], mpps_complete=True)
        v = _final(L, site["bad"])
        assert time.time() - last < 10 and v["verdict"] == "FAIL" and "RepetitionTime 2500 ms" in v["message"]
        # a conformant series from the same scanner, judged after the quiet time would be far too late: MPPS again
        last = _pynetdicom_scanner(L.port, site["t2"], mpps_complete=True)
        v2 = _final(L, site["t2"])
        assert time.time() - last < 10 and v2["verdict"] == "PASS"
    finally:
        L.stop()
