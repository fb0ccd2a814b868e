"""E-protocol exporter/importer: DICOM DPP + vendor-neutral JSON + scanner card.

Inputs are data: ``tests/golden/eprotocol/input_trial.json`` (an IR covering every constraint
kind, CT/XA/MR, model/software variants) and every study in ``examples/``. Goldens are the JSON
documents; regenerate with ``IMTRIAL_UPDATE_GOLDEN=1``.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import jsonschema
import pydicom
import pytest

from imtrial_dsl import ir
from imtrial_dsl.exporters import eprotocol as ep
from imtrial_dsl.exporters.eprotocol import dicom_dpp, json_io, targets

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).resolve().parent / "golden" / "eprotocol"
EXAMPLES = sorted((ROOT / "examples").glob("*.imtrial"))
UPDATE = os.environ.get("IMTRIAL_UPDATE_GOLDEN") == "1"

ENUM_CONSTRAINT_TYPES = {"RANGE_INCL", "RANGE_EXCL", "GREATER_OR_EQUAL", "LESS_OR_EQUAL", "GREATER_THAN", "LESS_THAN",
                         "EQUAL", "MEMBER_OF", "NOT_MEMBER_OF", "MEMBER_OF_CID", "UNCONSTRAINED"}  # PS3.3 Table 10.25-1
ONE_VALUE = {"GREATER_OR_EQUAL", "LESS_OR_EQUAL", "GREATER_THAN", "LESS_THAN", "EQUAL", "MEMBER_OF_CID"}
UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


def fixture_trial() -> ir.Trial:
    return ir.Trial.model_validate_json((GOLDEN / "input_trial.json").read_text())


def load_example(path: Path) -> ir.Trial:
    """Parse + lower (with imports): exporters need the IR, not the checker's verdict."""
    from imtrial_dsl.loader import load

    trial, diags, _ = load(str(path))
    errors = [d for d in diags if d.severity.value == "error"]
    assert trial is not None and not errors, "\n".join(str(d) for d in errors)
    return trial


@pytest.fixture(scope="module")
def fixture_export(tmp_path_factory):
    out = tmp_path_factory.mktemp("ep_fixture")
    trial = fixture_trial()
    return trial, ep.export(trial, None, out)


def _by_suffix(paths, suffix):
    return [p for p in paths if p.suffix == suffix and not p.name.endswith(".schema.json")]


def _strip(protocols):
    return {p.name: ir.strip_spans(p) for p in protocols}


# --------------------------------------------------------------------------- round trips

def test_round_trip_json_fixture(fixture_export):
    trial, paths = fixture_export
    assert _strip(ep.import_files(_by_suffix(paths, ".json"))) == _strip(trial.protocols)


def test_round_trip_dicom_fixture(fixture_export):
    trial, paths = fixture_export
    dpp = [p for p in trial.protocols if p.modality in dicom_dpp.DPP_MODALITIES]
    assert {p.modality for p in dpp} == {"CT", "XA"}
    assert _strip(ep.import_files(_by_suffix(paths, ".dcm"))) == _strip(dpp)


def test_import_single_base_file_is_the_base_protocol(fixture_export):
    trial, paths = fixture_export
    for proto in trial.protocols:
        for suffix in (".json", ".dcm") if proto.modality in dicom_dpp.DPP_MODALITIES else (".json",):
            base = next(p for p in _by_suffix(paths, suffix) if p.stem.endswith(f"_{proto.name}_base"))
            got = ep.import_file(base)
            want = proto.model_copy(update={"variants": []})
            assert ir.strip_spans(got) == ir.strip_spans(want), base.name


def test_import_single_variant_file_gives_the_whole_protocol(fixture_export):
    """A variant file alone carries the base constraints it overrides: the whole base plus that variant."""
    trial, paths = fixture_export
    proto = trial.protocol("CT_CAP")
    variant = next(v for v in proto.variants if v.vendor == "Canon")
    for suffix in (".dcm", ".json"):
        canon = next(p for p in _by_suffix(paths, suffix) if p.stem.endswith("_CT_CAP_Canon"))
        got = ep.import_file(canon)
        assert ir.strip_spans(got.constraints) == ir.strip_spans(proto.constraints), suffix
        assert ir.strip_spans(got.variants) == [ir.strip_spans(variant)], suffix
        effective, best = ir.effective_constraints(proto, "TOSHIBA", "V8.9", "Aquilion ONE")
        mine, _ = ir.effective_constraints(got, "TOSHIBA", "V8.9", "Aquilion ONE")
        assert ir.strip_spans(mine) == ir.strip_spans(effective)


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_every_variant_file_alone_compiles(example, tmp_path):
    """Each variant file imported alone gives a protocol that checks clean (amyloid's variant removes
    InversionTime: without the base constraint it removes, that is E311)."""
    from imtrial_dsl.check import check
    from imtrial_dsl.lower import lower
    from imtrial_dsl.parser import parse

    trial = load_example(example)
    paths = ep.export(trial, None, tmp_path)
    files = [p for p in paths if p.suffix in (".dcm", ".json") and not p.name.endswith(".schema.json")
             and not p.stem.endswith("_base")]
    assert files
    for f in files:
        got = ep.import_file(f)
        tree, diags = parse(ep.protocol_to_source(got), f.name)
        alone, ldiags = lower(tree, f.name)
        errors = [str(d) for d in diags + ldiags + check(alone) if d.severity.value == "error"]
        assert errors == [], f.name
        assert ir.strip_spans(got.constraints) == ir.strip_spans(trial.protocol(got.name).constraints), f.name


