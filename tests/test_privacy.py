"""Privacy that holds against the standard and against people (issue 9): one test (at least) per numbered point.

The row-by-row conformance to PS3.15 Table E.1-1 is ``test_ps315_acceptance.py``; the descriptor corpus is
``tests/data/descriptor_cleaning.tsv``. Real headers come from pydicom's test files and the GE Signa HDxt
validation data in ``/work/shared/reference/real-dicom`` (BSD-2, see its README).
"""
from __future__ import annotations

import copy
import csv
import hashlib
import json
import os
import sqlite3
import subprocess
import sys
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from imtrial_dsl import cli
from imtrial_dsl import deid as D
from imtrial_dsl.compiler import compile_file, compile_text
from imtrial_dsl.loader import load_text
from imtrial_dsl.runner.run import preflight, run_study
from imtrial_dsl.store import Store
from imtrial_dsl.tools.minicorpus import MINI_STUDY, make_corpus

ROOT = Path(__file__).resolve().parent.parent
GE = Path("/work/shared/reference/real-dicom/ge_signa_hdxt")
KEY = "privacy-test-key-0123456789abcdef"
KEY_ENV = "IMTRIAL_PRIVACY_KEY"
SUBJECT = {"subject_id": "P01-BOS-0001", "site": "BOS", "visit": "baseline", "timepoint": "baseline"}


@pytest.fixture(autouse=True)
def _key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    monkeypatch.setenv("IMTRIAL_KEY", KEY)


def trial(deid: str, extra: str = "", code: str = "P01") -> "object":
    text = (f'import "stdlib/deid/ps315.imtrial"\nstudy {code} "Privacy" {{ sponsor "Example University" }}\n'
            f'{deid.replace("KEYENV", KEY_ENV)}\n{extra}\n')
    t, diags, _ = load_text(text, str(ROOT / f"{code}.imtrial"))
    assert not [d for d in diags if d.severity.value == "error"], diags
    return t


def run(t, ds: Dataset) -> Dataset:
    eng = D.Deidentifier(t, D.resolve_key(t))
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    src = pydicom.dcmread(BytesIO(buf.getvalue()))
    res = eng.deidentify(src, SUBJECT)
    assert res.ok, res.reason
    return pydicom.dcmread(BytesIO(D.to_bytes(src, src.file_meta.TransferSyntaxUID)))


def real(name: str = "MR_small.dcm") -> Dataset:
    return pydicom.dcmread(get_testdata_file(name))


def values(ds: Dataset) -> set[str]:
    out = set()
    for e in ds:
        if e.VR == "SQ":
            for it in e.value:
                out |= values(it)
        elif e.value not in (None, "", b""):
            out.add(e.value.decode("latin-1") if isinstance(e.value, bytes) else str(e.value))
    return out


# ----------------------------------------------------------------------------- 1. D sequences


def test_1_a_D_sequence_keeps_nothing_of_any_VR():
    ds = real()
    op = Dataset()                                             # (0008,1072) Operator Identification Sequence, X/D
    op.PersonIdentificationCodeSequence = Sequence([Dataset()])   # (0040,1101) D
    code = op.PersonIdentificationCodeSequence[0]
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "EMP-4471", "HOSPITAL_HR", "Operator J. Kim"
    op.InstitutionName = "Springfield General"
    op.PersonTelephoneNumbers = "555 0199"
    op.add_new(0x00401103, "LO", "x4471")                      # Person's Telephone Numbers … any VR inside
    op.add_new(0x00189345, "FD", 4471.0)                        # a number the table does not name
    ds.OperatorIdentificationSequence = Sequence([op])
    graphic = Dataset()                                        # (0070,0001) Graphic Annotation Sequence, D
    graphic.GraphicLayer = "LAYER DOE"
    graphic.TextObjectSequence = Sequence([Dataset()])
    graphic.TextObjectSequence[0].UnformattedTextValue = "Jane Doe 05-Jan-2024"
    graphic.TextObjectSequence[0].BoundingBoxAnnotationUnits = "PIXEL"
    ds.GraphicAnnotationSequence = Sequence([graphic])
    before = values(ds.OperatorIdentificationSequence[0]) | values(ds.GraphicAnnotationSequence[0])
    out = run(trial("deidentify using ps315_basic { key env KEYENV }"), ds)
    after = values(out.OperatorIdentificationSequence[0]) | values(out.GraphicAnnotationSequence[0])
    assert not (after & before), after & before


