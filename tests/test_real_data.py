"""Real scanner headers (tests/data/real: GE Signa HDxt, Siemens XA30 Enhanced MR, three Philips Achieva).

Every study in ``tests/data/real/studies`` is written from the vendors' conventions and the standard, with
``<study>.expected.json`` saying what it must give on the real files: every series classified, every
conformant protocol passing with no finding, and for each protocol one planted violation that fails that
protocol alone, on that parameter. The pipeline runs end to end on copies of the files (nothing lost), and
the exams real headers leave without a usable identifier or date wait for ``imtrial assign``.

The tests read only the copy in ``tests/data/real`` (its PROVENANCE.md lists every file and its sha256).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import pydicom
import pytest
from pydicom import config as pydicom_config

from imtrial_dsl import cli
from imtrial_dsl.compiler import compile_text
from imtrial_dsl.loader import load
from imtrial_dsl.runner import adherence, classify, dicomio
from imtrial_dsl.runner.assign import AssignError, assign_exam
from imtrial_dsl.runner.identify import identifier_problem
from imtrial_dsl.runner.ingest import check_dataset
from imtrial_dsl.runner.run import run_study
from imtrial_dsl.store import Store

REAL = Path(__file__).parent / "data" / "real"
STUDIES = REAL / "studies"
EXPECTED = {p.name.removesuffix(".expected.json"): json.loads(p.read_text()) for p in sorted(STUDIES.glob("*.expected.json"))}
KEY = "cmVhbC1kYXRhLXRlc3Qta2V5LWZvci1pbXRyaWFs"  # 30 bytes of base64: long enough for read_key


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def _compile(text: str, name: str):
    """Load and check a study: (trial, every diagnostic); errors fail the test."""
    res = compile_text(text, str(STUDIES / name))
    assert res.ok, [str(d) for d in res.diagnostics]
    return res.trial, res.diagnostics


def _check_folders(trial, folders: list[str]) -> dict[str, tuple[dict, dict]]:
    """classify + adherence of each real exam folder, as the pipeline computes them from the headers."""
    out = {}
    for f in folders:
        folder = REAL / f
        cls = classify.classify_folder(trial, folder)
        out[f] = (cls, adherence.check_exam(trial, cls, adherence.headers_for(cls, folder)))
    return out


# ----------------------------------------------------------------------------- the copy

def test_the_copy_is_what_its_provenance_table_lists():
    assert sorted(EXPECTED) == ["ge_signa_hdxt", "philips", "siemens_xa30"]
    table = (REAL / "PROVENANCE.md").read_text()
    rows = re.findall(r"^\| `([^`]+)` \| ([^|]+) \| ([0-9a-f]+) \| (\d+) \| ([0-9a-f]{64}) \|$", table, flags=re.M)
    listed = {rel: (int(size), sha) for rel, _repo, _commit, size, sha in rows}
    on_disk = {str(p.relative_to(REAL)) for p in _files(REAL)
               if p.parent.name != "studies" and p.suffix != ".md" and not p.name.startswith("LICENSE")}
    assert on_disk == set(listed)
    for rel, (size, sha) in listed.items():
        data = (REAL / rel).read_bytes()
        assert len(data) == size and hashlib.sha256(data).hexdigest() == sha, rel
    assert sum(size for size, _ in listed.values()) <= 15 * 1024 * 1024
    for lic in ("LICENSE.dcm_qa_deident", "LICENSE.dcm_qa_philips", "LICENSE.dcm_qa_xa30"):
        assert "Redistribution" in (REAL / lic).read_text()


# ----------------------------------------------------------------------------- conformant and planted

@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_conformant_study_passes_on_the_real_files(name):
    exp = EXPECTED[name]
    text = (STUDIES / exp["study"]).read_text()
    trial, diags = _compile(text, exp["study"])
    assert diags == [], [str(d) for d in diags]  # checks clean: no warning either
    counts: dict[str, int] = {}
    for folder, (cls, res) in _check_folders(trial, exp["folders"]).items():
        assert cls["problems"] == [], folder
        assert all(s["status"] == "matched" for s in cls["series"]), (folder, cls["series"])
        for s in cls["series"]:
            counts[s["protocol"]] = counts.get(s["protocol"], 0) + 1
        assert res["findings"] == [], (folder, res["findings"])
        assert res["device_match"] is not None
        bad = [(s["protocol"], [(p["parameter"], p["actual_text"], p["expected"]) for p in s["parameters"] if not p["ok"]])
               for s in res["series"] if s["verdict"] != "pass"]
        assert bad == [] and res["verdict"] == "pass", (folder, bad)
    assert counts == exp["series"]


VIOLATIONS = [(name, v) for name, exp in sorted(EXPECTED.items()) for v in exp["violations"]]


@pytest.mark.parametrize("name,violation", VIOLATIONS, ids=[f"{n}-{v.get('id', v['protocol'])}" for n, v in VIOLATIONS])
def test_each_planted_violation_fails_its_protocol_alone(name, violation):
    exp = EXPECTED[name]
    text = (STUDIES / exp["study"]).read_text()
    assert text.count(violation["replace"]) == 1, "a planted violation replaces one constraint"
    trial, _ = _compile(text.replace(violation["replace"], violation["with"]), exp["study"])
    failing = []
    for folder, (cls, res) in _check_folders(trial, exp["folders"]).items():
        assert res["findings"] == [], folder
        for s in res["series"]:
            bad = sorted(p["keyword"] for p in s["parameters"] if not p["ok"])
            if s["protocol"] == violation["protocol"]:
                assert s["verdict"] == "fail" and bad == [violation["parameter"]], (folder, s["protocol"], bad)
                failing.append(s["series_uid"])
            else:
                assert s["verdict"] == "pass" and bad == [], (folder, s["protocol"], bad)
    assert len(failing) == exp["series"][violation["protocol"]]


# ----------------------------------------------------------------------------- defects found on real headers

def _header(rel: str) -> pydicom.Dataset:
    return dicomio.read_header(next(p for p in _files(REAL / rel)))


REAL_SOFTWARE = {  # folder -> (vendor as the header writes it, model)
    "ge_signa_hdxt": "GE MEDICAL SYSTEMS",
    "philips/Magdeburg_2014_fmri": "Philips Medical Systems",
    "philips/Vanderbilt_2018_dti": "Philips Medical Systems",
    "philips/Bangalore_2008_dwi": "Philips Medical Systems",
    "siemens_xa30/5_anat-T1w_acq-tfl": "Siemens Healthineers",
}


def _one_device_study(ident: dict, software: str, variant: str = "") -> str:
    return f"""