def _edited_dpp(path: Path, out: Path) -> Path:
    """The edits a vendor tool makes: SliceThickness upper bound 5 -> 3, KVP range 110..130 -> 100..140."""
    ds = pydicom.dcmread(path)
    for seq in ("AcquisitionProtocolElementSpecificationSequence", "ReconstructionProtocolElementSpecificationSequence"):
        for item in ds[seq][0].ParametersSpecificationSequence:
            if item.SelectorAttributeKeyword == "SliceThickness":
                item.ConstraintValueSequence[1].SelectorDSValue = "3"
            if item.SelectorAttributeKeyword == "KVP":
                item.ConstraintValueSequence[0].SelectorDSValue = "100"
                item.ConstraintValueSequence[1].SelectorDSValue = "140"
    ds.save_as(out, enforce_file_format=True)
    return out


def test_edited_dpp_imports_with_the_edit(tmp_path):
    trial = load_example(ROOT / "examples" / "oncology_ct.imtrial")
    paths = ep.export(trial, None, tmp_path / "x")
    base = next(p for p in paths if p.name == "ONC02_CT_CAP_base.dcm")
    protocols, notes = ep.import_report([_edited_dpp(base, tmp_path / "edited.dcm")])
    text = ep.protocol_to_source(protocols[0])
    assert "SliceThickness in 2.5 .. 3 mm" in text
    assert "KVP = 120 kV ± 20 kV" in text
    by_kw = {c.keyword: c for c in protocols[0].constraints}
    assert by_kw["SliceThickness"].values[1].value == 3.0 and by_kw["KVP"].tolerance.value == 20.0
    said = [d.message for d in notes if d.code == "W612"]
    assert any("SliceThickness" in m and "3" in m for m in said) and any("KVP" in m and "± 20" in m for m in said)


def test_edited_dpp_asymmetric_range_reads_as_a_range(tmp_path):
    trial = load_example(ROOT / "examples" / "oncology_ct.imtrial")
    paths = ep.export(trial, None, tmp_path / "x")
    ds = pydicom.dcmread(next(p for p in paths if p.name == "ONC02_CT_CAP_base.dcm"))
    item = next(i for i in ds.AcquisitionProtocolElementSpecificationSequence[0].ParametersSpecificationSequence
                if i.SelectorAttributeKeyword == "KVP")
    item.ConstraintValueSequence[1].SelectorDSValue = "140"
    ds.save_as(tmp_path / "e.dcm", enforce_file_format=True)
    protocols, notes = ep.import_report([tmp_path / "e.dcm"])
    assert "KVP in 110 .. 140 kV" in ep.protocol_to_source(protocols[0])
    assert any(d.code == "W612" and "not centred" in d.message for d in notes)


def test_edited_json_imports_with_the_edit(tmp_path):
    trial = load_example(ROOT / "examples" / "oncology_ct.imtrial")
    paths = ep.export(trial, None, tmp_path / "x")
    doc = json.loads(next(p for p in paths if p.name == "ONC02_CT_CAP_base.json").read_text())
    st = next(d for d in doc["parameters"] if d["keyword"] == "SliceThickness")
    st["values"][1]["value"] = 3          # the canonical number; source_value still says 5
    out = tmp_path / "edited.json"
    out.write_text(json.dumps(doc))
    protocols, notes = ep.import_report([out])
    assert "SliceThickness in 2.5 .. 3 mm" in ep.protocol_to_source(protocols[0])
    assert [d.code for d in notes].count("W613") >= 1