# ----------------------------------------------------------------------------- 2. C on non-text VRs


def test_2_clean_on_values_that_are_not_text_keeps_nothing_identifying():
    ds = real()
    ds.add_new(0x0016002B, "OB", b"Doe phone 555 0199")           # MakerNote, clean_descriptors C
    ds.add_new(0x0016004B, "OB", b"serial 4471 at BOS")           # DeviceSettingDescription
    ds.add_new(0x04000310, "OB", b"2024-01-05T10:22 TSA")          # CertifiedTimestamp, modified dates C
    ds.add_new(0x00340007, "OB", b"\x01\x02\x03\x04\x05\x06\x07\x08")   # FrameOriginTimestamp
    ds.add_new(0x00080201, "SH", "+0900")                          # TimezoneOffsetFromUTC
    item = Dataset()
    item.ReasonForTheAttributeModification = "ZQCODE"              # CS
    ds.add_new(0x04000561, "SQ", Sequence([item]))                 # Original Attributes Sequence
    t = trial("deidentify using ps315_basic with clean_descriptors, retain_longitudinal_modified_dates { key env KEYENV }")
    out = run(t, ds)
    for tag in (0x0016002B, 0x0016004B, 0x04000310, 0x00340007):
        assert tag not in out, hex(tag)
    assert out[0x00080201].value == "+0000"
    assert "ZQCODE" not in values(out)


# ----------------------------------------------------------------------------- 3. overrides that keep identity


def test_3_keeping_identity_is_said_and_only_a_declared_destination_gets_it(tmp_path):
    from imtrial_dsl.transfer.objects import check_object, may_receive_identified

    block = "deidentify using ps315_basic {\n keep PatientID, PatientName\n key env KEYENV\n}"
    undeclared = trial(block, 'transfer central folder "out"')
    diags = [d for d in compile_text(f'import "stdlib/deid/ps315.imtrial"\n{block.replace("KEYENV", KEY_ENV)}\n'
                                     'transfer central folder "out"\n', str(ROOT / "x.imtrial")).diagnostics]
    assert [d.code for d in diags if d.code == "E707"] == ["E707"]
    declared = trial(block, 'transfer irb folder "irb" receives identified\ntransfer central folder "out" via irb')
    out = run(declared, real())
    assert out.PatientIdentityRemoved == "NO" and out.PatientID == real().PatientID
    codes = [c.CodeValue for c in out.get("DeidentificationMethodCodeSequence", [])]
    assert "113100" not in codes
    assert "identity kept" in str(out.DeidentificationMethod)
    f = tmp_path / "x.dcm"
    out.save_as(f, enforce_file_format=True)
    obj = {"path": f, "sha256": hashlib.sha256(f.read_bytes()).hexdigest()}
    item, why = check_object(obj, identified_ok=may_receive_identified(undeclared, "central"))
    assert item is None and "receives identified" in why
    assert check_object(obj, identified_ok=may_receive_identified(declared, "irb"))[0] is not None
    assert not may_receive_identified(declared, "central")             # the final hop is not declared
    # keeping what an unchosen option would keep records that option's code, identity stays removed
    sex = run(trial("deidentify using ps315_basic {\n keep PatientSex\n key env KEYENV\n}"), real())
    assert sex.PatientIdentityRemoved == "YES"
    assert {"113100", "113108"} <= {c.CodeValue for c in sex.DeidentificationMethodCodeSequence}


# ----------------------------------------------------------------------------- 4. method codes only for what was done


def test_4_unimplemented_and_contradictory_options_are_refused():
    for opts, code in (("clean_recognizable_visual_features", "E705"),
                       ("retain_longitudinal_full_dates, retain_longitudinal_modified_dates", "E706")):
        text = f'import "stdlib/deid/ps315.imtrial"\ndeidentify using ps315_basic with {opts} {{ key env {KEY_ENV} }}\n'
        res = compile_text(text, str(ROOT / "o.imtrial"))
        assert code in {d.code for d in res.diagnostics}
        t, _, _ = load_text(text, str(ROOT / "o.imtrial"))
        with pytest.raises(D.DeidError) as err:
            D.Deidentifier(t, KEY.encode())
        assert err.value.diagnostic.code == code


# ----------------------------------------------------------------------------- 5. group 0000: test_ps315_acceptance.py
# ----------------------------------------------------------------------------- 6. trial-scoped pseudonyms


