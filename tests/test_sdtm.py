"""`imtrial export sdtm`: RECIST 1.1 TU/TR/RS tables from a workdir, against responses worked out by hand."""
from __future__ import annotations

import csv
import functools
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from imtrial_dsl.compiler import compile_file
from imtrial_dsl.exporters import sdtm
from imtrial_dsl.store import Store
from imtrial_dsl.workdir import IDENTITY, Workdir, analysis_dir

ROOT = Path(__file__).resolve().parent.parent
ONC = ROOT / "examples" / "oncology_ct.imtrial"

# Three participants of ONC02, measured by the `recist` analysis. Diameters in mm.
#   A: targets T01 (liver) 30 + T02 (lung) 20 = 50 at baseline, one non-target.
#      w06: 21 + 14 = 35 = 0.70 x 50  -> PR (30 % decrease, the boundary counts)
#      w12: 18 + 10 = 28               -> PR (nadir becomes 28)
#      w18: 22 + 12 = 34: +6 mm and +21 % over the nadir 28 -> PD
#   B: target T01 40 at baseline, one non-target; w06: T01 gone, non-target absent -> CR;
#      w12: still gone but a new lesion -> PD
#   C: sums only (no lesion list): 20 at baseline; w06 10 -> PR; w12 14: +4 mm over the nadir 10
#      (+40 %, but under 5 mm) -> not PD; 14 = 0.7 x 20 -> PR
EXAMS = {
    ("ONC02-HOU-0001", "baseline"): (50, 0, [("T01", "target", 30, "LIVER"), ("T02", "target", 20, "LUNG"),
                                           ("NT01", "non_target", "present", "LIVER")]),
    ("ONC02-HOU-0001", "w06"): (35, 0, [("T01", "target", 21, "LIVER"), ("T02", "target", 14, "LUNG"),
                                      ("NT01", "non_target", "present", "LIVER")]),
    ("ONC02-HOU-0001", "w12"): (28, 0, [("T01", "target", 18, "LIVER"), ("T02", "target", 10, "LUNG"),
                                      ("NT01", "non_target", "present", "LIVER")]),
    ("ONC02-HOU-0001", "w18"): (34, 0, [("T01", "target", 22, "LIVER"), ("T02", "target", 12, "LUNG"),
                                      ("NT01", "non_target", "present", "LIVER")]),
    ("ONC02-MIL-0002", "baseline"): (40, 0, [("T01", "target", 40, "LUNG"), ("NT01", "non_target", "present", "LYMPH NODE")]),
    ("ONC02-MIL-0002", "w06"): (0, 0, [("T01", "target", 0, "LUNG"), ("NT01", "non_target", "absent", "LYMPH NODE")]),
    ("ONC02-MIL-0002", "w12"): (0, 1, [("T01", "target", 0, "LUNG"), ("NT01", "non_target", "absent", "LYMPH NODE"),
                                     ("NEW01", "new", 12, "LIVER")]),
    ("ONC02-OSA-0003", "baseline"): (20, 0, None),
    ("ONC02-OSA-0003", "w06"): (10, 0, None),
    ("ONC02-OSA-0003", "w12"): (14, 0, None),
}
HAND = {  # (subject, visit): (target response, non-target response, new lesion, overall response)
    ("ONC02-HOU-0001", "w06"): ("PR", "NON-CR/NON-PD", "N", "PR"),
    ("ONC02-HOU-0001", "w12"): ("PR", "NON-CR/NON-PD", "N", "PR"),
    ("ONC02-HOU-0001", "w18"): ("PD", "NON-CR/NON-PD", "N", "PD"),
    ("ONC02-MIL-0002", "w06"): ("CR", "CR", "N", "CR"),
    ("ONC02-MIL-0002", "w12"): ("CR", "CR", "Y", "PD"),
    ("ONC02-OSA-0003", "w06"): ("PR", None, "N", "PR"),
    ("ONC02-OSA-0003", "w12"): ("PR", None, "N", "PR"),
}
VISITNUM = {"screening": 1, "baseline": 2, "w06": 3, "w12": 4, "w18": 5}


@functools.lru_cache(maxsize=None)
def _trial():
    return compile_file(ONC).trial


