"""De-identification engine: plan compilation from the generated PS3.15 profile, every action code,
keys, date shifting, UID remapping, burned-in quarantine / pixel cleaning, determinism, the step."""
from __future__ import annotations

import json
import sqlite3
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from imtrial_dsl import deid as D
from imtrial_dsl import ir
from imtrial_dsl.dicom_tables import CID7050, OPTION_CODES
from imtrial_dsl.secrets import SecretError

ROOT = Path(__file__).resolve().parent.parent
PS315 = ROOT / "stdlib" / "deid" / "ps315.imtrial"
KEY_ENV = "IMTRIAL_TEST_DEID_KEY"
SUBJECT = {"subject_id": "AMY01-BOS-0001", "site": "BOS", "visit": "baseline", "timepoint": "baseline",
           "timepoint_description": "Baseline visit"}


def make_trial(deid_block: str, key_env: str = KEY_ENV) -> ir.Trial:
    """A study (text, through the real parser/lowering/loader) that imports the generated ps315 profile."""
    from imtrial_dsl.loader import load_text

    text = (f'import "stdlib/deid/ps315.imtrial"\n'
            f'study T01 "De-identification test" {{ sponsor "Example University" }}\n'
            f'{deid_block.replace("KEYENV", key_env)}\n')
    trial, diags, _ = load_text(text, str(ROOT / "study.imtrial"))
    assert not [d for d in diags if d.severity.value == "error"], diags
    return trial


BASIC = "deidentify using ps315_basic { key env KEYENV }"
EXAMPLE = ("deidentify using ps315_basic with retain_longitudinal_modified_dates, retain_patient_characteristics,"
           " clean_descriptors {\n keep PatientSex, PatientAge\n replace InstitutionName with \"AMY01 imaging site\"\n"
           " empty ReferringPhysicianName\n key env KEYENV\n date_shift -365 .. -1 d\n}")


@pytest.fixture(autouse=True)
def _key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, "test-key-0123456789abcdef")


def engine(block: str = BASIC) -> D.Deidentifier:
    t = make_trial(block)
    return D.Deidentifier(t, D.resolve_key(t))


def roundtrip(eng: D.Deidentifier, path, identity=SUBJECT) -> tuple[D.InstanceResult, Dataset, bytes]:
    res, data = eng.deidentify_file(Path(path), identity)
    assert res.ok, (res.reason, res.detail)
    return res, pydicom.dcmread(BytesIO(data)), data


# --------------------------------------------------------------------------- the generated profile

def test_example_study_compiles_to_a_plan(monkeypatch):
    from imtrial_dsl.loader import load

    trial, diags, _ = load(ROOT / "examples" / "amyloid_mri.imtrial")
    assert not [d for d in diags if d.severity.value == "error"], diags
    monkeypatch.setenv("IMTRIAL_KEY", "example-key-0123456789abcdef")
    eng = D.Deidentifier(trial, D.resolve_key(trial))
    assert eng.plan.ops[D.parse_tag("InstitutionName")] == (D.SET, "AMY01 imaging site")
    assert eng.plan.shift_dates and len(trial.profile("ps315_basic").rules) == 621
    _, out, _ = roundtrip(eng, get_testdata_file("MR_small.dcm"))
    assert out.ClinicalTrialProtocolID == "AMY01" and out.PatientSex == "F"


def test_generated_profile_has_every_table_row():
    t = make_trial(BASIC)
    prof = t.profile("ps315_basic")
    assert prof.code == "113100" and len(prof.rules) == 621
    tags = {r.tag for r in prof.rules}
    assert {"(50xx,xxxx)", "(60xx,3000)", "(60xx,4000)", "(gggg,eeee)", "(0010,0010)"} <= tags
    acc = next(r for r in prof.rules if r.tag == "(0008,0050)")
    assert (acc.keyword, acc.action) == ("AccessionNumber", "Z")
    age = next(r for r in prof.rules if r.keyword == "PatientAge")
    assert age.action == "X" and age.options == {"retain_patient_characteristics": "K"}


