"""The pipeline commands: ``imtrial run | step | status | assign | synth | verify``."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional

from ..workdir import Workdir
from .common import EXIT_INPUT, EXIT_OK, EXIT_USAGE, UsageError, load_trial
from .render import assign_summary, exam_status, run_summary


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
    progress = None if args.no_progress or not sys.stderr.isatty() else progress_bar
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


def progress_bar(desc: str, total: int):
    """A progress bar on stderr (the runner asks for one per phase)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="item", file=sys.stderr, leave=False)


def _pairs(values: Optional[list[str]], flag: str) -> list[tuple[str, Path]]:
    out = []
    for v in values or []:
        rel, sep, path = v.partition("=")
        if not sep or not rel or not path:
            raise UsageError(f"{flag} takes REL=PATH, got {v!r}")
        out.append((rel, Path(path)))
    return out


def cmd_step(args) -> int:
    from .. import pipeline
    from ..runner.invoke import find_node, run_exam_segment, run_in_workdir, run_staged

    if args.list or not args.name:
        trial = load_trial(args.study) if args.study else None
        for name, st in pipeline.STEPS.items():
            where = st.scope + (f", shared {st.shared}" + (" (ordered)" if st.ordered else "") if st.shared else "")
            per = f", one per {st.per}" if st.per else ""
            print(f"{name:13s} [{where}{per}] {st.label}")
            print(f"{'':13s} reads {', '.join(st.inputs + st.study_inputs) or '-'}; "
                  f"writes {', '.join(st.outputs + st.study_outputs) or '-'}")
        if trial is not None:
            from ..runner.run import make_plan

            print("\nnodes of this study:", ", ".join(make_plan(trial).nodes))
        return EXIT_OK
    if not args.study:
        raise UsageError("imtrial step NAME needs --study FILE")
    trial = load_trial(args.study)
    # a step's ImtrialError (bad input or configuration, e.g. a missing key) is rendered by main as a diagnostic
    if args.name == "exam":
        if not (args.ref or "").isdigit():
            raise UsageError("imtrial step exam: --ref N names the per-exam phase (see the CWL export)")
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
    print(json.dumps(result, indent=2, sort_keys=True, default=str))
    return EXIT_OK


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


def cmd_assign(args) -> int:
    import getpass

    from ..runner.assign import assign_exam
    from ..runner.run import RunLocked, preflight

    trial = load_trial(args.study)
    if not args.no_run:
        problems = preflight(trial)
        if problems:
            for p in problems:
                print(f"imtrial assign: {p}", file=sys.stderr)
            return EXIT_INPUT
    try:
        res = assign_exam(trial, args.workdir, args.exam, by=args.by or getpass.getuser(), subject=args.subject,
                          site=args.site, visit=args.visit, date=args.date, note=args.note, run=not args.no_run)
    except RunLocked as exc:
        print(f"imtrial assign: {exc.diagnostic.message} (the assignment is recorded; the next run processes it)",
              file=sys.stderr)
        return EXIT_INPUT
    if args.json:
        print(json.dumps(res, indent=2, default=str))
    else:
        print(assign_summary(res))
    return EXIT_INPUT if (res["status"] or {}).get("status") == "failed" else EXIT_OK


def _names(text: Optional[str]) -> Optional[list[str]]:
    """A comma-separated option as a list; None when empty (synthesize() keeps its default)."""
    return [x for x in (text or "").split(",") if x] or None


def cmd_synth(args) -> int:
    from ..synth import synthesize

    trial = load_trial(args.study)
    given = {"subjects_per_site": args.subjects, "seed": args.seed, "phi": args.phi, "size": args.size,
             "deviations": _names(args.deviations), "visits": _names(args.visits), "start_date": args.start_date}
    # options left out keep synthesize()'s defaults, so they are stated once, there
    manifest = synthesize(trial, Path(args.out), small=args.small, enhanced=args.enhanced,
                          **{k: v for k, v in given.items() if v is not None})
    print(json.dumps({"out": args.out, "files": manifest["files"], "deviations": len(manifest["deviations"])}, indent=2))
    return EXIT_OK


def cmd_verify(args) -> int:
    from ..runner.archive import verify

    if not (args.archive or args.workdir):
        print("imtrial verify: give --workdir DIR or --archive DIR", file=sys.stderr)
        return EXIT_USAGE
    root = Path(args.archive) if args.archive else Workdir(args.workdir).archive
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

    p = sub.add_parser("step", help="run one node of the study's pipeline (as the CWL tools do)",
                       description="imtrial step NAME --study FILE [--ref R] (--workdir W [--exam KEY] | "
                                   "--in REL=PATH … --out DIR);  imtrial step --list [--study FILE]")
    p.add_argument("name", nargs="?", metavar="NAME", help="a step of the table (or 'exam': a fused per-exam phase)")
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

    p = sub.add_parser("status", help="show each exam's steps in a workdir")
    p.add_argument("--workdir", required=True, metavar="DIR")
    p.add_argument("--exam", metavar="KEY", help="exam key (or prefix) or subject ID")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("assign", help="resolve a held or unassigned exam (subject, visit or date) and process it onward",
                       description="imtrial assign EXAM --study FILE --workdir W (--subject ID|new [--site S] | "
                                   "--visit NAME | --date YYYY-MM-DD) [--by NAME] [--note TEXT]")
    p.add_argument("exam", metavar="EXAM", help="exam key (or a unique prefix), as imtrial status lists it")
    p.add_argument("--study", required=True, metavar="FILE", help="the study (.imtrial, or IR JSON)")
    p.add_argument("--workdir", required=True, metavar="DIR")
    p.add_argument("--subject", metavar="ID", help="an enrolled subject ID, or 'new' to enrol one")
    p.add_argument("--site", metavar="SITE", help="with --subject new: the site that enrols the subject")
    p.add_argument("--visit", metavar="NAME", help="the schedule visit of the exam")
    p.add_argument("--date", metavar="YYYY-MM-DD", help="the exam's real date (its visit then follows from the schedule)")
    p.add_argument("--by", metavar="NAME", help="who decides (recorded; default: the login name)")
    p.add_argument("--note", metavar="TEXT", help="why (recorded with the assignment)")
    p.add_argument("--no-run", action="store_true", help="only record it; the next 'imtrial run' processes the exam")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_assign)

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
    p.add_argument("--enhanced", dest="enhanced", action="store_true", default=None,
                   help="write every MR series as Enhanced MR (multi-frame); default: what each device writes")
    p.add_argument("--classic", dest="enhanced", action="store_false",
                   help="write every MR series as classic MR Image Storage (one file per slice)")
    p.add_argument("--visits", metavar="LIST", help="comma-separated schedule visits to generate")
    p.add_argument("--start-date", metavar="YYYY-MM-DD", help="first baseline date")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("verify", help="verify the archive's hash-chained audit log and object hashes")
    p.add_argument("--workdir", metavar="DIR")
    p.add_argument("--archive", metavar="DIR", help="archive folder (default WORKDIR/archive)")
    p.add_argument("--shallow", action="store_true", help="check the chain only, not the stored files")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_verify)