def make_workdir(root: Path) -> Path:
    """A workdir as `imtrial run` leaves it: the measurements table and each exam's analysis output."""
    w = Workdir(root).create()
    rows = []
    for i, ((subject, visit), (total, new, lesions)) in enumerate(sorted(EXAMS.items())):
        key = f"exam{i:02d}"
        ex = w.exam(key)
        ex.path(IDENTITY).parent.mkdir(parents=True, exist_ok=True)
        ex.path(IDENTITY).write_text(json.dumps({"subject_id": subject, "visit": visit}))
        adir = ex.path(analysis_dir("recist"))
        (adir / "outputs").mkdir(parents=True)
        out = {"sum_diameters": {"value": total, "unit": "mm"}, "new_lesions": {"value": new, "unit": "count"}}
        if lesions is not None:
            out["lesions"] = [{"id": lid, "role": role, "location": loc,
                               **({"state": v} if role == "non_target" else {"diameter": v})} for lid, role, v, loc in lesions]
        (adir / "outputs" / "read").write_text(json.dumps(out))
        (adir / "result.json").write_text(json.dumps({"analysis": "recist", "status": "done", "outputs": {"read": "outputs/read"}}))
        for m, v, u in (("sum_diameters", total, "mm"), ("new_lesions", new, "count")):
            rows.append({"exam_key": key, "subject": subject, "visit": visit, "site": subject.split("-")[1],
                         "protocol": "CT_CAP+CT_CHEST_LUNG", "analysis": "recist", "measurement": m, "value": float(v),
                         "unit": u, "series_uid": ""})
    with Store(root) as st:
        st.replace_measurements(rows)
    return root


def _read(path: Path) -> list[dict]:
    return list(csv.DictReader(io.StringIO(path.read_text())))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    base = tmp_path_factory.mktemp("sdtm")
    w = make_workdir(base / "w")
    paths = sdtm.export(_trial(), None, base / "out", workdir=w)
    return {p.name: _read(p) for p in paths}, paths


def test_rs_overall_response_matches_recist_worked_by_hand(exported):
    tables, _ = exported
    rs = tables["ONC02_rs.csv"]
    got: dict = {}
    for r in rs:
        got.setdefault((r["USUBJID"], r["VISIT"]), {})[r["RSTESTCD"]] = r["RSORRES"]
        assert (r["STUDYID"], r["DOMAIN"], r["RSCAT"]) == ("ONC02", "RS", "RECIST 1.1")
        assert r["RSSTRESC"] == r["RSORRES"] and r["VISITNUM"] == str(VISITNUM[r["VISIT"]])
    assert set(got) == set(HAND)                     # no response at baseline
    for key, (t, nt, new, overall) in HAND.items():
        want = {"TRGRESP": t, "NEWLIND": new, "OVRLRESP": overall} | ({"NTRGRESP": nt} if nt else {})
        assert got[key] == want, key
    assert {r["RSTEST"] for r in rs if r["RSTESTCD"] == "OVRLRESP"} == {"Overall Response"}


def test_tr_sums_and_lesion_diameters(exported):
    tables, _ = exported
    tr = tables["ONC02_tr.csv"]
    sums = {(r["USUBJID"], r["VISIT"]): float(r["TRSTRESN"]) for r in tr if r["TRTESTCD"] == "SUMDIAM"}
    assert sums == {k: float(v[0]) for k, v in EXAMS.items()}
    # each sum is the sum of that time point's target diameters
    for (subject, visit), (total, _, lesions) in EXAMS.items():
        ld = [float(r["TRSTRESN"]) for r in tr if (r["USUBJID"], r["VISIT"], r["TRTESTCD"], r["TRGRPID"]) ==
              (subject, visit, "LDIAM", "TARGET")]
        assert sum(ld) == (total if lesions else 0)
    t1 = [r for r in tr if r["USUBJID"] == "ONC02-HOU-0001" and r["TRLNKID"] == "T01"]
    assert [(r["VISIT"], r["TRORRES"], r["TRORRESU"], r["TRTEST"]) for r in t1] == [
        ("baseline", "30", "mm", "Longest Diameter"), ("w06", "21", "mm", "Longest Diameter"),
        ("w12", "18", "mm", "Longest Diameter"), ("w18", "22", "mm", "Longest Diameter")]
    nt = [(r["VISIT"], r["TRTESTCD"], r["TRORRES"]) for r in tr if r["USUBJID"] == "ONC02-MIL-0002" and r["TRLNKID"] == "NT01"]
    assert nt == [("baseline", "TUMSTATE", "PRESENT"), ("w06", "TUMSTATE", "ABSENT"), ("w12", "TUMSTATE", "ABSENT")]
    new = [r for r in tr if r["TRLNKID"] == "NEW01"]
    assert [(r["USUBJID"], r["VISIT"], r["TRGRPID"], r["TRSTRESN"]) for r in new] == [("ONC02-MIL-0002", "w12", "NEW", "12")]
    seqs = [int(r["TRSEQ"]) for r in tr if r["USUBJID"] == "ONC02-HOU-0001"]
    assert seqs == list(range(1, len(seqs) + 1))
    assert all(r["TRDTC"] == "" for r in tr)          # no real date leaves the site