@pytest.mark.parametrize("keyword, options, op", [
    ("AccessionNumber", [], D.EMPTY),                              # Z
    ("AcquisitionComments", [], D.DEL),                            # X
    ("AcquisitionComments", ["clean_descriptors"], D.CLEAN),       # X -> C
    ("PatientAge", [], D.DEL),
    ("PatientAge", ["retain_patient_characteristics"], D.KEEP),    # X -> K
    ("StudyDate", [], D.EMPTY),
    ("StudyDate", ["retain_longitudinal_modified_dates"], D.SHIFT),
    ("StudyDate", ["retain_longitudinal_full_dates"], D.KEEP),
    ("MakerNote", ["clean_descriptors"], D.DEL),                    # C on OB: nothing to vouch for -> removed
    ("DeviceSettingDescription", ["clean_descriptors"], D.DEL),
    ("FrameOriginTimestamp", ["retain_longitudinal_modified_dates"], D.DEL),
    ("CertifiedTimestamp", ["retain_longitudinal_modified_dates"], D.DEL),
    ("ReasonForTheAttributeModification", ["clean_descriptors"], D.DUMMY),   # C on CS -> a dummy
    ("TimezoneOffsetFromUTC", ["retain_longitudinal_modified_dates"], D.SET),  # C on SH under dates -> +0000
    ("SOPInstanceUID", [], D.UID),                                 # U
    ("SOPInstanceUID", ["retain_uids"], D.KEEP),
    ("InstitutionName", [], D.EMPTY),                              # X/Z/D -> Z (no fake device/site identity)
    ("InstitutionName", ["retain_institution_identity"], D.KEEP),
    ("AcquisitionDate", [], D.EMPTY),                              # X/Z -> Z
    ("ContentDate", [], D.DUMMY),                                  # Z/D -> D
    ("ReferencedImageSequence", [], D.SEQ_RECURSE),                # X/Z/U* -> remap inside
    ("ContentSequence", [], D.SEQ_STRICT),                         # D on a sequence
    ("ContentSequence", ["clean_structured_content"], D.SEQ_CLEAN),
    ("StationAETitle", ["retain_device_identity"], D.AEPSEUDO),    # C on an AE
    ("DateOfLastCalibration", ["retain_device_identity"], D.KEEP),
    ("DateOfLastCalibration", ["retain_device_identity", "retain_longitudinal_modified_dates"], D.SHIFT),  # K vs C: C
    ("OtherPatientIDsSequence", [], D.DEL),
])
def test_plan_resolves_actions(keyword, options, op):
    prof = make_trial(BASIC).profile("ps315_basic")
    plan = D.compile_plan(prof, ir.Deidentify(profile=ir.Ref(name="ps315_basic"),
                                              options=[ir.DeidOption(o) for o in options]))
    assert plan.ops[D.parse_tag(keyword)][0] == op


def test_overrides_win_over_the_profile():
    eng = engine(EXAMPLE)
    ops = eng.plan.ops
    assert ops[D.parse_tag("PatientSex")][0] == D.KEEP
    assert ops[D.parse_tag("InstitutionName")] == (D.SET, "AMY01 imaging site")
    assert ops[D.parse_tag("ReferringPhysicianName")][0] == D.EMPTY
    assert eng.plan.shift_dates and eng.plan.dates_state == "MODIFIED"
    assert [c for c, _ in eng.plan.method_codes] == ["113100", "113105", "113107", "113108"]
    assert eng.plan.method_text.split("\\") == [CID7050[c] for c in ("113100", "113105", "113107", "113108")]


# --------------------------------------------------------------------------- action codes on data

def _ds_with(**values) -> Dataset:
    src = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    for k, v in values.items():
        setattr(src, k, v)
    return src


def _run(eng, ds: Dataset, identity=SUBJECT) -> Dataset:
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    buf.seek(0)
    path = Path(pytest.tmp_dir) / "in.dcm"
    path.write_bytes(buf.getvalue())
    return roundtrip(eng, path, identity)[1]


@pytest.fixture(autouse=True)
def _tmp(tmp_path):
    pytest.tmp_dir = str(tmp_path)


def test_action_X_Z_D_K_U():
    eng = engine(BASIC)
    ds = _run(eng, _ds_with(AccessionNumber="ACC777", PatientBirthDate="19500101", InstitutionName="Boston General",
                            PerformingPhysicianName="Who^Doctor", Modality="MR",
                            FrameOfReferenceUID="1.2.3.4.5.6", StationName="BOSMR1", ProtocolName="T1 Doe"))
    assert "AccessionNumber" in ds and ds.AccessionNumber == ""                      # Z
    assert "PatientBirthDate" in ds and ds.PatientBirthDate == ""                    # Z
    assert "InstitutionName" in ds and ds.InstitutionName == ""                      # X/Z/D -> Z
    assert "PerformingPhysicianName" not in ds                                       # X
    assert ds.Modality == "MR"                                                       # not in the table: kept
    assert ds.FrameOfReferenceUID.startswith("2.25.") and ds.FrameOfReferenceUID != "1.2.3.4.5.6"   # U
    assert "StationName" in ds and ds.StationName == ""                              # X/Z/D -> Z
    assert ds.ProtocolName == "ANONYMIZED"                                           # X/D -> D
    assert ds.PatientIdentityRemoved == "YES"
    assert ds.LongitudinalTemporalInformationModified == "REMOVED"