def test_6_two_trials_sharing_a_key_share_no_pseudonym():
    a = D.Deidentifier(trial("deidentify using ps315_basic { key env KEYENV }", code="TRA"), KEY.encode())
    b = D.Deidentifier(trial("deidentify using ps315_basic { key env KEYENV }", code="TRB"), KEY.encode())
    uids = [f"1.2.826.0.1.3680043.10.900.{i}" for i in range(401)]
    assert not {a.pseudo.uid(u) for u in uids} & {b.pseudo.uid(u) for u in uids}
    assert a.pseudo.date_offset("S-1") != b.pseudo.date_offset("S-1") or a.pseudo.hash_text("x", "LO") != b.pseudo.hash_text("x", "LO")
    assert a.pseudo.hash_text("MRN-1", "LO") != b.pseudo.hash_text("MRN-1", "LO")


# ----------------------------------------------------------------------------- 7. one study = one patient


def test_7_a_study_with_several_patients_is_split_by_patient(tmp_path):
    m = make_corpus(tmp_path / "c", subjects=1, slices=3, visits=(("baseline", 0),))
    files = [Path(m["inbox"]) / f for f in m["files"]]
    first = pydicom.dcmread(files[0])                       # the first file names nobody …
    del first.PatientID
    first.save_as(files[0], enforce_file_format=True)
    other = pydicom.dcmread(files[1])                        # … another one someone else
    other.PatientID = "PAT9999"
    other.save_as(files[1], enforce_file_format=True)
    s = run_study(compile_file(m["study"]).trial, inbox=m["inbox"], workdir=tmp_path / "w", jobs=1, progress=False)
    st = Store(tmp_path / "w")
    try:
        exams = st.exams()
        assert len({e["study_uid"] for e in exams}) == 1 and len(exams) == 3
        done = [e for e in exams if e["status"] == "done"]
        assert len(done) == 2 and len({e["subject_id"] for e in done}) == 2       # two patients, two subjects
        assert {e["n_instances"] for e in done} == {1, 4}                         # 6 files: 4 of PAT0001, 1 other
        (lost,) = [e for e in exams if e["status"] == "held"]                    # only the file without a PatientID
        assert lost["n_instances"] == 1
        assert all(any(w.get("code") == "study_split" for w in e["warnings"]) for e in done)
    finally:
        st.close()
    assert s["unmatched"] == [] and [w["exam_key"] for w in s["waiting"]] == [lost["exam_key"]]


# ----------------------------------------------------------------------------- 8. free-text cleaning


def _corpus():
    for line in (ROOT / "tests" / "data" / "descriptor_cleaning.tsv").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            text, want = line.split("\t")
            yield text, want


def test_8_descriptor_corpus_is_cleaned_as_expected():
    rows = list(_corpus())
    assert len(rows) >= 100
    t = trial("deidentify using ps315_basic with clean_descriptors { key env KEYENV }")
    eng = D.Deidentifier(t, D.resolve_key(t))
    wrong = []
    for text, want in rows:
        ds = real()
        ds.PatientName, ds.PatientID, ds.OtherPatientIDs = "Doe^Jane", "A7741209", "55-213-9"
        ds.AccessionNumber, ds.ReferringPhysicianName, ds.OperatorsName = "ACC99812", "Rivera^Carlos", "Kim^Lee"
        ds.InstitutionName, ds.StationName, ds.DeviceSerialNumber = "Springfield General Hospital", "MRC25309", "45123"
        ds.StudyDescription = text                            # LO: up to 64 characters, like every row here
        assert eng.deidentify(ds, SUBJECT).ok
        got = str(ds.get("StudyDescription", "") or "")
        if got != want:
            wrong.append((text, got, want))
    assert not wrong, wrong


# ----------------------------------------------------------------------------- 9. classify on the originals


