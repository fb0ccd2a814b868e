"""Synthetic headers as real as the real files: for each real series of tests/data/real, the synthetic series
``imtrial synth`` writes for the same protocol on a device declared like that scanner (the real-data studies
declare each scanner as its headers do) must carry what adherence reads in the same place and shape.

For each keyword adherence reads — the protocol's constraints, its match rules, the device identity — the
place (top level, shared or per-frame functional group, derived from Enhanced MR attributes) and the shape
(number or text, how many values) are compared. Over a broader list of MR attributes a protocol may
constrain, a synthetic header may hold a value only where the real one does, in the same place: so no
synthetic run passes a constraint the real file would fail. Attributes the real file's own (upstream)
de-identification removed, as its DeidentificationMethodCodeSequence declares, are not the scanner's and
are left out of the comparison.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pydicom
import pytest

from imtrial_dsl.compiler import compile_file
from imtrial_dsl.deid.plan import resolve_action
from imtrial_dsl.dicom_tables import OPTION_CODES
from imtrial_dsl.loader import load_text
from imtrial_dsl.runner import classify, dicomio
from imtrial_dsl.synth import synthesize

REAL = Path(__file__).parent / "data" / "real"
STUDIES = REAL / "studies"
EXPECTED = {p.name.removesuffix(".expected.json"): json.loads(p.read_text()) for p in sorted(STUDIES.glob("*.expected.json"))}

IDENTITY = ("Manufacturer", "ManufacturerModelName", "SoftwareVersions", "DeviceSerialNumber", "StationName", "Modality")
# attributes of the MR Image module (and their Enhanced MR homes) that protocols constrain
BROAD = ("ScanningSequence", "SequenceVariant", "ScanOptions", "MRAcquisitionType", "RepetitionTime", "EchoTime",
         "EchoTrainLength", "InversionTime", "SequenceName", "NumberOfAverages", "ImagingFrequency", "ImagedNucleus",
         "EchoNumbers", "MagneticFieldStrength", "SpacingBetweenSlices", "NumberOfPhaseEncodingSteps", "PercentSampling",
         "PercentPhaseFieldOfView", "PixelBandwidth", "ReceiveCoilName", "TransmitCoilName", "AcquisitionMatrix",
         "InPlanePhaseEncodingDirection", "FlipAngle", "SAR", "dBdt", "SliceThickness", "PixelSpacing", "TriggerTime",
         "DiffusionBValue", "BodyPartExamined", "ProtocolName", "SeriesDescription", "ImageType") + IDENTITY
# multi-valued code strings whose number of values follows acquisition choices, not the vendor's layout
FREE_COUNT = {"ScanningSequence", "SequenceVariant", "ScanOptions"}


def place(ds: pydicom.Dataset, kw: str) -> str:
    """Where get_param finds ``kw``: top, shared, frame (functional groups) or derived."""
    kws = dicomio._keywords(kw)
    if any(k in ds and ds[k].VR != "SQ" and ds[k].value not in (None, "") for k in kws):
        return "top"
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared and dicomio._find_in_item(shared[0], kws, dicomio._MAX_DEPTH) is not dicomio.MISSING:
        return "shared"
    frames = ds.get("PerFrameFunctionalGroupsSequence")
    if frames and dicomio._find_in_item(frames[0], kws, dicomio._MAX_DEPTH) is not dicomio.MISSING:
        return "frame"
    return "derived"


def shape(ds: pydicom.Dataset, kw: str):
    """(place, kind, count) of the value adherence reads, or None when it reads none (missing or empty)."""
    v = dicomio.get_param(ds, kw)
    values = [x for x in dicomio.as_list(v) if x not in ("", None)]
    if not values:
        return None
    kind = "number" if all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in values) else "text"
    return place(ds, kw), kind, ("n" if kw in FREE_COUNT else len(values))


def removed_upstream(ds: pydicom.Dataset) -> set[str]:
    """Keywords a PS3.15 de-identification the header declares (DeidentificationMethodCodeSequence) removes."""
    if str(ds.get("PatientIdentityRemoved", "")).upper() != "YES":
        return set()
    codes = {str(it.CodeValue) for it in ds.get("DeidentificationMethodCodeSequence", [])}
    options = [name for name, code in OPTION_CODES.items() if code in codes]
    trial, _, _ = load_text('import "stdlib/deid/ps315.imtrial"\n', str(STUDIES / "x.imtrial"))
    profile = trial.profile("ps315_basic")
    return {r.keyword for r in profile.rules if r.keyword and resolve_action(r, options)[0] != "K"}


def _protocol_keywords(trial, name: str) -> set[str]:
    p = trial.protocol(name)
    return ({c.keyword for c in p.constraints} | {c.keyword for v in p.variants for c in v.constraints}
            | {r.attribute for r in p.match} | set(IDENTITY))


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """(study, protocol, device, real header, synthetic header, trial) for every real MR file."""
    out = []
    for name, exp in sorted(EXPECTED.items()):
        trial = compile_file(STUDIES / exp["study"]).trial
        root = tmp_path_factory.mktemp(f"synth-{name}")
        m = synthesize(trial, root, subjects_per_site=1, seed=5, small=True, phi=False)
        synthetic = {(e["device"], s["protocol"]): pydicom.dcmread(root / s["files"][0], stop_before_pixels=True)
                     for e in m["exams"] for s in e["series"]}
        for folder in exp["folders"]:
            cls = classify.classify_folder(trial, REAL / folder)
            for s in cls["series"]:
                if s["modality"] != "MR":
                    continue  # a Siemens protocol report (SR): synth writes images only
                for f in s["files"]:
                    real = dicomio.read_header(REAL / folder / f)
                    device = next(d.id for _, d in trial.devices() if d.serial == str(real.get("DeviceSerialNumber", "")))
                    out.append((name, s["protocol"], device, real, synthetic[(device, s["protocol"])], trial))
    return out


def _ids(pairs_list):
    return [f"{n}-{d}-{p}" for n, p, d, *_ in pairs_list]


def test_every_real_file_has_a_synthetic_counterpart(pairs):
    real_mr = [p for p in REAL.rglob("*") if p.is_file() and p.parent.name != "studies" and p.suffix != ".md"
               and not p.name.startswith("LICENSE") and "Phoenix" not in str(p)]
    assert len(EXPECTED) == 3 and len(real_mr) > 100
    assert len(pairs) == len(real_mr)
    assert {(n, pr) for n, pr, *_ in pairs} == {(n, pr) for n, exp in EXPECTED.items() for pr in exp["series"] if pr != "REPORT"}


def test_synthetic_objects_are_the_real_objects(pairs):
    for name, protocol, device, real, syn, _ in pairs:
        assert syn.SOPClassUID == real.SOPClassUID, (name, protocol)
        assert syn.Manufacturer == real.Manufacturer, (name, protocol)
        assert dicomio.as_list(dicomio.get_param(syn, "SoftwareVersions")) == \
            dicomio.as_list(dicomio.get_param(real, "SoftwareVersions")), (name, protocol)
        real_creators = {(e.tag.group, e.value) for e in real if e.tag.is_private and e.tag.element < 0x100}
        syn_creators = {(e.tag.group, e.value) for e in syn if e.tag.is_private and e.tag.element < 0x100} | _shared_creators(syn)
        assert syn_creators and syn_creators <= real_creators | _shared_creators(real), (name, protocol, syn_creators)


def _shared_creators(ds: pydicom.Dataset) -> set:
    shared = ds.get("SharedFunctionalGroupsSequence")
    return {(e.tag.group, e.value) for e in (shared[0] if shared else []) if e.tag.is_private and e.tag.element < 0x100}


def test_what_adherence_reads_is_where_the_scanner_puts_it(pairs):
    problems = []
    for name, protocol, device, real, syn, trial in pairs:
        for kw in sorted(_protocol_keywords(trial, protocol)):
            if shape(real, kw) != shape(syn, kw):
                problems.append((name, protocol, kw, shape(real, kw), shape(syn, kw)))
    assert problems == []


@pytest.mark.filterwarnings("ignore:The value length")   # the GE header's own over-long de-identification code
def test_no_synthetic_value_where_the_real_header_has_none(pairs):
    """A constraint on any of these attributes passes on the synthetic series only where it could on the real one."""
    problems = []
    for name, protocol, device, real, syn, _ in pairs:
        skip = removed_upstream(real)
        for kw in BROAD:
            if kw in skip:
                continue
            r, s = shape(real, kw), shape(syn, kw)
            if s is not None and (r is None or r[:2] != s[:2]):
                problems.append((name, protocol, kw, r, s))
    assert problems == []


# ----------------------------------------------------------------------------- the IODs, checked by dicom3tools

SCANNERS = """
study IOD "every object synth writes" { }
site XA "Siemens XA" { device XA { modality MR vendor Siemens model "MAGNETOM Prisma" software "XA30" serial "1" } }
site VE "Siemens VE" { device VE { modality MR vendor Siemens model "MAGNETOM Skyra" software "syngo MR E11" serial "2" } }
site GE "GE" {
  device GE { modality MR vendor "GE MEDICAL SYSTEMS" model "SIGNA Premier" software "DV28.0_R02_1947.a" serial "3" }
  device PT1 { modality PT vendor "GE MEDICAL SYSTEMS" model "Discovery MI" software "pet_coreload.46" serial "6" }
}
site PH "Philips" {
  device PH { modality MR vendor Philips model "Ingenia" software "5.7.1\\5.7.1.2" serial "4" }
  device CT1 { modality CT vendor Siemens model "SOMATOM Force" software "VB20" serial "5" }
}
protocol T1 modality MR { match SeriesDescription ~ "(?i)t1|mprage|spgr" InversionTime in 300 .. 1200 ms }
protocol DWI modality MR { match SeriesDescription ~ "(?i)dwi|diff" DiffusionBValue = 1000 }
protocol BOLD modality MR { match SeriesDescription ~ "(?i)bold|fmri|rest" RepetitionTime = 2000 ms }
protocol HEAD modality CT { match SeriesDescription ~ "(?i)head" KVP = 120 kV }
protocol FDG modality PT "FDG brain PET" { match SeriesDescription ~ "(?i)pet" SliceThickness = 2 mm }
"""


@pytest.fixture(scope="module")
def every_object(tmp_path_factory):
    import shutil

    assert shutil.which("dciodvfy"), "dicom3tools (dciodvfy) is a test dependency: scripts/sysdeps.sh installs it"
    trial, _, _ = load_text(SCANNERS, str(STUDIES / "iod.imtrial"))
    root = tmp_path_factory.mktemp("iod")
    m = synthesize(trial, root, subjects_per_site=1, seed=3, small=True, phi=False)
    return trial, root, m


def test_every_object_is_valid_for_its_iod(every_object):
    _, root, m = every_object
    # Laterality (General Series, Type 2C) is required for paired body parts; dciodvfy cannot tell that a
    # brain is not one, and the vendors' real headers leave it out too. GE writes InversionTime for its
    # IR-prepared SPGR with ScanningSequence GR, which dciodvfy flags on the real HDxt header the same way.
    allowed = ("Element=<Laterality>", "Conditional Element=<InversionTime> Module=<MRImage>")
    seen = set()
    for e in m["exams"]:
        for s in e["series"]:
            path = root / s["files"][0]
            out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
            errors = [ln for ln in (out.stdout + out.stderr).splitlines()
                      if ln.startswith("Error") and not any(a in ln for a in allowed)]
            assert errors == [], (e["device"], s["protocol"], errors)
            seen.add(str(pydicom.dcmread(path, stop_before_pixels=True).SOPClassUID.name))
    assert seen == {"MR Image Storage", "Enhanced MR Image Storage", "CT Image Storage",
                    "Positron Emission Tomography Image Storage"}


def test_pet_radiopharmaceutical_is_inside_its_sequence(every_object):
    trial, root, m = every_object
    pet = next(s for e in m["exams"] for s in e["series"] if s["protocol"] == "FDG")
    ds = pydicom.dcmread(root / pet["files"][0], stop_before_pixels=True)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.128" and ds.Modality == "PT"
    item = ds.RadiopharmaceuticalInformationSequence[0]
    assert "RadionuclideTotalDose" not in ds and float(item.RadionuclideTotalDose) > 0
    assert item.RadionuclideCodeSequence[0].CodeMeaning == "^18^Fluorine" and ds.Units == "BQML"
    assert ds.Manufacturer == "GE MEDICAL SYSTEMS"


def test_each_vendor_keeps_b_values_where_it_does(every_object):
    """Siemens XA: per frame in MRDiffusionSequence; Philips R5: public and in (2001,xx03); GE and Siemens
    classic: only in their private groups (a public DiffusionBValue constraint fails on them, as on the scanner)."""
    _, root, m = every_object
    dwi = {e["device"]: pydicom.dcmread(root / s["files"][0], stop_before_pixels=True)
           for e in m["exams"] for s in e["series"] if s["protocol"] == "DWI"}
    assert shape(dwi["XA"], "DiffusionBValue") == ("frame", "number", 1)
    assert shape(dwi["PH"], "DiffusionBValue") == ("top", "number", 1)
    assert dwi["PH"].private_block(0x2001, "Philips Imaging DD 001")[0x03].value == 1000.0
    assert shape(dwi["GE"], "DiffusionBValue") is None
    assert dwi["GE"].private_block(0x0043, "GEMS_PARM_01")[0x39].value[0] == 1000
    assert shape(dwi["VE"], "DiffusionBValue") is None
    assert dwi["VE"].private_block(0x0019, "SIEMENS MR HEADER")[0x0C].value == 1000
    notes = [n for n in m["notes"] if n["protocol"] == "DWI"]
    assert sorted(n["site"] for n in notes) == ["GE", "VE"] and all("DiffusionBValue" in n["detail"] for n in notes)


def test_enhanced_mr_round_trips_the_classic_values():
    """Synth writes Enhanced MR pulse-sequence attributes as the inverse of what dicomio derives."""
    from imtrial_dsl.synth.writer import enhanced_pulse_attributes
    from pydicom.sequence import Sequence

    cases = [("GR", "SP", ""), (["GR", "IR"], ["SK", "SP", "MP"], ""), ("EP", ["SK", "SS"], ["PFP", "FS"]),
             (["SE", "EP"], "SK", ["PFF", "PFP", "SP", "FS"]), (["SE", "IR"], ["SK", "SP", "MP"], ["FC", "PER"]),
             (["SE", "GR"], ["TRSS", "OSP"], "")]
    for scan, variant, options in cases:
        attrs = enhanced_pulse_attributes({"ScanningSequence": scan, "SequenceVariant": variant, "ScanOptions": options})
        ds = pydicom.Dataset()
        for kw, v in attrs["top"].items():
            setattr(ds, kw, v)
        group = pydicom.Dataset()
        for seq in ("MRModifierSequence", "MRImagingModifierSequence"):
            item = pydicom.Dataset()
            for kw, v in attrs[seq].items():
                setattr(item, kw, v)
            setattr(group, seq, Sequence([item]))
        ds.SharedFunctionalGroupsSequence = Sequence([group])
        for kw, want in (("ScanningSequence", scan), ("SequenceVariant", variant), ("ScanOptions", options)):
            got = [v for v in dicomio.as_list(dicomio.get_param(ds, kw)) if v not in ("", "NONE")]
            assert sorted(got) == sorted(v for v in dicomio.as_list(want) if v), (kw, want, got)