def test_dummy_values_have_the_right_vr():
    for vr, value in [("PN", "ANONYMIZED"), ("DA", "19000101"), ("DT", "19000101000000"), ("TM", "000000"),
                      ("AS", "000Y"), ("CS", "ANONYMIZED"), ("IS", "0"), ("DS", "0"), ("US", 0), ("OB", b"\x00\x00")]:
        assert D.Deidentifier._dummy(vr) == value


def test_dummy_written_for_every_D_row_present():
    eng = engine(BASIC)
    # (0008,0090) ReferringPhysicianName is Z; (0008,1060) NameOfPhysiciansReadingStudy X; (0040,A123) PersonName D
    item = Dataset()
    item.PersonName = "Doe^Jane"
    item.ValueType = "PNAME"
    ds = _ds_with(ReferringPhysicianName="Ref^Doc")
    ds.ContentSequence = Sequence([item])
    out = _run(eng, ds)
    assert out.ReferringPhysicianName == ""
    assert out.ContentSequence[0].PersonName == "ANONYMIZED"
    assert out.ContentSequence[0].ValueType == "ANONYMIZED"      # inside a D sequence nothing original is kept


def test_sequence_D_replaces_free_text_C_cleans_it():
    def sr(text):
        item = Dataset()
        item.ValueType = "TEXT"
        item.TextValue = text
        ds = _ds_with(PatientName="Doe^Jane")
        ds.ContentSequence = Sequence([item])
        return ds

    strict = _run(engine(BASIC), sr("Jane Doe seen 2024-03-01, MRN 1234567, mild atrophy"))
    assert strict.ContentSequence[0].TextValue == "ANONYMIZED"
    cleaned = _run(engine("deidentify using ps315_basic with clean_structured_content { key env KEYENV }"),
                   sr("Jane Doe seen 2024-03-01, MRN 1234567, mild atrophy"))
    text = cleaned.ContentSequence[0].TextValue
    assert "mild atrophy" in text
    for leaked in ("Jane", "Doe", "2024-03-01", "1234567"):
        assert leaked not in text


def test_clean_descriptors_scrubs_identifiers_keeps_meaning():
    eng = engine("deidentify using ps315_basic with clean_descriptors { key env KEYENV }")
    out = _run(eng, _ds_with(PatientName="Rivera^Ana", PatientID="MRN998877", SeriesDescription="T1 MPRAGE Rivera 20240101",
                             StudyDescription="Brain MRN998877 follow-up"))
    assert out.SeriesDescription == "T1 MPRAGE"
    assert out.StudyDescription == "Brain follow-up"


def test_clean_text_function():
    assert D.clean_text("Scan of Ana RIVERA on 03/04/2024 tel +1 617 555 0100", ["Rivera", "Ana"]) == "Scan of on tel"


def test_uids_consistent_within_and_between_files(tmp_path):
    eng = engine(BASIC)
    a = _ds_with(SOPInstanceUID="1.2.3.100", StudyInstanceUID="1.2.3.1", SeriesInstanceUID="1.2.3.2")
    b = _ds_with(SOPInstanceUID="1.2.3.101", StudyInstanceUID="1.2.3.1", SeriesInstanceUID="1.2.3.2")
    ref = Dataset()
    ref.ReferencedSOPClassUID = a.SOPClassUID
    ref.ReferencedSOPInstanceUID = "1.2.3.100"
    b.ReferencedImageSequence = Sequence([ref])
    oa, ob = _run(eng, a), _run(eng, b)
    assert oa.StudyInstanceUID == ob.StudyInstanceUID != "1.2.3.1"
    assert ob.ReferencedImageSequence[0].ReferencedSOPInstanceUID == oa.SOPInstanceUID
    assert ob.ReferencedImageSequence[0].ReferencedSOPClassUID == a.SOPClassUID       # class UIDs are not PHI
    assert oa.file_meta.MediaStorageSOPInstanceUID == oa.SOPInstanceUID
    other = engine(BASIC)
    other.pseudo._key = b"another key"
    assert _run(other, a).SOPInstanceUID != oa.SOPInstanceUID
    assert len(oa.SOPInstanceUID) <= 64 and pydicom.uid.UID(oa.SOPInstanceUID).is_valid