def test_9_classification_reads_the_originals_and_names_only_deidentified_series(tmp_path):
    """A real GE series whose description holds the PatientID as a word ("fMRI Multiphase Des" of patient
    "fMRI"): cleaning removes the word, classification on the originals still matches it."""
    from imtrial_dsl import pipeline
    from imtrial_dsl.runner.invoke import find_node, run_staged

    exam = tmp_path / "exam"
    files = sorted(GE.glob("*.dcm"))[:3]
    for f in files:
        ds = pydicom.dcmread(f)
        ds.PatientID, ds.SeriesDescription = "fMRI", "fMRI Multiphase Des"
        (exam / "original" / "s").mkdir(parents=True, exist_ok=True)
        ds.save_as(exam / "original" / "s" / f.name, enforce_file_format=True)
    study = (MINI_STUDY.replace('match SeriesDescription ~ "(?i)t2"', 'match SeriesDescription ~ "^fMRI Multi"')
             .replace("modality MR  vendor Toshiba", "modality MR  vendor GE"))
    (tmp_path / "s.imtrial").write_text(study)
    t = compile_file(tmp_path / "s.imtrial").trial
    assert pipeline.STEPS["classify"].inputs[1] == "original/"
    ident = tmp_path / "identity.json"
    ident.write_text(json.dumps({"subject_id": "MINI01-HOS-00180", "site": "HOS", "visit": "baseline"}))
    run_staged(t, find_node(t, "classify"), [("original/", exam / "original"), ("results/identity.json", ident)],
               tmp_path / "out")
    cls = json.loads((tmp_path / "out" / "results" / "classification.json").read_text())
    (s,) = cls["series"]
    assert s["status"] == "matched" and s["protocol"] == "T2w"
    assert s["series_description"] == "Multiphase Des"             # as de-identification writes it
    orig = pydicom.dcmread(files[0], stop_before_pixels=True)
    text = json.dumps(cls)
    for ident_value in (str(orig.SeriesInstanceUID), str(orig.StudyInstanceUID), str(orig.SOPInstanceUID), "fMRI "):
        assert ident_value not in text
    # the files it names are the ones the deidentify step writes
    eng = D.Deidentifier(t, D.resolve_key(t))
    assert s["files"][0] == f"{eng.output_uid(0x00080018, str(orig.SOPInstanceUID))}.dcm" or \
        f"{eng.output_uid(0x00080018, str(orig.SOPInstanceUID))}.dcm" in s["files"]
    assert s["series_uid"] == eng.output_uid(0x0020000E, str(orig.SeriesInstanceUID))


def test_9_the_matching_attribute_warning_is_retired():
    res = compile_file(ROOT / "tests" / "scenarios" / "deid_removes_match_attribute.imtrial")
    assert "W407" not in {d.code for d in res.diagnostics}


# ----------------------------------------------------------------------------- a mini run, shared by 10, 11, 13, 17


ENV_ANALYSIS = '''
analysis envdump "What an analysis program sees" {
  input t2 from T2w
  output dump file
  run "python3 -c \\"import json, os, sys; json.dump(dict(os.environ), open(sys.argv[1], 'w'))\\" {dump}"
  env OMP_NUM_THREADS
}

transfer central dicomweb "https://central.example/dicom-web" auth env CENTRAL_TOKEN
'''


def _mini_run(base: Path, extra: str = "") -> dict:
    m = make_corpus(base, subjects=1, slices=2, visits=(("baseline", 0),))
    Path(m["study"]).write_text(Path(m["study"]).read_text() + extra)
    old = {k: os.environ.get(k) for k in ("IMTRIAL_KEY", "CENTRAL_TOKEN", "OMP_NUM_THREADS", "AWS_SECRET_ACCESS_KEY")}
    os.environ.update(IMTRIAL_KEY=KEY, CENTRAL_TOKEN="central-token-value", OMP_NUM_THREADS="3",
                      AWS_SECRET_ACCESS_KEY="aws-secret-value")
    try:
        t = compile_file(m["study"]).trial
        s = run_study(t, inbox=m["inbox"], workdir=base / "w", jobs=1, progress=False)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    assert not s["failed"] and not s["unmatched"], (s["failed"], s["unmatched"])
    return {"m": m, "trial": t, "work": base / "w", "base": base}


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    """The mini study with an analysis that dumps its environment and a transfer token in the environment."""
    return _mini_run(tmp_path_factory.mktemp("privacy"), ENV_ANALYSIS)


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """The mini study as it ships."""
    return _mini_run(tmp_path_factory.mktemp("plain"))


