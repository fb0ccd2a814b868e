"""End to end: synthetic multi-site corpus -> runner -> operations (reminders, reports, qualification).

The corpus comes from ``examples/amyloid_mri.imtrial`` via the synth helper with a missing visit and a
software upgrade injected (recorded in its manifest); this test moves one follow-up exam 60 days
later (all its dates) to make an out-of-window visit, runs the real pipeline (``run_study``), records
qualification exams (one device qualified, one qualified and then upgraded, one failing adherence),
and checks reminders (delivered to an aiosmtpd sink on 127.0.0.1), report tables per role and the
qualification records against what the manifest says must be there.
"""
import csv
import email
import json
import os
import re
import shutil
import subprocess
import sys
from datetime import date, timedelta
from email import policy
from pathlib import Path

import pydicom
import pytest
from aiosmtpd.controller import Controller

from imtrial_dsl.compiler import compile_file
from imtrial_dsl.ops import reports
from imtrial_dsl.ops.expected import expected_vs_received
from imtrial_dsl.ops.model import load_study_data
from imtrial_dsl.ops.qualify import is_qualified, qualify
from imtrial_dsl.ops.reminders import run_reminders
from imtrial_dsl import synth
from imtrial_dsl.runner.run import run_study
from netutil import free_port  # tests/netutil.py

ROOT = Path(__file__).resolve().parent.parent
STUDY = ROOT / "examples" / "amyloid_mri.imtrial"
SHIFT = 60  # days: beyond every follow-up window (+28 d)

# synth + a full pipeline run: ~17 s CPU, 30-80 s wall on the shared 2-core machine
pytestmark = pytest.mark.slow


def _shift_exam_dates(folder: Path, old: str, days: int) -> str:
    """Move every date of an exam (DA values equal to the exam date) by ``days``; returns the new date."""
    new = (date(int(old[:4]), int(old[4:6]), int(old[6:])) + timedelta(days=days)).strftime("%Y%m%d")
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        ds = pydicom.dcmread(f)
        for el in ds.iterall():
            if el.VR == "DA" and el.value == old:
                el.value = new
        ds.save_as(f)
    return new


def _set_param(folder: Path, keyword: str, value) -> None:
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        ds = pydicom.dcmread(f)
        setattr(ds, keyword, value)
        ds.save_as(f)


class _Sink:
    def __init__(self):
        self.messages = []

    async def handle_DATA(self, server, session, envelope):
        self.messages.append((list(envelope.rcpt_tos), email.message_from_bytes(envelope.content, policy=policy.default)))
        return "250 OK"


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    os.environ.setdefault("IMTRIAL_KEY", "acceptance-test-key-0123456789")
    res = compile_file(str(STUDY))
    assert res.ok, [str(d) for d in res.diagnostics]
    trial = res.trial
    root = tmp_path_factory.mktemp("ops_e2e")
    inbox = root / "inbox"
    man = synth.synthesize(trial, inbox, subjects_per_site=1, seed=7, small=True,
                           deviations=["missing_visit", "software_upgrade"])
    devs = {d["type"]: d for d in man["deviations"]}
    assert set(devs) == {"missing_visit", "software_upgrade"}
    upgraded = (devs["software_upgrade"]["site"], devs["software_upgrade"]["visit"])
    missing = (devs["missing_visit"]["site"], devs["missing_visit"]["visit"])
    # the out-of-window visit: a follow-up at a site other than the upgraded/missing ones
    late = next(e for e in man["exams"] if e["visit"] in ("m12", "m24")
                and e["site"] not in (upgraded[0], missing[0]))
    old = late["date"].replace("-", "")
    late_date = _shift_exam_dates(inbox / late["dir"], old, SHIFT)

    # qualification exams, kept outside the inbox: copies of baseline exams of each site
    qdir = root / "qualification"
    base = {e["site"]: e for e in man["exams"] if e["visit"] == "baseline"}
    for s in base:
        shutil.copytree(inbox / base[s]["dir"], qdir / s)
    t1 = next(x for x in base["TOK"]["series"] if x["protocol"] == "T1w")
    _set_param(qdir / "TOK" / Path(t1["files"][0]).parent.relative_to(base["TOK"]["dir"]), "RepetitionTime", 30.0)

    wd = root / "work"
    summary = run_study(trial, inbox=inbox, workdir=wd, progress=False)
    assert summary["exams"] == len(man["exams"])
    quals = {
        "BOS": qualify(trial, wd, "BOS", "BOS_MR1", qdir / "BOS", by="QA physicist", on=date(2026, 1, 10)),
        "LYN": qualify(trial, wd, "LYN", "LYN_MR1", qdir / "LYN", by="QA physicist", on=date(2026, 1, 12)),
        "TOK": qualify(trial, wd, "TOK", "TOK_MR1", qdir / "TOK", by="QA physicist", on=date(2026, 1, 14)),
    }
    as_of = date.fromisoformat(man["as_of"])
    return {"trial": trial, "man": man, "wd": wd, "root": root, "missing": missing, "upgraded": upgraded,
            "upgraded_device": devs["software_upgrade"]["device"],
            "late": (late["site"], late["visit"], late_date), "quals": quals, "as_of": as_of}


