"""Pixel QC: each metric on synthetic series with a planted defect vs the clean series, real pydicom
files, and error values for unknown metrics/parameters."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from imtrial_dsl import ir
from imtrial_dsl.loader import load
from imtrial_dsl import synth
from imtrial_dsl.runner import classify, qc
from imtrial_dsl.synth import pixels

DATA = Path(__file__).resolve().parent / "adherence_data"
ROOT = Path(__file__).resolve().parent.parent


def _check(metric: str, param: str, value: float, unit: str = "", severity=ir.Significance.ERROR) -> ir.QcCheck:
    return ir.QcCheck(name=f"c_{metric}", metric=metric, severity=severity,
                      params={param: ir.Quantity(value=value, unit=unit)})


@pytest.fixture(scope="module")
def amy():
    t, _, _ = load(ROOT / "examples" / "amyloid_mri.imtrial")
    return t


@pytest.fixture(scope="module")
def mr_series(amy, tmp_path_factory):
    """One clean T1w series (classic) and one FLAIR series (Enhanced MR), small size."""
    out = tmp_path_factory.mktemp("qc_mr")
    m = synth.synthesize(amy, out, subjects_per_site=1, seed=21, small=True, visits=["baseline"], enhanced=["FLAIR"])
    e = m["exams"][0]
    t1 = next(s for s in e["series"] if s["protocol"] == "T1w")
    fl = next(s for s in e["series"] if s["protocol"] == "FLAIR")
    return out, [out / f for f in t1["files"]], [out / f for f in fl["files"]]


def _copy(files, dest: Path) -> list[Path]:
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for f in files:
        shutil.copy(f, dest / f.name)
        out.append(dest / f.name)
    return out


def test_clean_series_pass_every_metric(mr_series):
    _, t1, flair = mr_series
    checks = [_check("snr", "min", 12), _check("ghosting", "max", 0.1), _check("clipping", "max_fraction", 0.01),
              _check("dynamic_range", "min", 8), _check("slice_spacing", "tolerance", 0.1, "mm"),
              _check("missing_slices", "max", 0), _check("noise", "max", 60)]
    for files in (t1, flair):
        res = qc.qc_series(checks, files)
        assert res["verdict"] == "pass", res
        m = {c["metric"]: c["measured"] for c in res["checks"]}
        assert m["snr"] > 20 and m["ghosting"] < 0.02 and m["clipping"] == 0 and m["missing_slices"] == 0
    assert qc.qc_series(checks, flair)["shape"][0] == 12  # 12 frames of one Enhanced MR file


def test_ghosting_detected_along_phase_encoding(tmp_path):
    clean = pixels.head_phantom((8, 48, 48), "T1")
    rng = np.random.default_rng(0)
    ghosted = pixels.add_noise(pixels.add_ghosts(clean, pe_axis=2, amplitude=0.3), rng, "T1")
    base = pixels.add_noise(clean, rng, "T1")
    def vol(a, pe):
        return qc.Volume(data=a.astype(np.float32), stored=np.rint(a).astype(np.int64), positions=list(range(8)),
                         instance_numbers=list(range(1, 9)), modality="MR", pe_direction=pe, bits_stored=12, signed=False)
    g_row = qc.m_ghosting(vol(ghosted, "ROW"))[0]
    g_col = qc.m_ghosting(vol(ghosted, "COL"))[0]
    g_clean = qc.m_ghosting(vol(base, "ROW"))[0]
    assert g_row > 0.15 > g_clean and g_clean < 0.02
    assert g_col < g_row / 3  # ghosts run along the declared phase-encoding axis only


def test_missing_slice_and_uneven_spacing(mr_series, tmp_path):
    _, t1, _ = mr_series
    files = _copy(t1, tmp_path / "gap")
    files[5].unlink()
    res = qc.qc_series([_check("missing_slices", "max", 0), _check("slice_spacing", "tolerance", 0.1, "mm")],
                       [f for f in files if f.exists()])
    by = {c["metric"]: c for c in res["checks"]}
    assert by["missing_slices"]["measured"] == 1 and by["missing_slices"]["verdict"] == "fail"
    assert by["slice_spacing"]["measured"] == pytest.approx(1.0, abs=0.01)
    files = _copy(t1, tmp_path / "shift")
    ds = pydicom.dcmread(files[3])
    ds.ImagePositionPatient = [ds.ImagePositionPatient[0], ds.ImagePositionPatient[1], float(ds.ImagePositionPatient[2]) + 0.3]
    ds.save_as(files[3])
    res = qc.qc_series([_check("slice_spacing", "tolerance", 0.1, "mm"), _check("missing_slices", "max", 0)], files)
    by = {c["metric"]: c for c in res["checks"]}
    assert by["slice_spacing"]["measured"] == pytest.approx(0.3, abs=0.01) and not by["slice_spacing"]["ok"]
    assert by["missing_slices"]["ok"]


def test_clipping(mr_series, tmp_path):
    _, t1, _ = mr_series
    files = _copy(t1, tmp_path / "clip")
    for f in files:
        ds = pydicom.dcmread(f)
        a = ds.pixel_array.copy()
        a[a > np.percentile(a, 85)] = 4095  # saturate the brightest 15 %
        ds.PixelData = a.tobytes()
        ds.save_as(f)
    r = qc.run_check(_check("clipping", "max_fraction", 1, "%"), qc.load_volume(files))
    assert r["threshold"] == 0.01 and r["measured"] > 0.1 and r["verdict"] == "fail"


def test_ct_series_with_study_checks(tmp_path):
    t, diags, _ = load(DATA / "ct_head.imtrial")
    m = synth.synthesize(t, tmp_path, subjects_per_site=1, seed=2, small=True)
    e = m["exams"][0]
    cls = classify.classify_folder(t, tmp_path / e["dir"])
    res = qc.qc_exam(t, cls, tmp_path / e["dir"])
    assert res["verdict"] == "pass", res
    by = {c["check"]: c for c in res["series"][0]["checks"]}
    assert set(by) == {"ct_noise", "ct_range", "ct_clip", "ct_gaps", "ct_spacing"}
    assert by["ct_range"]["measured"] > 10  # air .. bone spans > 2^10 HU
    # double the noise: the noise metric follows
    files = [tmp_path / f for f in e["series"][0]["files"]]
    rng = np.random.default_rng(1)
    for f in files:
        ds = pydicom.dcmread(f)
        a = ds.pixel_array.astype(np.float64) + rng.normal(0, 20, ds.pixel_array.shape)
        ds.PixelData = np.clip(np.rint(a), 0, 4095).astype(np.uint16).tobytes()
        ds.save_as(f)
    noisy = qc.qc_exam(t, cls, tmp_path / e["dir"], only="ct_noise")
    c = noisy["series"][0]["checks"][0]
    assert c["measured"] > by["ct_noise"]["measured"] + 10 and c["verdict"] == "fail"


def test_unknown_metric_and_parameters_are_error_values(mr_series):
    _, t1, _ = mr_series
    vol = qc.load_volume(t1)
    r = qc.run_check(ir.QcCheck(name="x", metric="snrr", params={"min": ir.Quantity(value=3)}), vol)
    assert r["verdict"] == "error" and "unknown QC metric" in r["error"] and r["hint"] == "did you mean 'snr'?"
    r = qc.run_check(ir.QcCheck(name="y", metric="snr", params={"max": ir.Quantity(value=3)}), vol)
    assert r["verdict"] == "error" and "no parameter 'max'" in r["error"]
    r = qc.run_check(ir.QcCheck(name="z", metric="ghosting", params={}), vol)
    assert r["verdict"] == "error" and "needs its threshold" in r["error"]
    assert qc.series_verdict([r, {"verdict": "pass"}]) == "error"


def test_warning_severity_gives_warn(mr_series):
    _, t1, _ = mr_series
    r = qc.run_check(_check("snr", "min", 10_000, severity=ir.Significance.WARNING), qc.load_volume(t1))
    assert not r["ok"] and r["verdict"] == "warn"


@pytest.mark.parametrize("name,metric", [("CT_small.dcm", "dynamic_range"), ("emri_small.dcm", "snr"),
                                         ("MR_small.dcm", "ghosting"), ("eCT_Supplemental.dcm", "slice_spacing")])
def test_pydicom_files(name, metric):
    param = qc.METRICS[metric][1]
    r = qc.qc_series([_check(metric, param, 1)], [get_testdata_file(name)])
    c = r["checks"][0]
    assert c["verdict"] in ("pass", "fail", "warn", "error")
    if c["verdict"] != "error":
        assert isinstance(c["measured"], float)
    if name == "emri_small.dcm":
        assert r["shape"] == [10, 64, 64] and c["measured"] > 1


def test_unreadable_pixels_are_error_values(tmp_path):
    shutil.copy(get_testdata_file("MR_truncated.dcm"), tmp_path / "t.dcm")
    r = qc.qc_series([_check("snr", "min", 5)], [tmp_path / "t.dcm"])
    assert r["verdict"] == "error" and "unreadable" in r["checks"][0]["error"]


def test_runner_implements_exactly_the_languages_metrics():
    from imtrial_dsl.qc_metrics import QC_METRICS

    assert set(qc.FUNCS) == set(QC_METRICS)