def test_10_analysis_programs_get_a_minimal_environment(mini):
    (dump,) = list(mini["work"].glob("exams/*/analyses/envdump/outputs/dump"))
    env = json.loads(dump.read_text())
    for secret in ("IMTRIAL_KEY", "CENTRAL_TOKEN", "AWS_SECRET_ACCESS_KEY"):
        assert secret not in env
    assert KEY not in json.dumps(env) and "central-token-value" not in json.dumps(env)
    assert env["OMP_NUM_THREADS"] == "3" and env["IMTRIAL_ANALYSIS"] == "envdump" and "PATH" in env
    res = compile_text(MINI_STUDY + ENV_ANALYSIS.replace("env OMP_NUM_THREADS", "env IMTRIAL_KEY, CENTRAL_TOKEN"),
                       str(ROOT / "mini.imtrial"))
    assert [d.code for d in res.diagnostics if d.code == "E711"] == ["E711", "E711"]


def test_10_graphviz_gets_no_secret(monkeypatch):
    from imtrial_dsl import graph

    seen = {}

    def fake_run(argv, **kw):
        seen.update(kw.get("env") or {"<inherited>": "everything"})
        return subprocess.CompletedProcess(argv, 0, b"<svg/>", b"")

    monkeypatch.setenv("CENTRAL_TOKEN", "central-token-value")
    monkeypatch.setattr(graph.subprocess, "run", fake_run)
    res = compile_file(ROOT / "examples" / "amyloid_mri.imtrial")
    graph.render_image(res.graph, "svg")
    assert seen and "<inherited>" not in seen and "IMTRIAL_KEY" not in seen and "CENTRAL_TOKEN" not in seen


def test_11_another_key_is_refused_before_anything_is_written(plain, tmp_path, monkeypatch, capsys):
    mini = plain
    work = mini["work"]
    before = {p: p.stat().st_mtime_ns for p in work.rglob("*") if p.is_file()}
    monkeypatch.setenv("IMTRIAL_KEY", "a-different-key-0123456789abcdef")
    problems = preflight(mini["trial"], work)
    assert problems and all("not the key this workdir was first run with" in p for p in problems)
    assert cli.main(["run", mini["m"]["study"], "--inbox", mini["m"]["inbox"], "--workdir", str(work)]) == 1
    assert "not the key this workdir was first run with" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in work.rglob("*") if p.is_file()} == before
    # a step run alone in the workdir refuses it too
    from imtrial_dsl.secrets import KeyMismatchError
    from imtrial_dsl.deid.pseudonyms import check_key

    with pytest.raises(KeyMismatchError):
        check_key(mini["trial"], b"a-different-key-0123456789abcdef", work / "state.sqlite")


def test_11_weak_keys_are_refused_and_keygen_makes_good_ones(monkeypatch, capsys, tmp_path):
    from imtrial_dsl.secrets import WeakKeyError

    for weak in ("k3y", "runner-test-key", "0123456789abcdef0123", "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"):
        monkeypatch.setenv(KEY_ENV, weak)
        with pytest.raises(WeakKeyError) as err:
            D.resolve_key(trial("deidentify using ps315_basic { key env KEYENV }"))
        assert err.value.diagnostic.code == "E703" and weak not in err.value.diagnostic.message
    assert cli.main(["keygen"]) == 0
    key = capsys.readouterr().out.strip()
    monkeypatch.setenv(KEY_ENV, key)
    assert D.resolve_key(trial("deidentify using ps315_basic { key env KEYENV }")) == key.encode()
    assert cli.main(["keygen", "-o", str(tmp_path / "k")]) == 0
    assert (tmp_path / "k").stat().st_mode & 0o777 == 0o600
    assert cli.main(["keygen", "-o", str(tmp_path / "k")]) == 1            # never overwritten


def test_12_a_relative_key_file_resolves_against_the_study_for_the_compiled_ir_too(tmp_path, monkeypatch):
    from imtrial_dsl.compiler import load_trial

    (tmp_path / "study").mkdir()
    (tmp_path / "study" / "s.imtrial").write_text(
        'import "stdlib/deid/ps315.imtrial"\nstudy K1 "k" { sponsor "s" }\n'
        'deidentify using ps315_basic { key file "site.key" }\n')
    (tmp_path / "study" / "site.key").write_text(KEY + "\n")
    monkeypatch.chdir(tmp_path / "study")
    assert cli.main(["compile", "s.imtrial", "-o", str(tmp_path / "s.ir.json")]) == 0
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert D.resolve_key(load_trial(tmp_path / "s.ir.json")) == KEY.encode()
    assert preflight(load_trial(tmp_path / "s.ir.json")) == []