def test_import_several_files_merges_them(tmp_path):
    """`imtrial import eprotocol A B C` merges the base and variant files of a protocol into one."""
    import subprocess
    import sys

    trial = load_example(ROOT / "examples" / "oncology_ct.imtrial")
    paths = [p for p in ep.export(trial, None, tmp_path) if p.suffix == ".dcm" and "_CT_CAP_" in p.name]
    proc = subprocess.run([sys.executable, "-m", "imtrial_dsl", "import", "eprotocol", *map(str, paths)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("protocol CT_CAP ") == 1
    assert proc.stdout.count("  variant ") == len(trial.protocol("CT_CAP").variants)


def test_model_specification_manufacturer_as_the_scanner_writes_it(tmp_path):
    """Siemens devices get 'SIEMENS' and 'Siemens Healthineers' items, GE 'GE MEDICAL SYSTEMS', Canon (written
    'TOSHIBA' in the study) its headers' spellings; the real GE and Siemens headers' Manufacturer is among them."""
    trial = load_example(ROOT / "examples" / "oncology_ct.imtrial")
    paths = ep.export(trial, None, tmp_path)
    maker = {p.name: [str(i.Manufacturer) for i in pydicom.dcmread(p).ModelSpecificationSequence]
             for p in paths if p.suffix == ".dcm"}
    assert {"SIEMENS", "Siemens Healthineers"} <= set(maker["ONC02_CT_CAP_Siemens.dcm"])
    assert "GE MEDICAL SYSTEMS" in maker["ONC02_CT_CAP_GE.dcm"] and "GE" not in maker["ONC02_CT_CAP_GE.dcm"]
    assert {"TOSHIBA", "CANON_MEC", "TOSHIBA_MEC"} <= set(maker["ONC02_CT_CAP_Canon.dcm"])
    real = Path("/work/shared/reference/real-dicom")
    seen = set()
    for sub in ("ge_signa_hdxt", "siemens_xa30"):
        for f in sorted((real / sub).rglob("*"))[:40]:
            if f.is_file():
                try:
                    seen.add(str(pydicom.dcmread(f, stop_before_pixels=True, specific_tags=["Manufacturer"]).Manufacturer))
                except Exception:
                    continue
    from imtrial_dsl.vendors import normalize_vendor, scanner_manufacturers
    for name in seen:
        assert name in scanner_manufacturers(normalize_vendor(name)), name


def test_scanner_card_lists_regex_constraints_as_manual_checks(tmp_path):
    trial = load_example(ROOT / "examples" / "oncology_ct.imtrial")
    paths = ep.export(trial, None, tmp_path)
    card = next(p for p in paths if p.name == "ONC02_CT_CAP_Siemens.html").read_text()
    section = card.split("<h2>Check by hand</h2>", 1)[1].split("</div>", 1)[0]
    assert "Convolution Kernel" in section and "Contrast/Bolus Agent" in section
    doc = json.loads(next(p for p in paths if p.name == "ONC02_CT_CAP_Siemens.json").read_text())
    suggested = doc["series_naming"]["suggested_series_description"]
    assert suggested and suggested in section
    base = next(p for p in paths if p.name == "ONC02_CT_CHEST_LUNG_base.html").read_text()
    assert "Check by hand" not in base      # no regex constraint in that protocol's base


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_round_trip_examples(example, tmp_path):
    trial = load_example(example)
    paths = ep.export(trial, None, tmp_path)
    assert _strip(ep.import_files(_by_suffix(paths, ".json"))) == _strip(trial.protocols)
    dpp = [p for p in trial.protocols if p.modality in dicom_dpp.DPP_MODALITIES]
    assert _strip(ep.import_files(_by_suffix(paths, ".dcm"))) == _strip(dpp)
    for doc in _by_suffix(paths, ".json"):
        jsonschema.validate(json.loads(doc.read_text()), json_io.schema())


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_protocol_to_source_reparses(example):
    """Imported protocols printed as .imtrial source lower back to the same IR."""
    from imtrial_dsl.loader import load_text

    trial = load_example(example)
    src = "\n".join(ep.protocol_to_source(p) for p in trial.protocols)
    got, diags, _ = load_text(src, "roundtrip.imtrial")
    assert got is not None and not [d for d in diags if d.severity.value == "error"], "\n".join(map(str, diags))
    assert _strip(got.protocols) == _strip(trial.protocols)


# --------------------------------------------------------------------------- DICOM object

def test_dpp_objects_are_valid_per_standard_tables(fixture_export):
    trial, paths = fixture_export
    dcms = _by_suffix(paths, ".dcm")
    assert len(dcms) == sum(1 + len(p.variants) for p in trial.protocols if p.modality in dicom_dpp.DPP_MODALITIES)
    table = dicom_dpp.dpp_modules()["iods"]
    for modality, iod in table.items():
        assert {m["id"] for m in iod["modules"]} <= set(dicom_dpp.MODULE_EVIDENCE), "a module without evidence attributes"
    uids = set()
    for path in dcms:
        ds = pydicom.dcmread(path)
        modality = ds.EquipmentModality
        assert ds.SOPClassUID == table[modality]["sop_class_uid"]
        assert ds.file_meta.MediaStorageSOPClassUID == ds.SOPClassUID
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert UID_RE.match(ds.SOPInstanceUID) and len(ds.SOPInstanceUID) <= 64
        uids.add(ds.SOPInstanceUID)
        assert dicom_dpp.missing_modules(ds, modality) == []
        assert ds.ProtocolName and ds.PotentialScheduledProtocolCodeSequence[0].CodingSchemeDesignator.startswith("99")
        assert ds.ClinicalTrialProtocolID == "ONC02"
        assert ds.OtherClinicalTrialProtocolIDsSequence[0].ClinicalTrialProtocolID == "NCT09999998"
        for it in ds.ModelSpecificationSequence:
            assert it.Manufacturer
        for seq in ("AcquisitionProtocolElementSpecificationSequence", "ReconstructionProtocolElementSpecificationSequence"):
            for element in ds.get(seq, []):
                assert element.ProtocolElementNumber == 1
                for item in element.ParametersSpecificationSequence:
                    _check_constraint_item(item)
    assert len(uids) == len(dcms)


def _check_constraint_item(item):
    from pydicom.datadict import dictionary_VM, dictionary_VR

    ctype = item.ConstraintType
    assert ctype in ENUM_CONSTRAINT_TYPES
    assert item.ConstraintViolationSignificance in {"FAILURE", "WARNING", "INFORMATIVE"}
    assert item.ModifiableConstraintFlag in {"YES", "NO"}
    tag = int(item.SelectorAttribute)
    assert item.SelectorAttributeVR == dictionary_VR(tag).split(" or ")[0]
    values = item.get("ConstraintValueSequence", [])
    if ctype == "UNCONSTRAINED":
        assert not values
        return
    if ctype in ONE_VALUE:
        assert len(values) == 1
    elif ctype.startswith("RANGE"):
        assert len(values) == 2
        lo, hi = (v[f"Selector{item.SelectorAttributeVR}Value"].value for v in values)
        assert float(lo) <= float(hi)
    else:
        assert len(values) >= 1
    for v in values:
        assert f"Selector{item.SelectorAttributeVR}Value" in v
    vm = dictionary_VM(tag)
    if item.SelectorValueNumber:
        assert vm != "1", "Selector Value Number on a single-valued attribute"


def test_equal_with_tolerance_encoding(fixture_export):
    """EQUAL ± tol is RANGE_INCL [nominal-tol, nominal+tol] + Recommended Default Value = nominal, in DICOM units."""
    _, paths = fixture_export
    ds = pydicom.dcmread(next(p for p in _by_suffix(paths, ".dcm") if p.stem.endswith("_CT_CAP_base")))
    items = {it.SelectorAttributeKeyword: it for el in ds.AcquisitionProtocolElementSpecificationSequence
             for it in el.ParametersSpecificationSequence}
    kvp = items["KVP"]
    assert kvp.ConstraintType == "RANGE_INCL"
    assert [float(v.SelectorDSValue) for v in kvp.ConstraintValueSequence] == [110.0, 130.0]
    assert float(kvp.RecommendedDefaultValueSequence[0].SelectorDSValue) == 120.0
    rev = items["RevolutionTime"]  # canonical ms, stored in s: 500 ms ± 10% -> 0.45 .. 0.55 s
    assert [v.SelectorFDValue for v in rev.ConstraintValueSequence] == pytest.approx([0.45, 0.55])
    assert items["ImageType"].ConstraintType == "NOT_MEMBER_OF"
    assert items["ContrastBolusAgent"].ConstraintType == "UNCONSTRAINED"
    assert items["ContrastBolusAgent"].ConstraintViolationSignificance == "WARNING"
    assert items["XRayTubeCurrent"].ModifiableConstraintFlag == "YES"
    assert items["SpiralPitchFactor"].ConstraintViolationSignificance == "INFORMATIVE"
    recon = {it.SelectorAttributeKeyword for el in ds.ReconstructionProtocolElementSpecificationSequence
             for it in el.ParametersSpecificationSequence}
    assert recon == {"SliceThickness", "PixelSpacing"}
    pix = next(it for el in ds.ReconstructionProtocolElementSpecificationSequence
               for it in el.ParametersSpecificationSequence if it.SelectorAttributeKeyword == "PixelSpacing")
    assert pix.SelectorValueNumber == 1  # IR index 0 -> first value
    # addressing inside the performed protocol (PS3.3 Table C.34.9-2)
    assert [int(x) for x in kvp.SelectorSequencePointer] == [0x00189920, 0x00189325]
    assert [int(x) for x in kvp.SelectorSequencePointerItems] == [1, 1]
    assert int(items["CTDIvol"].SelectorSequencePointer) == 0x00189920
    assert int(pix.SelectorSequencePointer) == 0x00189934 and int(pix.SelectorSequencePointerItems) == 1


def test_standard_only_import(fixture_export, tmp_path):
    """Without the imtrial private data a DPP still reads as the nearest IR the standard can express."""
    _, paths = fixture_export
    src = next(p for p in _by_suffix(paths, ".dcm") if p.stem.endswith("_CT_CAP_base"))
    ds = pydicom.dcmread(src)
    ds.remove_private_tags()
    out = tmp_path / "plain.dcm"
    ds.save_as(out, enforce_file_format=True)
    got = ep.import_file(out)
    by_kw = {c.keyword: c for c in got.constraints}
    assert got.name == "CT_CAP" and got.title == "CT chest/abdomen/pelvis" and got.modality == "CT"
    assert got.preparation == ["Fast for 4 hours.", "Arms up."]
    assert by_kw["KVP"].kind == ir.ConstraintKind.RANGE_INCL
    assert [v.value for v in by_kw["KVP"].values] == [110.0, 130.0]
    assert by_kw["RevolutionTime"].values[0].value == pytest.approx(450.0) and by_kw["RevolutionTime"].values[0].unit == "ms"
    assert by_kw["ImageType"].kind == ir.ConstraintKind.NOT_EQUAL and by_kw["ImageType"].values == ["LOCALIZER"]
    assert "ContrastBolusAgent" not in by_kw  # UNCONSTRAINED carries no constraint
    assert by_kw["XRayTubeCurrent"].modifiable and by_kw["XRayTubeCurrent"].significance == ir.Significance.WARNING
    assert by_kw["PixelSpacing"].index == 0
    assert got.variants == []


def test_edited_constraint_type_wins_and_is_reported(fixture_export, tmp_path):
    _, paths = fixture_export
    ds = pydicom.dcmread(next(p for p in _by_suffix(paths, ".dcm") if p.stem.endswith("_CT_CAP_base")))
    item = ds.AcquisitionProtocolElementSpecificationSequence[0].ParametersSpecificationSequence[0]
    item.ConstraintType = "GREATER_OR_EQUAL"
    del item.ConstraintValueSequence[1:]
    out = tmp_path / "edited.dcm"
    ds.save_as(out, enforce_file_format=True)
    protocols, notes = ep.import_report([out])
    kw = str(item.SelectorAttributeKeyword)
    c = next(c for c in protocols[0].constraints if c.keyword == kw)
    assert c.kind == ir.ConstraintKind.GREATER_OR_EQUAL and c.tolerance is None
    assert any(d.code == "W612" and "Constraint Type" in d.message for d in notes)


def test_outputs_are_deterministic(tmp_path):
    trial = fixture_trial()
    a = ep.export(trial, None, tmp_path / "a")
    b = ep.export(trial, None, tmp_path / "b")
    assert [p.name for p in a] == [p.name for p in b]
    for x, y in zip(a, b):
        assert x.read_bytes() == y.read_bytes(), x.name


def test_targets_follow_effective_variant_selection():
    trial = fixture_trial()
    got = {t.label: sorted(d.id for _, d in t.devices) for t in targets.targets_of(trial, trial.protocol("CT_CAP"))}
    assert got == {"base": ["XX_CT1"], "Siemens": [], "Siemens-VA4x": ["HOU_CT2"], "Canon": ["OSA_CT1"],
                   "Siemens-SOMATOMForce-VBx": ["HOU_CT1"]}


def test_mr_gets_no_dicom_object(fixture_export):
    _, paths = fixture_export
    assert not [p for p in paths if "_T1w_" in p.name and p.suffix == ".dcm"]
    assert [p.name for p in paths if "_T1w_" in p.name] == ["ONC02_T1w_base.json", "ONC02_T1w_base.html"]


# --------------------------------------------------------------------------- JSON + goldens

def test_json_validates_against_published_schema(fixture_export):
    _, paths = fixture_export
    schema = json_io.schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    for doc in _by_suffix(paths, ".json"):
        jsonschema.validate(json.loads(doc.read_text()), schema)
    shipped = next(p for p in paths if p.name == json_io.SCHEMA_FILE)
    assert json.loads(shipped.read_text()) == schema


def test_schema_rejects_malformed_documents(fixture_export):
    _, paths = fixture_export
    doc = json.loads(next(p for p in _by_suffix(paths, ".json") if p.stem.endswith("_CT_CAP_base")).read_text())
    for mutate in (lambda d: d.update(format="imtrial-eprotocol/2"),
                   lambda d: d["parameters"][0].update(constraint="APPROX"),
                   lambda d: d["parameters"][1].update(values=[d["parameters"][1]["values"][0]]),  # range with 1 value
                   lambda d: d["parameters"][0].update(significance="fatal")):
        bad = json.loads(json.dumps(doc))
        mutate(bad)
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, json_io.schema())


def test_meaning_checks_reject_each_kind_of_nonsense(fixture_export):
    """Beyond shape: units of the dimension, DICOM keywords that exist, ranges in order, dicom.values = values."""
    _, paths = fixture_export
    doc = json.loads(next(p for p in _by_suffix(paths, ".json") if p.stem.endswith("_CT_CAP_base")).read_text())
    assert json_io.meaning_problems(doc) == []
    rng = next(i for i, d in enumerate(doc["parameters"]) if d["constraint"] == "RANGE_INCL"
               and isinstance(d["values"][0], dict))
    cases = {
        "unit": (lambda d: d["parameters"][rng]["values"][0].update(unit="furlong"), "canonical unit"),
        "source unit": (lambda d: d["parameters"][rng]["values"][0].update(source_unit="kV"), "is not a unit of"),
        "keyword": (lambda d: d["parameters"][rng].update(keyword="SliceThicknes"), "not a DICOM keyword"),
        "tag": (lambda d: d["parameters"][rng].update(tag="(0018,0080)"), "is not the tag of"),
        "order": (lambda d: d["parameters"][rng]["values"].reverse(), "not in order"),
        "dicom values": (lambda d: d["parameters"][rng]["dicom"]["values"].__setitem__(0, 999), "do not equal values"),
    }
    for name, (mutate, words) in cases.items():
        bad = json.loads(json.dumps(doc))
        mutate(bad)
        problems = json_io.meaning_problems(bad)
        assert any(words in p for p in problems), (name, problems)
        if name != "dicom values":   # an edit that left dicom.values behind imports (values[].value wins, W613)
            path = Path(os.environ.get("TMPDIR", "/tmp")) / f"imtrial-meaning-{name.replace(' ', '_')}.json"
            path.write_text(json.dumps(bad))
            with pytest.raises(ValueError, match=words.split()[0]):
                ep.import_file(path)
            path.unlink()


def _golden_compare(paths, folder: Path):
    docs = {p.name: p.read_text() for p in _by_suffix(paths, ".json")}
    if UPDATE:
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob("*.json"):
            old.unlink()
        for name, text in docs.items():
            (folder / name).write_text(text)
    assert sorted(docs) == sorted(p.name for p in folder.glob("*.json"))
    for name, text in docs.items():
        assert text == (folder / name).read_text(), f"{name} differs from golden (IMTRIAL_UPDATE_GOLDEN=1 to accept)"


def test_golden_fixture(fixture_export):
    _, paths = fixture_export
    _golden_compare(paths, GOLDEN / "fixture")


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_golden_examples(example, tmp_path):
    paths = ep.export(load_example(example), None, tmp_path)
    _golden_compare(paths, GOLDEN / example.stem)


def test_json_content_reads_for_people(fixture_export):
    _, paths = fixture_export
    doc = json.loads(next(p for p in _by_suffix(paths, ".json") if p.stem.endswith("_T1w_base")).read_text())
    by_kw = {p["keyword"]: p for p in doc["parameters"]}
    assert by_kw["RepetitionTime"]["requirement"] == "2.3 s ± 1% (2277 ms – 2323 ms)"
    assert by_kw["ImagingFrequency"]["dicom"] == {"constraint_type": "RANGE_INCL", "values": [127.69, 127.79],
                                                  "recommended_default": 127.74, "unit": "MHz", "vr": "DS"}
    assert by_kw["ScanningSequence"]["requirement"] == 'one of "GR", "IR", "GR\\IR"'


# --------------------------------------------------------------------------- scanner card

def test_scanner_card_content(fixture_export):
    trial, paths = fixture_export
    html = next(p for p in paths if p.name == "ONC02_CT_CAP_Canon.html").read_text()
    assert "Aquilion ONE" in html and "TOSHIBA" in html
    assert "Fast for 4 hours." in html and "IV contrast" in html
    assert "one of &#34;FC08&#34;, &#34;FC13&#34;" in html
    assert "between 50 kV" not in html and "between 50 mA and 500 mA (inclusive)" in html
    assert "CTDIvol" in html and "Not required on these scanners: CTDIvol" in html
    assert "SeriesDescription matches /(?i)venous|portal/" in html
    assert "Series description: <span class=\"mono\"><b>venous</b></span>" in html
    assert "MUST: deviation" in html and "SHOULD: note it" in html


def test_scanner_card_fits_one_page(fixture_export):
    import weasyprint

    _, paths = fixture_export
    for name in ("ONC02_CT_CAP_Siemens-SOMATOMForce-VBx.html", "ONC02_XA_TACE_base.html"):
        html = next(p for p in paths if p.name == name).read_text()
        doc = weasyprint.HTML(string=html).render()
        assert len(doc.pages) == 1, name


MAX_BYTES = {"AE": 16, "CS": 16, "SH": 16, "LO": 64, "PN": 64, "UI": 64, "ST": 1024, "LT": 10240, "DS": 16, "IS": 12}


def _vr_problems(ds) -> list[str]:
    from pydicom import config
    from pydicom.valuerep import validate_value

    problems = []

    def visit(dataset, elem):
        if elem.VR == "SQ" or elem.tag.is_private or elem.value is None:
            return
        values = elem.value if elem.VM > 1 else [elem.value]
        for v in values:
            if elem.VR in ("DS", "IS"):  # validate the text as written, not the parsed number
                v = getattr(v, "original_string", None) or str(v)
            try:
                validate_value(elem.VR, v, config.RAISE)
            except ValueError as exc:
                problems.append(f"{elem.tag} {elem.keyword}: {exc}")
            if isinstance(v, str) and elem.VR in MAX_BYTES and len(v.encode("utf-8")) > MAX_BYTES[elem.VR]:
                problems.append(f"{elem.tag} {elem.keyword}: {len(v.encode('utf-8'))} bytes > {MAX_BYTES[elem.VR]}")

    ds.walk(visit)
    return problems


def _dciodvfy_vr_errors(path: Path) -> list[str]:
    """VR/VM errors reported by dicom3tools' dciodvfy (its 2022 build has no DPP IOD, see docs/eprotocol.md)."""
    import shutil
    import subprocess

    exe = shutil.which("dciodvfy")
    if exe is None:
        return []
    out = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (out.stdout + out.stderr).splitlines()
            if line.startswith("Error") and "Information Object Not found" not in line]


