"""Adherence: constraint semantics (data-driven), variants, exam-level device rules, and a synthetic
corpus whose injected deviations must all be reported (and a conformant one that reports none)."""
from __future__ import annotations

import copy
import datetime as dt
import json
import shutil
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

from imtrial_dsl.loader import load
from imtrial_dsl import synth
from imtrial_dsl.runner import adherence, classify, dicomio
from imtrial_dsl.runner.invoke import find_node, run_staged

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "adherence_data"
EXAMPLE = ROOT / "examples" / "amyloid_mri.imtrial"


def _load(path):
    trial, diags, _ = load(path)
    assert not [d for d in diags if d.severity.value == "error"], diags
    return trial


@pytest.fixture(scope="module")
def cons_trial():
    return _load(DATA / "constraints.imtrial")


@pytest.fixture(scope="module")
def amy():
    return _load(EXAMPLE)


@pytest.fixture(scope="module")
def deviant(amy, tmp_path_factory):
    out = tmp_path_factory.mktemp("deviant")
    m = synth.synthesize(amy, out, subjects_per_site=2, seed=7, small=True, deviations=list(synth.DEVIATIONS),
                         enhanced=["FLAIR"])
    return out, m


@pytest.fixture(scope="module")
def conformant(amy, tmp_path_factory):
    out = tmp_path_factory.mktemp("conformant")
    m = synth.synthesize(amy, out, subjects_per_site=1, seed=3, small=True, enhanced=["SWI"])
    return out, m


def _header(values: dict) -> Dataset:
    ds = Dataset()
    ds.Modality = "MR"
    ds.SeriesDescription = "P"
    ds.Manufacturer = "SIEMENS"
    ds.ManufacturerModelName = "MAGNETOM Prisma"
    ds.SoftwareVersions = "syngo MR XA30"
    for k, v in values.items():
        setattr(ds, k, v)
    return ds


CASES = json.loads((DATA / "constraint_cases.json").read_text())


def test_base_header_passes(cons_trial):
    res = adherence.check_series(cons_trial.protocol("P"), [_header(CASES["base"])])
    assert res["verdict"] == CASES["base_verdict"], [r for r in res["parameters"] if not r["ok"]]
    assert len(res["parameters"]) == len(cons_trial.protocol("P").constraints)


@pytest.mark.parametrize("case", CASES["cases"], ids=[json.dumps(c.get("set") or c.get("unset")) for c in CASES["cases"]])
def test_constraint_semantics(cons_trial, case):
    values = copy.deepcopy(CASES["base"])
    values.update(case.get("set", {}))
    for k in case.get("unset", []):
        values.pop(k)
    res = adherence.check_series(cons_trial.protocol("P"), [_header(values)])
    rows = {r["parameter"]: r for r in res["parameters"]}
    for param, ok in case["expect"].items():
        assert rows[param]["ok"] is ok, (case, rows[param])
        assert rows[param]["expected"]
    others = [r["parameter"] for r in res["parameters"] if not r["ok"] and r["parameter"] not in case["expect"]]
    assert others == []
    if "verdict" in case:
        assert res["verdict"] == case["verdict"]


def test_expected_text_is_human(cons_trial):
    rows = {c.keyword: adherence.expected_text(c) for c in cons_trial.protocol("P").constraints}
    assert rows["RepetitionTime"] == "= 2.3 s ± 1%"
    assert rows["EchoTime"] == "in 2 .. 3.5 ms"
    assert rows["InversionTime"].endswith("(exclusive)")
    assert rows["FlipAngle"] == "= 9 deg ± 1 deg"
    assert rows["ScanningSequence"] == 'in {"GR", "IR", "GR\\IR"}'