def test_13_no_plain_map_without_a_reidentification_log_and_purge_drops_every_map(plain, tmp_path):
    st = Store(plain["work"])
    try:
        audit = st.audit_map()
        assert audit and all(r["source_value"].startswith("hmac:") for r in audit)
        assert "PAT0001" not in json.dumps(audit) and "HOS-MRN" not in json.dumps(audit)
        assert st.db.execute("SELECT count(*) FROM deid_audit").fetchone()[0] == 0
    finally:
        st.close()
    # with a re-identification log: both maps, plain, site-side; purge drops both
    m = make_corpus(tmp_path / "c", subjects=1, slices=2, visits=(("baseline", 0),))
    Path(m["study"]).write_text(Path(m["study"]).read_text().replace("  key env IMTRIAL_KEY\n}\n\nqc",
                                                                    "  key env IMTRIAL_KEY\n  reidentification_log yes\n}\n\nqc"))
    assert run_study(compile_file(m["study"]).trial, inbox=m["inbox"], workdir=tmp_path / "w", jobs=1,
                     progress=False)["failed"] == []
    st = Store(tmp_path / "w")
    try:
        assert [r["source_value"] for r in st.audit_map()] == ["PAT0001"]
        n_uid = st.db.execute("SELECT count(*) FROM deid_audit").fetchone()[0]
        assert n_uid > 0
        assert st.purge_audit_map() >= 1 + n_uid
        assert not st.audit_map() and st.db.execute("SELECT count(*) FROM deid_audit").fetchone()[0] == 0
    finally:
        st.close()


def test_13_the_cwl_workflow_puts_no_registry_beside_the_archive(tmp_path):
    import yaml

    from imtrial_dsl.exporters import cwl as cwl_export

    res = compile_file(ROOT / "examples" / "amyloid_mri.imtrial")
    cwl_export.export(res.trial, res.graph, tmp_path)
    wf = yaml.safe_load((tmp_path / "workflow.cwl").read_text())
    outs = wf["outputs"]
    assert "archive" in str(outs) and "registry" not in str(outs) and "state.sqlite" not in str(outs)
    tool = yaml.safe_load((tmp_path / "tools" / "identify.cwl").read_text())
    assert not [o for o in tool["outputs"] if "sqlite" in str(o)]
    assert {i["id"] if isinstance(i, dict) else i for i in (tool["inputs"] if isinstance(tool["inputs"], list)
                                                             else [{"id": k} for k in tool["inputs"]])} >= {"registry_dir"}


def test_13_the_charter_says_what_the_registry_stores():
    from imtrial_dsl.exporters import docs

    t = compile_file(ROOT / "examples" / "amyloid_mri.imtrial").trial
    text = docs._identifiers(t)["registry"]
    assert "keyed hashes" in text and "No re-identification log" in text


# ----------------------------------------------------------------------------- 14, 15, 16: reports


def test_14_15_reports_outside_the_site_show_no_real_date_and_keyed_codes(tmp_path, monkeypatch):
    from ops_data.data import AS_OF, study_data
    from ops_data.trial import KEY as OPS_KEY, KEY_ENV as OPS_ENV, trial as ops_trial

    from imtrial_dsl.deid import subject_date_shift
    from imtrial_dsl.ops import reports

    monkeypatch.setenv(OPS_ENV, OPS_KEY)
    t, data = ops_trial(), study_data()
    files = {}
    for role in ("central", "reader", "sponsor"):
        files |= reports.generate(t, data, tmp_path, AS_OF, role=role)
    files |= reports.generate(t, data, tmp_path, AS_OF, role="site", site="BOS")
    real_dates = {e.exam_date.isoformat() for e in data.exams if e.exam_date}
    for label in ("central", "reader", "sponsor"):
        text = "".join(p.read_text() for p in files[label])
        assert not [d for d in real_dates if d in text], label
    shifted = {(e.subject_id, (e.exam_date + __import__("datetime").timedelta(days=subject_date_shift(t, e.subject_id))).isoformat())
               for e in data.exams if e.exam_date}
    central = list(csv.DictReader(open(tmp_path / "central" / "exams.csv")))
    assert {(r["subject_id"], r["exam_date"]) for r in central} <= shifted
    bos = "".join(p.read_text() for p in files["site (BOS)"])
    assert any(e.exam_date.isoformat() in bos for e in data.exams if e.site == "BOS")   # its own real dates
    # reader codes and exam codes are keyed: not the unkeyed hashes an outsider could enumerate
    reader = list(csv.DictReader(open(tmp_path / "reader" / "visits.csv")))
    unkeyed = {"R-" + hashlib.sha256(f"AMY01\0{e.subject_id}".encode()).hexdigest()[:10].upper() for e in data.exams}
    assert reader and not {r["subject_id"] for r in reader} & unkeyed
    plain = {hashlib.sha256(e.exam_key.encode()).hexdigest()[:16] for e in data.exams} | {e.exam_key for e in data.exams}
    assert not {r["exam_key"] for r in central} & plain
    monkeypatch.setenv(OPS_ENV, "another-ops-key-0123456789abcdef")
    again = reports.generate(t, data, tmp_path / "again", AS_OF, role="reader")
    assert {r["subject_id"] for r in csv.DictReader(open(tmp_path / "again" / "reader" / "visits.csv"))} != \
        {r["subject_id"] for r in reader}
    assert again


