"""CWL v1.2 exporter: the compiled study as a Workflow plus one CommandLineTool per pipeline step.

Every built-in tool runs ``imtrial step NAME`` — the same registered function the
local runner calls — so a CWL engine (cwltool, Toil on a cluster) and ``imtrial
run`` give the same archive and verdicts for the same inbox and key. Built with
cwl-utils' object model, never string templates.

Shape (exam-scoped steps scatter over exams)::

    ingest → identify-all → deidentify* → classify* → adherence* → qc* → archive-all
                                                                   └→ analysis_<name>* … → measurements

Secrets never enter the documents or the job file: the engine must pass the key's
environment variable through (``cwltool --preserve-environment IMTRIAL_KEY``).
Study strings (titles, descriptions, commands) only ever appear in ``label``/``doc``
fields, which CWL never evaluates, and in the compiled IR file, which is data.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import networkx as nx
from cwl_utils.parser import cwl_v1_2 as cwl
from ruamel.yaml import YAML

from imtrial_dsl import ir

CWL_VERSION = "v1.2"
IR_FILE = "study.ir.json"


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


# ----------------------------------------------------------------------------- tools

def _inp(id_: str, type_, prefix: Optional[str] = None, doc: Optional[str] = None, position: Optional[int] = None):
    binding = cwl.CommandLineBinding(prefix=prefix, position=position) if prefix or position is not None else None
    return cwl.CommandInputParameter(id=id_, type_=type_, inputBinding=binding, doc=doc)


def _out(id_: str, type_, glob: str, doc: Optional[str] = None):
    return cwl.CommandOutputParameter(id=id_, type_=type_, outputBinding=cwl.CommandOutputBinding(glob=glob), doc=doc)


def _tool(step_name: str, label: str, doc: str, inputs: list, outputs: list, arguments: list,
          requirements: Optional[list] = None) -> cwl.CommandLineTool:
    study = _inp("study", "File", prefix="--study", doc="The compiled study (IR JSON) or its .imtrial source")
    return cwl.CommandLineTool(
        cwlVersion=CWL_VERSION, id=step_name.replace("-", "_"), label=_esc(label), doc=_esc(doc),
        baseCommand=["imtrial", "step", step_name], arguments=arguments,
        inputs=[study] + inputs, outputs=outputs, requirements=requirements or None,
    )


def _exam_tool(step_name: str, label: str, doc: str, arguments: list, extra_inputs: Optional[list] = None) -> cwl.CommandLineTool:
    """A per-exam tool: stage the exam folder writable, let the step add to it, hand the folder on."""
    staging = cwl.InitialWorkDirRequirement(listing=[cwl.Dirent(entry="$(inputs.exam)", writable=True)])
    return _tool(step_name, label, doc,
                 inputs=[_inp("exam", "Directory", doc="One exam folder")] + (extra_inputs or []),
                 outputs=[_out("exam_out", "Directory", "$(inputs.exam.basename)")],
                 arguments=["--exam", "$(inputs.exam.basename)"] + arguments,
                 requirements=[staging])


def build_tools(trial: ir.Trial, graph: nx.DiGraph) -> dict[str, cwl.CommandLineTool]:
    """One CommandLineTool per step of the compiled graph (QC checks share one tool: the qc step runs them all)."""
    B = "$(inputs.exam.basename)"
    tools: dict[str, cwl.CommandLineTool] = {}
    tools["ingest"] = _tool(
        "ingest", "Ingest DICOM", "Verify inbox files are DICOM, group them by study into exams, quarantine the rest.",
        inputs=[_inp("inbox", "Directory", prefix="--inbox")],
        outputs=[_out("exams", "Directory", "exams"), _out("quarantine", "Directory", "quarantine")],
        arguments=["--out", "exams", "--quarantine", "quarantine"])
    stage_all = cwl.InitialWorkDirRequirement(listing=["$(inputs.exams)"])
    tools["identify"] = _tool(
        "identify-all", "Assign research identifiers",
        "Registry lookup for every exam, serially (one registry); writes results/identity.json into each exam.",
        inputs=[_inp("exams", "Directory", prefix="--exams"),
                _inp("registry", "File?", prefix="--registry")],
        outputs=[_out("exams_out", "Directory[]", "identified/*"), _out("registry_out", "File", "registry.sqlite")],
        arguments=["--out", "identified", "--registry-out", "registry.sqlite"])
    tools["deidentify"] = _exam_tool(
        "deidentify", "De-identify", "DICOM PS3.15 Annex E profile, options and overrides; research identifiers inserted.",
        ["--identity", f"{B}/results/identity.json", "--out", f"{B}/deid"])
    tools["classify"] = _exam_tool(
        "classify", "Classify series", "Match every series to a protocol.",
        ["--out", f"{B}/results/classification.json"])
    tools["adherence"] = _exam_tool(
        "adherence", "Protocol adherence", "Check every matched series against its protocol variant and the device rules.",
        ["--classification", f"{B}/results/classification.json", "--out", f"{B}/results/adherence.json"])
    qc_nodes = [n for n, d in graph.nodes(data=True) if d.get("kind") == "qc"]
    tools["qc"] = _exam_tool(
        "qc", "Image QC", "Pixel QC checks: " + (", ".join(sorted(graph.nodes[n]["ref"] for n in qc_nodes)) or "none"),
        ["--classification", f"{B}/results/classification.json", "--out", f"{B}/results/qc.json"])
    tools["archive"] = _tool(
        "archive-all", "Archive", "Content-addressed, immutable archive with sidecars and a hash-chained audit log.",
        inputs=[_inp("exams", {"type": "array", "items": "Directory"})],
        outputs=[_out("archive", "Directory", "archive")],
        arguments=["--exams", ".", "--archive", "archive"], requirements=[stage_all])
    for a in analyses_in_order(trial, graph):
        tools[f"analysis:{a.name}"] = _exam_tool(
            "analysis", f"Analysis {a.name}", (a.description or a.name) + " — runs: " + " ".join(a.command),
            ["--results", f"{B}/results", "--out", f"{B}/analyses", "--name", a.name])
    tools["measurements"] = _tool(
        "measurements", "Measurements table", "Gather every exam's measurements into one tidy table.",
        inputs=[_inp("exams", {"type": "array", "items": "Directory"})],
        outputs=[_out("csv", "File", "measurements.csv"), _out("json", "File", "measurements.json")],
        arguments=["--exams", ".", "--csv", "measurements.csv", "--json", "measurements.json"],
        requirements=[stage_all])
    return tools


def analyses_in_order(trial: ir.Trial, graph: nx.DiGraph) -> list[ir.Analysis]:
    order = [n for n in nx.topological_sort(graph) if graph.nodes[n].get("kind") == "analysis"]
    return [trial.analysis(graph.nodes[n]["ref"]) for n in order if trial.analysis(graph.nodes[n]["ref"])]


# ----------------------------------------------------------------------------- workflow

def _tool_file(key: str) -> str:
    return "tools/" + key.replace(":", "_") + ".cwl"


def build_workflow(trial: ir.Trial, graph: nx.DiGraph, tools: dict[str, cwl.CommandLineTool]) -> cwl.Workflow:
    def ws(id_, key, in_, out, scatter=None):
        return cwl.WorkflowStep(id=id_, run=_tool_file(key), in_=[cwl.WorkflowStepInput(id=k, source=v) for k, v in in_.items()],
                                out=out, scatter=scatter, label=tools[key].label)

    steps = [
        ws("ingest", "ingest", {"study": "study", "inbox": "inbox"}, ["exams", "quarantine"]),
        ws("identify", "identify", {"study": "study", "exams": "ingest/exams", "registry": "registry"}, ["exams_out", "registry_out"]),
    ]
    prev = "identify/exams_out"
    for key in ("deidentify", "classify", "adherence", "qc"):
        steps.append(ws(key, key, {"study": "study", "exam": prev}, ["exam_out"], scatter="exam"))
        prev = f"{key}/exam_out"
    steps.append(ws("archive_exams", "archive", {"study": "study", "exams": prev}, ["archive"]))
    for a in analyses_in_order(trial, graph):
        sid = f"analysis_{a.name}"
        steps.append(ws(sid, f"analysis:{a.name}", {"study": "study", "exam": prev}, ["exam_out"], scatter="exam"))
        prev = f"{sid}/exam_out"
    steps.append(ws("measurements", "measurements", {"study": "study", "exams": prev}, ["csv", "json"]))

    code = trial.study.code if trial.study else "study"
    title = trial.study.title if trial.study else ""
    secrets = secret_env_vars(trial)
    doc = (f"imtrial per-exam pipeline for {code}: {title}. Study version "
           f"{trial.study.version if trial.study and trial.study.version else '-'}, source sha256 {trial.source_sha256 or '-'}. ")
    if secrets:
        doc += ("Key material comes from the environment: run with "
                + " ".join(f"--preserve-environment {s}" for s in secrets)
                + " (cwltool), or --preserve-entire-environment (toil-cwl-runner).")
    return cwl.Workflow(
        cwlVersion=CWL_VERSION, id="main", label=_esc(f"{code} imaging pipeline"), doc=_esc(doc),
        requirements=[cwl.ScatterFeatureRequirement(), cwl.SubworkflowFeatureRequirement(),
                      cwl.StepInputExpressionRequirement()],
        inputs=[cwl.WorkflowInputParameter(id="study", type_="File", doc="Compiled study (study.ir.json)"),
                cwl.WorkflowInputParameter(id="inbox", type_="Directory", doc="Folder of incoming DICOM files"),
                cwl.WorkflowInputParameter(id="registry", type_="File?", doc="Existing identity registry (optional)")],
        outputs=[
            cwl.WorkflowOutputParameter(id="archive", type_="Directory", outputSource="archive_exams/archive"),
            cwl.WorkflowOutputParameter(id="quarantine", type_="Directory", outputSource="ingest/quarantine"),
            cwl.WorkflowOutputParameter(id="registry_out", type_="File", outputSource="identify/registry_out"),
            cwl.WorkflowOutputParameter(id="exams", type_={"type": "array", "items": "Directory"}, outputSource=prev),
            cwl.WorkflowOutputParameter(id="measurements_csv", type_="File", outputSource="measurements/csv"),
            cwl.WorkflowOutputParameter(id="measurements_json", type_="File", outputSource="measurements/json"),
        ],
        steps=steps,
    )


def _dump(obj, path: Path) -> None:
    yaml = YAML()
    yaml.default_flow_style = False
    doc = obj.save(top=True)
    doc.pop("id", None)  # a file's id is its own path; an explicit fragment confuses relative run: references
    with open(path, "w") as fh:
        fh.write("#!/usr/bin/env cwl-runner\n")
        yaml.dump(doc, fh)


def export(trial: ir.Trial, graph: nx.DiGraph, out_dir: Path) -> list[Path]:
    """Write ``workflow.cwl``, ``tools/*.cwl``, the compiled ``study.ir.json`` and an example job file."""
    out_dir = Path(out_dir)
    (out_dir / "tools").mkdir(parents=True, exist_ok=True)
    tools = build_tools(trial, graph)
    written = []
    for key, tool in tools.items():
        p = out_dir / _tool_file(key)
        _dump(tool, p)
        written.append(p)
    wf = out_dir / "workflow.cwl"
    _dump(build_workflow(trial, graph, tools), wf)
    written.append(wf)
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
    return written
