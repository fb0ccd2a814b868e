"""The study design as CDISC USDM (Unified Study Definitions Model) JSON, built with the ``usdm`` package.

``imtrial export usdm STUDY -o DIR`` writes ``<STUDY>_usdm.json``: the study, its version and identifiers,
the arms, epochs derived from the visit kinds, one encounter per visit with its timing and window relative
to the anchor visit (day 0), the imaging activities of each encounter, and each protocol as a procedure.
The mapping is documented in ``docs/usdm.md``. Ids are stable (derived from names), so output is reproducible.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from imtrial_dsl import __version__, ir
from imtrial_dsl.files import atomic_write_text

NCI = "http://www.cdisc.org"   # the code system USDM uses for CDISC/NCI Thesaurus codes
# The CDISC controlled terminology release every code below is taken from: the package's own copy,
# usdm_excel/data/cdisc_ct_2024-09-27.yaml (tests/test_usdm.py checks each code and decode against it). Decodes are
# the terms' preferred terms, as the usdm package writes them (usdm_excel/cdisc_ct.py).
NCI_VERSION = "2024-09-27"
DICOM = "http://dicom.nema.org/resources/ontology/DCM"

# (code, preferred term), by the codelist the usdm package binds the attribute to (usdm_excel/data/cdisc_ct_config.yaml)
SPONSOR_ORG = ("C70793", "Clinical Study Sponsor")           # Organization.type, C188724
REGISTRY_ORG = ("C93453", "Study Registry")                   # Organization.type, C188724
OFFICIAL_TITLE = ("C207616", "Official Study Title")          # StudyTitle.type, C207419
INTERVENTIONAL = ("C98388", "Interventional Study")           # StudyDesign.studyType, C99077
PARALLEL = ("C82639", "Parallel Study")                       # StudyDesign.model, C99076
INVESTIGATIONAL_ARM = ("C174266", "Investigational Arm")      # StudyArm.type, C174222
DATA_IN_STUDY = ("C188866", "Data Generated Within Study")    # StudyArm.dataOriginType, C188727
VISIT = ("C25716", "Visit")                                   # Encounter.type, C188728
EPOCHS = {"screening": ("C202487", "Screening Epoch"),        # StudyEpoch.type, C99079
          "treatment": ("C101526", "Treatment Epoch")}
# Timing.type (codelist C201264) is not in the CT release; these are the codes the usdm package itself writes
# (usdm_excel/study_design_timing_sheet: FIXED, AFTER, BEFORE)
TIMING_FIXED = ("C201358", "Fixed Reference")
TIMING_AFTER = ("C201356", "After")
TIMING_BEFORE = ("C201357", "Before")
START_TO_START = ("C201355", "Start to Start")                # Timing.relativeToFrom, C201265
PHASES = {"1": ("C15600", "Phase I Trial"), "2": ("C15601", "Phase II Trial"), "3": ("C15602", "Phase III Trial"),
          "4": ("C15603", "Phase IV Trial")}                  # StudyDesign.studyPhase, C66737
# Procedure.code: the imaging method, from the SDTM Method codelist (C85492)
MODALITY = {"CT": ("C17204", "Computed Tomography"), "MR": ("C16809", "Magnetic Resonance Imaging"),
            "PT": ("C17007", "Positron Emission Tomography"), "XA": ("C20080", "X-ray Angiography"),
            "NM": ("C127514", "Nuclear Radiology Imaging Procedure"), "US": ("C17230", "Ultrasound Imaging"),
            "MG": ("C16818", "Mammography"), "DX": ("C18001", "Digital Radiography"),
            "CR": ("C190521", "Computed Radiography")}


def _duration(days: float) -> str:
    """ISO 8601 duration of a whole number of days (USDM timings): 42 -> 'P42D'."""
    d = abs(days)
    return f"P{int(d)}D" if float(d).is_integer() else f"PT{round(d * 24, 3):g}H"


def design(trial: ir.Trial) -> dict:
    """The USDM wrapper of the study as plain JSON-ready data (validated by loading it into usdm_model)."""
    from usdm_model import (Activity, Code, Encounter, InterventionalStudyDesign, Organization, Procedure,
                            ScheduledActivityInstance, ScheduleTimeline, Study, StudyArm, StudyCell,
                            StudyDesignPopulation, StudyEpoch, StudyIdentifier, StudyTitle, StudyVersion, Timing, TransitionRule,
                            Wrapper)
    from usdm_model.alias_code import AliasCode

    s = trial.study
    code = s.code if s else "STUDY"
    n = {"i": 0}

    def cid(kind: str, name: str = "") -> str:
        return f"{kind}_{name}" if name else f"{kind}_{code}"

    def c(pair: tuple[str, str], key: str) -> Code:
        n["i"] += 1
        return Code(id=f"Code_{key}", code=pair[0], codeSystem=NCI, codeSystemVersion=NCI_VERSION, decode=pair[1])

    orgs = [Organization(id=cid("Org", "sponsor"), name=(s.sponsor if s and s.sponsor else code), identifierScheme="sponsor",
                         identifier=code, type=c(SPONSOR_ORG, "org_sponsor"))]
    idents = [StudyIdentifier(id=cid("StudyIdentifier", "sponsor"), text=code, scopeId=orgs[0].id)]
    if s and s.registry:
        orgs.append(Organization(id=cid("Org", "registry"), name="ClinicalTrials.gov" if s.registry.upper().startswith("NCT")
                                 else "Clinical trial registry", identifierScheme="registry", identifier=s.registry,
                                 type=c(REGISTRY_ORG, "org_registry")))
        idents.append(StudyIdentifier(id=cid("StudyIdentifier", "registry"), text=s.registry, scopeId=orgs[1].id))

    visits = list(trial.schedule.visits) if trial.schedule else []
    scheduled = [v for v in visits if v.kind != "unscheduled"]
    epochs, epoch_of = [], {}
    for key, kinds in (("screening", ("screening",)), ("treatment", ("baseline", "followup"))):
        members = [v for v in scheduled if v.kind in kinds]
        if members:
            epochs.append(StudyEpoch(id=cid("Epoch", key), name=key.title(), label=key.title(),
                                     description=f"imaging visits {', '.join(v.name for v in members)}",
                                     type=c(EPOCHS[key], f"epoch_{key}")))
            for v in members:
                epoch_of[v.name] = epochs[-1].id
    for a, b in zip(epochs, epochs[1:]):
        a.nextId, b.previousId = b.id, a.id

    arm_names = list(s.arms) if s and s.arms else ["all_participants"]
    arms = [StudyArm(id=cid("Arm", a), name=a, label=a, type=c(INVESTIGATIONAL_ARM, f"arm_{a}"),
                     dataOriginDescription="Data collected in the study", dataOriginType=c(DATA_IN_STUDY, f"origin_{a}"))
            for a in arm_names]
    cells = [StudyCell(id=cid("Cell", f"{a.name}_{e.id}"), armId=a.id, epochId=e.id, elementIds=[]) for a in arms for e in epochs]

    activities = []
    for p in trial.protocols:
        mod = MODALITY.get(p.modality)
        # a modality the Method codelist has no term for keeps its DICOM code (CID 29), named as such
        pcode = c(mod, f"proc_{p.name}") if mod else Code(id=f"Code_proc_{p.name}", code=p.modality, codeSystem=DICOM,
                                                          codeSystemVersion="", decode=p.modality)
        proc = Procedure(id=cid("Procedure", p.name), name=p.name, label=p.title or p.name,
                         description=f"{p.modality} acquisition protocol {p.name}" + (f": {p.title}" if p.title else ""),
                         procedureType="Imaging", code=pcode)
        activities.append(Activity(id=cid("Activity", p.name), name=f"IMG_{p.name}", label=p.title or p.name,
                                   description=f"Acquire {p.name} ({p.modality})", definedProcedures=[proc]))
    for a, b in zip(activities, activities[1:]):
        a.nextId, b.previousId = b.id, a.id

    anchor = next((v for v in scheduled if v.offset.days == 0), scheduled[0] if scheduled else None)
    encounters, instances, timings = [], [], []
    for v in visits:
        enc = Encounter(id=cid("Encounter", v.name), name=v.name, label=v.name, type=c(VISIT, f"enc_{v.name}"),
                        description=(f"unscheduled visit on event: {v.event}" if v.event else
                                     f"{v.kind} visit" + ("" if v.kind == "unscheduled" else f", target day {v.offset.days:g}")),
                        # an event-driven visit starts when its event happens, not on a day of the timeline
                        transitionStartRule=TransitionRule(id=cid("TransitionRule", v.name), name=f"TR_{v.name}",
                                                           text=f"on event: {v.event}") if v.event else None)
        encounters.append(enc)
        if v.kind == "unscheduled":
            continue
        inst = ScheduledActivityInstance(id=cid("Instance", v.name), name=f"SAI_{v.name}", encounterId=enc.id,
                                         epochId=epoch_of.get(v.name), activityIds=[cid("Activity", a.name) for a in v.acquire])
        instances.append(inst)
        before = abs(v.window_before.days) if v.window_before else 0.0
        after = abs(v.window_after.days) if v.window_after else 0.0
        rel = v.offset.days - (anchor.offset.days if anchor else 0.0)
        kind = TIMING_FIXED if v is anchor else (TIMING_AFTER if rel >= 0 else TIMING_BEFORE)
        t = Timing(id=cid("Timing", v.name), name=f"TIM_{v.name}", label=f"day {v.offset.days:g}",
                   type=c(kind, f"timing_type_{v.name}"), value=_duration(rel), valueLabel=f"{rel:+g} days" if v is not anchor else "day 0",
                   relativeToFrom=c(START_TO_START, f"timing_rel_{v.name}"),
                   relativeFromScheduledInstanceId=inst.id,
                   relativeToScheduledInstanceId=None if v is anchor else cid("Instance", anchor.name),
                   windowLower=_duration(before), windowUpper=_duration(after),
                   windowLabel=f"-{before:g} / +{after:g} days")
        timings.append(t)
        enc.scheduledAtId = t.id
    for a, b in zip(encounters, encounters[1:]):
        a.nextId, b.previousId = b.id, a.id
    timelines = []
    if instances:
        timelines.append(ScheduleTimeline(id=cid("Timeline", "main"), name="imaging", label="Imaging schedule",
                                          description="Imaging visits relative to the anchor visit (day 0)",
                                          mainTimeline=True, entryCondition="Participant enrolled",
                                          entryId=instances[0].id, timings=timings, instances=instances))
    phase = PHASES.get((s.phase or "").strip()) if s else None
    study_design = InterventionalStudyDesign(
        id=cid("StudyDesign"), name=f"{code}_design", label=f"{code} imaging design",
        description=s.description if s and s.description else (s.title if s else ""),
        rationale=(s.hypothesis if s and s.hypothesis else "Imaging design of the study"),
        studyType=c(INTERVENTIONAL, "study_type"),
        studyPhase=AliasCode(id="AliasCode_phase", standardCode=c(phase, "phase")) if phase else None,
        model=c(PARALLEL, "model"), arms=arms, epochs=epochs, studyCells=cells, encounters=encounters,
        activities=activities, scheduleTimelines=timelines,
        population=StudyDesignPopulation(id=cid("Population"), name="participants", includesHealthySubjects=False))
    version = StudyVersion(id=cid("StudyVersion"), versionIdentifier=(s.version if s and s.version else "1"),
                           rationale=(s.hypothesis if s and s.hypothesis else "Imaging design"),
                           studyIdentifiers=idents, organizations=orgs, studyDesigns=[study_design],
                           titles=[StudyTitle(id=cid("Title"), text=s.title if s else code, type=c(OFFICIAL_TITLE, "title"))])
    wrapper = Wrapper(study=Study(name=code, label=s.title if s else code, versions=[version]),
                      usdmVersion=_usdm_model_version(), systemName="imtrial", systemVersion=__version__)
    return json.loads(wrapper.model_dump_json())


def _usdm_model_version() -> str:
    from usdm_info import __model_version__

    return __model_version__


def load(doc: dict) -> Any:
    """A USDM JSON document as the ``usdm`` package's model (raises pydantic's ValidationError when invalid)."""
    from usdm_model import Wrapper

    return Wrapper.model_validate(doc)


def export(trial: ir.Trial, graph: Any = None, out_dir: Path | str = ".") -> list[Path]:
    """Write ``<STUDY>_usdm.json`` (checked by loading it back into the usdm model); ``graph`` is not used."""
    doc = design(trial)
    load(doc)
    code = trial.study.code if trial.study else "STUDY"
    path = Path(out_dir) / f"{code}_usdm.json"
    atomic_write_text(path, json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    return [path]
