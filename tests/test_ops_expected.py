"""Expected vs received on hand-built exams (tests/ops_data)."""
from datetime import date

from imtrial_dsl.ops.expected import expected_vs_received, summarize
from imtrial_dsl.ops.model import OpsError, read_enrollment_csv
from ops_data.data import AS_OF, study_data
from ops_data.trial import trial


def _table(rows):
    return {(r.subject_id, r.visit): r for r in rows}


def test_statuses_as_of():
    rows = _table(expected_vs_received(trial(), study_data(), AS_OF))
    got = {k: v.status for k, v in rows.items()}
    assert got == {
        ("AMY01-BOS-0001", "baseline"): "received_in_window",
        ("AMY01-BOS-0001", "m12"): "received_out_of_window",
        ("AMY01-BOS-0001", "m24"): "upcoming",
        ("AMY01-BOS-0002", "baseline"): "received_in_window",
        ("AMY01-BOS-0002", "m12"): "overdue",
        ("AMY01-BOS-0002", "m24"): "upcoming",
        ("AMY01-LYN-0001", "baseline"): "received_in_window",
        ("AMY01-LYN-0001", "m12"): "received_in_window",
        ("AMY01-LYN-0001", "m24"): "upcoming",
        ("AMY01-LYN-0002", "baseline"): "received_in_window",
        ("AMY01-LYN-0002", "m12"): "upcoming",
        ("AMY01-LYN-0002", "m24"): "upcoming",
        ("AMY01-TOK-0001", "baseline"): "window_open",
        ("AMY01-TOK-0001", "m12"): "upcoming",
        ("AMY01-TOK-0001", "m24"): "upcoming",
    }
    m12 = rows[("AMY01-BOS-0002", "m12")]
    assert (m12.target, m12.opens, m12.closes) == (date(2027, 3, 10), date(2027, 2, 24), date(2027, 4, 7))
    late = rows[("AMY01-BOS-0001", "m12")]
    assert late.days_from_target == 45 and late.exam_keys == ["bos1m12"]
    assert rows[("AMY01-TOK-0001", "baseline")].day0_source == "enrollment"
    assert rows[("AMY01-BOS-0002", "baseline")].day0_source == "baseline_exam"


def test_required_acquisitions_inside_received_visits():
    rows = _table(expected_vs_received(trial(), study_data(), AS_OF))
    acq = lambda k: {a.protocol: a.status for a in rows[k].acquisitions}
    assert acq(("AMY01-BOS-0001", "baseline")) == {"T1w": "ok", "FLAIR": "ok", "SWI": "ok"}
    assert acq(("AMY01-BOS-0001", "m12")) == {"T1w": "failed_adherence", "FLAIR": "missing", "SWI": "missing"}
    assert acq(("AMY01-LYN-0001", "m12")) == {"T1w": "ok", "FLAIR": "failed_qc", "SWI": "missing"}
    assert "RepetitionTime" in rows[("AMY01-BOS-0001", "m12")].acquisitions[0].detail
    assert rows[("AMY01-LYN-0001", "m12")].incomplete and not rows[("AMY01-LYN-0001", "baseline")].incomplete


def test_past_date_ignores_later_exams_and_window_edges():
    t = trial()
    # the day the BOS-0002 m12 window closes it is still open; the day after it is overdue
    on_close = _table(expected_vs_received(t, study_data(), date(2027, 4, 7)))
    after = _table(expected_vs_received(t, study_data(), date(2027, 4, 8)))
    assert on_close[("AMY01-BOS-0002", "m12")].status == "window_open"
    assert after[("AMY01-BOS-0002", "m12")].status == "overdue"
    # before BOS-0001's late m12 exam existed it was simply overdue
    before = _table(expected_vs_received(t, study_data(), date(2027, 4, 14)))
    assert before[("AMY01-BOS-0001", "m12")].status == "overdue"
    assert before[("AMY01-BOS-0001", "m12")].acquisitions == []


def test_summary_counts():
    s = summarize(expected_vs_received(trial(), study_data(), AS_OF))
    assert s["BOS"]["overdue"] == 1 and s["BOS"]["received_out_of_window"] == 1 and s["BOS"]["incomplete"] == 1
    assert s["LYN"]["received_in_window"] == 3 and s["LYN"]["incomplete"] == 1
    assert s["TOK"]["window_open"] == 1


def test_enrollment_csv(tmp_path):
    p = tmp_path / "enrol.csv"
    p.write_text("subject_id,site,enrolled_on,arm\nAMY01-TOK-0001,TOK,2027-04-20,drug_x\nAMY01-TOK-0002,TOK,2027-04-22,\n")
    enr = read_enrollment_csv(p)
    assert enr["AMY01-TOK-0001"].enrolled_on == date(2027, 4, 20) and enr["AMY01-TOK-0001"].arm == "drug_x"
    assert enr["AMY01-TOK-0002"].arm is None
    bad = tmp_path / "bad.csv"
    bad.write_text("subject_id,site,enrolled_on\nX,TOK,not-a-date\n")
    try:
        read_enrollment_csv(bad)
    except OpsError as exc:
        assert "bad.csv:2" in str(exc) and exc.code == "E842"
    else:
        raise AssertionError("a bad date must be rejected with its line")
