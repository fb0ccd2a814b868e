"""The runner's subcommands: ``imtrial run | step | status | synth | verify``.

``imtrial_dsl.cli`` calls :func:`register`; ``python -m imtrial_dsl.runner.commands …`` works alone too.
Handlers print; everything they call returns values.
"""
from __future__ import annotations

import argparse
import inspect
import json
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from ..diagnostics import ImtrialError


def load_trial(path: str | Path):
    """A checked Trial from a ``.imtrial`` file (diagnostics printed, SystemExit(1) on errors) or IR JSON."""
    p = Path(path)
    if p.suffix == ".json":
        import hashlib

        from .. import ir

        trial = ir.Trial.model_validate_json(p.read_text())
        if not trial.source_sha256:
            trial.source_sha256 = hashlib.sha256(p.read_bytes()).hexdigest()
        return trial
    try:
        from ..cli import load_study
    except ImportError:  # the CLI module is optional for the runner
        load_study = None
    if load_study is not None:
        return load_study(p)[0]
    from ..compiler import compile_file

    res = compile_file(p)
    for d in res.diagnostics:
        print(str(d), file=sys.stderr)
    if not res.ok:
        raise SystemExit(1)
    return res.trial


# ----------------------------------------------------------------------------- run

def _tqdm(desc: str, total: int):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="item", file=sys.stderr, leave=False)


def cmd_run(args) -> int:
    from .run import RunLocked, format_summary, run_study

    trial = load_trial(args.study)
    if not Path(args.inbox).is_dir():
        print(f"imtrial run: inbox {args.inbox} is not a directory", file=sys.stderr)
        return 2
    from .run import preflight

    problems = preflight(trial)
    if problems:
        for p in problems:
            print(f"imtrial run: {p}", file=sys.stderr)
        return 1
    progress = None if args.no_progress or not sys.stderr.isatty() else _tqdm
    log = (lambda s: print(s, file=sys.stderr)) if args.verbose else (lambda s: None)
    try:
        summary = run_study(trial, inbox=args.inbox, workdir=args.workdir, jobs=args.jobs, move=args.move,
                            progress=progress, log=log)
    except RunLocked as exc:
        print(f"imtrial run: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
    else:
        print(format_summary(summary))
    return 1 if summary["failed"] else 0


# ----------------------------------------------------------------------------- step

def _pairs(values: Optional[list[str]], flag: str) -> list[tuple[str, Path]]:
    out = []
    for v in values or []:
        rel, sep, path = v.partition("=")
        if not sep or not rel or not path:
            raise SystemExit(f"imtrial step: {flag} takes REL=PATH, got {v!r}")
        out.append((rel, Path(path)))
    return out


def cmd_step(args) -> int:
    from .. import pipeline
    from .invoke import StepError, find_node, run_exam_segment, run_in_workdir, run_staged

    if args.list or not args.name:
        trial = load_trial(args.study) if args.study else None
        for name, st in pipeline.STEPS.items():
            where = st.scope + (f", shared {st.shared}" + (" (ordered)" if st.ordered else "") if st.shared else "")
            per = f", one per {st.per}" if st.per else ""
            print(f"{name:13s} [{where}{per}] {st.label}")
            print(f"{'':13s} reads {', '.join(st.inputs + st.study_inputs) or '-'}; writes {', '.join(st.outputs + st.study_outputs) or '-'}")
        if trial is not None:
            from .run import make_plan

            print("\nnodes of this study:", ", ".join(make_plan(trial).nodes))
        return 0
    if not args.study:
        print("imtrial step: --study FILE is required", file=sys.stderr)
        return 2
    trial = load_trial(args.study)
    try:
        if args.name == "exam":
            if not (args.ref or "").isdigit():
                print("imtrial step exam: --ref N names the per-exam segment (see the CWL export)", file=sys.stderr)
                return 2
            result = run_exam_segment(trial, int(args.ref), _pairs(args.inputs, "--in"), Path(args.out or "."))
        else:
            node = find_node(trial, args.name, args.ref)
            if args.workdir:
                result = run_in_workdir(trial, node, Path(args.workdir), args.exam)
            else:
                result = run_staged(trial, node, _pairs(args.inputs, "--in"), Path(args.out or "."),
                                    study_inputs=dict(_pairs(args.study_inputs, "--study-in")),
                                    registry=Path(args.registry) if args.registry else None,
                                    archive=Path(args.archive) if args.archive else None)
    except ImtrialError as err:  # bad input or configuration (e.g. a missing key): a diagnostic, not a crash
        from ..diagnostics import render

        print(render([err.diagnostic], {}), file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2, sort_keys=True, default=str))
    return 0


