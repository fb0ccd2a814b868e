"""Step 8, analyses and measurements: run the study's analysis programs and gather a tidy table.

An analysis' ``command`` is an argv template; ``{name}`` placeholders are the analysis' input and
output names (``{input}``/``{output}`` mean the first of each). It runs as an argv list with a timeout — never
through a shell — in a process group of its own that is killed when the run dies (``runner/procs.py``). A
leading ``python3``/``python`` is the running interpreter, so ``python3 -m imtrial_dsl.tools.volume`` finds this
package in any venv. The program gets a minimal environment: PATH, HOME, TMPDIR and the locale, the variables
the analysis names (``env NAME, …``) and the ``IMTRIAL_*`` variables below — never the study's keys or transfer
tokens.

Measurement convention: an output file that is JSON holds, per declared measurement name, a number or
``{"value": v, "unit": u}`` (at top level or under ``"measurements"``); an analysis that declares exactly one
measurement may instead write ``{"value": v, "unit": u}``. The runner also exports ``IMTRIAL_ANALYSIS`` and
``IMTRIAL_MEASUREMENTS`` (comma-separated declared names) to the program.
"""
from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

from ..diagnostics import ImtrialError
from ..secrets import secret_variables, subprocess_env
from .procs import run_guarded

PLACEHOLDER = re.compile(r"\{(\w+)\}")
CSV_COLUMNS = ("subject", "visit", "site", "protocol", "analysis", "measurement", "value", "unit")
DEFAULT_TIMEOUT_S = 3600.0