def test_variant_selection_by_vendor_and_software(amy):
    t1 = amy.protocol("T1w")
    ge = _header({"RepetitionTime": 7.3, "EchoTime": 3.0, "InversionTime": 450, "FlipAngle": 8})
    ge.Manufacturer, ge.SoftwareVersions = "GE MEDICAL SYSTEMS", ["MR30.1_R01_2133.a", "LX"]
    res = adherence.check_series(t1, [ge])
    assert res["variant"]["vendor"] == "GE"
    rows = {r["parameter"]: r for r in res["parameters"]}
    assert rows["RepetitionTime"]["ok"] and rows["RepetitionTime"]["expected"] == "= 7.3 ms ± 10%"
    # Siemens XA30 gets the SequenceName rule of its release-specific variant; another release does not
    sie = _header({"SequenceName": "*tfl3d1_16ns"})
    assert adherence.check_series(t1, [sie])["variant"]["software"] == "XA30"
    sie.SoftwareVersions = "syngo MR XA50"
    res = adherence.check_series(t1, [sie])
    assert res["variant"] is None and "SequenceName" not in {r["keyword"] for r in res["parameters"]}
    # Philips: InversionTime removed by the variant
    ph = _header({})
    ph.Manufacturer, ph.SoftwareVersions = "Philips Medical Systems", ["R5.7.1", "R5.7.1.2"]
    res = adherence.check_series(t1, [ph])
    assert res["variant"]["software"] == "R5.*"
    assert "InversionTime" not in {r["keyword"] for r in res["parameters"]}


def test_device_matching_order(amy):
    base = {"manufacturer": "SIEMENS", "model": "MAGNETOM Prisma", "software": ["syngo MR XA30"]}
    assert adherence.match_device(amy, {**base, "serial": "166012"})["matched_by"] == "serial"
    assert adherence.match_device(amy, {**base, "serial": "", "station": "BOSMR1"})["matched_by"] == "station"
    assert adherence.match_device(amy, {**base, "serial": "", "station": ""})["matched_by"] == "model"
    assert adherence.match_device(amy, {**base, "serial": "999", "station": ""}) is None
    hit, findings = adherence.device_findings(amy, {**base, "serial": "999", "station": "X"})
    assert hit is None and [f["code"] for f in findings] == ["unknown_device"]


def test_software_upgrade_coverage(amy):
    # Philips R5.7 -> R5.9 is still covered by the 'R5.*' variant; Siemens XA30 -> XA50 is not
    hit, f = adherence.device_findings(amy, {"manufacturer": "Philips Medical Systems", "model": "Ingenia Elition X",
                                             "serial": "PH77001", "software": ["R5.9.0"]})
    up = next(x for x in f if x["code"] == "software_upgrade")
    assert {c["protocol"]: c["covered"] for c in up["coverage"]}["T1w"] is True
    hit, f = adherence.device_findings(amy, {"manufacturer": "SIEMENS", "model": "MAGNETOM Prisma",
                                             "serial": "166012", "software": ["syngo MR XA50"]})
    up = next(x for x in f if x["code"] == "software_upgrade")
    cov = {c["protocol"]: c["covered"] for c in up["coverage"]}
    assert cov["T1w"] is False and cov["SWI"] is None
    assert "no variant covers" in up["message"] and up["requalify"] is True
    hit, f = adherence.device_findings(amy, {"manufacturer": "SIEMENS", "model": "MAGNETOM Prisma",
                                             "serial": "166012", "software": ["syngo MR XA30"]})
    assert f == []


def test_same_device_rule(amy):
    assert adherence.same_device_finding(amy, "BOS_MR1", {}, ["MR"]) is None
    assert adherence.same_device_finding(amy, "BOS_MR1", {"MR": ["BOS_MR1"]}, ["MR"]) is None
    f = adherence.same_device_finding(amy, "LYN_MR1", {"MR": ["BOS_MR1"]}, ["MR"])
    assert f["code"] == "same_device" and f["severity"] == "error"


def _exam_results(trial, root: Path, exam: dict, prior: list[str]):
    d = root / exam["dir"]
    cls = classify.classify_folder(trial, d, expected=classify.expected_protocols(trial, exam["visit"]))
    adh = adherence.check_exam(trial, cls, adherence.headers_for(cls, d), prior_devices={"MR": prior}, modalities=["MR"])
    return cls, adh