def test_tu_identifies_each_lesion_once_where_it_was_first_seen(exported):
    tables, _ = exported
    tu = [(r["USUBJID"], r["TULNKID"], r["TUORRES"], r["TULOC"], r["VISIT"], r["TUMETHOD"], r["TUTESTCD"])
          for r in tables["ONC02_tu.csv"]]
    assert tu == [
        ("ONC02-HOU-0001", "T01", "TARGET", "LIVER", "baseline", "CT SCAN", "TUMIDENT"),
        ("ONC02-HOU-0001", "T02", "TARGET", "LUNG", "baseline", "CT SCAN", "TUMIDENT"),
        ("ONC02-HOU-0001", "NT01", "NON-TARGET", "LIVER", "baseline", "CT SCAN", "TUMIDENT"),
        ("ONC02-MIL-0002", "T01", "TARGET", "LUNG", "baseline", "CT SCAN", "TUMIDENT"),
        ("ONC02-MIL-0002", "NT01", "NON-TARGET", "LYMPH NODE", "baseline", "CT SCAN", "TUMIDENT"),
        ("ONC02-MIL-0002", "NEW01", "NEW", "LIVER", "w12", "CT SCAN", "TUMIDENT"),
    ]


def test_values_are_cdisc_ct_submission_values(exported):
    """TUORRES (C123650), RSORRES (C96785), the methods (C85492), locations (C74456) and units (C71620), checked
    against the CT release the usdm package ships."""
    import usdm_excel
    import yaml

    doc = yaml.load((Path(usdm_excel.__file__).parent / "data" / "cdisc_ct_2024-09-27.yaml").read_text(), Loader=yaml.CSafeLoader)
    ct = {cl: {t["submissionValue"] for t in v["terms"]} for cl, v in doc.items()}
    tables, _ = exported
    assert {r["TUORRES"] for r in tables["ONC02_tu.csv"]} <= ct["C123650"]
    assert set(sdtm.TU_RESULT.values()) <= ct["C123650"]
    assert {r["RSORRES"] for r in tables["ONC02_rs.csv"] if r["RSTESTCD"] != "NEWLIND"} <= ct["C96785"]
    assert {"CR", "PR", "SD", "PD", "NE", "NON-CR/NON-PD"} <= ct["C96785"]
    assert set(sdtm.METHOD.values()) <= ct["C85492"]
    assert {r["TULOC"] for r in tables["ONC02_tu.csv"]} <= ct["C74456"]
    assert {r["TRORRESU"] for r in tables["ONC02_tr.csv"] if r["TRORRESU"]} <= ct["C71620"]


def test_recist_rules_at_their_boundaries():
    L = sdtm.Lesion
    # PD needs both +20 % and +5 mm over the nadir
    assert sdtm.target_response(12.0, 15.0, 10.0, []) == "SD"      # +20 %, +2 mm; 80 % of baseline
    assert sdtm.target_response(15.0, 20.0, 10.0, []) == "PD"      # +50 %, +5 mm
    assert sdtm.target_response(14.1, 50.0, 10.0, []) == "PR"      # +41 %, +4.1 mm; 28 % of baseline
    # PR: at least 30 % below the baseline sum
    assert sdtm.target_response(35.0, 50.0, 50.0, []) == "PR"
    assert sdtm.target_response(35.5, 50.0, 50.0, []) == "SD"
    # CR: non-nodal targets gone, nodal targets under 10 mm short axis (the sum need not be 0)
    assert sdtm.target_response(9.0, 40.0, 40.0, [L("T01", "target", 0.0), L("T02", "target", 9.0, nodal=True)]) == "CR"
    assert sdtm.target_response(10.0, 40.0, 40.0, [L("T01", "target", 0.0), L("T02", "target", 10.0, nodal=True)]) == "PR"
    assert sdtm.target_response(None, 40.0, 40.0, []) == "NE"
    assert sdtm.target_response(20.0, 40.0, 40.0, [L("T01", "target", None)]) == "NE"
    # RECIST 1.1 table 1
    assert sdtm.overall_response("CR", "NON-CR/NON-PD", False) == "PR"
    assert sdtm.overall_response("CR", "NE", False) == "PR"
    assert sdtm.overall_response("SD", "NON-CR/NON-PD", False) == "SD"
    assert sdtm.overall_response("NE", "NON-CR/NON-PD", False) == "NE"
    assert sdtm.overall_response("PR", "PD", False) == "PD"
    assert sdtm.overall_response("SD", "", True) == "PD"
    assert sdtm.non_target_response([L("N", "non_target", None, state="unequivocal_progression")]) == "PD"


