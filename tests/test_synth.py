"""The synthetic corpus: realistic headers per vendor, consistent UIDs, visit dates in windows,
planted PHI on request, Enhanced MR on request, determinism, and a manifest that matches the files."""
from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections import defaultdict
from pathlib import Path

import pydicom
import pytest

from imtrial_dsl.loader import load
from imtrial_dsl import synth
from imtrial_dsl.runner import adherence, dicomio
from imtrial_dsl.vendors import normalize_vendor

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def amy():
    t, _, _ = load(ROOT / "examples" / "amyloid_mri.imtrial")
    return t


@pytest.fixture(scope="module")
def corpus(amy, tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    m = synth.synthesize(amy, out, subjects_per_site=2, seed=9, small=True, phi=True, enhanced=["SWI"],
                         deviations=["corrupt_file", "software_upgrade"])
    return out, m


def _headers(out: Path, m: dict):
    for e in m["exams"]:
        for s in e["series"]:
            for f in s["files"]:
                yield e, s, f, pydicom.dcmread(out / f, stop_before_pixels=True)


def test_manifest_matches_files(corpus):
    out, m = corpus
    listed = sorted(f for e in m["exams"] for s in e["series"] for f in s["files"])
    on_disk = sorted(str(p.relative_to(out)) for p in out.rglob("*.dcm"))
    assert listed == on_disk and m["files"] == len(listed)
    assert json.loads((out / "manifest.json").read_text()) == m
    # 3 sites x 2 subjects x (screening FLAIR + 3 visits x 3 protocols)
    assert len(m["exams"]) == 3 * 2 * 4
    assert sorted(d["type"] for d in m["deviations"]) == ["corrupt_file", "software_upgrade"]


def test_headers_realistic_and_consistent(amy, corpus):
    out, m = corpus
    study_uids, series_for = {}, defaultdict(set)
    sop_uids = set()
    upgraded = {(d["patient_id"], d["visit"]) for d in m["deviations"] if d["type"] == "software_upgrade"}
    corrupt = {d["file"] for d in m["deviations"] if d["type"] == "corrupt_file"}
    for e, s, f, ds in _headers(out, m):
        if f in corrupt:
            continue
        key = (e["patient_id"], e["visit"])
        assert ds.StudyInstanceUID == e["study_uid"] and ds.SeriesInstanceUID == s["series_uid"]
        study_uids.setdefault(e["study_uid"], ds.FrameOfReferenceUID)
        assert study_uids[e["study_uid"]] == ds.FrameOfReferenceUID  # one frame of reference per exam
        assert ds.SOPInstanceUID not in sop_uids
        sop_uids.add(ds.SOPInstanceUID)
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        want_sop = pydicom.uid.EnhancedMRImageStorage if s["enhanced"] else pydicom.uid.MRImageStorage
        assert ds.SOPClassUID == want_sop
        _, dev = next((st, d) for st, d in amy.devices() if d.id == e["device"])
        assert ds.Manufacturer == {"Siemens": "Siemens Healthineers", "GE": "GE MEDICAL SYSTEMS",   # syngo MR XA
                                   "Philips": "Philips Medical Systems"}[dev.vendor]
        assert normalize_vendor(ds.Manufacturer) == dev.vendor
        assert ds.ManufacturerModelName == dev.model and ds.DeviceSerialNumber == dev.serial
        versions = dicomio.as_list(dicomio.get_param(ds, "SoftwareVersions"))
        if dev.vendor in ("GE", "Philips"):  # multi-valued, as those vendors write it
            assert len(versions) == {"GE": 3, "Philips": 2}[dev.vendor]
        if dev.vendor == "GE":
            assert versions[1] == "LX" and versions[2].startswith("MR Software release:")
        assert adherence.software_consistent(dev.software, versions) is (key not in upgraded)
        assert ds.StudyDate == e["date"].replace("-", "")
        series_for[e["study_uid"]].add(ds.SeriesInstanceUID)
    for e in m["exams"]:
        assert len(series_for[e["study_uid"]]) == len(e["series"])


def test_visit_dates_inside_windows(amy, corpus):
    _, m = corpus
    by_subject = defaultdict(list)
    for e in m["exams"]:
        by_subject[e["patient_id"]].append(e)
    for pid, exams in by_subject.items():
        vf = adherence.visit_findings(amy, [dt.date.fromisoformat(e["date"]) for e in exams],
                                      dt.date.fromisoformat(m["as_of"]))
        assert vf["findings"] == []
        assert {v["visit"]: v["date"] for v in vf["visits"]} == {e["visit"]: e["date"] for e in exams}
        base = next(s for s in m["subjects"] if s["patient_id"] == pid)["baseline"]
        assert vf["baseline"] == base


def test_phi_planted_and_absent(amy, corpus, tmp_path):
    out, m = corpus
    e, s, f, ds = next(_headers(out, m))
    assert ds.PatientName and ds.PatientBirthDate and ds.PatientAddress and ds.OtherPatientIDs
    assert ds.PatientName.family_name in ds.ImageComments.upper() or ds.PatientID in ds.ImageComments
    block = ds.private_block(0x0029, "IMTRIAL SYNTH PHI")
    assert block[0x10].value == str(ds.PatientName)
    assert str(ds.PatientName) in m["phi_values"] and ds.PatientID in m["phi_values"]
    clean = synth.synthesize(amy, tmp_path, subjects_per_site=1, seed=9, small=True, phi=False, visits=["baseline"])
    ds2 = pydicom.dcmread(tmp_path / clean["exams"][0]["series"][0]["files"][0])
    assert clean["phi_values"] == []
    for kw in ("PatientAddress", "OtherPatientIDs", "ImageComments", "AdditionalPatientHistory"):
        assert kw not in ds2
    assert ds2.PatientBirthDate == ""   # Type 2: present and empty
    assert ds2.PatientID.startswith("SYN-")
    # the vendor's private groups are there (as on its scanners), the planted-PHI block is not
    creators = {e.value for e in ds2 if e.tag.is_private and e.tag.element < 0x100}
    creators |= {e.value for g in ds2.get("SharedFunctionalGroupsSequence", []) for e in g
                 if e.tag.is_private and e.tag.element < 0x100}
    assert creators and "IMTRIAL SYNTH PHI" not in creators


def test_enhanced_mr_structure(corpus):
    out, m = corpus
    e = m["exams"][1]
    s = next(s for s in e["series"] if s["protocol"] == "SWI")
    ds = pydicom.dcmread(out / s["files"][0])
    n = int(ds.NumberOfFrames)
    assert n == s["shape"][0] == len(ds.PerFrameFunctionalGroupsSequence)
    shared = ds.SharedFunctionalGroupsSequence[0]
    for seq in ("MRTimingAndRelatedParametersSequence", "MRModifierSequence", "MRImagingModifierSequence",
                "MRFOVGeometrySequence"):
        assert seq in shared
    for seq in ("MREchoSequence", "PixelMeasuresSequence", "PlaneOrientationSequence", "MRImageFrameTypeSequence"):
        assert all(seq in f for f in ds.PerFrameFunctionalGroupsSequence)   # per frame, as syngo MR XA writes them
    z = [float(f.PlanePositionSequence[0].ImagePositionPatient[2]) for f in ds.PerFrameFunctionalGroupsSequence]
    assert z == sorted(z) and len(set(z)) == n
    assert ds.pixel_array.shape == (n, s["shape"][1], s["shape"][2])


def test_deterministic_bytes(amy, tmp_path):
    def digest(root: Path) -> dict[str, str]:
        return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*.dcm"))}
    kw = dict(subjects_per_site=1, seed=42, small=True, visits=["baseline"], deviations=["param_off", "ghosting"])
    a = synth.synthesize(amy, tmp_path / "a", **kw)
    b = synth.synthesize(amy, tmp_path / "b", **kw)
    assert a == b and digest(tmp_path / "a") == digest(tmp_path / "b")
    c = synth.synthesize(amy, tmp_path / "c", **{**kw, "seed": 43})
    assert digest(tmp_path / "c") != digest(tmp_path / "a")


def test_pixel_data_is_a_head_with_rician_noise(corpus):
    import numpy as np

    out, m = corpus
    e = m["exams"][1]
    s = next(s for s in e["series"] if s["protocol"] == "T1w")
    vol = np.stack([pydicom.dcmread(out / f).pixel_array for f in s["files"]]).astype(float)
    mid = vol[len(vol) // 2]
    corner = mid[:4, :4]
    assert corner.min() >= 0 and 5 < corner.mean() < 60  # Rician background: positive, mean ~ 1.25 sigma
    assert mid[16, 16] > 3 * corner.mean()  # brain in the middle
    assert len(np.unique(mid)) > 100


def test_unknown_deviation_rejected(amy, tmp_path):
    with pytest.raises(ValueError, match="unknown deviation"):
        synth.synthesize(amy, tmp_path, deviations=["moire"], small=True)