def test_date_shift_per_subject_in_range_and_consistent():
    eng = engine(EXAMPLE)
    s1 = dict(SUBJECT)
    s2 = dict(SUBJECT, subject_id="AMY01-BOS-0002")
    o1 = _run(eng, _ds_with(StudyDate="20260315", AcquisitionDateTime="20260315101500.5", StudyTime="101500"), s1)
    o1b = _run(eng, _ds_with(StudyDate="20270320"), s1)
    o2 = _run(eng, _ds_with(StudyDate="20260315"), s2)
    import datetime as dt
    d = lambda s: dt.date(int(s[:4]), int(s[4:6]), int(s[6:8]))
    off1 = (d(o1.StudyDate) - d("20260315")).days
    assert -365 <= off1 <= -1
    assert (d(o1b.StudyDate) - d("20270320")).days == off1                     # same subject, next visit
    assert o1.AcquisitionDateTime == (d("20260315") + dt.timedelta(days=off1)).strftime("%Y%m%d") + "101500.5"
    assert o1.StudyTime == "101500"
    assert D.subject_date_shift(make_trial(EXAMPLE), "AMY01-BOS-0001") == off1
    offs = {D.Pseudonymizer(b"k" * 16, "T", -365, -1).date_offset(f"S{i}") for i in range(50)}
    assert len(offs) > 30 and min(offs) >= -365 and max(offs) <= -1
    assert (d(o2.StudyDate) - d("20260315")).days == D.subject_date_shift(make_trial(EXAMPLE), "AMY01-BOS-0002")


def test_full_dates_kept_and_no_shift_without_option():
    full = _run(engine("deidentify using ps315_basic with retain_longitudinal_full_dates { key env KEYENV }"),
                _ds_with(StudyDate="20260315"))
    assert full.StudyDate == "20260315" and full.LongitudinalTemporalInformationModified == "UNMODIFIED"
    assert D.subject_date_shift(make_trial(BASIC), "S") is None


def test_private_tags_removed_and_safe_private_kept():
    def with_private():
        ds = _ds_with()
        blk = ds.private_block(0x0019, "SIEMENS MR HEADER", create=True)
        blk.add_new(0x0C, "IS", "1000")              # B_value: on the safe list
        blk.add_new(0x20, "LO", "PATIENT SECRET")    # not on the list
        other = ds.private_block(0x0029, "ACME PHI", create=True)
        other.add_new(0x01, "LO", "Doe^Jane")
        return ds

    out = _run(engine(BASIC), with_private())
    assert not [e for e in out if e.tag.is_private]
    kept = _run(engine("deidentify using ps315_basic with retain_safe_private { key env KEYENV }"), with_private())
    priv = {(e.tag, str(e.value)) for e in kept if e.tag.is_private}
    assert (0x00190010, "SIEMENS MR HEADER") in priv and (0x0019100C, "1000") in priv
    assert all("SECRET" not in v and "Doe" not in v and "ACME" not in v for _, v in priv)
    assert "113111" in [i.CodeValue for i in kept.DeidentificationMethodCodeSequence]


def test_overlay_and_curve_groups():
    ds = pydicom.dcmread(get_testdata_file("MR-SIEMENS-DICOM-WithOverlays.dcm"))
    assert any(e.tag.group == 0x6000 for e in ds)
    ds.add_new(0x50000010, "US", 3)
    out = _run(engine(BASIC), ds)
    assert not [e for e in out if 0x5000 <= e.tag.group <= 0x60FF]


def test_overrides_hash_and_research_identifiers():
    eng = engine('deidentify using ps315_basic { hash AccessionNumber\n key env KEYENV }')
    out = _run(eng, _ds_with(AccessionNumber="ACC-42", PatientID="MRN1"))
    assert out.AccessionNumber not in ("", "ACC-42") and len(out.AccessionNumber) <= 16
    assert out.PatientID == out.PatientName == out.ClinicalTrialSubjectID == "AMY01-BOS-0001"
    assert out.ClinicalTrialProtocolID == "T01" and out.ClinicalTrialSponsorName == "Example University"
    assert out.ClinicalTrialSiteID == "BOS" and out.ClinicalTrialTimePointID == "baseline"
    assert out.ClinicalTrialTimePointDescription == "Baseline visit"
    codes = [(i.CodeValue, i.CodingSchemeDesignator, i.CodeMeaning) for i in out.DeidentificationMethodCodeSequence]
    assert codes == [("113100", "DCM", CID7050["113100"])]
    assert out.DeidentificationMethod == CID7050["113100"]