def _prior_devices(manifest: dict) -> dict[tuple[str, str], list[str]]:
    """Device ids of each subject's earlier exams, as the runner passes them from state."""
    out, seen = {}, {}
    for e in sorted(manifest["exams"], key=lambda e: e["date"]):
        out[(e["patient_id"], e["visit"])] = list(seen.get(e["patient_id"], []))
        if e["device"]:
            seen.setdefault(e["patient_id"], []).append(e["device"])
    return out


def test_every_injected_deviation_is_reported(amy, deviant):
    from imtrial_dsl.runner import qc

    root, m = deviant
    kinds = {d["type"] for d in m["deviations"]}
    assert kinds == set(synth.DEVIATIONS)
    prior = _prior_devices(m)
    reported: dict[tuple[str, str], dict] = {}
    for e in m["exams"]:
        cls, adh = _exam_results(amy, root, e, prior[(e["patient_id"], e["visit"])])
        q = qc.qc_exam(amy, cls, root / e["dir"])
        reported[(e["patient_id"], e["visit"])] = {"cls": cls, "adh": adh, "qc": q}
    for dev in m["deviations"]:
        key = (dev["patient_id"], dev["visit"])
        if dev["type"] == "missing_visit":
            dates = [dt.date.fromisoformat(e["date"]) for e in m["exams"] if e["patient_id"] == dev["patient_id"]]
            vf = adherence.visit_findings(amy, dates, dt.date.fromisoformat(m["as_of"]))
            assert [f["visit"] for f in vf["findings"] if f["code"] == "missing_visit"] == [dev["visit"]]
            assert key not in reported
            continue
        r = reported[key]
        codes = [f["code"] for f in r["adh"]["findings"]]
        if dev["type"] == "param_off":
            s = next(s for s in r["adh"]["series"] if s["series_uid"] == dev["series_uid"])
            assert s["verdict"] == "fail"
            assert [p["parameter"] for p in s["parameters"] if not p["ok"]] == [dev["parameter"]]
        elif dev["type"] == "wrong_device":
            f = next(f for f in r["adh"]["findings"] if f["code"] == "same_device")
            assert f["device"] == dev["device_used"] and dev["home_device"] in f["prior_devices"]
        elif dev["type"] == "unknown_device":
            assert "unknown_device" in codes and r["adh"]["verdict"] == "fail"
        elif dev["type"] == "software_upgrade":
            f = next(f for f in r["adh"]["findings"] if f["code"] == "software_upgrade")
            assert f["device"] == dev["device"] and f["reported"] == dev["reported"]
        elif dev["type"] == "ghosting":
            s = next(s for s in r["qc"]["series"] if s["series_uid"] == dev["series_uid"])
            ghost = [c for c in s["checks"] if c["metric"] == "ghosting"]
            assert ghost and all(not c["ok"] for c in ghost)
        elif dev["type"] == "corrupt_file":
            probs = r["cls"]["problems"]
            assert [(p["reason"], p["file"]) for p in probs] == [("truncated", str(Path(dev["file"]).relative_to(Path(r_dir(m, key)))))]
    # and nothing else: every exam without an injected deviation passes adherence with no findings
    touched = {(d["patient_id"], d["visit"]) for d in m["deviations"]}
    for key, r in reported.items():
        if key in touched:
            continue
        assert r["adh"]["verdict"] == "pass" and r["adh"]["findings"] == [], key
        assert r["qc"]["verdict"] == "pass", (key, r["qc"])
        assert r["cls"]["summary"]["matched"] == r["cls"]["summary"]["series"] and not r["cls"]["problems"]


def r_dir(m: dict, key) -> str:
    return next(e["dir"] for e in m["exams"] if (e["patient_id"], e["visit"]) == key)