def _subject_of(study, site):
    data = load_study_data(study["wd"], "AMY01")
    return next(e.subject_id for e in data.exams if e.site == site)


def _want(study) -> dict:
    """(site, visit) -> status the operations must report as of the end of the corpus."""
    # windows are relative to each subject's baseline exam date (synth places visits around its own
    # nominal baseline, so a screening exam can fall outside its window: compute from the dates)
    visits = {v.name: v for v in study["trial"].schedule.visits}
    base = {e["site"]: date.fromisoformat(e["date"]) for e in study["man"]["exams"] if e["visit"] == "baseline"}
    want = {}
    for e in study["man"]["exams"]:
        v, d = visits[e["visit"]], date.fromisoformat(e["date"])
        if (e["site"], e["visit"]) == study["late"][:2]:
            d = date.fromisoformat(f"{study['late'][2][:4]}-{study['late'][2][4:6]}-{study['late'][2][6:]}")
        target = base[e["site"]] + timedelta(days=round(v.offset.days))
        inside = target - timedelta(days=round(v.window_before.days)) <= d <= target + timedelta(days=round(v.window_after.days))
        want[(e["site"], e["visit"])] = "received_in_window" if inside else "received_out_of_window"
    want[study["missing"]] = "overdue"
    return want


def test_expected_vs_received(study):
    rows = expected_vs_received(study["trial"], load_study_data(study["wd"], "AMY01"), study["as_of"])
    got = {(r.site, r.visit): r.status for r in rows}
    want = _want(study)
    assert want[study["late"][:2]] == "received_out_of_window"
    assert got == want
    late = next(r for r in rows if (r.site, r.visit) == study["late"][:2])
    assert late.exam_date.strftime("%Y%m%d") == study["late"][2]
    assert all(a.status == "ok" for r in rows if r.received for a in r.acquisitions)


def test_qualification_records(study):
    q = study["quals"]
    assert [(d.protocol, d.qualified) for d in q["BOS"].decisions] == [("T1w", True), ("FLAIR", True)]
    assert [(d.protocol, d.qualified) for d in q["LYN"].decisions] == [("T1w", True), ("FLAIR", True)]
    tok = {d.protocol: d for d in q["TOK"].decisions}
    assert not tok["T1w"].qualified and tok["FLAIR"].qualified
    assert any("RepetitionTime" in r for r in tok["T1w"].reasons)
    assert is_qualified(study["wd"], "LYN", "LYN_MR1", "T1w")
    assert not is_qualified(study["wd"], "TOK", "TOK_MR1", "T1w") and is_qualified(study["wd"], "TOK", "TOK_MR1", "FLAIR")


def test_reminders_over_smtp(study):
    trial, wd, as_of = study["trial"], study["wd"], study["as_of"]
    site, visit = study["missing"]
    pi = next(c.email for c in trial.site(site).contacts if c.role == "imaging_pi")
    sink = _Sink()
    port = free_port()
    ctl = Controller(sink, hostname="127.0.0.1", port=port)
    ctl.start()
    try:
        run = run_reminders(trial, load_study_data(wd, "AMY01"), wd, as_of, smtp=("127.0.0.1", port),
                            central_emails=["central@amy01.example"], out_dir=study["root"] / "reminders")
        again = run_reminders(trial, load_study_data(wd, "AMY01"), wd, as_of, smtp=("127.0.0.1", port),
                              central_emails=["central@amy01.example"])
    finally:
        ctl.stop()
    subject = _subject_of(study, site)
    # after the last exam every window has closed: only the missing visit is escalated (imaging PI + central)
    assert sorted(r[0] for r, _ in sink.messages) == sorted([pi, "central@amy01.example"])
    for _, msg in sink.messages:
        body = msg.get_body(("plain",)).get_content()
        assert subject in body and f"visit {visit}: OVERDUE" in body
    assert run.ok and again.messages == [] and len(again.already_sent) == 2
    saved = json.loads((study["root"] / "reminders" / "reminders.json").read_text())
    assert [(n["kind"], n["site"], n["visit"]) for n in saved["notices"]] == [("overdue", site, visit)]