def test_cid7050_table_is_complete():
    assert set(OPTION_CODES.values()) | {"113100"} == set(CID7050)
    assert {o.value for o in ir.DeidOption} == set(OPTION_CODES)


# --------------------------------------------------------------------------- keys

def test_missing_key_is_a_clear_error(monkeypatch):
    monkeypatch.delenv(KEY_ENV)
    t = make_trial(BASIC)
    with pytest.raises(SecretError) as e:
        D.resolve_key(t)
    assert KEY_ENV in e.value.diagnostic.message and e.value.diagnostic.code == "E702"
    assert e.value.diagnostic.span is not None
    with pytest.raises(SecretError):
        D.subject_date_shift(make_trial(EXAMPLE), "S1")


def test_key_file_and_key_never_in_output(tmp_path):
    keyfile = tmp_path / "deid.key"
    keyfile.write_text("FILEKEY-SECRET-987-abcdefgh\n")
    t = make_trial(f'deidentify using ps315_basic {{ key file "{keyfile}" }}')
    assert D.resolve_key(t) == b"FILEKEY-SECRET-987-abcdefgh"
    eng = D.Deidentifier(t, D.resolve_key(t))
    _, _, data = roundtrip(eng, get_testdata_file("CT_small.dcm"))
    assert b"FILEKEY-SECRET-987-abcdefgh" not in data and b"test-key-0123456789abcdef" not in data


# --------------------------------------------------------------------------- determinism, files

def test_output_is_byte_deterministic():
    a = roundtrip(engine(EXAMPLE), get_testdata_file("MR_small.dcm"))[2]
    b = roundtrip(engine(EXAMPLE), get_testdata_file("MR_small.dcm"))[2]
    assert a == b
    assert a[:128] == b"\x00" * 128 and a[128:132] == b"DICM"


@pytest.mark.parametrize("name", ["MR_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm", "CT_small.dcm",
                                  "emri_small.dcm", "rtplan.dcm", "MR_small_jpeg_ls_lossless.dcm"])
def test_real_files_round_trip(name):
    src = pydicom.dcmread(get_testdata_file(name))
    _, out, _ = roundtrip(engine(EXAMPLE), get_testdata_file(name))
    assert out.file_meta.TransferSyntaxUID == src.file_meta.TransferSyntaxUID
    if "PixelData" in src:
        assert out.PixelData == src.PixelData
    assert out.SOPInstanceUID != src.SOPInstanceUID
    assert out.file_meta.ImplementationClassUID == D.IMPLEMENTATION_CLASS_UID


# --------------------------------------------------------------------------- burned-in annotation

def test_burned_in_quarantined_without_region():
    eng = engine(BASIC)
    res, data = eng.deidentify_file(Path(get_testdata_file("US1_UNCR.dcm")), SUBJECT)
    assert not res.ok and res.reason == "burned_in_annotation" and data is None
    flagged = _ds_with(BurnedInAnnotation="YES")
    path = Path(pytest.tmp_dir) / "flag.dcm"
    flagged.save_as(path, enforce_file_format=True)
    assert eng.deidentify_file(path, SUBJECT)[0].reason == "burned_in_annotation"


def test_burned_in_cleaned_with_matching_region():
    eng = engine("deidentify using ps315_basic { blank 0, 0, 640, 40 modality US rows 480\n key env KEYENV }")
    src = pydicom.dcmread(get_testdata_file("US1_UNCR.dcm"))
    assert src.pixel_array[:40].any()
    res, out, _ = roundtrip(eng, get_testdata_file("US1_UNCR.dcm"))
    assert res.pixel_cleaned
    arr = out.pixel_array
    assert not arr[:40].any() and np.array_equal(arr[40:], src.pixel_array[40:])
    assert "113101" in [i.CodeValue for i in out.DeidentificationMethodCodeSequence]
    assert out.BurnedInAnnotation == "NO"


# --------------------------------------------------------------------------- the step