def test_cli_and_its_errors(tmp_path):
    w = make_workdir(tmp_path / "w")
    exe = [sys.executable, "-m", "imtrial_dsl"]
    p = subprocess.run(exe + ["export", "sdtm", str(ONC), "-o", str(tmp_path / "out"), "--workdir", str(w)],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert [Path(x).name for x in p.stdout.split()] == ["ONC02_tu.csv", "ONC02_tr.csv", "ONC02_rs.csv"]
    p = subprocess.run(exe + ["export", "sdtm", str(ONC), "-o", str(tmp_path / "o2")], capture_output=True, text=True)
    assert p.returncode == 1 and "E630" in p.stderr and "--workdir" in p.stderr
    p = subprocess.run(exe + ["export", "sdtm", str(ONC), "-o", str(tmp_path / "o3"), "--workdir", str(tmp_path)],
                       capture_output=True, text=True)
    assert p.returncode == 1 and "E630" in p.stderr and "state.sqlite" in p.stderr
    p = subprocess.run(exe + ["export", "sdtm", str(ONC), "-o", str(tmp_path / "o4"), "--workdir", str(w), "--analysis", "nope"],
                       capture_output=True, text=True)
    assert p.returncode == 1 and "E630" in p.stderr and "recist" in p.stderr
    p = subprocess.run(exe + ["export", "usdm", str(ONC), "-o", str(tmp_path / "o5"), "--workdir", str(w)],
                       capture_output=True, text=True)
    assert p.returncode == 2 and "--workdir is not an option of 'export usdm'" in p.stderr
    amy = ROOT / "examples" / "amyloid_mri.imtrial"        # no sum_diameters anywhere
    p = subprocess.run(exe + ["export", "sdtm", str(amy), "-o", str(tmp_path / "o6"), "--workdir", str(w)],
                       capture_output=True, text=True)
    assert p.returncode == 1 and "E630" in p.stderr and "sum_diameters" in p.stderr


def test_recist_tool_follows_the_baseline_lesions():
    """The demo read's follow-up: each baseline lesion is the nearest within TRACK_MM, others are new."""
    from imtrial_dsl.tools.recist import track

    base = [{"id": "T01", "role": "target", "centroid": [0, 0, 0], "location": ""},
            {"id": "T02", "role": "target", "centroid": [60, 0, 0], "location": "LUNG"},
            {"id": "NT01", "role": "non_target", "centroid": [0, 80, 0], "location": ""}]
    now = [{"diameter": 25.0, "centroid": [3, 4, 0], "location": ""},          # 5 mm from T01
           {"diameter": 14.0, "centroid": [0, 0, 40], "location": ""}]         # near nothing: new
    got = {r["id"]: r for r in track(now, base)}
    assert got["T01"]["diameter"] == 25.0 and got["T02"]["diameter"] == 0.0 and got["NT01"]["state"] == "absent"
    assert got["NEW01"]["role"] == "new" and got["NEW01"]["diameter"] == 14.0
    assert [l.id for l in sdtm.parse_lesions({"lesions": track(now, base)})] == ["T01", "T02", "NT01", "NEW01"]


def test_the_python_example_of_the_docs_runs(monkeypatch):
    import re

    monkeypatch.chdir(ROOT)
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "sdtm.md").read_text(), flags=re.S)
    assert blocks
    for b in blocks:
        exec(compile(b, "docs/sdtm.md", "exec"), {})