@pytest.mark.parametrize("source", ["fixture"] + [p.stem for p in EXAMPLES])
def test_dpp_values_valid_for_their_vr(source, tmp_path):
    trial = fixture_trial() if source == "fixture" else load_example(ROOT / "examples" / f"{source}.imtrial")
    paths = _by_suffix(ep.export(trial, None, tmp_path), ".dcm")
    for path in paths:
        ds = pydicom.dcmread(path)
        assert _vr_problems(ds) == [], path.name
        assert _dciodvfy_vr_errors(path) == [], path.name


def test_unencodable_constraint_is_a_diagnostic_and_nothing_is_written(tmp_path):
    from imtrial_dsl.diagnostics import CompileErrors, Span

    trial = fixture_trial()
    bad = ir.Constraint(keyword="NotADicomKeyword", kind=ir.ConstraintKind.EQUAL, values=["x"],
                        span=Span(file="s.imtrial", line=7, col=3))
    trial.protocol("CT_CAP").constraints.append(bad)
    with pytest.raises(CompileErrors) as exc:
        ep.export(trial, None, tmp_path / "out")
    [d] = exc.value.diagnostics
    assert str(d.span) == "s.imtrial:7:3" and "'NotADicomKeyword' is not a DICOM keyword" in d.message
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content", [b"", b"{}", b'{"format": "imtrial-eprotocol/1"}', b"\x00" * 200, b"not json"])
def test_malformed_input_is_a_value_error(content, tmp_path):
    path = tmp_path / "in.json"
    path.write_bytes(content)
    with pytest.raises(ValueError):
        ep.import_file(path)