def test_exam_deidentification_quarantines_refused_files_and_records_the_audit_map(tmp_path):
    exam = tmp_path / "exams" / "abc"
    (exam / "original" / "s1").mkdir(parents=True)
    for n in ("MR_small.dcm", "CT_small.dcm", "US1_UNCR.dcm"):
        (exam / "original" / "s1" / n).write_bytes(Path(get_testdata_file(n)).read_bytes())
    (exam / "original" / "s1" / "junk.dcm").write_bytes(b"not dicom at all")
    ident = tmp_path / "identity.json"
    ident.write_text(json.dumps(SUBJECT))
    reg = tmp_path / "state.sqlite"
    # the plain UID map is kept only where the study asks for a re-identification log
    t = make_trial(EXAMPLE + '\nidentifiers {\n subject "T01-{site}-{seq:04}"\n reidentification_log yes\n}')
    out = tmp_path / "deid"
    summary = D.deidentify_exam(t, exam, json.loads(ident.read_text()), out, registry=reg,
                              quarantine=tmp_path / "quarantine")
    assert summary["files"] == 4 and summary["written"] == 2
    reasons = sorted(q["reason"] for q in summary["quarantined"])
    assert reasons == ["burned_in_annotation", "missing_essentials"]   # junk reads as an empty dataset
    for q in summary["quarantined"]:
        qd = tmp_path / "quarantine" / q["sha256"]
        assert (qd / "file").read_bytes() == Path(q["file"]).read_bytes()
        assert json.loads((qd / "reason.json").read_text())["reason"] == q["reason"]
    files = sorted(out.glob("*.dcm"))
    assert len(files) == 2 and all(pydicom.dcmread(f).SOPInstanceUID == f.stem for f in files)
    rows = sqlite3.connect(reg).execute("SELECT kind, original, pseudonym FROM deid_audit").fetchall()
    originals = {pydicom.dcmread(get_testdata_file("MR_small.dcm")).SOPInstanceUID}
    assert originals <= {o for k, o, _ in rows if k == "uid"}
    assert any(k == "date_shift_days" for k, _, _ in rows)
    text = json.dumps(summary)
    assert "test-key" not in text
    # re-run: same bytes, audit idempotent
    first = {f.name: f.read_bytes() for f in files}
    D.deidentify_exam(t, exam, json.loads(ident.read_text()), out, registry=reg)
    assert {f.name: f.read_bytes() for f in sorted(out.glob("*.dcm"))} == first
    assert sqlite3.connect(reg).execute("SELECT count(*) FROM deid_audit").fetchone()[0] == len(rows)


def test_clean_graphics_keeps_overlay_only_with_region_blanked():
    src = pydicom.dcmread(get_testdata_file("MR-SIEMENS-DICOM-WithOverlays.dcm"))
    rows, cols = src[0x60000010].value, src[0x60000011].value
    before = np.unpackbits(np.frombuffer(src[0x60003000].value, np.uint8), bitorder="little")[: rows * cols]
    before = before.reshape(rows, cols)
    assert before.any()
    no_region = _run(engine("deidentify using ps315_basic with clean_graphics { key env KEYENV }"), src)
    assert not [e for e in no_region if e.tag.group == 0x6000]
    with_region = _run(engine("deidentify using ps315_basic with clean_graphics {\n"
                              f" blank 0, 0, {cols}, {rows // 2} modality MR\n key env KEYENV }}"),
                       pydicom.dcmread(get_testdata_file("MR-SIEMENS-DICOM-WithOverlays.dcm")))
    after = np.unpackbits(np.frombuffer(with_region[0x60003000].value, np.uint8), bitorder="little")[: rows * cols]
    after = after.reshape(rows, cols)
    assert not after[: rows // 2].any() and np.array_equal(after[rows // 2:], before[rows // 2:])
    assert "113103" in [i.CodeValue for i in with_region.DeidentificationMethodCodeSequence]


def test_docs_example_loads_and_runs(monkeypatch):
    from imtrial_dsl.loader import load_text

    doc = (ROOT / "docs" / "deidentification.md").read_text()
    block = doc.split("```imtrial\n", 1)[1].split("```", 1)[0]
    trial, diags, _ = load_text(block, str(ROOT / "docs" / "example.imtrial"))
    assert not [d for d in diags if d.severity.value == "error"], diags
    monkeypatch.setenv("IMTRIAL_KEY", "doc-key-0123456789abcdef")
    eng = D.Deidentifier(trial, D.resolve_key(trial))
    res, out, _ = roundtrip(eng, get_testdata_file("US1_UNCR.dcm"))
    assert res.pixel_cleaned and not out.pixel_array[:40].any()
    assert out.ClinicalTrialProtocolID == "DEID01"
    assert [i.CodeValue for i in out.DeidentificationMethodCodeSequence] == ["113100", "113101", "113105", "113107",
                                                                               "113108"]