# ----------------------------------------------------------------------------- status

def cmd_status(args) -> int:
    from .run import format_summary, summarize
    from ..store import Store as State

    try:
        st = State(args.workdir, create=False)
    except FileNotFoundError as exc:
        print(f"imtrial status: {exc}", file=sys.stderr)
        return 1
    try:
        if args.exam:
            exams = [e for e in st.exams() if e["exam_key"].startswith(args.exam)
                     or (e["subject_id"] or "") == args.exam]
            if not exams:
                print(f"imtrial status: no exam {args.exam!r} in {args.workdir}", file=sys.stderr)
                return 1
        else:
            exams = st.exams()
        if args.json:
            out: Any = exams if args.exam else {"summary": summarize(st), "exams": exams}
            print(json.dumps(out, indent=2, default=str))
            return 0
        if not args.exam:
            print(format_summary(summarize(st)))
            print()
        for e in exams:
            win = "" if e["in_window"] is None else (" in window" if e["in_window"] else " OUT OF WINDOW")
            print(f"{e['exam_key']}  {e['subject_id'] or '-'}  {e['site'] or '-'}/{e['device'] or '-'}  "
                  f"{e['visit'] or '-'}{win}  {e['exam_date'] or ''}  [{e['status']}]")
            steps = e["steps"]
            line = "   " + "  ".join(f"{n}:{v['status']}" for n, v in steps.items())
            print(line)
            if args.exam:
                for n, v in steps.items():
                    if v["status"] == "failed":
                        print(f"   {n} failed: {v['detail'].get('error') or v['detail'].get('detail')}")
                for s in e["series"]:
                    a = (s.get("adherence") or {}).get("verdict", "-")
                    q = (s.get("qc") or {}).get("verdict", "-")
                    print(f"   series {s['series_number']!s:>4} {s['description'] or '':30s} {s['protocol'] or '-':10s} "
                          f"adherence {a:5s} qc {q}")
                for w in e["warnings"]:
                    print(f"   warning {w.get('code')}: {w.get('detail')}")
    finally:
        st.close()
    return 0


# ----------------------------------------------------------------------------- synth

def cmd_synth(args) -> int:
    try:
        from .. import synth
    except ImportError as exc:
        print(f"imtrial synth: the synthetic-corpus module is not available: {exc}", file=sys.stderr)
        return 1
    trial = load_trial(args.study)
    fn = synth.synthesize
    offered = {"subjects_per_site": args.subjects, "seed": args.seed, "phi": args.phi, "small": args.small or None,
               "size": args.size, "deviations": [d for d in (args.deviations or "").split(",") if d] or None,
               "enhanced": args.enhanced, "visits": [v for v in (args.visits or "").split(",") if v] or None,
               "start_date": args.start_date}
    params = inspect.signature(fn).parameters
    accepts_any = any(p.kind == p.VAR_KEYWORD for p in params.values())
    kwargs = {k: v for k, v in offered.items() if v is not None and (accepts_any or k in params)}
    dropped = [k for k, v in offered.items() if v not in (None, False, []) and k not in kwargs]
    if dropped:
        print(f"imtrial synth: option(s) not supported by synthesize(): {', '.join(dropped)}", file=sys.stderr)
        return 2
    manifest = fn(trial, Path(args.out), **kwargs)
    files = manifest.get("files") if isinstance(manifest, dict) else None
    n = len(files) if isinstance(files, list) else (files if isinstance(files, int) else None)
    print(json.dumps({"out": args.out, "files": n, "deviations": len(manifest.get("deviations", []))
                      if isinstance(manifest, dict) else None}, indent=2))
    return 0


# ----------------------------------------------------------------------------- verify

def cmd_verify(args) -> int:
    from .archive import verify

    if not (args.archive or args.workdir):
        print("imtrial verify: give --workdir DIR or --archive DIR", file=sys.stderr)
        return 2
    root = Path(args.archive) if args.archive else Path(args.workdir) / "archive"
    if not (root / "audit.log.jsonl").exists():
        print(f"imtrial verify: no archive at {root}", file=sys.stderr)
        return 1
    res = verify(root, deep=not args.shallow)
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print(f"{'OK' if res['ok'] else 'BROKEN'}: {res['records']} audit record(s), {res['objects']} object(s), head {res['head'][:16]}")
        for e in res["errors"]:
            print(f"  {e}")
    return 0 if res["ok"] else 1


