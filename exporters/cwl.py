"""CWL v1.2 exporter: the compiled graph as a Workflow, its tools generated from the step table.

Every tool runs ``imtrial step NAME`` — the node the local runner runs, through the same function —
so a CWL engine (cwltool, Toil on a cluster) and ``imtrial run`` give the same archive and verdicts
for the same inbox and key. Nothing here lists the steps: tools, their inputs and outputs, their
resources and the wiring between them all come from ``imtrial_dsl.pipeline`` through the graph.

* A node's inputs are the exam-folder paths it reads, each passed as ``--in REL=PATH`` wherever the
  engine staged it; its outputs are globbed at their exam-relative path (no exam folder is copied
  from step to step). An edge of the graph is a CWL source: the producer's output parameter.
* Exam nodes that touch no shared state run in a per-exam sub-workflow scattered over the exams
  (``granularity="step"``: one tool per node; ``"exam"``: one tool per exam running the fused
  per-exam pipeline, ``imtrial step exam``). Study nodes and nodes on shared state (the identity
  registry, the archive) run once, over every exam, at workflow level: a CWL engine stages inputs
  read-only and cannot share a mutable registry between scattered jobs.
* Resources (``ResourceRequirement``, ``ToolTimeLimit`` from an analysis' ``timeout``) come from the
  table; ``SoftwareRequirement`` names imtrial and its version; ``DockerRequirement`` is a hint when
  an image is given.

Secrets never enter the documents or the job file: the engine passes the key's environment variable
through (``cwltool --preserve-environment IMTRIAL_KEY``). Study strings (titles, commands) only appear
in ``label``/``doc`` fields, which CWL never evaluates, and in the compiled IR file, which is data.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import networkx as nx
from imtrial_dsl import __version__, extras, ir, pipeline
from imtrial_dsl.graph import staged_phases

# the 'cwl' extra (E900 naming it when it is not installed)
cwl = extras.load("cwl_utils.parser.cwl_v1_2", "'imtrial export cwl'")
YAML = extras.load("ruamel.yaml", "'imtrial export cwl'").YAML

CWL_VERSION = "v1.2"
IR_FILE = "study.ir.json"
GRANULARITIES = ("step", "exam")


def _esc(text: str) -> str:
    """Make study text inert in CWL strings that might be scanned for parameter references."""
    return text.replace("\\", "\\\\").replace("$(", "\\$(").replace("${", "\\${")


def secret_env_vars(trial: ir.Trial) -> list[str]:
    """Environment variables that hold key material the steps read (names only, never values)."""
    names = []
    for src in (trial.deidentify.key if trial.deidentify else None, trial.identifiers.key if trial.identifiers else None):
        if src is not None and src.kind == "env" and src.ref not in names:
            names.append(src.ref)
    return names


def pid(rel: str) -> str:
    """A CWL parameter id for an exam-folder path or workdir object (``results/qc/snr.json`` → ``results_qc_snr_json``)."""
    return re.sub(r"[^A-Za-z0-9]+", "_", rel.rstrip("/")).strip("_")


def _type(rel: str) -> str:
    return "Directory" if rel.endswith("/") else "File"


def _array(item: str, binding: Optional[cwl.CommandLineBinding] = None) -> cwl.CommandInputArraySchema:
    return cwl.CommandInputArraySchema(items=item, type_="array", inputBinding=binding)


# ----------------------------------------------------------------------------- what the graph says

@dataclass
class Unit:
    """One CWL tool: a node (or, at exam granularity, a fused per-exam pipeline of several)."""

    id: str
    step: str                        # the ``imtrial step`` name
    nodes: list[pipeline.Node]
    batch: bool                      # runs once over every exam (arrays in, arrays out)
    ref: Optional[str] = None
    reads: list[str] = field(default_factory=list)     # exam paths read from outside the unit
    writes: list[str] = field(default_factory=list)    # exam paths written

    @property
    def study_inputs(self) -> list[str]:
        return [s for n in self.nodes for s in n.step.study_inputs if s != "state.sqlite"]


def _producers(nodes: list[pipeline.Node]) -> dict[str, pipeline.Node]:
    return {w: n for n in nodes for w in n.outputs}


def _resolve(read: str, produced: dict[str, pipeline.Node]) -> list[str]:
    """The produced paths that make up input ``read`` (a folder input is every output inside it)."""
    return [w for w in produced if pipeline.covers(w, read)]


def plan_units(trial: ir.Trial, graph: nx.DiGraph, granularity: str) -> list[list[Unit]]:
    """The graph's staged phases (``imtrial_dsl.graph.staged_phases``) as CWL units: a batch unit alone,
    or a segment of per-exam units scattered together (fused into one at exam granularity)."""
    by_id = {n.id: n for n in pipeline.nodes(trial)}
    produced = _producers(list(by_id.values()))
    phases: list[list[Unit]] = []
    for k, (batch, ids) in enumerate(staged_phases(graph)):
        units = []
        for nid in ids:
            n = by_id[nid]
            reads = [w for r in n.inputs for w in _resolve(r, produced) if produced[w] is not n]
            units.append(Unit(pid(nid), n.step.name, [n], batch, n.ref, list(dict.fromkeys(reads)), list(n.outputs)))
        if granularity == "exam" and not batch:
            writes = [w for u in units for w in u.writes]
            reads = [r for u in units for r in u.reads if r not in writes]
            units = [Unit(f"exam_pipeline_{k}", "exam", [n for u in units for n in u.nodes], False, str(k),
                          list(dict.fromkeys(reads)), writes)]
        phases.append(units)
    return phases


# ----------------------------------------------------------------------------- tools

def _requirements(unit: Unit) -> list:
    cores = max(n.resources.cores for n in unit.nodes)
    ram = max(n.resources.ram_mb for n in unit.nodes)
    reqs: list = [cwl.ResourceRequirement(coresMin=cores, ramMin=ram)]
    limits = [n.resources.time_limit_s for n in unit.nodes]
    if any(limits) and (len(unit.nodes) == 1 or all(limits)):
        reqs.append(cwl.ToolTimeLimit(timelimit=sum(x or 0 for x in limits)))
    return reqs


def _hints(docker_image: Optional[str]) -> list:
    hints: list = [cwl.SoftwareRequirement(packages=[cwl.SoftwarePackage(package="imtrial", version=[__version__])])]
    if docker_image:
        hints.append(cwl.DockerRequirement(dockerPull=docker_image))
    return hints


def _in_binding(rel: str) -> cwl.CommandLineBinding:
    return cwl.CommandLineBinding(prefix="--in", valueFrom=f"{rel}=$(self.path)")


def build_tool(unit: Unit, trial: ir.Trial, secrets: list[str], docker_image: Optional[str]) -> cwl.CommandLineTool:
    """The CommandLineTool of one unit."""
    study = cwl.CommandInputParameter(id="study", type_="File", doc="The compiled study (study.ir.json)",
                                      inputBinding=cwl.CommandLineBinding(prefix="--study"))
    inputs = [study]
    for rel in unit.reads:
        t = _type(rel)
        inputs.append(cwl.CommandInputParameter(
            id=pid(rel), type_=_array(t, _in_binding(rel)) if unit.batch else t,
            inputBinding=None if unit.batch else _in_binding(rel), doc=f"exam path {rel}"))
    for s in unit.study_inputs:
        inputs.append(cwl.CommandInputParameter(
            id=pid(s), type_=_type(s), doc=f"study object {s}",
            inputBinding=cwl.CommandLineBinding(prefix="--study-in", valueFrom=f"{s}=$(self.path)")))
    shared = {n.step.shared for n in unit.nodes} - {None}
    if "registry" in shared:
        inputs.append(cwl.CommandInputParameter(id="registry", type_="File?", doc="An identity registry to continue",
                                                inputBinding=cwl.CommandLineBinding(prefix="--registry")))
    if "archive" in shared:
        inputs.append(cwl.CommandInputParameter(id="archive_in", type_="Directory?", doc="An archive to add to",
                                                inputBinding=cwl.CommandLineBinding(prefix="--archive")))
    outputs = []
    first = unit.nodes[0]
    study_scope = first.scope == "study"
    for rel in unit.writes:
        if study_scope:   # a study step writing exam folders (ingest): the workdir's exams/<key>/REL
            glob, t = f"exams/*/{rel.rstrip('/')}", _array(_type(rel))
        elif unit.batch:
            glob, t = f"*/{rel.rstrip('/')}", _array(_type(rel))
        else:
            glob, t = rel.rstrip("/"), _type(rel)
        outputs.append(cwl.CommandOutputParameter(id=pid(rel), type_=t, outputBinding=cwl.CommandOutputBinding(glob=glob)))
    for s in [o for n in unit.nodes for o in n.step.study_outputs]:
        if s == "exams/":
            continue  # its content is the per-exam outputs above
        oid = "registry_out" if s == "state.sqlite" else pid(s)
        outputs.append(cwl.CommandOutputParameter(id=oid, type_=_type(s),
                                                  outputBinding=cwl.CommandOutputBinding(glob=s.rstrip("/"))))
    # one token each: CWL orders unpositioned arguments among the input bindings
    args: list = ["--out=."] + ([f"--ref={unit.ref}"] if unit.ref else [])
    label = first.label if len(unit.nodes) == 1 else "Per-exam pipeline: " + ", ".join(n.id for n in unit.nodes)
    doc = " ".join(dict.fromkeys(n.step.doc for n in unit.nodes))
    if len(unit.nodes) == 1 and first.step.per == "analysis":
        doc += " Command: " + " ".join(trial.analysis(first.ref).command)
    needs = sorted({s for n in unit.nodes for s in n.step.secrets})
    if needs and secrets:
        doc += f" Reads the study's key ({', '.join(needs)}) from the environment: {', '.join(secrets)}."
    return cwl.CommandLineTool(
        cwlVersion=CWL_VERSION, id=unit.id, label=_esc(label), doc=_esc(doc),
        baseCommand=["imtrial", "step", unit.step], arguments=args, inputs=inputs, outputs=outputs,
        requirements=_requirements(unit), hints=_hints(docker_image))


# ----------------------------------------------------------------------------- the workflow

def _tool_file(unit_id: str) -> str:
    return f"tools/{unit_id}.cwl"


def _sub_file(k: int) -> str:
    return f"exam_pipeline_{k}.cwl"


def build(trial: ir.Trial, graph: nx.DiGraph, *, granularity: str = "step", docker_image: Optional[str] = None):
    """(workflow, {file name: document}) for the study."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {', '.join(GRANULARITIES)}")
    secrets = secret_env_vars(trial)
    phases = plan_units(trial, graph, granularity)
    docs: dict[str, object] = {}
    arrays: dict[str, str] = {}          # exam path -> workflow source of its array over exams
    study_src: dict[str, str] = {"inbox/": "inbox"}
    steps: list = []
    wf_outputs: list = []
    requirements = [cwl.ScatterFeatureRequirement(), cwl.SubworkflowFeatureRequirement(),
                    cwl.StepInputExpressionRequirement(), cwl.MultipleInputFeatureRequirement()]
    for k, ph in enumerate(phases):
        if ph[0].batch:
            u = ph[0]
            tool = build_tool(u, trial, secrets, docker_image)
            docs[_tool_file(u.id)] = tool
            in_ = {"study": "study"}
            for rel in u.reads:
                in_[pid(rel)] = arrays[rel]
            for s in u.study_inputs:
                in_[pid(s)] = study_src[s]
            if any(n.step.shared == "registry" for n in u.nodes):
                in_["registry"] = "registry"
            if any(n.step.shared == "archive" for n in u.nodes):
                in_["archive_in"] = "archive_in"
            outs = [o.id for o in tool.outputs]
            sid = u.id if u.nodes[0].scope == "study" else f"{u.id}_all"   # a batch over every exam
            steps.append(cwl.WorkflowStep(id=sid, run=_tool_file(u.id), label=tool.label, out=outs,
                                          in_=[cwl.WorkflowStepInput(id=i, source=s) for i, s in in_.items()]))
            for rel in u.writes:
                arrays[rel] = f"{sid}/{pid(rel)}"
            for s in [o for n in u.nodes for o in n.step.study_outputs]:
                study_src[s] = f"{sid}/{'registry_out' if s == 'state.sqlite' else pid(s)}"
            continue
        # a segment: a sub-workflow (or one fused tool) scattered over the exams
        sub_id = f"exams_{k}"
        reads = list(dict.fromkeys(r for u in ph for r in u.reads if r not in {w for x in ph for w in x.writes}))
        writes = [w for u in ph for w in u.writes]
        if granularity == "exam":
            u = ph[0]
            tool = build_tool(u, trial, secrets, docker_image)
            docs[_tool_file(u.id)] = tool
            run = _tool_file(u.id)
        else:
            sub_steps, local = [], {}
            for u in ph:
                tool = build_tool(u, trial, secrets, docker_image)
                docs[_tool_file(u.id)] = tool
                in_ = {"study": "study"}
                for rel in u.reads:
                    in_[pid(rel)] = local.get(rel, pid(rel))
                sub_steps.append(cwl.WorkflowStep(id=u.id, run=_tool_file(u.id), label=tool.label,
                                                  out=[pid(w) for w in u.writes],
                                                  in_=[cwl.WorkflowStepInput(id=i, source=s) for i, s in in_.items()]))
                for w in u.writes:
                    local[w] = f"{u.id}/{pid(w)}"
            sub = cwl.Workflow(
                cwlVersion=CWL_VERSION, id=sub_id, label="Per-exam pipeline",
                doc="The exam nodes of the graph that share no state, for one exam: "
                    + ", ".join(n.id for u in ph for n in u.nodes) + ".",
                inputs=[cwl.WorkflowInputParameter(id="study", type_="File")]
                + [cwl.WorkflowInputParameter(id=pid(r), type_=_type(r)) for r in reads],
                outputs=[cwl.WorkflowOutputParameter(id=pid(w), type_=_type(w), outputSource=local[w]) for w in writes],
                steps=sub_steps)
            docs[_sub_file(k)] = sub
            run = _sub_file(k)
        steps.append(cwl.WorkflowStep(
            id=sub_id, run=run, label="Per-exam pipeline (scattered over exams)", out=[pid(w) for w in writes],
            in_=[cwl.WorkflowStepInput(id="study", source="study")]
            + [cwl.WorkflowStepInput(id=pid(r), source=arrays[r]) for r in reads],
            scatter=[pid(r) for r in reads] if reads else None, scatterMethod="dotproduct" if len(reads) > 1 else None))
        for w in writes:
            arrays[w] = f"{sub_id}/{pid(w)}"
    for name, kind, doc in (("quarantine/", "Directory", "Inbox files that were refused, each with reason.json"),
                            ("archive/", "Directory", "The content-addressed archive (objects, sidecars, audit log)"),
                            ("measurements.csv", "File", "The tidy measurements table"),
                            ("measurements.json", "File", "The tidy measurements table as JSON"),
                            ("state.sqlite", "File", "The site's identity registry: SITE-SIDE ONLY — it maps original "
                                                     "identifiers to subjects; keep it at the site, never send it on")):
        if name in study_src:
            oid = "site_registry" if name == "state.sqlite" else pid(name)
            wf_outputs.append(cwl.WorkflowOutputParameter(id=oid, type_=kind, doc=doc, outputSource=study_src[name]))
    code = trial.study.code if trial.study else "study"
    title = trial.study.title if trial.study else ""
    doc = (f"imtrial pipeline for {code}: {title}. Study version "
           f"{trial.study.version if trial.study and trial.study.version else '-'}, source sha256 "
           f"{trial.source_sha256 or '-'}, imtrial {__version__}, granularity {granularity}. ")
    if secrets:
        doc += ("Key material comes from the environment: run with "
                + " ".join(f"--preserve-environment {s}" for s in secrets)
                + " (cwltool), or --preserve-entire-environment (toil-cwl-runner).")
    wf = cwl.Workflow(
        cwlVersion=CWL_VERSION, id="main", label=_esc(f"{code} imaging pipeline"), doc=_esc(doc),
        requirements=requirements,
        inputs=[cwl.WorkflowInputParameter(id="study", type_="File", doc="Compiled study (study.ir.json)"),
                cwl.WorkflowInputParameter(id="inbox", type_="Directory", doc="Folder of incoming DICOM files"),
                cwl.WorkflowInputParameter(id="registry", type_="File?", doc="Existing identity registry (site-side)"),
                cwl.WorkflowInputParameter(id="archive_in", type_="Directory?", doc="Existing archive to add to")],
        outputs=wf_outputs, steps=steps)
    return wf, docs