study SW "software" {{ }}
site S "site" {{
  device D {{ modality MR vendor "{ident['manufacturer']}" model "{ident['model']}" software {software} }}
}}
protocol P modality MR {{
  match SeriesDescription ~ "."
  FlipAngle > 0 deg
  {variant}
}}
"""


@pytest.mark.parametrize("folder", sorted(REAL_SOFTWARE))
def test_a_device_declared_as_its_header_writes_software_raises_no_upgrade(folder):
    ident = dicomio.device_identity(_header(folder))
    written = "\\".join(ident["software"])
    as_string = '"' + written.replace("\\", "\\\\") + '"'
    as_list = "[" + ", ".join(f'"{v}"' for v in ident["software"]) + "]"
    for form in (as_string, as_list):
        trial, diags = _compile(_one_device_study(ident, form), "sw.imtrial")
        assert trial.sites[0].devices[0].software == written
        hit, findings = adherence.device_findings(trial, ident)
        assert hit is not None and findings == [], (form, findings)
    # another release in one value is an upgrade, found value by value
    upgraded = ident["software"][:-1] + [re.sub(r"\d+", lambda m: str(int(m.group()) + 1), ident["software"][-1], count=1)]
    _, findings = adherence.device_findings(trial, {**ident, "software": upgraded})
    assert [f["code"] for f in findings] == ["software_upgrade"]


def test_the_checker_suggests_a_software_glob_that_matches_the_device():
    from imtrial_dsl.vendors import software_matches

    ident = dicomio.device_identity(_header("ge_signa_hdxt"))
    text = _one_device_study(ident, '"24\\\\LX\\\\MR Software release:HD16.0_V02_1131.a"',
                             'variant GE model "Other" { FlipAngle > 1 deg }')
    _, diags = _compile(text, "sw.imtrial")
    w402 = [d for d in diags if d.code == "W402"]
    assert w402, [str(d) for d in diags]
    glob = re.search(r'software "([^"]+)"', w402[0].hint).group(1)
    assert glob == "HD16.0*" and software_matches(glob, ident["software"])


def test_ge_release_glob_matches_the_release_suffix_and_says_so():
    ident = dicomio.device_identity(_header("ge_signa_hdxt"))
    text = _one_device_study(ident, '"24\\\\LX\\\\MR Software release:HD16.0_V02_1131.a"',
                             'variant GE software "HD16*" { FlipAngle > 1 deg }')
    trial, diags = _compile(text, "sw.imtrial")
    assert not [d for d in diags if d.code == "W401"], [str(d) for d in diags]
    cls = classify.classify_folder(trial, REAL / "ge_signa_hdxt")
    res = adherence.check_exam(trial, cls, adherence.headers_for(cls, REAL / "ge_signa_hdxt"))
    assert res["findings"] == [] and res["verdict"] == "pass"
    variant = res["series"][0]["variant"]
    assert variant["software"] == "HD16*"
    assert variant["software_match"] == ("'HD16*' matched release 'HD16.0_V02_1131.a' of value "
                                         "'MR Software release:HD16.0_V02_1131.a'")
    # the glob DV28* of the issue against a DV28 header, and what did not match before (the ':' token)
    from imtrial_dsl.vendors import software_match

    m = software_match("DV28*", ["28", "LX", "MR Software release:DV28.0_R02_1947.a"])
    assert m is not None and m[0].form == "release" and m[0].text == "DV28.0_R02_1947.a"


SIEMENS = ["5_anat-T1w_acq-tfl", "7_func-bold_task-fa_run-1", "12_DWI_dir80_PA", "25_asl_2d_tra",
           "27_asl_2d_tra", "8_gre_field_mapping", "9_gre_field_mapping"]


def _siemens_classic(ds: pydicom.Dataset) -> dict[str, list[str]]:
    """The classic ScanningSequence / SequenceVariant / ScanOptions Siemens keeps in its own shared
    functional-group item ("SIEMENS MR SDS 01", elements xx5A / xx5B / xx5C, as dcm2niix documents)."""
    shared = ds.SharedFunctionalGroupsSequence[0]
    item = next(e.value[0] for e in shared if e.tag.is_private and e.VR == "SQ")
    block = item.private_block(0x0021, "SIEMENS MR SDS 01")
    out = {}
    for kw, off in (("ScanningSequence", 0x5A), ("SequenceVariant", 0x5B), ("ScanOptions", 0x5C)):
        out[kw] = dicomio.as_list(dicomio.plain(block[off].value)) if off in block else []
    return out


@pytest.mark.parametrize("series", SIEMENS)
def test_enhanced_mr_scanning_sequence_is_derived_as_siemens_writes_it(series):
    ds = _header(f"siemens_xa30/{series}")
    assert "ScanningSequence" not in ds and ds.EchoPulseSequence == "GRADIENT"
    vendor = _siemens_classic(ds)
    derived = dicomio.as_list(dicomio.get_param(ds, "ScanningSequence"))
    assert derived == vendor["ScanningSequence"]
    assert ("EP" in derived) == (ds.EchoPlanarPulseSequence == "YES")
    # Scan Options agree in the standard's defined terms (Siemens writes SATn for a saturation slab, IR for IR)
    opts = [o for o in dicomio.as_list(dicomio.get_param(ds, "ScanOptions")) if o]
    siemens = ["SP" if re.fullmatch(r"SAT\d", o) else o for o in vendor["ScanOptions"] if o != "IR"]
    assert opts == siemens


def test_enhanced_mr_values_in_classic_terms():
    t1 = _header("siemens_xa30/5_anat-T1w_acq-tfl")
    bold = _header("siemens_xa30/7_func-bold_task-fa_run-1")
    assert dicomio.get_param(bold, "InPlanePhaseEncodingDirection") == "COL"   # Enhanced writes COLUMN
    assert dicomio.get_param(t1, "InPlanePhaseEncodingDirection") == "ROW"
    assert dicomio.get_param(t1, "ImagingFrequency") == pytest.approx(123.262417)   # TransmitterFrequency
    assert dicomio.get_param(t1, "ImagedNucleus") == "1H"
    assert dicomio.get_param(t1, "AcquisitionMatrix") == [0, 128, 128, 0]
    assert dicomio.get_param(bold, "AcquisitionMatrix") == [64, 0, 0, 64]


@pytest.mark.parametrize("folder", ["ge_signa_hdxt", "philips/Magdeburg_2014_fmri", "philips/Vanderbilt_2018_dti",
                                    "philips/Bangalore_2008_dwi"])
def test_acquisition_matrix_derivation_agrees_with_classic_headers(folder):
    """The classic AcquisitionMatrix of GE and Philips headers, rebuilt from the Enhanced MR attributes."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    ds = _header(folder)
    freq = next(v for v in ds.AcquisitionMatrix[:2] if v)
    phase = next(v for v in ds.AcquisitionMatrix[2:] if v)
    fov = Dataset()
    fov.MRAcquisitionFrequencyEncodingSteps, fov.MRAcquisitionPhaseEncodingStepsInPlane = freq, phase
    fov.InPlanePhaseEncodingDirection = {"COL": "COLUMN"}.get(ds.InPlanePhaseEncodingDirection, ds.InPlanePhaseEncodingDirection)
    shared = Dataset()
    shared.MRFOVGeometrySequence = Sequence([fov])
    enhanced = Dataset()
    enhanced.SharedFunctionalGroupsSequence = Sequence([shared])
    assert dicomio.get_param(enhanced, "AcquisitionMatrix") == [int(v) for v in ds.AcquisitionMatrix]


