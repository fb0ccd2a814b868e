"""Management reports: figures per site/device/exam and access control by role, checked in every output file."""
import csv
import json
import os
import re
from xml.etree import ElementTree

import pytest

from imtrial_dsl import ir
from imtrial_dsl.ops import reports
from imtrial_dsl.ops.model import OpsError
from ops_data.data import AS_OF, study_data
from ops_data.trial import KEY, KEY_ENV, trial

os.environ.setdefault(KEY_ENV, KEY)

SUBJECTS = {"BOS": ["AMY01-BOS-0001", "AMY01-BOS-0002"], "LYN": ["AMY01-LYN-0001", "AMY01-LYN-0002"],
            "TOK": ["AMY01-TOK-0001"]}


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    root = tmp_path_factory.mktemp("reports")
    files = reports.generate(trial(), study_data(), root / "out", AS_OF, workdir=root / "w")
    # by default the audiences of the study's report declaration; any other role on request
    assert set(files) == {"central", "site (BOS)", "site (LYN)", "site (TOK)"}
    for role in ("reader", "sponsor"):
        files |= reports.generate(trial(), study_data(), root / "out", AS_OF, role=role, workdir=root / "w")
    return root / "out", files


def _all_text(folder):
    return {p.name: p.read_text(encoding="utf-8") for p in folder.iterdir() if p.is_file()}


def test_one_report_per_audience(out):
    root, files = out
    assert set(files) == {"central", "site (BOS)", "site (LYN)", "site (TOK)", "reader", "sponsor"}
    for label, paths in files.items():
        assert sorted(p.name for p in paths) == ["devices.csv", "exams.csv", "qualification.csv", "report.html",
                                                 "report.json", "sites.csv", "visits.csv"]
    assert (root / "site" / "BOS" / "report.html").is_file()


def test_central_site_figures(out):
    root, _ = out
    rows = {r["site"]: r for r in csv.DictReader(open(root / "central" / "sites.csv"))}
    bos, lyn, tok = rows["BOS"], rows["LYN"], rows["TOK"]
    assert (bos["subjects_enrolled"], bos["exams_received"], bos["overdue_visits"], bos["visits_out_of_window"]) == ("2", "3", "1", "1")
    # BOS: 7 series with adherence verdicts, 1 fail -> 6/7; QC verdicts on 5 series, all pass
    assert float(bos["adherence_pass_rate"]) == round(6 / 7, 4) and float(bos["qc_pass_rate"]) == 1.0
    # LYN: QC verdicts on 2+2+2 series, FLAIR of m12 fails -> 5/6
    assert float(lyn["qc_pass_rate"]) == round(5 / 6, 4)
    assert (tok["subjects_enrolled"], tok["exams_received"], tok["adherence_pass_rate"]) == ("1", "0", "")
    assert "BOS_MR1 T1w: not_assessed" in bos["device_qualification"]


def test_per_exam_pipeline_and_analyses(out):
    root, _ = out
    # outside the site an exam is named by a keyed code, not by the site's exam key
    code = {reports.exam_code(trial(), k, KEY.encode()): k for k in (e.exam_key for e in study_data().exams)}
    rows = {code[r["exam_key"]]: r for r in csv.DictReader(open(root / "central" / "exams.csv"))}
    assert rows["bos1base"]["analyses_done"] == "hipvol" and rows["bos1base"]["analyses_remaining"] == ""
    assert rows["bos1m12"]["analyses_done"] == "" and rows["bos1m12"]["analyses_remaining"] == "hipvol"
    assert rows["bos1m12"]["window"] == "received_out_of_window" and rows["bos1m12"]["adherence_fail"] == "1"
    assert rows["lyn2base"]["step_identify"] == "done" and rows["lyn2base"]["step_deidentify"] == "pending"
    assert rows["bos1base"]["arm"] == "placebo"  # central is not blinded
    # no qualification decision recorded in this workdir: qualification protocols are flagged per exam
    assert rows["bos1base"]["device_unqualified"] == "FLAIR: not_assessed; T1w: not_assessed"
    assert rows["bos1m12"]["device_unqualified"] == "T1w: not_assessed"


def test_upgrade_is_reported(out):
    root, _ = out
    m = json.loads((root / "central" / "report.json").read_text())
    (u,) = m["upgrades"]
    assert u["device"] == "BOS_MR1" and u["software"] == ["syngo MR XA31"]
    assert {c["protocol"]: c["covered"] for c in u["coverage"]} == {"T1w": False, "FLAIR": True, "SWI": True}
    dev = {d["device"]: d for d in m["devices"]}
    assert dev["BOS_MR1"]["upgrade_detected"] and not dev["LYN_MR1"]["upgrade_detected"]


