"""CWL overhead: cwltool and Toil on one machine against ``imtrial run`` on the same inbox, both granularities.

    .venv/bin/python benchmarks/bench_cwl.py [--example amyloid_mri] [--subjects 2] [--visits baseline,m12]
        [--size medium] [--repeats 1] [--runs local1,local2,cwltool-exam,cwltool-exam-par,cwltool-step,toil-exam,toil-step]

A synthetic inbox of the example (``imtrial synth``, no planted deviations) is run by every contender in
turn, interleaved, in fresh output folders: ``imtrial run --jobs 1`` and ``--jobs 2`` (the default), cwltool
serially and with ``--parallel`` at exam granularity (one tool per exam), cwltool at step granularity (one
tool per node) and Toil at both. Each contender is timed by wall clock and by CPU (user + system of its
whole process tree, which a busy machine inflates less than wall time); the ratios are against the local
run of the same block. Every CWL result is checked against the local run (same archive objects, same
sidecar verdicts, same measurements table) before it counts.

Where the time goes: every ``imtrial`` process an engine starts runs through a shim on ``PATH`` that
logs its CPU and wall time per step, so a CWL run splits into the engine's own work (start-up, staging,
output collection; total minus the ``imtrial`` processes), the study-level tools (ingest, identify,
archive, measurements) and the per-exam tools; the fixed start-up of one ``imtrial step`` process
(interpreter, imports, reading the study) is measured on its own.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
KEY = "bench-cwl-key-0123456789abcdef"
RUNS = ("local1", "local2", "cwltool-exam", "cwltool-exam-par", "cwltool-step", "toil-exam", "toil-step")

STARTUP = r"""
import resource, sys
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
t0 = cpu()
import imtrial_dsl.cli
t1 = cpu()
from imtrial_dsl.cli.common import load_trial
from imtrial_dsl.runner.invoke import segment
t2 = cpu()
trial = load_trial(sys.argv[1])
t3 = cpu()
from imtrial_dsl.graph import staged_phases, build_graph
k = next(i for i, (batch, _) in enumerate(staged_phases(build_graph(trial))) if not batch)
segment(trial, k)
t4 = cpu()
from imtrial_dsl import pipeline
for n in segment(trial, k)[0]:
    n.step.function()
t5 = cpu()
print(f"{t0:.3f} {t1 - t0:.3f} {t2 - t1:.3f} {t3 - t2:.3f} {t4 - t3:.3f} {t5 - t4:.3f}")
"""


def env(shim: Path | None = None) -> dict:
    e = dict(os.environ, IMTRIAL_KEY=KEY)
    e["PATH"] = os.pathsep.join(([str(shim)] if shim else []) + [str(BIN), e.get("PATH", "")])
    return e


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def timed(cmd: list[str], **kw) -> tuple[float, float]:
    """(wall s, CPU s of the whole process tree) of one command, which must succeed."""
    c0, w0 = children_cpu(), time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    wall, cpu = time.perf_counter() - w0, children_cpu() - c0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:3])} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return wall, cpu


def make_shim(tmp: Path) -> tuple[Path, Path]:
    """A folder with an ``imtrial`` that logs each process' wall/user/system seconds and step name."""
    shim, log = tmp / "shim", tmp / "shim.log"
    shim.mkdir()
    timebin = shutil.which("time", path="/usr/bin:/bin")
    if not timebin:
        raise SystemExit("GNU time (/usr/bin/time) is needed for the split (apt-get install time)")
    (shim / "imtrial").write_text(
        f'#!/bin/sh\nexec {timebin} -a -o "{log}" -f "%e %U %S $2" "{BIN / "imtrial"}" "$@"\n')
    (shim / "imtrial").chmod(0o755)
    return shim, log


def read_shim(log: Path) -> dict[str, list[float]]:
    """step name -> [processes, wall s, CPU s] from the shim's log (and empty it)."""
    out: dict[str, list[float]] = defaultdict(lambda: [0, 0.0, 0.0])
    if log.exists():
        for line in log.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 4 and parts[0].replace(".", "").isdigit():
                row = out[parts[3]]
                row[0] += 1
                row[1] += float(parts[0])
                row[2] += float(parts[1]) + float(parts[2])
        log.unlink()
    return dict(out)


def objects(archive: Path) -> set[str]:
    return {p.name for p in (archive / "objects").rglob("*") if p.is_file()}


def records(archive: Path) -> dict:
    out = {}
    for p in (archive / "records").rglob("v*.json"):
        d = json.loads(p.read_text())
        out[(d["key"], d["version"])] = d["content"]
    return out


def same_results(local: Path, out: Path) -> None:
    if not (objects(out / "archive") == objects(local / "archive") and records(out / "archive") == records(local / "archive")
            and (out / "measurements.csv").read_text() == (local / "measurements.csv").read_text()):
        raise SystemExit(f"{out.name}: results differ from the local run")