def test_conformant_corpus_reports_nothing(amy, conformant):
    from imtrial_dsl.runner import qc

    root, m = conformant
    assert m["deviations"] == [] and m["notes"] == []
    prior = _prior_devices(m)
    for e in m["exams"]:
        cls, adh = _exam_results(amy, root, e, prior[(e["patient_id"], e["visit"])])
        assert cls["summary"]["matched"] == cls["summary"]["series"] > 0
        assert cls["missing_protocols"] == [] and cls["problems"] == []
        assert adh["verdict"] == "pass" and adh["findings"] == [], adh
        assert all(p["ok"] for s in adh["series"] for p in s["parameters"])
        q = qc.qc_exam(amy, cls, root / e["dir"])
        assert q["verdict"] == "pass", q
    subjects = {e["patient_id"] for e in m["exams"]}
    for pid in subjects:
        dates = [dt.date.fromisoformat(e["date"]) for e in m["exams"] if e["patient_id"] == pid]
        vf = adherence.visit_findings(amy, dates, dt.date.fromisoformat(m["as_of"]))
        assert vf["findings"] == [] and all(v["status"] == "received" for v in vf["visits"])


def test_enhanced_mr_checked_through_functional_groups(amy, conformant, tmp_path):
    root, m = conformant
    e = m["exams"][1]
    swi = next(s for s in e["series"] if s["protocol"] == "SWI")
    assert swi["enhanced"] and len(swi["files"]) == 1
    src = root / swi["files"][0]
    ds = pydicom.dcmread(src)
    assert ds.SOPClassUID == pydicom.uid.EnhancedMRImageStorage
    assert "EchoTime" not in ds and "FlipAngle" not in ds  # only inside functional groups
    assert dicomio.get_param(ds, "EchoTime") == ds.PerFrameFunctionalGroupsSequence[0].MREchoSequence[0].EffectiveEchoTime
    ok = adherence.check_series(amy.protocol("SWI"), [ds])
    assert ok["verdict"] == "pass" and {r["keyword"] for r in ok["parameters"]} >= {"EchoTime", "FlipAngle"}
    # push the flip angle inside MRTimingAndRelatedParametersSequence out of range
    ds.SharedFunctionalGroupsSequence[0].MRTimingAndRelatedParametersSequence[0].FlipAngle = 35.0
    bad = adherence.check_series(amy.protocol("SWI"), [ds])
    rows = {r["parameter"]: r for r in bad["parameters"]}
    assert bad["verdict"] == "fail" and rows["FlipAngle"]["actual"] == 35.0 and not rows["FlipAngle"]["ok"]
    # per-frame values: a multi-echo object must have every echo in range
    ds2 = pydicom.dcmread(src)
    for i, item in enumerate(ds2.PerFrameFunctionalGroupsSequence):
        echo = Dataset()
        echo.EffectiveEchoTime = 10.0 if i == 0 else 25.0
        item.MREchoSequence = pydicom.sequence.Sequence([echo])
    assert dicomio.get_param_values(ds2, "EchoTime") == [10.0, 25.0]
    rows = {r["parameter"]: r for r in adherence.check_series(amy.protocol("SWI"), [ds2])["parameters"]}
    assert rows["EchoTime"]["ok"] is False and rows["EchoTime"]["actual"] == [10.0, 25.0]


def test_pydicom_test_files_check_without_error(cons_trial):
    for name in ["MR_small.dcm", "emri_small.dcm", "MR_small_bigendian.dcm", "MR-SIEMENS-DICOM-WithOverlays.dcm"]:
        ds = dicomio.read_header(get_testdata_file(name))
        res = adherence.check_series(cons_trial.protocol("P"), [ds])
        assert res["verdict"] in ("pass", "warn", "fail")
        assert len(res["parameters"]) == len(cons_trial.protocol("P").constraints)
    mr = dicomio.read_header(get_testdata_file("MR_small.dcm"))
    rows = {r["parameter"]: r for r in adherence.check_series(cons_trial.protocol("P"), [mr])["parameters"]}
    assert rows["RepetitionTime"]["actual"] == 4000.0 and not rows["RepetitionTime"]["ok"]
    assert rows["EchoTime"]["actual"] == 240.0
    emri = dicomio.read_header(get_testdata_file("emri_small.dcm"))
    rows = {r["parameter"]: r for r in adherence.check_series(cons_trial.protocol("P"), [emri])["parameters"]}
    assert rows["MagneticFieldStrength"]["ok"] and rows["SpacingBetweenSlices"]["actual"] == 1.2
    assert rows["ScanningSequence"]["actual"] == "GR"  # derived from EchoPulseSequence GRADIENT
    ct = dicomio.read_header(get_testdata_file("eCT_Supplemental.dcm"))
    rows = {r["parameter"]: r for r in adherence.check_series(cons_trial.protocol("CTH"), [ct])["parameters"]}
    assert rows["SliceThickness"]["actual"] == 10.0 and not rows["SliceThickness"]["ok"]  # from SharedFunctionalGroups


