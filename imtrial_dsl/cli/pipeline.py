"""The pipeline commands: ``imtrial run | step | status | synth | verify``."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional

from .common import EXIT_INPUT, EXIT_OK, EXIT_USAGE, load_trial
from .render import exam_status, run_summary


def cmd_run(args) -> int:
    from ..runner.run import RunLocked, preflight, run_study

    trial = load_trial(args.study)
    if not Path(args.inbox).is_dir():
        print(f"imtrial run: inbox {args.inbox} is not a directory", file=sys.stderr)
        return EXIT_USAGE
    problems = preflight(trial)
    if problems:
        for p in problems:
            print(f"imtrial run: {p}", file=sys.stderr)
        return EXIT_INPUT
    progress = False if args.no_progress else None
    log = (lambda s: print(s, file=sys.stderr)) if args.verbose else (lambda s: None)
    try:
        summary = run_study(trial, inbox=args.inbox, workdir=args.workdir, jobs=args.jobs, move=args.move,
                            progress=progress, log=log)
    except RunLocked as exc:
        print(f"imtrial run: {exc.diagnostic.message}", file=sys.stderr)
        return EXIT_INPUT
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
    else:
        print(run_summary(summary))
    return EXIT_INPUT if summary["failed"] else EXIT_OK


def _step_parser(spec) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=f"imtrial step {spec.name}", description=spec.doc)
    ap.add_argument("--study", required=True, metavar="FILE", help="the study (.imtrial, or IR JSON)")
    for p in spec.inputs + spec.outputs:
        flag = "--" + p.name.replace("_", "-")
        if p.kind == "bool":
            ap.add_argument(flag, dest=p.name, action="store_true", help=p.doc)
        else:
            ap.add_argument(flag, dest=p.name, required=not p.optional, type=int if p.kind == "int" else str,
                            metavar=p.kind.upper(), help=p.doc + ("" if not p.optional else " (optional)"))
    ap.add_argument("--json-out", metavar="FILE", help="also write the step's summary to FILE")
    return ap


def cmd_step(args) -> int:
    from ..diagnostics import did_you_mean
    from ..runner.steps import load_all

    steps = load_all()
    if args.list or not args.name:
        for name, spec in sorted(steps.items()):
            params = " ".join(("[" if p.optional else "") + f"--{p.name.replace('_', '-')} {p.kind.upper()}" + ("]" if p.optional else "")
                              for p in spec.inputs + spec.outputs)
            print(f"{name:12s} {params}\n{'':12s} {spec.doc.splitlines()[0] if spec.doc else ''}")
        return EXIT_OK
    spec = steps.get(args.name)
    if spec is None:
        hint = did_you_mean(args.name, steps)
        print(f"imtrial step: unknown step {args.name!r}" + (f"; {hint}" if hint else "") +
              f" (known: {', '.join(sorted(steps))})", file=sys.stderr)
        return EXIT_USAGE
    ns = _step_parser(spec).parse_args(args.params)
    trial = load_trial(ns.study)
    kwargs = {p.name: getattr(ns, p.name) for p in spec.inputs + spec.outputs
              if getattr(ns, p.name) is not None and not (p.kind == "bool" and p.optional and getattr(ns, p.name) is False)}
    # a step's ImtrialError (bad input or configuration, e.g. a missing key) is rendered by main as a diagnostic
    result = spec.func(trial, **kwargs)
    text = json.dumps(result, indent=2, sort_keys=True, default=str)
    if ns.json_out:
        Path(ns.json_out).write_text(text + "\n")
    print(text)
    return EXIT_OK if not (isinstance(result, dict) and result.get("ok") is False) else EXIT_INPUT


def cmd_status(args) -> int:
    from ..runner.run import summarize
    from ..store import Store, StoreError

    try:
        st = Store(args.workdir, create=False)
    except StoreError as exc:
        print(f"imtrial status: {exc.diagnostic.message}", file=sys.stderr)
        return EXIT_INPUT
    try:
        if args.exam:
            exams = [e for e in st.exams() if e["exam_key"].startswith(args.exam)
                     or (e["subject_id"] or "") == args.exam]
            if not exams:
                print(f"imtrial status: no exam {args.exam!r} in {args.workdir}", file=sys.stderr)
                return EXIT_INPUT
        else:
            exams = st.exams()
        if args.json:
            out: Any = exams if args.exam else {"summary": summarize(st), "exams": exams}
            print(json.dumps(out, indent=2, default=str))
            return EXIT_OK
        if not args.exam:
            print(run_summary(summarize(st)))
            print()
        for e in exams:
            print("\n".join(exam_status(e, detailed=bool(args.exam))))
    finally:
        st.close()
    return EXIT_OK


def _names(text: Optional[str]) -> Optional[list[str]]:
    """A comma-separated option as a list; None when empty (synthesize() keeps its default)."""
    return [x for x in (text or "").split(",") if x] or None


def cmd_synth(args) -> int:
    from ..runner.synth import synthesize

    trial = load_trial(args.study)
    given = {"subjects_per_site": args.subjects, "seed": args.seed, "phi": args.phi, "size": args.size,
             "deviations": _names(args.deviations), "visits": _names(args.visits), "start_date": args.start_date}
    # options left out keep synthesize()'s defaults, so they are stated once, there
    manifest = synthesize(trial, Path(args.out), small=args.small, enhanced=bool(args.enhanced),
                          **{k: v for k, v in given.items() if v is not None})
    print(json.dumps({"out": args.out, "files": manifest["files"], "deviations": len(manifest["deviations"])}, indent=2))
    return EXIT_OK


def cmd_verify(args) -> int:
    from ..runner.archive import verify

    if not (args.archive or args.workdir):
        print("imtrial verify: give --workdir DIR or --archive DIR", file=sys.stderr)
        return EXIT_USAGE
    root = Path(args.archive) if args.archive else Path(args.workdir) / "archive"
    if not (root / "audit.log.jsonl").exists():
        print(f"imtrial verify: no archive at {root}", file=sys.stderr)
        return EXIT_INPUT
    res = verify(root, deep=not args.shallow)
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print(f"{'OK' if res['ok'] else 'BROKEN'}: {res['records']} audit record(s), {res['objects']} object(s), head {res['head'][:16]}")
        for e in res["errors"]:
            print(f"  {e}")
    return EXIT_OK if res["ok"] else EXIT_INPUT


def register(sub) -> None:
    """Add the pipeline commands to the ``imtrial`` subparsers."""
    p = sub.add_parser("run", help="run the per-exam pipeline over an inbox (resumable)")
    p.add_argument("study", metavar="STUDY", help=".imtrial file (or IR JSON)")
    p.add_argument("--inbox", required=True, metavar="DIR")
    p.add_argument("--workdir", required=True, metavar="DIR")
    p.add_argument("--jobs", "-j", type=int, default=2, metavar="N", help="worker processes (default 2)")
    p.add_argument("--move", action="store_true", help="remove inbox files once they are safely recorded")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (it is off anyway when stderr is not a TTY)")
    p.add_argument("--verbose", "-v", action="store_true")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("step", help="run one registered pipeline step (as the CWL tools do)",
                       description="imtrial step NAME --study FILE --<param> VALUE …  (imtrial step --list)")
    p.add_argument("name", nargs="?", metavar="NAME")
    p.add_argument("params", nargs=argparse.REMAINDER)
    p.add_argument("--list", action="store_true", help="list the registered steps and their parameters")
    p.set_defaults(func=cmd_step)

    p = sub.add_parser("status", help="show each exam's steps in a workdir")
    p.add_argument("--workdir", required=True, metavar="DIR")
    p.add_argument("--exam", metavar="KEY", help="exam key (or prefix) or subject ID")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("synth", help="generate a synthetic DICOM corpus for a study")
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

    p = sub.add_parser("verify", help="verify the archive's hash-chained audit log and object hashes")
    p.add_argument("--workdir", metavar="DIR")
    p.add_argument("--archive", metavar="DIR", help="archive folder (default WORKDIR/archive)")
    p.add_argument("--shallow", action="store_true", help="check the chain only, not the stored files")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_verify)