def run_one(name: str, tmp: Path, study: Path, shim: Path, block: int) -> tuple[float, float, Path]:
    out = tmp / f"{name}-{block}"
    if name.startswith("local"):
        wall, cpu = timed([str(BIN / "imtrial"), "run", str(study), "--inbox", str(tmp / "inbox"), "--workdir", str(out),
                           "--jobs", name[-1], "--no-progress", "--json"], env=env())
        return wall, cpu, out
    engine, granularity, *par = name.split("-")
    wf = tmp / f"cwl-{granularity}" / "workflow.cwl"
    if engine == "cwltool":
        cmd = [str(BIN / "cwltool"), "--no-container", "--preserve-environment", "IMTRIAL_KEY", "--quiet",
               "--outdir", str(out)] + (["--parallel"] if par else []) + [str(wf), str(tmp / "job.json")]
        wall, cpu = timed(cmd, env=env(shim))
    else:
        cmd = [str(BIN / "toil-cwl-runner"), "--no-container", "--preserve-entire-environment", "--logLevel", "WARNING",
               "--jobStore", str(tmp / f"js-{name}-{block}"), "--outdir", str(out), str(wf), str(tmp / "job.json")]
        wall, cpu = timed(cmd, env=env(shim), cwd=tmp)
    return wall, cpu, out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--example", default="amyloid_mri")
    ap.add_argument("--subjects", default="2", help="subjects per site (imtrial synth)")
    ap.add_argument("--visits", default="baseline,m12")
    ap.add_argument("--size", default="medium", choices=("small", "medium", "full"))
    ap.add_argument("--repeats", type=int, default=1, help="interleaved blocks (medians are reported)")
    ap.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated, of {', '.join(RUNS)}")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = ap.parse_args()
    runs = [r for r in args.runs.split(",") if r]
    for r in runs:
        if r not in RUNS:
            ap.error(f"unknown run {r!r}")
    study = ROOT / "examples" / f"{args.example}.imtrial"
    tmp = Path(tempfile.mkdtemp(prefix="bench-cwl-"))
    try:
        imtrial = str(BIN / "imtrial")
        subprocess.run([imtrial, "synth", str(study), "-o", str(tmp / "inbox"), "--subjects", args.subjects, "--visits",
                        args.visits, "--size", args.size, "--seed", "7", "--no-phi", "--no-progress"],
                       check=True, capture_output=True, env=env())
        files = sum(1 for p in (tmp / "inbox").rglob("*") if p.is_file())
        for g in ("step", "exam"):
            subprocess.run([imtrial, "export", "cwl", str(study), "-o", str(tmp / f"cwl-{g}"), "--granularity", g],
                           check=True, capture_output=True, env=env())
        (tmp / "job.json").write_text(json.dumps({
            "study": {"class": "File", "path": str(tmp / "cwl-exam" / "study.ir.json")},
            "inbox": {"class": "Directory", "path": str(tmp / "inbox")}}))
        shim, log = make_shim(tmp)
        walls: dict[str, list[float]] = defaultdict(list)
        cpus: dict[str, list[float]] = defaultdict(list)
        split: dict[str, dict[str, list[float]]] = {}
        exams = None
        for b in range(args.repeats):
            for name in (["local1"] if "local1" not in runs else []) + runs:
                wall, cpu, out = run_one(name, tmp, study, shim, b)
                if name == "local1":
                    local = out
                    exams = json.loads(subprocess.run(
                        [imtrial, "status", "--workdir", str(out), "--json"], capture_output=True, text=True,
                        env=env()).stdout)["summary"]["exams"]
                elif not name.startswith("local"):
                    same_results(local, out)
                walls[name].append(wall)
                cpus[name].append(cpu)
                split[name] = read_shim(log)
                print(f"  block {b} {name}: {wall:.1f} s wall, {cpu:.1f} s CPU", file=sys.stderr, flush=True)
                if name != "local1":
                    shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(local, ignore_errors=True)
        starts = [subprocess.run([sys.executable, "-c", STARTUP, str(tmp / "cwl-exam" / "study.ir.json")],
                                 capture_output=True, text=True, check=True, env=env()).stdout.split() for _ in range(5)]
        st = [statistics.median(float(s[i]) for s in starts) for i in range(6)]
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    med = {k: (statistics.median(walls[k]), statistics.median(cpus[k])) for k in walls}
    base_w, base_c = med["local1"]
    print(f"\nCorpus: {args.example}, {args.subjects} subject(s) per site × visits {args.visits}, size {args.size}: "
          f"{files} files, {exams} exams; {args.repeats} interleaved block(s), medians.\n")
    print("| contender | wall s | CPU s | × local --jobs 1 wall | × CPU | imtrial processes | their CPU s | engine's own CPU s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name in runs:
        w, c = med[name]
        sp = split.get(name) or {}
        procs = sum(int(v[0]) for v in sp.values())
        pc = sum(v[2] for v in sp.values())
        own = f"{c - pc:.1f}" if sp else "-"
        print(f"| {name} | {w:.1f} | {c:.1f} | {w / base_w:.2f} | {c / base_c:.2f} | {procs or '-'} | "
              f"{pc:.1f} | {own} |" if sp else f"| {name} | {w:.1f} | {c:.1f} | {w / base_w:.2f} | {c / base_c:.2f} | - | - | - |")
    if "local2" in med:
        w2, c2 = med["local2"]
        for name in runs:
            if name.endswith("-par"):
                print(f"\n{name} against `imtrial run --jobs 2`: {med[name][0] / w2:.2f}× wall, {med[name][1] / c2:.2f}× CPU")
    print("\nCPU s of the imtrial processes by step (last block): processes, wall s, CPU s")
    for name in runs:
        sp = split.get(name)
        if sp:
            print(f"  {name}: " + "; ".join(f"{k} {int(v[0])}× {v[1]:.1f}/{v[2]:.1f}" for k, v in sorted(sp.items())))
    print(f"\nStart-up of one `imtrial step exam` process (CPU s, median of 5): interpreter {st[0]:.3f}, "
          f"`imtrial_dsl.cli` {st[1]:.3f}, the step path (runner, graph) {st[2]:.3f}, reading the IR {st[3]:.3f}, "
          f"graph and segment {st[4]:.3f}, the steps' modules (pydicom, numpy, …) {st[5]:.3f}; total {sum(st):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