def _dump(obj, path: Path) -> None:
    yaml = YAML()
    yaml.default_flow_style = False
    doc = obj.save(top=True)
    doc.pop("id", None)  # a file's id is its own path; an explicit fragment confuses relative run: references
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fh.write("#!/usr/bin/env cwl-runner\n")
        yaml.dump(doc, fh)


def export(trial: ir.Trial, graph: nx.DiGraph, out_dir: Path, *, granularity: str = "step",
           docker_image: Optional[str] = None) -> list[Path]:
    """Write ``workflow.cwl``, its sub-workflows and ``tools/*.cwl``, the compiled ``study.ir.json`` and an
    example job file."""
    out_dir = Path(out_dir)
    wf, docs = build(trial, graph, granularity=granularity, docker_image=docker_image)
    written = []
    for name, obj in docs.items():
        _dump(obj, out_dir / name)
        written.append(out_dir / name)
    _dump(wf, out_dir / "workflow.cwl")
    written.append(out_dir / "workflow.cwl")
    irp = out_dir / IR_FILE
    irp.write_text(trial.model_dump_json(indent=1) + "\n")
    written.append(irp)
    job = out_dir / "job.example.yml"
    job.write_text(
        "# Example job: point inbox at a folder of DICOM files, then run e.g.\n"
        "#   cwltool --no-container " + " ".join(f"--preserve-environment {s}" for s in secret_env_vars(trial))
        + " workflow.cwl job.example.yml\n"
        + json.dumps({"study": {"class": "File", "path": IR_FILE}, "inbox": {"class": "Directory", "path": "inbox"}}, indent=2)
        + "\n")
    written.append(job)
    return sorted(written)