def _blocks(md: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", md, flags=re.S)


@pytest.mark.parametrize("doc", ["eprotocol.md", "inventory.md"])
def test_docs_examples_run(doc, tmp_path, monkeypatch):
    """The Python examples in the docs run as written (from a folder that has examples/)."""
    md = (ROOT / "docs" / doc).read_text()
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    monkeypatch.chdir(tmp_path)
    blocks = _blocks(md, "python")
    assert blocks
    for code in blocks:
        exec(compile(code, f"docs/{doc}", "exec"), {})


def test_docs_embed_the_published_schema_and_real_output(tmp_path):
    md = (ROOT / "docs" / "eprotocol.md").read_text()
    assert json.loads(_blocks(md, "json")[0]) == json_io.schema()
    from imtrial_dsl.exporters import inventory

    inv_md = (ROOT / "docs" / "inventory.md").read_text()
    paths = inventory.export(load_example(ROOT / "examples" / "amyloid_mri.imtrial"), None, tmp_path)
    shown = [b for b in _blocks(inv_md, "") if b.startswith("site,")][0]
    assert shown == paths[0].read_text()


# --------------------------------------------------------------------------- property: any constraint round-trips

from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from imtrial_dsl import units  # noqa: E402

# keyword -> unit to write values in (covers DS/IS/FD/US VRs and unit conversion to s / MHz)
_NUMERIC = {"KVP": "kV", "XRayTubeCurrent": "mA", "CTDIvol": "mGy", "SliceThickness": "mm", "RevolutionTime": "ms",
            "SpiralPitchFactor": "", "ImagingFrequency": "MHz", "Rows": "", "PixelSpacing": "mm", "CineRate": ""}
_STRINGS = {"ConvolutionKernel": ["B30f", "FC13", "STANDARD"], "ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"],
            "ScanningSequence": ["GR", "IR", "GR\\IR"]}


