"""`imtrial export usdm`: the study design as CDISC USDM JSON, loaded back into the usdm package's model."""
from __future__ import annotations

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
