"""The step table: every pipeline step, once.

The graph (``imtrial_dsl.graph``) is built from this table plus the study's QC checks and analyses;
the local runner (``imtrial_dsl.runner.run``) walks that graph; ``imtrial step NAME`` runs one node
of it; the CWL exporter (``exporters/cwl.py``) generates its tools and their wiring from it. Nothing
else lists the steps or their order: the order *is* the data dependencies declared here.

A step reads and writes **paths of an exam folder** (``results/identity.json``, ``deid/`` …, see
``imtrial_dsl.workdir``) and, for steps over the whole study or shared state, **workdir objects**
(``inbox/``, ``archive/``, ``state.sqlite``, ``measurements.csv``). An edge A → B exists when B reads
a path that A writes. A step with ``per="qc"`` or ``per="analysis"`` becomes one node per QC check or
analysis of the study (``qc:snr``, ``analysis:hipvol``), its paths filled in for that check/analysis.

Scopes:

* ``study`` — once per run, over the workdir (ingest, the measurements table);
* ``exam``  — once per exam. With ``shared`` set it writes state that exams share (the identity
  registry, the archive): the local runner serializes it (``ordered``: one exam at a time in exam-date
  order, because the registry hands out sequence numbers; otherwise under the resource's lock), and
  a CWL engine, which stages inputs read-only, runs it as one batch tool over every exam.

The function of a step is named by an import path (``module:function``) so that reading the table
(as ``imtrial check`` and ``imtrial graph`` do) imports none of the runner's heavy dependencies.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Literal, Optional

from . import ir
from . import workdir as W

Scope = Literal["study", "exam"]


@dataclass(frozen=True)
class Resources:
    """What one run of a node needs (a cluster scheduler reads these from the CWL export)."""

    cores: int = 1
    ram_mb: int = 1024
    time_limit_s: Optional[int] = None   # None: no limit (an analysis sets its own from ``timeout``)


@dataclass(frozen=True)
class Step:
    """One pipeline step."""

    name: str
    label: str
    doc: str
    scope: Scope
    func: str                                  # "module:function"; called with a runner context
    inputs: tuple[str, ...] = ()               # exam-folder paths read ("/" at the end: a folder)
    outputs: tuple[str, ...] = ()              # exam-folder paths written (always all of them)
    study_inputs: tuple[str, ...] = ()         # workdir objects read
    study_outputs: tuple[str, ...] = ()        # workdir objects written
    shared: Optional[str] = None               # "registry" | "archive": state shared by all exams
    ordered: bool = False                      # shared state that needs exams in exam-date order
    per: Optional[Literal["qc", "analysis"]] = None
    resources: Resources = field(default_factory=Resources)
    secrets: tuple[str, ...] = ()              # the study's key sources it reads: "identifiers", "deidentify"
    study_parts: tuple[str, ...] = ()          # Trial fields whose change makes its results stale
    kind: str = "step"                         # graph node kind: step | qc | analysis

    def function(self) -> Callable[..., dict]:
        mod, _, attr = self.func.partition(":")
        return getattr(importlib.import_module(mod), attr)


@dataclass(frozen=True)
class Node:
    """One node of the compiled graph: a step, for one QC check or analysis where ``per`` says so."""

    id: str
    step: Step
    ref: Optional[str] = None
    label: str = ""
    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    resources: Resources = field(default_factory=Resources)
    protocols: tuple[str, ...] = ()            # protocols whose series the node reads (QC, analyses)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def scope(self) -> Scope:
        return self.step.scope


STEPS: dict[str, Step] = {}


def register(step: Step) -> Step:
    """Add a step to the table (the built-in steps below; a test registers a toy one)."""
    if step.name in STEPS:
        raise ValueError(f"step {step.name!r} is already in the step table")
    STEPS[step.name] = step
    return step


def unregister(name: str) -> None:
    STEPS.pop(name, None)


# --------------------------------------------------------------------------- the built-in steps

register(Step(
    "ingest", "Ingest DICOM",
    "Verify inbox files are DICOM, group them by study into exams, quarantine the rest (nothing is lost).",
    scope="study", func="imtrial_dsl.runner.ingest:ingest_step",
    study_inputs=("inbox/",), study_outputs=("exams/", "quarantine/"),
    outputs=(W.EXAM_JSON, W.ORIGINAL),
    resources=Resources(cores=2, ram_mb=2048),
    study_parts=("identifiers",)))

register(Step(
    "identify", "Assign research identifiers",
    "Registry lookup or assignment of the subject ID, site, device and visit of each exam (serially, in exam-date order).",
    scope="exam", func="imtrial_dsl.runner.identify:identify_step",
    inputs=(W.EXAM_JSON,), outputs=(W.IDENTITY,),
    study_inputs=("state.sqlite",), study_outputs=("state.sqlite",),
    shared="registry", ordered=True, secrets=("identifiers",),
    study_parts=("study", "identifiers", "sites", "schedule", "protocols", "deidentify")))

register(Step(
    "deidentify", "De-identify",
    "DICOM PS3.15 Annex E profile, options and overrides; research identifiers inserted; UIDs and dates remapped per subject.",
    scope="exam", func="imtrial_dsl.deid.step:deidentify_step",
    inputs=(W.ORIGINAL, W.IDENTITY), outputs=(W.DEID,),
    resources=Resources(cores=1, ram_mb=2048), secrets=("deidentify",),
    study_parts=("study", "deidentify", "deid_profiles", "identifiers")))

# Classification, adherence and QC read the ORIGINAL headers at the site (matching must not depend on what
# de-identification removes or cleans); their results name series by their de-identified UIDs and carry no
# PHI, so the archive and the analyses (which read deid/) find the de-identified files from them.
register(Step(
    "classify", "Classify series",
    "Match every series (original headers, at the site) to a protocol by its rules; the result names the "
    "de-identified series and files.",
    scope="exam", func="imtrial_dsl.runner.classify:classify_step",
    inputs=(W.EXAM_JSON, W.ORIGINAL, W.IDENTITY), outputs=(W.CLASSIFICATION,), secrets=("deidentify",),
    study_parts=("protocols", "schedule", "study", "deidentify", "deid_profiles")))

register(Step(
    "adherence", "Protocol adherence",
    "Check every matched series against its protocol variant, and the device, software and same-device rules.",
    scope="exam", func="imtrial_dsl.runner.adherence:adherence_step",
    inputs=(W.EXAM_JSON, W.ORIGINAL, W.IDENTITY, W.CLASSIFICATION), outputs=(W.ADHERENCE,), secrets=("deidentify",),
    study_parts=("protocols", "sites", "schedule")))

register(Step(
    "qc", "Image QC",
    "A pixel QC check (numpy) on every series of the protocols it applies to.",
    scope="exam", func="imtrial_dsl.runner.qc:qc_step", per="qc", kind="qc",
    inputs=(W.EXAM_JSON, W.ORIGINAL, W.CLASSIFICATION), outputs=(W.QC + "{ref}.json",), secrets=("deidentify",),
    resources=Resources(cores=1, ram_mb=2048)))

register(Step(
    "archive", "Archive",
    "Content-addressed, immutable archive of the de-identified instances with per-series sidecars and a hash-chained audit log.",
    scope="exam", func="imtrial_dsl.runner.archive:archive_step",
    inputs=(W.DEID, W.IDENTITY, W.CLASSIFICATION, W.ADHERENCE, W.QC), outputs=(W.ARCHIVED,),
    study_outputs=("archive/",), shared="archive",
    study_parts=("deidentify",)))

register(Step(
    "analysis", "Analysis",
    "Run one of the study's analysis programs (argv, never a shell) on the exam's de-identified series.",
    scope="exam", func="imtrial_dsl.runner.analyses:analysis_step", per="analysis", kind="analysis",
    inputs=(W.DEID, W.IDENTITY, W.CLASSIFICATION, W.ADHERENCE), outputs=(W.ANALYSES + "{ref}/",),
    resources=Resources(cores=1, ram_mb=4096)))

register(Step(
    "measurements", "Measurements table",
    "Gather every exam's measurements into one tidy table (subject, visit, site, protocol, analysis, measurement, value, unit).",
    scope="study", func="imtrial_dsl.runner.analyses:measurements_step",
    inputs=(W.IDENTITY, W.ANALYSES), study_outputs=("measurements.csv", "measurements.json"),
    resources=Resources(cores=1, ram_mb=1024)))


# --------------------------------------------------------------------------- nodes of a study

def qc_protocols(trial: ir.Trial, q: ir.QcCheck) -> list[str]:
    """The protocols ``q`` applies to (named targets, or every protocol of its modality)."""
    names = {t.name for t in q.targets}
    return [p.name for p in trial.protocols
            if p.name in names or (q.modality and q.modality == p.modality and not q.targets)]


def _fill(paths: tuple[str, ...], ref: str) -> tuple[str, ...]:
    return tuple(p.replace("{ref}", ref) for p in paths)


def _qc_nodes(trial: ir.Trial, step: Step) -> list[Node]:
    out = []
    for q in trial.qc:
        prots = qc_protocols(trial, q)
        if not prots:
            continue  # a modality-wide check with no protocol of that modality: nothing to run
        out.append(Node(f"{step.name}:{q.name}", step, q.name, f"QC {q.name} ({q.metric})",
                        step.inputs, _fill(step.outputs, q.name), step.resources, tuple(prots),
                        {"metric": q.metric}))
    return out


def _analysis_nodes(trial: ir.Trial, step: Step, qc_nodes: list[Node]) -> list[Node]:
    out = []
    for a in trial.analyses:
        prots = tuple(sorted({i.protocol.name for i in a.inputs if i.protocol is not None}))
        reads = list(step.inputs)
        # the QC verdicts of the series it reads choose which series it gets; the outputs of the
        # analyses it consumes are its inputs
        reads += [n.outputs[0] for n in qc_nodes if set(n.protocols) & set(prots)]
        for i in a.inputs:
            if i.analysis_output is not None:
                reads.append(W.analysis_dir(i.analysis_output.name.partition(".")[0]))
        limit = int(a.timeout.value / 1000.0) if a.timeout else None
        res = replace(step.resources, time_limit_s=limit) if limit else step.resources
        out.append(Node(f"{step.name}:{a.name}", step, a.name, a.description or f"Analysis {a.name}",
                        tuple(dict.fromkeys(reads)), _fill(step.outputs, a.name), res, prots))
    return out


def nodes(trial: ir.Trial) -> list[Node]:
    """Every node of the study's pipeline, in table order (per-check/analysis nodes in study order)."""
    out: list[Node] = []
    qc: list[Node] = []
    for step in STEPS.values():
        if step.per == "qc":
            qc = _qc_nodes(trial, step)
            out += qc
        elif step.per == "analysis":
            out += _analysis_nodes(trial, step, qc)
        else:
            out.append(Node(step.name, step, None, step.label, step.inputs, step.outputs, step.resources))
    return out


def covers(produced: str, read: str) -> bool:
    """Does writing path ``produced`` provide (part of) path ``read``? (a folder covers what is inside it)"""
    if produced == read:
        return True
    return (read.endswith("/") and produced.startswith(read)) or (produced.endswith("/") and read.startswith(produced))