# ----------------------------------------------------------------------------- registration

def register(subparsers) -> None:
    p = subparsers.add_parser("run", help="run the per-exam pipeline over an inbox (resumable)")
    p.add_argument("study", metavar="STUDY", help=".imtrial file (or IR JSON)")
    p.add_argument("--inbox", required=True, metavar="DIR")
    p.add_argument("--workdir", required=True, metavar="DIR")
    p.add_argument("--jobs", "-j", type=int, default=2, metavar="N", help="worker processes (default 2)")
    p.add_argument("--move", action="store_true", help="remove inbox files once they are safely recorded")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (it is off anyway when stderr is not a TTY)")
    p.add_argument("--verbose", "-v", action="store_true")
    p.set_defaults(func=cmd_run)

    p = subparsers.add_parser("step", help="run one node of the study's pipeline (as the CWL tools do)",
                              description="imtrial step NAME --study FILE [--ref R] (--workdir W [--exam KEY] | "
                                          "--in REL=PATH … --out DIR);  imtrial step --list [--study FILE]")
    p.add_argument("name", nargs="?", metavar="NAME", help="a step of the table (or 'exam': the fused per-exam pipeline)")
    p.add_argument("--study", metavar="FILE", help="the study (.imtrial, or IR JSON)")
    p.add_argument("--ref", metavar="NAME", help="the QC check or analysis, for steps that run once per check/analysis")
    p.add_argument("--workdir", metavar="DIR", help="run in place in a workdir, and record it there")
    p.add_argument("--exam", metavar="KEY", help="with --workdir: the exam (key or unique prefix)")
    p.add_argument("--in", dest="inputs", action="append", metavar="REL=PATH",
                   help="an input exam path and where it is (repeat per path; once per exam for batch steps)")
    p.add_argument("--study-in", dest="study_inputs", action="append", metavar="OBJ=PATH",
                   help="a study object (e.g. inbox/=DIR)")
    p.add_argument("--registry", metavar="FILE", help="an identity registry to continue (steps on the registry)")
    p.add_argument("--archive", metavar="DIR", help="an archive to add to (the archive step)")
    p.add_argument("--out", metavar="DIR", help="where outputs go, at their exam-relative paths (default .)")
    p.add_argument("--list", action="store_true", help="list the step table (and a study's nodes)")
    p.set_defaults(func=cmd_step)

    p = subparsers.add_parser("status", help="show each exam's steps in a workdir")
    p.add_argument("--workdir", required=True, metavar="DIR")
    p.add_argument("--exam", metavar="KEY", help="exam key (or prefix) or subject ID")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    p = subparsers.add_parser("synth", help="generate a synthetic DICOM corpus for a study")
    p.add_argument("study", metavar="STUDY")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--subjects", type=int, default=None, metavar="N", help="subjects per site")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--deviations", metavar="LIST", help="comma-separated: param_off, wrong_device, missing_visit, "
                                                        "ghosting, corrupt_file, unknown_device, software_upgrade")
    p.add_argument("--phi", dest="phi", action="store_true", default=None, help="plant PHI in the headers (default)")
    p.add_argument("--no-phi", dest="phi", action="store_false", help="no planted PHI")
    p.add_argument("--small", action="store_true", help="small images (fast; same as --size small)")
    p.add_argument("--size", choices=["small", "medium", "full"], help="image size")
    p.add_argument("--enhanced", action="store_true", default=None, help="write MR series as Enhanced MR (multi-frame)")
    p.add_argument("--visits", metavar="LIST", help="comma-separated schedule visits to generate")
    p.add_argument("--start-date", metavar="YYYY-MM-DD", help="first baseline date")
    p.set_defaults(func=cmd_synth)

    p = subparsers.add_parser("verify", help="verify the archive's hash-chained audit log and object hashes")
    p.add_argument("--workdir", metavar="DIR")
    p.add_argument("--archive", metavar="DIR", help="archive folder (default WORKDIR/archive)")
    p.add_argument("--shallow", action="store_true", help="check the chain only, not the stored files")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_verify)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Stand-alone entry point: ``python -m imtrial_dsl.runner.commands run …``."""
    ap = argparse.ArgumentParser(prog="imtrial")
    register(ap.add_subparsers(dest="command", required=True))
    args = ap.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