def _q(v: float, unit: str) -> ir.Quantity:
    c, cu, dim = units.to_canonical(v, unit)
    return ir.Quantity(value=c, unit=cu, dimension=dim, source_value=v, source_unit=unit)


# integers, halves (fractional bounds on integer-VR attributes) and 2-decimal values
_nums = st.one_of(st.integers(0, 5000).map(float), st.integers(0, 5000).map(lambda i: i + 0.5),
                  st.decimals(min_value=0, max_value=5000, places=2, allow_nan=False).map(float))


@st.composite
def _constraint(draw):
    sig = draw(st.sampled_from(list(ir.Significance)))
    mod = draw(st.booleans())
    note = draw(st.none() | st.text(alphabet="abc xyz", min_size=1, max_size=12))
    if draw(st.booleans()):
        kw = draw(st.sampled_from(sorted(_STRINGS)))
        kind = draw(st.sampled_from([ir.ConstraintKind.EQUAL, ir.ConstraintKind.NOT_EQUAL, ir.ConstraintKind.SET_OF,
                                     ir.ConstraintKind.MATCHES]))
        pool = _STRINGS[kw]
        vals = (draw(st.lists(st.sampled_from(pool), min_size=1, max_size=3, unique=True)) if kind == ir.ConstraintKind.SET_OF
                else ["^(?i)b\\d+f"] if kind == ir.ConstraintKind.MATCHES else [draw(st.sampled_from(pool))])
        return ir.Constraint(keyword=kw, kind=kind, values=vals, significance=sig, modifiable=mod, note=note)
    kw = draw(st.sampled_from(sorted(_NUMERIC)))
    unit = _NUMERIC[kw]
    # the kinds a DICOM Defined Procedure Protocol carries (the others: test_json_only_constructs)
    kind = draw(st.sampled_from([k for k in dicom_dpp._KIND_TO_DICOM if k != ir.ConstraintKind.MATCHES]))
    if kind in (ir.ConstraintKind.RANGE_INCL, ir.ConstraintKind.RANGE_EXCL):
        a, b = sorted([draw(_nums), draw(_nums)])
        vals = [_q(a, unit), _q(b, unit)]
    elif kind == ir.ConstraintKind.SET_OF:
        vals = [_q(v, unit) for v in draw(st.lists(_nums, min_size=1, max_size=3, unique=True))]
    else:
        vals = [_q(draw(_nums), unit)]
    tol = None
    if kind == ir.ConstraintKind.EQUAL and draw(st.booleans()):
        rel = draw(st.booleans())
        t = float(draw(st.decimals(min_value=0, max_value=20, places=1)))
        tol = ir.Tolerance(value=t, relative=True, source_value=t, source_unit="%") if rel else \
            ir.Tolerance(value=_q(t, unit).value, source_value=t, source_unit=unit)
    index = draw(st.sampled_from([None, 0, 1])) if kw == "PixelSpacing" else None
    return ir.Constraint(keyword=kw, kind=kind, values=vals, tolerance=tol, significance=sig, modifiable=mod,
                         index=index, note=note)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(base=st.lists(_constraint(), max_size=6, unique_by=lambda c: (c.keyword, c.index)),
       extra=st.lists(_constraint(), max_size=3, unique_by=lambda c: (c.keyword, c.index)), remove_first=st.booleans())