def _load(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def _entry(doc: Any, uid: str) -> Optional[dict]:
    from .archive import _series_entry

    return _series_entry(doc, uid)


def _verdict(entry: Optional[dict]) -> str:
    if not isinstance(entry, dict):
        return "unknown"
    return str(entry.get("verdict") or entry.get("status") or "unknown").lower()


def choose_series(protocol: str, classification: Any, adherence: Any, qc: Any) -> Optional[dict]:
    """The series to analyse for a protocol: passing adherence and QC first, then the latest series."""
    series = [s for s in (classification or {}).get("series", []) if s.get("status") == "matched" and s.get("protocol") == protocol]
    if not series:
        return None
    rank = {"pass": 0, "passed": 0, "ok": 0, "warn": 1, "warning": 1, "unknown": 2, "fail": 3, "failed": 3}

    def key(s):
        a, q = _verdict(_entry(adherence, s["series_uid"])), _verdict(_entry(qc, s["series_uid"]))
        return (rank.get(a, 2) + rank.get(q, 2), -(s.get("series_number") or 0))

    return sorted(series, key=key)[0]


def _link_inputs(files: list[Path], dest: Path) -> None:
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for i, f in enumerate(files):
        target = dest / f"{i:05d}_{f.name}"
        try:
            os.link(f, target)
        except OSError:
            shutil.copy2(f, target)


def build_argv(template: list[str], paths: dict[str, str]) -> list[str]:
    """Substitute placeholders; an unknown one is an error (never passed through to the program)."""
    out = []
    for i, arg in enumerate(template):
        def sub(m):
            if m.group(1) not in paths:
                raise KeyError(f"unknown placeholder {{{m.group(1)}}} in argument {i}: {arg!r} (known: {', '.join(sorted(paths))})")
            return paths[m.group(1)]
        out.append(PLACEHOLDER.sub(sub, arg))
    if out and out[0] in ("python3", "python"):
        out[0] = sys.executable
    return out


def extract_measurements(analysis, outputs: dict[str, Path]) -> tuple[list[dict], list[str]]:
    """Declared measurements found in the analysis' JSON outputs; plus the names that are missing."""
    docs = []
    for o in analysis.outputs:
        p = outputs.get(o.name)
        if p is not None and Path(p).is_file():
            d = _load(p)
            if isinstance(d, dict):
                docs.append(d)
    found, missing = [], []
    for m in analysis.measurements:
        val, unit = None, m.unit
        for d in docs:
            cand = d.get(m.name, (d.get("measurements") or {}).get(m.name) if isinstance(d.get("measurements"), dict) else None)
            if cand is None and isinstance(d.get("measurements"), list):
                cand = next((x for x in d["measurements"] if isinstance(x, dict) and x.get("name") == m.name), None)
            if cand is None and len(analysis.measurements) == 1 and "value" in d:
                cand = d
            if cand is not None:
                if isinstance(cand, dict):
                    val, unit = cand.get("value"), cand.get("unit") or m.unit
                else:
                    val = cand
                break
        try:
            fval = float(val) if val is not None and not isinstance(val, bool) else None
        except (TypeError, ValueError):
            fval = None
        if fval is None:
            missing.append(m.name)
        else:
            found.append({"measurement": m.name, "value": fval, "unit": unit or ""})
    return found, missing


RESULT = "result.json"   # inside analyses/<name>/


def _baseline_output(ctx, analysis) -> str:
    """The same analysis' first output in the subject's baseline exam (a sibling exam of the workdir), or ''.

    Only a local run has the siblings; a CWL engine stages each exam alone (docs/cwl.md)."""
    from ..workdir import IDENTITY, analysis_dir

    ident = ctx.identity
    if ctx.workdir is None or not analysis.outputs or not ident.get("subject_id") or ident.get("visit_kind") == "baseline":
        return ""
    for d in sorted(p for p in ctx.workdir.exams.iterdir() if p.is_dir()):
        other = _load(d / IDENTITY) or {}
        if other.get("subject_id") == ident["subject_id"] and other.get("visit_kind") == "baseline":
            cand = d / analysis_dir(analysis.name) / "outputs" / analysis.outputs[0].name
            if cand.is_file():
                return str(cand)
    return ""


def run_one(ctx, analysis, adir: Path) -> dict:
    """Run one analysis for one exam into folder ``adir`` (inputs/, outputs/, stdout.txt, stderr.txt)."""
    from ..workdir import ADHERENCE, CLASSIFICATION, DEID, QC, analysis_dir
    from .qc import merge_by_series

    cls, adh = ctx.read_json(CLASSIFICATION), ctx.read_json(ADHERENCE)
    qc = merge_by_series(ctx.read_json(r) for r in ctx.under(QC))
    ident = ctx.identity
    paths: dict[str, str] = {}
    protocols, series_used = [], {}
    chosen = {}
    for inp in analysis.inputs:  # every input must be there before anything is prepared
        if inp.protocol is not None:
            s = choose_series(inp.protocol.name, cls, adh, qc)
            if s is None:
                return {"analysis": analysis.name, "status": "skipped",
                        "reason": f"no series of protocol {inp.protocol.name} in this exam"}
            chosen[inp.name] = s
    deid = ctx.path(DEID)
    for inp in analysis.inputs:
        if inp.protocol is not None:
            s = chosen[inp.name]
            files = [f for f in (deid / rel for rel in s.get("files", [])) if f.exists()]
            if not files:
                return {"analysis": analysis.name, "status": "failed", "reason": f"series files of {inp.protocol.name} not found"}
            _link_inputs(files, adir / "inputs" / inp.name)
            paths[inp.name] = str(adir / "inputs" / inp.name)
            protocols.append(inp.protocol.name)
            series_used[inp.name] = s["series_uid"]
        elif inp.analysis_output is not None:
            src_name, _, out_name = inp.analysis_output.name.partition(".")
            src_dir = ctx.path(analysis_dir(src_name))
            prev = _load(src_dir / RESULT) or {}
            if prev.get("status") != "done":
                return {"analysis": analysis.name, "status": "skipped", "reason": f"input {src_name}.{out_name} not available"}
            paths[inp.name] = str(src_dir / prev["outputs"][out_name])
            protocols.extend(prev.get("protocols", []))
    outputs: dict[str, Path] = {}
    (adir / "outputs").mkdir(parents=True, exist_ok=True)
    for o in analysis.outputs:
        p = adir / "outputs" / o.name
        if o.kind == "directory":
            p.mkdir()
        outputs[o.name] = p
        paths[o.name] = str(p)
    if analysis.inputs:
        paths.setdefault("input", paths[analysis.inputs[0].name])
    if analysis.outputs:
        paths.setdefault("output", paths[analysis.outputs[0].name])
    try:
        argv = build_argv(list(analysis.command), paths)
    except KeyError as exc:
        return {"analysis": analysis.name, "status": "failed", "reason": str(exc.args[0])}
    if not argv:
        return {"analysis": analysis.name, "status": "failed", "reason": "the analysis has no command"}
    timeout = analysis.timeout.value / 1000.0 if analysis.timeout else DEFAULT_TIMEOUT_S
    pkg_root = str(Path(__file__).resolve().parents[2])
    # a minimal environment (secrets.subprocess_env): never the study's keys or tokens (the checker refuses a
    # program `env` that names one, E711; they are also dropped here)
    env = subprocess_env([n for n in analysis.env if n not in secret_variables(ctx.trial)],
                         IMTRIAL_ANALYSIS=analysis.name,
                         IMTRIAL_MEASUREMENTS=",".join(m.name for m in analysis.measurements),
                         IMTRIAL_SUBJECT=str(ident.get("subject_id") or ""), IMTRIAL_VISIT=str(ident.get("visit") or ""),
                         IMTRIAL_VISIT_KIND=str(ident.get("visit_kind") or ""),
                         IMTRIAL_BASELINE_OUTPUT=_baseline_output(ctx, analysis),
                         PYTHONPATH=os.pathsep.join([pkg_root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    t0 = time.time()
    try:
        proc = run_guarded(argv, timeout=timeout, env=env, cwd=str(adir))  # dies with the run (runner/procs.py)
    except subprocess.TimeoutExpired:
        return {"analysis": analysis.name, "status": "failed", "reason": f"timed out after {timeout:g} s"}
    except OSError as exc:
        return {"analysis": analysis.name, "status": "failed", "reason": f"cannot run {argv[0]!r}: {exc}"}
    (adir / "stdout.txt").write_bytes(proc.stdout)
    (adir / "stderr.txt").write_bytes(proc.stderr)
    res = {"analysis": analysis.name, "argv": [a.replace(str(adir), "<out>") for a in argv], "returncode": proc.returncode,
           "seconds": round(time.time() - t0, 3), "protocols": protocols, "series": series_used,
           "outputs": {k: str(v.relative_to(adir)) for k, v in outputs.items()}, "subject": ident.get("subject_id"),
           "visit": ident.get("visit"), "site": ident.get("site")}
    if proc.returncode != 0:
        tail = proc.stderr.decode(errors="replace").strip().splitlines()[-5:]
        return {**res, "status": "failed", "reason": f"exit status {proc.returncode}: " + " | ".join(tail)}
    found, missing = extract_measurements(analysis, outputs)
    res.update(measurements=found, missing=missing, status="done" if not missing else "failed")
    if missing:
        res["reason"] = f"measurements not produced: {', '.join(missing)}"
    return res


def measurement_rows(result: dict) -> list[dict]:
    """The tidy rows of one analysis result (``analyses/<name>/result.json``)."""
    return [{"subject": result.get("subject"), "visit": result.get("visit"), "site": result.get("site"),
             "protocol": "+".join(result.get("protocols", [])), "analysis": result["analysis"],
             "measurement": m["measurement"], "value": m["value"], "unit": m["unit"],
             "series_uid": ",".join(f"{k}={v}" for k, v in sorted(result.get("series", {}).items()))}
            for m in result.get("measurements", [])]


def write_table(rows: list[dict], csv_path: Path, json_path: Path) -> None:
    """The tidy measurements table, as CSV and JSON (write-temp-then-rename)."""
    from ..files import atomic_write_bytes

    rows = sorted(rows, key=lambda r: tuple(str(r.get(k) or "") for k in ("subject", "visit", "protocol", "analysis", "measurement")))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(CSV_COLUMNS), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else (f"{r[k]:.6g}" if k == "value" else r[k])) for k in CSV_COLUMNS})
    atomic_write_bytes(Path(csv_path), buf.getvalue().encode())
    atomic_write_bytes(Path(json_path), (json.dumps({"columns": list(CSV_COLUMNS), "rows": [
        {k: r.get(k) for k in CSV_COLUMNS} for r in rows]}, indent=2) + "\n").encode())


class AnalysisFailed(ImtrialError):
    """An analysis program failed (its result.json says why); the node is recorded as failed."""

    code = "E807"


def analysis_step(ctx) -> dict:
    """Run one of the study's analysis programs (argv, no shell) on one exam's de-identified series;
    writes ``analyses/<name>/`` with ``result.json``. A failed program fails the node (after its
    result is written, so the reason is kept)."""
    from ..files import atomic_write_json
    from ..workdir import analysis_dir

    a = ctx.trial.analysis(ctx.ref)
    adir = ctx.out(analysis_dir(a.name))
    res = run_one(ctx, a, adir)
    atomic_write_json(adir / RESULT, res)
    if res["status"] == "failed":
        raise AnalysisFailed(f"analysis {a.name} failed: {res.get('reason')}")
    return {k: res.get(k) for k in ("analysis", "status", "reason", "seconds") if res.get(k) is not None}


def exam_rows(ctx) -> list[dict]:
    """Every measurement row of one exam (its analyses' results)."""
    from ..workdir import analysis_dir

    rows = []
    for a in ctx.trial.analyses:
        res = _load(ctx.path(analysis_dir(a.name)) / RESULT)
        if isinstance(res, dict) and res.get("status") == "done":
            rows.extend({**r, "exam_key": ctx.key} for r in measurement_rows(res))
    return rows


def measurements_step(ctx) -> dict:
    """Gather every exam's measurements into one tidy table (subject, visit, protocol, analysis, …)."""
    rows = [r for e in ctx.exams() for r in exam_rows(e)]
    write_table(rows, ctx.output("measurements.csv"), ctx.output("measurements.json"))
    if ctx.store is not None:
        ctx.store.replace_measurements(rows)
    return {"rows": len(rows)}
