"""Operations on a workdir built through the runner's State API, and the CLI subcommands in-process."""
import json
from datetime import date

import pytest

from imtrial_dsl import cli
from imtrial_dsl.ops.model import load_study_data
from imtrial_dsl.store import Store as State

STUDY = "examples/amyloid_mri.imtrial"


@pytest.fixture
def workdir(tmp_path):
    wd = tmp_path / "w"
    with State(wd) as st:
        st.upsert_exam("k1", trial="AMY01", subject_id="AMY01-BOS-000125", site="BOS", device="BOS_MR1",
                       visit="baseline", visit_kind="baseline", exam_date="20260301", in_window=1, status="done")
        st.upsert_exam("k2", trial="AMY01", subject_id="AMY01-BOS-000125", site="BOS", device="BOS_MR1",
                       visit="m12", visit_kind="followup", exam_date="20270225", in_window=1, status="done")
        st.upsert_exam("other", trial="OTHER", subject_id="OTHER-1", site="BOS", device="BOS_MR1", visit="baseline",
                       exam_date="20260101", status="done")
        for k in ("k1", "k2"):
            for step in ("ingest", "identify", "classify", "adherence", "qc:t1_snr", "qc:t1_motion"):
                st.set_step(k, step, "done")
        st.set_step("k1", "analysis:hipvol", "done", {"analysis": "hipvol", "status": "done"})
        # per-series verdicts as the runner records them (JSON columns)
        with st.tx() as db:
            db.execute("INSERT INTO series(exam_key, series_uid, protocol, adherence, qc) VALUES (?,?,?,?,?)",
                       ("k1", "1.1", "T1w", json.dumps({"verdict": "pass"}), json.dumps({"verdict": "pass", "checks": []})))
            db.execute("INSERT INTO series(exam_key, series_uid, protocol, adherence, qc) VALUES (?,?,?,?,?)",
                       ("k2", "2.1", "T1w", json.dumps({"verdict": "fail", "failed": ["RepetitionTime"]}),
                        json.dumps({"verdict": "warn", "checks": [{"check": "t1_motion", "verdict": "warn", "measured": 0.2}]})))
    for k, sw in (("k1", "syngo MR XA30"), ("k2", ["syngo MR XA31", "XA31A"])):
        (wd / "exams" / k).mkdir(parents=True)
        (wd / "exams" / k / "exam.json").write_text(json.dumps({"exam_key": k, "device": {"software": sw, "serial": "166012"}}))
    return wd


def test_adapter_reads_runner_state(workdir):
    data = load_study_data(workdir, "AMY01")
    assert [e.exam_key for e in data.exams] == ["k1", "k2"]            # the other trial is not ours
    k1, k2 = data.exams
    assert (k1.subject_id, k1.site, k1.device, k1.visit, k1.exam_date, k1.in_window) == (
        "AMY01-BOS-000125", "BOS", "BOS_MR1", "baseline", date(2026, 3, 1), True)
    assert k1.software == ["syngo MR XA30"] and k2.software == ["syngo MR XA31", "XA31A"]
    assert (k2.series[0].adherence, k2.series[0].qc) == ("fail", "warn")
    assert k2.series[0].reasons == ["RepetitionTime: outside its constraint"]
    assert k1.analyses == {"hipvol": "done"} and k1.steps["qc"] == "done"


def test_cli_subcommands(workdir, tmp_path, capsys):
    assert cli.main(["expected", STUDY, "--workdir", str(workdir), "--as-of", "2027-03-01"]) == 0
    out = capsys.readouterr().out
    assert "AMY01-BOS-000125     m12        2027-02-10..2027-03-24  received_in_window  [T1w:failed_adherence, FLAIR:missing, SWI:missing]" in out
    assert "screening  2026-01-18..2026-02-01  overdue" in out

    assert cli.main(["upgrades", STUDY, "--workdir", str(workdir)]) == 0
    out = capsys.readouterr().out
    assert "BOS/BOS_MR1: software 'syngo MR XA31 / XA31A' differs from inventory 'XA30'" in out
    assert "2 new re-qualification flag(s)" in out

    rc = cli.main(["reminders", STUDY, "--workdir", str(workdir), "--as-of", "2027-03-01", "--dry-run"])
    assert rc == 0
    out, err = capsys.readouterr()
    # the screening visit never came: escalated to the imaging PI; no central address configured -> warned
    assert "[dry_run] To: rivera@bgh.example (imaging_pi, BOS)" in out
    assert "no contact with role 'central'" in err

    assert cli.main(["report", STUDY, "--workdir", str(workdir), "-o", str(tmp_path / "r"), "--role", "nurse"]) == 1
    assert "unknown role 'nurse'" in capsys.readouterr().err
    assert cli.main(["report", STUDY, "--workdir", str(tmp_path / "nothing"), "-o", str(tmp_path / "r")]) == 1
    assert "no state database" in capsys.readouterr().err
    assert cli.main(["reminders", STUDY, "--workdir", str(workdir), "--as-of", "01/03/2027"]) == 2