def test_16_hide_accepts_only_known_fields():
    from ops_data.data import AS_OF, study_data
    from ops_data.trial import trial as ops_trial

    from imtrial_dsl import ir
    from imtrial_dsl.ops import reports
    from imtrial_dsl.ops.model import OpsError

    t = ops_trial()
    t.roles.append(ir.Role(name="leaky", kind="reader", blinded=True, hide=["arm", "sites"]))
    with pytest.raises(OpsError) as err:
        reports.generate(t, study_data(), "/nonexistent", AS_OF, role="leaky")
    assert err.value.diagnostic.code == "E708" and "sites" in err.value.diagnostic.message
    res = compile_text("role reader kind reader blinded hide arm, sites\n", str(ROOT / "r.imtrial"))
    (d,) = [d for d in res.diagnostics if d.code == "E708"]
    assert "did you mean 'site'" in (d.hint or "")


# ----------------------------------------------------------------------------- 17. results without device identity


def test_17_results_quote_no_institution_serial_or_station(plain):
    src = pydicom.dcmread(Path(plain["m"]["inbox"]) / plain["m"]["files"][0])
    secrets = {str(src.get(k)) for k in ("InstitutionName", "StationName", "DeviceSerialNumber", "InstitutionAddress")
               if str(src.get(k) or "").strip()}
    assert secrets
    def keys(o):
        if isinstance(o, dict):
            return set(o) | {k for v in o.values() for k in keys(v)}
        return {k for v in o for k in keys(v)} if isinstance(o, list) else set()

    results = list(plain["work"].glob("exams/*/results/**/*.json"))
    assert len(results) >= 4
    for p in results:
        text = p.read_text()
        for s in secrets:
            assert s not in text, (p.name, s)
        assert not keys(json.loads(text)) & {"serial", "station", "institution"}, p.name


# ----------------------------------------------------------------------------- the conformance report


def test_conformance_report_per_exam_and_in_the_management_report(plain, tmp_path):
    mini = plain
    from imtrial_dsl.ops import reports
    from imtrial_dsl.ops.model import load_study_data

    (doc,) = [json.loads(p.read_text()) for p in mini["work"].glob("exams/*/deid/conformance.json")]
    assert doc["instances"] == 4 and doc["patient_identity_removed"] == "YES"
    by_tag = {r["tag"]: r for r in doc["attributes"]}
    assert by_tag["(0010,0010)"]["table_action"] == "Z" and by_tag["(0010,0010)"]["decided_by"] == "basic profile"
    assert by_tag["(0008,0020)"]["decided_by"] == "retain_longitudinal_modified_dates"
    assert by_tag["(0008,0020)"]["applied"] == {"shift": 4}
    assert sum(doc["per_table_action"].values()) > 0
    assert "other" in doc["not_in_table"] and doc["not_in_table"]["other"]["kept"] > 0
    text = json.dumps(doc)
    assert "PAT0001" not in text and "Doe^Patient" not in text
    os.environ[KEY_ENV] = KEY
    files = reports.generate(mini["trial"], load_study_data(mini["work"], "MINI01"), tmp_path,
                             __import__("datetime").date(2026, 1, 1), workdir=mini["work"])
    names = {p.name for p in files["central"]}
    assert {"conformance.html", "conformance.json"} <= names
    html = (tmp_path / "central" / "conformance.html").read_text()
    assert "(0010,0010)" in html and "conformance.html" in (tmp_path / "central" / "report.html").read_text()
