"""`imtrial export usdm`: the study design as CDISC USDM JSON, loaded back into the usdm package's model."""
from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest

from imtrial_dsl.compiler import compile_file
from imtrial_dsl.exporters import usdm

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.imtrial"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_usdm_round_trips_through_the_usdm_model(path, tmp_path):
    trial = compile_file(path).trial
    [out] = usdm.export(trial, None, tmp_path)
    doc = json.loads(out.read_text())
    wrapper = usdm.load(doc)                       # the usdm package's pydantic model accepts it
    assert json.loads(wrapper.model_dump_json()) == doc
    version = wrapper.study.versions[0]
    assert version.versionIdentifier == trial.study.version
    design = version.studyDesigns[0]
    visits = trial.schedule.visits
    assert [e.name for e in design.encounters] == [v.name for v in visits]
    assert [a.name for a in design.arms] == (list(trial.study.arms) or ["all_participants"])
    assert [p.name for a in design.activities for p in a.definedProcedures] == [p.name for p in trial.protocols]
    timeline = design.scheduleTimelines[0]
    timing = {t.relativeFromScheduledInstanceId: t for t in timeline.timings}
    inst = {i.encounterId: i for i in timeline.instances}
    anchor = next(v for v in visits if v.offset.days == 0)
    for v in visits:
        if v.kind == "unscheduled":           # an Encounter without a timing; an event-driven one starts on its event
            enc = next(e for e in design.encounters if e.name == v.name)
            assert enc.scheduledAtId is None and f"Encounter_{v.name}" not in inst
            assert (enc.transitionStartRule.text if v.event else None) == (f"on event: {v.event}" if v.event else None)
            continue
        i = inst[f"Encounter_{v.name}"]
        assert i.activityIds == [f"Activity_{a.name}" for a in v.acquire]
        t = timing[i.id]
        assert t.value == f"P{int(abs(v.offset.days))}D"
        assert t.type.decode == ("Fixed Reference" if v is anchor else ("After" if v.offset.days > 0 else "Before"))
        assert t.windowLower == f"P{int(abs(v.window_before.days)) if v.window_before else 0}D"
        assert t.windowUpper == f"P{int(abs(v.window_after.days)) if v.window_after else 0}D"
        assert next(e for e in design.encounters if e.name == v.name).scheduledAtId == t.id


def test_oncology_screening_is_its_own_epoch_before_the_anchor(tmp_path):
    doc = usdm.design(compile_file(ROOT / "examples" / "oncology_ct.imtrial").trial)
    design = doc["study"]["versions"][0]["studyDesigns"][0]
    assert [e["name"] for e in design["epochs"]] == ["Screening", "Treatment"]
    t = next(t for t in design["scheduleTimelines"][0]["timings"] if t["name"] == "TIM_screening")
    assert (t["type"]["decode"], t["value"], t["windowLower"], t["windowUpper"]) == ("Before", "P21D", "P7D", "P13D")
    assert len(design["studyCells"]) == 2 * 2     # two arms x two epochs


def test_invalid_document_is_rejected_by_the_model():
    from pydantic import ValidationError

    doc = usdm.design(compile_file(ROOT / "examples" / "amyloid_mri.imtrial").trial)
    del doc["study"]["versions"][0]["titles"]
    with pytest.raises(ValidationError):
        usdm.load(doc)


# ---------------------------------------------------------------- codes against the usdm package's CDISC CT

def _usdm_data():
    import usdm_excel

    return Path(usdm_excel.__file__).resolve().parent


@functools.lru_cache(maxsize=None)
def _ct(version: str) -> dict:
    """{codelist: {conceptId: preferredTerm}} of the CDISC CT release the usdm package ships."""
    import yaml

    doc = yaml.load((_usdm_data() / "data" / f"cdisc_ct_{version}.yaml").read_text(), Loader=yaml.CSafeLoader)
    return {cl: {t["conceptId"]: t["preferredTerm"] for t in v["terms"]} for cl, v in doc.items()}


def _timing_types() -> dict:
    """The Timing.type codes the usdm package writes (its timing sheet's table; that codelist is not in the CT file)."""
    import ast

    src = (_usdm_data() / "study_design_timing_sheet" / "study_design_timing_sheet.py").read_text()
    fn = next(n for n in ast.walk(ast.parse(src)) if isinstance(n, ast.FunctionDef) and n.name == "_set_type")
    table = next(ast.literal_eval(n.value) for n in ast.walk(fn) if isinstance(n, ast.Assign) and isinstance(n.value, ast.Dict))
    return {v["c_code"]: v["pt"] for v in table.values()}


def _codes(node, klass=None, attr=None):
    """(klass, attribute, code dict) for every Code in a USDM document."""
    if isinstance(node, dict):
        if node.get("instanceType") == "Code":
            yield klass, attr, node
            return
        k = node.get("instanceType", klass)
        for key, v in node.items():
            if key == "standardCode" and node.get("instanceType") == "AliasCode":
                yield from _codes(v, klass, attr)
            else:
                yield from _codes(v, k, key)
    elif isinstance(node, list):
        for v in node:
            yield from _codes(v, klass, attr)


# attribute -> codelist, as the usdm package binds them (cdisc_ct_config.yaml uses some older attribute names)
_RENAMED = {("Organization", "type"): "organizationType", ("StudyArm", "type"): "studyArmType",
            ("StudyArm", "dataOriginType"): "studyArmDataOriginType", ("StudyEpoch", "type"): "studyEpochType",
            ("Encounter", "type"): "encounterType", ("Timing", "type"): "timingType",
            ("Timing", "relativeToFrom"): "timingRelativeToFrom", ("InterventionalStudyDesign", "model"): "interventionModel"}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_every_code_is_a_term_of_the_usdm_packages_cdisc_ct(path):
    import yaml

    config = yaml.safe_load((_usdm_data() / "data" / "cdisc_ct_config.yaml").read_text())["klass"]
    doc = usdm.design(compile_file(path).trial)
    timing = _timing_types()
    seen = 0
    for klass, attr, code in _codes(doc):
        if code["codeSystem"] != "http://www.cdisc.org":
            continue
        ct = _ct(code["codeSystemVersion"])
        cfg_klass = "StudyDesign" if klass.endswith("StudyDesign") else klass
        cfg_attr = _RENAMED.get((klass, attr), attr)
        codelist = config.get(cfg_klass, {}).get(cfg_attr)
        if codelist == "C201264":                                   # timing type: the package's own table
            assert timing.get(code["code"]) == code["decode"], (klass, attr, code)
        elif codelist is not None:
            assert codelist in ct, codelist
            assert ct[codelist].get(code["code"]) == code["decode"], (klass, attr, code, codelist)
        else:                                                        # Procedure.code: the SDTM Method codelist
            assert (klass, attr) == ("Procedure", "code"), (klass, attr)
            assert ct["C85492"].get(code["code"]) == code["decode"], code
        seen += 1
    assert seen >= 10


def test_every_modality_code_is_a_method_term():
    ct = _ct(usdm.NCI_VERSION)["C85492"]
    for modality, (code, decode) in usdm.MODALITY.items():
        assert ct.get(code) == decode, modality