def test_reports_per_role(study):
    trial, wd = study["trial"], study["wd"]
    out = study["root"] / "reports"
    files = reports.generate(trial, load_study_data(wd, "AMY01"), out, study["as_of"], workdir=wd)
    for role in ("reader", "sponsor"):
        files |= reports.generate(trial, load_study_data(wd, "AMY01"), out, study["as_of"], role=role, workdir=wd)
    assert set(files) == {"central", "site (BOS)", "site (LYN)", "site (TOK)", "reader", "sponsor"}

    sites = {r["site"]: r for r in csv.DictReader(open(out / "central" / "sites.csv"))}
    want = _want(study)
    n_exams = {s: sum(e["site"] == s for e in study["man"]["exams"]) for s in ("BOS", "LYN", "TOK")}
    for s, r in sites.items():
        assert r["subjects_enrolled"] == "1" and int(r["exams_received"]) == n_exams[s]
        assert r["overdue_visits"] == ("1" if s == study["missing"][0] else "0")
        assert int(r["visits_out_of_window"]) == sum(st == "received_out_of_window" for (x, _), st in want.items() if x == s)
        assert float(r["adherence_pass_rate"]) == 1.0 and float(r["qc_pass_rate"]) == 1.0
    qual = {(r["device"], r["protocol"]): r["status"] for r in csv.DictReader(open(out / "central" / "qualification.csv"))}
    up_dev = study["upgraded_device"]
    want_q = {("BOS_MR1", "T1w"): "qualified", ("BOS_MR1", "FLAIR"): "qualified",
            ("LYN_MR1", "T1w"): "qualified", ("LYN_MR1", "FLAIR"): "qualified",
            ("TOK_MR1", "T1w"): "not_qualified", ("TOK_MR1", "FLAIR"): "qualified"}
    for p in ("T1w", "FLAIR"):  # the upgrade seen in a later exam requires re-qualification
        if want_q[(up_dev, p)] == "qualified":
            want_q[(up_dev, p)] = "requalification_needed"
    assert qual == want_q
    assert not is_qualified(wd, study["upgraded"][0], up_dev, "T1w")
    m = json.loads((out / "central" / "report.json").read_text())
    assert [u["device"] for u in m["upgrades"]] == [up_dev]
    cov = {c["protocol"]: c["covered"] for c in m["upgrades"][0]["coverage"]}
    if up_dev == "BOS_MR1":  # the T1w variant pins Siemens software "XA30": a new release falls back to base
        assert cov["T1w"] is False and cov["FLAIR"] is True
    exams = list(csv.DictReader(open(out / "central" / "exams.csv")))
    assert len(exams) == len(study["man"]["exams"]) and all(r["step_archive"] == "done" for r in exams)
    acquire = {v.name: {r.name for r in v.acquire} for v in trial.schedule.visits}
    for r in exams:  # exams acquired on devices not qualified for their protocols are flagged
        flags = dict(x.split(": ") for x in r["device_unqualified"].split("; ") if x)
        assert flags == {p: want_q[(r["device"], p)] for p in ("T1w", "FLAIR")
                         if p in acquire[r["visit"]] and want_q[(r["device"], p)] != "qualified"}
    assert any(r["device_unqualified"] == "T1w: not_qualified" for r in exams if r["site"] == "TOK")

    subjects = {s: _subject_of(study, s) for s in ("BOS", "LYN", "TOK")}
    for s in subjects:
        folder = out / "site" / s
        for p in folder.iterdir():
            text = p.read_text(encoding="utf-8")
            for other, sid in subjects.items():
                if other != s:
                    assert sid not in text, f"{sid} leaked into site {s} {p.name}"
    for p in (out / "reader").iterdir():
        text = p.read_text(encoding="utf-8")
        assert not any(sid in text for sid in subjects.values())
        assert not any(re.search(rf"\b{code}\b", text) for code in subjects)


def test_cli_commands(study):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    wd, out = study["wd"], study["root"] / "cli"
    cmd = [sys.executable, "-m", "imtrial_dsl"]
    r = subprocess.run(cmd + ["reminders", str(STUDY), "--workdir", str(wd), "--as-of", study["as_of"].isoformat(),
                              "--dry-run", "--central-email", "central@amy01.example"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    # already sent by the SMTP test or not: either the dry run lists it, or says it was sent before
    assert "[dry_run]" in r.stdout or "already sent" in r.stdout
    r = subprocess.run(cmd + ["report", str(STUDY), "--workdir", str(wd), "-o", str(out), "--role", "site",
                              "--site", "BOS", "--as-of", study["as_of"].isoformat()],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert (out / "site" / "BOS" / "report.html").is_file() and not (out / "site" / "LYN").exists()