# ----------------------------------------------------------------------------- identifiers and dates

def test_an_empty_patient_id_is_reported_as_empty():
    path = _files(REAL / "philips/Bangalore_2008_dwi")[0]
    header = check_dataset(path.read_bytes())["header"]
    assert header["patient"]["PatientID"] == ""
    assert identifier_problem(["PatientID"], header["patient"]) == "PatientID is empty"
    assert identifier_problem(["PatientID"], {}) == "PatientID is not present"


def _unusable_dates(src: Path, dest: Path, which=("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate")) -> None:
    """The files with their dates written as United Imaging writes an unknown one ('***')."""
    import warnings

    dest.mkdir(parents=True)
    for p in _files(src):
        ds = pydicom.dcmread(p)
        for kw in which:
            if kw in ds:
                ds[kw] = pydicom.DataElement(ds[kw].tag, "DA", "***")
        with _no_validation(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds.save_as(dest / p.name)


class _no_validation:
    """pydicom refuses to write an invalid DA unless told to (the point here is to write one)."""

    def __enter__(self):
        self._mode = pydicom_config.settings.writing_validation_mode
        pydicom_config.settings.writing_validation_mode = pydicom_config.IGNORE

    def __exit__(self, *exc):
        pydicom_config.settings.writing_validation_mode = self._mode


@pytest.mark.filterwarnings("ignore:Invalid value for VR DA")
def test_a_usable_date_is_taken_from_the_other_date_attributes(tmp_path):
    _unusable_dates(REAL / "ge_signa_hdxt", tmp_path / "study", which=("StudyDate",))
    header = check_dataset(_files(tmp_path / "study")[0].read_bytes())["header"]
    assert header["study_date"] == "20240425"   # the SeriesDate
    _unusable_dates(REAL / "ge_signa_hdxt", tmp_path / "all")
    assert check_dataset(_files(tmp_path / "all")[0].read_bytes())["header"]["study_date"] == "***"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """imtrial run of each conformant study over copies of its real files (module scope: runs are the cost)."""
    os.environ["IMTRIAL_KEY"] = KEY
    out = {}
    for name, exp in EXPECTED.items():
        base = tmp_path_factory.mktemp(name)
        inbox = base / "inbox"
        for f in exp["folders"]:
            shutil.copytree(REAL / f, inbox / f)
        trial = load(STUDIES / exp["study"])[0]
        summary = run_study(trial, inbox=inbox, workdir=base / "w", jobs=1)
        out[name] = {"trial": trial, "work": base / "w", "inbox": inbox, "summary": summary, "exp": exp}
    return out


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_the_pipeline_loses_nothing_and_classifies_every_series(runs, name):
    r = runs[name]
    s, exp = r["summary"], r["exp"]
    n_files = len(_files(r["inbox"]))
    assert s["instances"] == n_files and s["quarantined"] == 0 and not s["failed"]
    held = exp.get("held", {})
    assert s["exams"] == exp["exams"] and s["exam_status"] == {k: v for k, v in
                                                              {"done": exp["exams"] - len(held), "held": len(held)}.items() if v}
    st = Store(r["work"])
    try:
        done = [e for e in st.exams() if e["status"] == "done"]
        assert all(sr["classification"]["status"] == "matched" and sr["adherence"]["verdict"] == "pass"
                   for e in done for sr in e["series"])
        assert all(e["warnings"] == [] for e in done), [e["warnings"] for e in done]
        archived = sum(json.loads((r["work"] / "exams" / e["exam_key"] / "results" / "archived.json").read_text())["instances"]
                       for e in done)
        held_files = sum(len(_files(REAL / f)) for f in held)
        assert archived + held_files == n_files
        for e in st.exams("held"):
            w = next(w for w in e["warnings"] if w["code"] == "no_source_identifier")
            assert w["detail"].startswith(next(iter(held.values())))
    finally:
        st.close()
    assert [w["exam_key"] for w in s["waiting"]] == [e["exam_key"] for e in (Store(r["work"]).exams("held"))]


def test_a_held_exam_is_resolved_by_imtrial_assign(runs, capsys):
    r = runs["philips"]
    st = Store(r["work"])
    key = st.exams("held")[0]["exam_key"]
    st.close()
    assert cli.main(["status", "--workdir", str(r["work"])]) == 0
    out = capsys.readouterr().out
    assert f"{key} held: PatientID is empty; resolve with imtrial assign {key} --subject" in out
    # an unknown subject is refused, with nothing recorded
    assert cli.main(["assign", key[:8], "--subject", "PHIL-NOPE", "--study", str(STUDIES / "philips.imtrial"),
                     "--workdir", str(r["work"])]) == 1
    assert "no subject 'PHIL-NOPE' in the registry of PHIL" in capsys.readouterr().err
    with pytest.raises(AssignError) as err:
        assign_exam(r["trial"], r["work"], key, by="x", subject="PHIL-NOPE")
    assert err.value.diagnostic.code == "E816"
    assert Store(r["work"]).assignment_history(key) == []
    assert cli.main(["assign", key[:8], "--subject", "new", "--study", str(STUDIES / "philips.imtrial"),
                     "--workdir", str(r["work"]), "--by", "site-coordinator", "--note", "PatientID left empty"]) == 0
    assert f"assigned subject new to exam {key} (by site-coordinator)" in capsys.readouterr().out
    st = Store(r["work"])
    try:
        e = st.exam(key)
        assert e["status"] == "done" and e["subject_id"] == "PHIL-BLR-0001" and e["site"] == "BLR"
        assert [sr["adherence"]["verdict"] for sr in e["series"]] == ["pass"]
        assert set(e["steps"]) >= {"identify", "deidentify", "classify", "adherence", "archive"}
        hist = st.assignment_history(key)
        assert [(h["field"], h["value"], h["assigned_by"], h["note"]) for h in hist] == \
            [("subject", "new", "site-coordinator", "PatientID left empty")]
        assert summary_waiting(st) == []
    finally:
        st.close()
    # the other exams were not touched by the assignment, and a later run has nothing left to do
    assert all(v["status"] == "done" for e in Store(r["work"]).exams() for v in e["steps"].values())
    again = run_study(r["trial"], inbox=r["inbox"], workdir=r["work"], jobs=1)
    assert again["this_run"]["exams_processed"] == 0 and again["exam_status"] == {"done": 3}


def summary_waiting(st: Store) -> list:
    from imtrial_dsl.runner.run import summarize

    return summarize(st)["waiting"]


@pytest.mark.filterwarnings("ignore:Invalid value for VR DA")
def test_an_exam_with_unusable_dates_is_processed_with_visit_unassigned(tmp_path, capsys):
    os.environ["IMTRIAL_KEY"] = KEY
    _unusable_dates(REAL / "ge_signa_hdxt", tmp_path / "inbox")
    study = STUDIES / "ge_signa_hdxt.imtrial"
    trial = load(study)[0]
    s = run_study(trial, inbox=tmp_path / "inbox", workdir=tmp_path / "w", jobs=1)
    assert s["exam_status"] == {"done": 1} and s["classification"] == {"matched": 1} and s["adherence"] == {"pass": 1}
    st = Store(tmp_path / "w")
    e = st.exams()[0]
    st.close()
    assert e["visit"] == "unassigned" and e["exam_date"] is None and e["subject_id"] == "HDXT-GEN-0001"
    assert [w["code"] for w in e["warnings"]] == ["unassigned_visit"]
    assert "StudyDate '***' is not a date" in e["warnings"][0]["detail"]
    assert s["waiting"] == [{"exam_key": e["exam_key"], "subject": "HDXT-GEN-0001", "waiting": "unassigned",
                             "reason": "unassigned_visit", "detail": e["warnings"][0]["detail"]}]
    archived = tmp_path / "w" / "archive" / "records" / "HDXT-GEN-0001" / "unassigned"
    assert archived.is_dir()
    for bad in (["--date", "2024-02-30"], ["--visit", "baselin"]):
        assert cli.main(["assign", e["exam_key"], *bad, "--study", str(study), "--workdir", str(tmp_path / "w")]) == 1
    err = capsys.readouterr().err
    assert "--date '2024-02-30' is not a date" in err and "did you mean 'baseline'" in err
    assert cli.main(["assign", e["exam_key"], "--date", "2024-04-25", "--study", str(study),
                     "--workdir", str(tmp_path / "w"), "--by", "alice"]) == 0
    st = Store(tmp_path / "w")
    e2 = st.exam(e["exam_key"])
    st.close()
    assert (e2["visit"], e2["exam_date"], e2["in_window"], e2["warnings"]) == ("baseline", "20240425", True, [])
    assert (tmp_path / "w" / "archive" / "records" / "HDXT-GEN-0001" / "baseline").is_dir()
    ident = json.loads((tmp_path / "w" / "exams" / e["exam_key"] / "results" / "identity.json").read_text())
    assert ident["assigned"] == {"date": "2024-04-25"} and ident["visit"] == "baseline"