def test_site_report_has_no_other_site_subject_in_any_file(out):
    root, _ = out
    for site, mine in SUBJECTS.items():
        texts = _all_text(root / "site" / site)
        others = [s for k, v in SUBJECTS.items() if k != site for s in v]
        for name, text in texts.items():
            for sid in others:
                assert sid not in text, f"{sid} leaked into site {site} {name}"
            for other_site in set(SUBJECTS) - {site}:
                assert not re.search(rf"\b{other_site}\b", text), f"site {other_site} appears in {site}/{name}"
        if site != "TOK":
            assert any(mine[0] in t for t in texts.values())
        # the site role is not blinded in this trial, but the arm is still its own subjects' only
        rows = list(csv.DictReader(open(root / "site" / site / "visits.csv")))
        assert {r["site"] for r in rows} == {site}


def test_blinded_roles_see_no_arm_and_reader_no_site(out):
    root, _ = out
    for role in ("reader", "sponsor"):
        for name, text in _all_text(root / role).items():
            assert "placebo" not in text and "drug_x" not in text, f"arm leaked into {role}/{name}"
        for table in ("exams", "visits"):
            assert "arm" not in next(csv.reader(open(root / role / f"{table}.csv")))
        m = json.loads((root / role / "report.json").read_text())
        assert not any("arm" in r for t in ("exams", "visits", "overdue") for r in m[t])
    for name, text in _all_text(root / "reader").items():
        for sids in SUBJECTS.values():
            for sid in sids:
                assert sid not in text, f"{sid} (embeds its site) leaked into reader/{name}"
        for code in SUBJECTS:
            assert not re.search(rf"\b{code}\b", text), f"site {code} in reader/{name}"
        for dev in ("BOS_MR1", "LYN_MR1", "TOK_MR1", "166012", "GEP0042"):
            assert dev not in text
    reader_rows = list(csv.DictReader(open(root / "reader" / "visits.csv")))
    assert len(reader_rows) == 15 and all(r["subject_id"].startswith("R-") for r in reader_rows)
    sponsor_rows = list(csv.DictReader(open(root / "sponsor" / "exams.csv")))
    assert {r["site"] for r in sponsor_rows} == {"BOS", "LYN"}  # sponsor hides only the arm


def test_html_is_well_formed_with_inline_svg(out):
    root, _ = out
    html = (root / "central" / "report.html").read_text()
    svgs = re.findall(r"<svg .*?</svg>", html, flags=re.S)
    assert len(svgs) == 3  # enrolment over time, by site, by device
    for s in svgs:
        ElementTree.fromstring(s)  # each chart is well-formed XML
    assert "Subjects enrolled over time per site" in html and "by device" in html
    site_html = (root / "site" / "BOS" / "report.html").read_text()
    assert "Adherence and QC pass rate by site" in site_html


def test_reports_are_deterministic(tmp_path):
    a = reports.generate(trial(), study_data(), tmp_path / "a", AS_OF, role="central", workdir=tmp_path / "w")
    b = reports.generate(trial(), study_data(), tmp_path / "b", AS_OF, role="central", workdir=tmp_path / "w")
    for pa, pb in zip(a["central"], b["central"]):
        assert pa.read_bytes() == pb.read_bytes()


def test_unknown_role_or_site_is_an_error(tmp_path):
    with pytest.raises(OpsError, match="unknown role 'nurse'"):
        reports.generate(trial(), study_data(), tmp_path, AS_OF, role="nurse")
    with pytest.raises(OpsError, match="unknown site 'XXX'"):
        reports.generate(trial(), study_data(), tmp_path, AS_OF, site="XXX")


def test_hiding_exam_dates_removes_every_date(tmp_path):
    """Reports built from a site-side workdir hold real dates; a role can hide them everywhere."""
    t = trial()
    t.roles.append(ir.Role(name="monitor", kind="monitor", hide=["exam_date"]))
    files = reports.generate(t, study_data(), tmp_path, AS_OF, role="monitor", workdir=tmp_path / "w")
    dates = {e.exam_date.isoformat() for e in study_data().exams} | {"2027-04-20", "2026-03-01"}
    for p in files["monitor"]:
        text = p.read_text()
        assert not any(d in text for d in dates), p.name
    visits = {(r["subject_id"], r["visit"]): r for r in csv.DictReader(open(tmp_path / "monitor" / "visits.csv"))}
    assert "opens" not in visits[("AMY01-BOS-0001", "m12")]
    assert visits[("AMY01-BOS-0001", "m12")]["days_from_target"] == "45"   # intervals stay visible