def test_property_any_protocol_round_trips(base, extra, remove_first, tmp_path_factory):
    variant = ir.Variant(vendor="GE", vendor_text="GE", constraints=extra,
                         remove=[base[0].keyword] if (remove_first and base and base[0].keyword not in {c.keyword for c in extra}) else [])
    proto = ir.Protocol(name="P", modality="CT", constraints=base, variants=[variant])
    trial = ir.Trial(study=ir.StudyInfo(code="S", title="t"), protocols=[proto])
    out = tmp_path_factory.mktemp("prop")
    paths = ep.export(trial, None, out)
    want = ir.strip_spans(proto)
    for suffix in (".json", ".dcm"):
        [got] = ep.import_files(_by_suffix(paths, suffix))
        assert ir.strip_spans(got) == want, suffix


def test_same_attribute_twice_is_a_diagnostic_for_dicom(tmp_path):
    """PS3.3 C.34.9: the same attribute may not be constrained twice with the same addressing."""
    from imtrial_dsl.diagnostics import CompileErrors, Span

    trial = fixture_trial()
    cap = trial.protocol("CT_CAP")
    cap.constraints.append(ir.Constraint(keyword="CTDIvol", kind=ir.ConstraintKind.GREATER_THAN, values=[_q(1, "mGy")],
                                         span=Span(file="s.imtrial", line=9, col=3)))
    with pytest.raises(CompileErrors) as exc:
        ep.export(trial, None, tmp_path / "out")
    assert {str(d.span) for d in exc.value.diagnostics} == {"s.imtrial:9:3"}
    assert "CTDIvol is constrained twice" in exc.value.diagnostics[0].message
    # different values of one multi-valued attribute are fine
    cap.constraints.pop()
    cap.constraints.append(ir.Constraint(keyword="PixelSpacing", kind=ir.ConstraintKind.LESS_THAN, values=[_q(1, "mm")], index=1))
    ep.export(trial, None, tmp_path / "ok")