def test_steps_write_results(amy, conformant, tmp_path, monkeypatch):
    """The step functions through ``imtrial step``'s staged mode: inputs where they are, outputs under --out.
    Classification, adherence and QC read the original headers (the synthetic files stand for them)."""
    monkeypatch.setenv("IMTRIAL_KEY", "adherence-test-key-0123456789")
    root, m = conformant
    e = m["exams"][1]
    out = tmp_path / "exam1"
    ident = tmp_path / "identity.json"
    ident.write_text(json.dumps({"exam_key": "exam1", "subject_id": "S1", "visit": None, "modalities": ["MR"],
                                 "prior_devices": {"MR": ["LYN_MR1"]}}))
    staged = [("original/", root / e["dir"]), ("results/identity.json", ident)]
    run_staged(amy, find_node(amy, "classify"), staged, out)
    summary = run_staged(amy, find_node(amy, "adherence"), staged, out)
    res = out / "results"
    adh = json.loads((res / "adherence.json").read_text())
    assert adh["verdict"] == summary["verdict"]
    assert adh["device_match"]["device"] == e["device"]
    if e["device"] != "LYN_MR1":
        assert [f["code"] for f in adh["findings"]] == ["same_device"]
    run_staged(amy, find_node(amy, "qc", "t1_snr"), staged, out)
    q = json.loads((res / "qc" / "t1_snr.json").read_text())
    assert q["check"] == "t1_snr" and {c["check"] for s in q["series"] for c in s["checks"]} == {"t1_snr"}


def test_same_device_rule_compares_one_modality_at_a_time(amy):
    """A same-day MR and CT of one subject are no device change; a second MR scanner is."""
    amy = amy.model_copy(deep=True)
    amy.schedule.same_device = "required"
    assert adherence.same_device_finding(amy, "BOS_MR1", {"CT": ["BOS_CT1"]}, ["MR"]) is None
    assert adherence.same_device_finding(amy, "BOS_MR1", {"MR": ["BOS_MR1"], "CT": ["BOS_CT1"]}, ["MR", "CT"])["modalities"] == ["CT"]
    f = adherence.same_device_finding(amy, "BOS_MR2", {"MR": ["BOS_MR1"]}, ["MR"])
    assert f["code"] == "same_device" and f["severity"] == "error" and f["prior_devices"] == ["BOS_MR1"]


def test_fingerprinted_scan_gives_the_same_results(amy, deviant):
    """scan(keep_headers=False) keeps one header per distinct parameter set; results must not change."""
    root, m = deviant
    tags = adherence.study_tags(amy)
    for e in m["exams"]:
        folder = root / e["dir"]
        full = classify.classify_folder(amy, folder)
        lean_scan = classify.scan(folder, keep_headers=False, fingerprint_tags=tags)
        lean = classify.classify_scan(amy, lean_scan)
        assert lean == full
        kept = sum(i.header is not None for s in lean_scan.series.values() for i in s.instances)
        assert kept == len(lean_scan.series)  # synthetic series are uniform: one header each
        a = adherence.check_exam(amy, full, adherence.headers_for(full, folder))
        b = adherence.check_exam(amy, lean, lean_scan.series)
        for sa, sb in zip(a["series"], b["series"]):
            sb = {k: v for k, v in sb.items() if k != "distinct_parameter_sets"}
            sa = {k: v for k, v in sa.items() if k != "distinct_parameter_sets"}
            assert sa == sb
        assert a["verdict"] == b["verdict"] and a["findings"] == b["findings"]