def test_json_only_constructs_round_trip_in_json_and_stay_out_of_the_dpp(tmp_path):
    """Paths, private elements, value counts, 'if present', has/present and derived quantities: the JSON
    e-protocol carries them (and reads them back); a DICOM DPP cannot, so they are left out of it."""
    src = """
    study S "s" { }
    protocol P modality CT {
      KVP = 120 kV
      RadiopharmaceuticalInformationSequence[0].RadionuclideTotalDose in 185 .. 370 MBq
      private "GEMS_PARM_01" (0043,xx39)[0] = 1000
      ImageType has "AXIAL"
      ImageType count >= 3
      ContrastBolusAgent present
      CTDIvol <= 10 mGy if present
      TemporalResolution <= 200 ms
    }
    """
    from imtrial_dsl.compiler import compile_text

    trial = compile_text(src, "s.imtrial").trial
    paths = ep.export(trial, None, tmp_path)
    [got] = ep.import_files(_by_suffix(paths, ".json"))
    assert ir.strip_spans(got) == ir.strip_spans(trial.protocols[0])
    [dcm] = _by_suffix(paths, ".dcm")
    ds = pydicom.dcmread(dcm)
    selectors = [str(i.SelectorAttributeKeyword) for e in ds.AcquisitionProtocolElementSpecificationSequence
                 for i in e.get("ParametersSpecificationSequence", [])]
    assert selectors == ["KVP", "TemporalResolution"]      # what the standard attributes can say
    protocols, notes = ep.import_report([dcm])             # the rest comes back from imtrial's private block
    assert ir.strip_spans(protocols[0]) == ir.strip_spans(trial.protocols[0])
    assert [n.code for n in notes] == ["W620"] and "protocol P: 6 constraints" in notes[0].message
