"""The pipeline commands: ``imtrial run | step | status | assign | synth | verify | keygen``."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional

from ..workdir import Workdir
from .common import (EXIT_ENVIRONMENT, EXIT_INPUT, EXIT_OK, EXIT_USAGE, KEY_ENV, UsageError, add_json, add_out,
                     add_study, add_workdir, command, load_trial)
from .render import assign_summary, exam_status, progress_for, run_summary


def cmd_run(args) -> int:
    from ..runner.run import worker_pool

    # started first (forked: nothing is open yet), so that they import the steps' modules while the study compiles
    pool = worker_pool(args.jobs, fork=True)
    try:
        return _run(args, pool)
    finally:
        if pool is not None:
            pool.shutdown()


def _run(args, pool) -> int:
    from ..runner.run import RunLocked, preflight, run_study

    trial = load_trial(args.study)
    if not Path(args.inbox).is_dir():
        print(f"imtrial run: inbox {args.inbox} is not a directory", file=sys.stderr)
        return EXIT_USAGE
    problems = preflight(trial, args.workdir)
    if problems:
        for p in problems:
            print(f"imtrial run: {p}", file=sys.stderr)
        return EXIT_INPUT
    progress = progress_for(args)
    log = (lambda s: print(s, file=sys.stderr)) if args.verbose else (lambda s: None)
    try:
        summary = run_study(trial, inbox=args.inbox, workdir=args.workdir, jobs=args.jobs, move=args.move,
                            progress=progress, log=log, pool=pool)
    except RunLocked as exc:
        print(f"imtrial run: {exc.diagnostic.message}", file=sys.stderr)
        return EXIT_INPUT
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
    else:
        print(run_summary(summary))
    if summary["failed"]:
        env = all(str(f.get("error") or "").startswith("environment error") for f in summary["failed"])
        return EXIT_ENVIRONMENT if env else EXIT_INPUT
    if summary["this_run"]["ingest"].get("not_removed"):  # --move could not delete (read-only inbox): E854
        print(f"imtrial run: environment error [E854]: {len(summary['this_run']['ingest']['not_removed'])} inbox "
              f"file(s) recorded and copied but not removed (--move): "
              f"{summary['this_run']['ingest']['not_removed'][0]['reason']}", file=sys.stderr)
        return EXIT_ENVIRONMENT
    return EXIT_OK


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
                                registry_dir=Path(args.registry_dir) if args.registry_dir else None,
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
            print("\n".join(exam_status(e, detailed=bool(args.exam or args.all))))
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
                          progress=progress_for(args), **{k: v for k, v in given.items() if v is not None})
    print(json.dumps({"out": args.out, "files": manifest["files"], "deviations": len(manifest["deviations"])}, indent=2))
    return EXIT_OK


def cmd_verify(args) -> int:
    from ..runner.archive import checkpoint_key, verify

    if not (args.archive or args.workdir):
        print("imtrial verify: give --workdir DIR or --archive DIR", file=sys.stderr)
        return EXIT_USAGE
    root = Path(args.archive) if args.archive else Workdir(args.workdir).archive
    if not (root / "audit.log.jsonl").exists():
        print(f"imtrial verify: no archive at {root}", file=sys.stderr)
        return EXIT_INPUT
    key = None
    if args.study:
        key = checkpoint_key(load_trial(args.study))
        if key is None:
            print("imtrial verify: the study names no key (or it is not set): the checkpoint's MAC is not checked",
                  file=sys.stderr)
    state = args.workdir if args.workdir and Workdir(args.workdir).state_db.exists() else None
    res = verify(root, deep=not args.shallow, state=state, key=key)
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print(f"{'OK' if res['ok'] else 'BROKEN'}: {res['records']} audit record(s), {res['objects']} object(s) "
              f"({res['current']} current instance version(s)), head {res['head'][:16]}"
              + (" [shallow: stored files not re-hashed]" if args.shallow else ""))
        for e in res["errors"]:
            print(f"  {e}")
        for n in res["notes"]:
            print(f"  note: {n}")
    return EXIT_OK if res["ok"] else EXIT_INPUT


def cmd_keygen(args) -> int:
    """Print a new random key (or write it to a new file readable only by its owner)."""
    import os

    from ..secrets import KEYGEN_BYTES, generate_key

    if args.bytes < 16:
        raise UsageError("imtrial keygen: --bytes must be at least 16 (128 bits)")
    key = generate_key(args.bytes or KEYGEN_BYTES)
    if not args.out:
        print(key)
        return EXIT_OK
    try:   # O_EXCL: never overwrite a key (a study's pseudonyms depend on it); 0600: the site's eyes only
        fd = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        print(f"imtrial keygen: {args.out} exists; a key is never overwritten", file=sys.stderr)
        return EXIT_INPUT
    with os.fdopen(fd, "w") as fh:
        fh.write(key + "\n")
    print(f"imtrial keygen: wrote a {args.bytes * 8}-bit key to {args.out} (mode 600); name it with "
          f"`key file \"{args.out}\"`", file=sys.stderr)
    return EXIT_OK


def register(sub) -> None:
    """Add the pipeline commands to the ``imtrial`` subparsers."""
    p = command(sub, "keygen", "generate a pseudonymization key (random, URL-safe base64)", examples=[
        "imtrial keygen -o site.key", "imtrial keygen  # prints a key: export IMTRIAL_KEY=... from it"],
        details="At least 128 bits of random material, as the study's key must have. With -o the key goes to a new "
                "file readable only by you (mode 600) — name it in the study with 'key file \"site.key\"'; "
                "otherwise it is printed. Keep it where the site keeps secrets: a lost key cannot be recovered, "
                "and the registry refuses a different one.")
    p.add_argument("--bytes", type=int, default=32, metavar="N", help="random bytes (default 32; at least 16)")
    add_out(p, "write it to a new file (mode 600) instead of stdout", metavar="FILE", old_spelling=True)
    p.set_defaults(func=cmd_keygen)

    p = command(sub, "run", "run the per-exam pipeline over an inbox of DICOM files (resumable)", examples=[
        "imtrial run examples/amyloid_mri.imtrial --inbox inbox --workdir work",
        "imtrial run examples/amyloid_mri.imtrial --inbox inbox --workdir work --jobs 4 --json > summary.json"],
        details="Ingests the inbox, then walks the study's graph for every exam: identify, de-identify, classify, "
                "adherence, QC, archive, analyses. A second run does only what is new or changed (the study edited, "
                "new files). Prints a summary: counts, visits missing a protocol, findings grouped by kind (the "
                "rarest first). Exit 1 when an exam failed.",
        env=[KEY_ENV])
    add_study(p, ir_json=True)
    p.add_argument("--inbox", required=True, metavar="DIR", help="the folder of incoming DICOM files (read recursively)")
    add_workdir(p, "the workdir to create or continue (state.sqlite, archive/, exams/)")
    p.add_argument("--jobs", "-j", type=int, default=2, metavar="N", help="worker processes (default 2)")
    p.add_argument("--move", action="store_true", help="remove inbox files once they are safely recorded")
    add_json(p, "print the summary as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (it is off anyway when stderr is not a terminal)")
    p.add_argument("--verbose", "-v", action="store_true", help="log each phase on stderr")
    p.set_defaults(func=cmd_run)

    p = command(sub, "step", "run one node of the study's pipeline (as the CWL tools do)", examples=[
        "imtrial step --list --study examples/amyloid_mri.imtrial",
        "imtrial step classify --study examples/amyloid_mri.imtrial --workdir work --exam 3f2a",
        "imtrial step qc --ref t1_snr --study examples/amyloid_mri.imtrial --in deid/=exam/deid "
        "--in results/classification.json=exam/results/classification.json -o out"],
        details="Either in a workdir (--workdir W [--exam KEY]: recorded like a run) or staged (--in REL=PATH … "
                "-o DIR: inputs where they are, outputs written at their exam-relative paths under DIR). "
                "'imtrial step exam --ref N' runs per-exam phase N of the CWL export fused.",
        env=[KEY_ENV])
    p.add_argument("name", nargs="?", metavar="NAME", help="a step of the table (or 'exam': a fused per-exam phase)")
    p.add_argument("--study", metavar="STUDY", help="the study (.imtrial, or IR JSON)")
    p.add_argument("--ref", metavar="NAME", help="the QC check or analysis, for steps that run once per check/analysis")
    add_workdir(p, "run in place in this workdir, and record it there", required=False)
    p.add_argument("--exam", metavar="KEY", help="with --workdir: the exam (key or unique prefix)")
    p.add_argument("--in", dest="inputs", action="append", metavar="REL=PATH",
                   help="an input exam path and where it is (repeat per path; once per exam for batch steps)")
    p.add_argument("--study-in", dest="study_inputs", action="append", metavar="OBJ=PATH",
                   help="a study object (e.g. inbox/=DIR)")
    p.add_argument("--registry", metavar="FILE", help="an identity registry to continue (steps on the registry)")
    p.add_argument("--registry-dir", metavar="DIR", help="the site's registry folder, used in place (state.sqlite "
                                                         "inside; what the CWL tools are given)")
    p.add_argument("--archive", metavar="DIR", help="an archive to add to (the archive step)")
    add_out(p, "where outputs go, at their exam-relative paths (default .)", metavar="DIR")
    p.add_argument("--list", action="store_true", help="list the step table (and a study's nodes)")
    p.set_defaults(func=cmd_step)

    p = command(sub, "status", "show what a workdir holds: the summary and each exam's steps", examples=[
        "imtrial status --workdir work", "imtrial status --workdir work --all",
        "imtrial status --workdir work --exam AMY01-BOS-0001"],
        details="The run summary (as 'imtrial run' prints it: visits missing a protocol, findings grouped by "
                "kind) and one line per exam with its steps; --all or --exam add each exam's failures, series "
                "verdicts and findings.")
    add_workdir(p)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--exam", metavar="KEY", help="only this exam: key (or prefix) or subject ID, in detail")
    g.add_argument("--all", action="store_true", help="every exam in detail (failures, series verdicts, findings)")
    add_json(p, "print the summary and the exams as JSON")
    p.set_defaults(func=cmd_status)

    p = command(sub, "assign", "resolve a held or unassigned exam (its subject, visit or date) and process it onward",
                examples=["imtrial assign 5051c566 --subject new --study study.imtrial --workdir work --by 'site coordinator'",
                          "imtrial assign 925467d3 --date 2024-04-25 --study study.imtrial --workdir work",
                          "imtrial assign 925467d3 --visit m12 --study study.imtrial --workdir work --no-run"],
                details="A held exam (no usable source identifier, e.g. 'PatientID is empty', or an unknown person "
                        "at an unknown device) gets a subject: an enrolled subject ID, or 'new' (at the device's "
                        "site or --site). An exam with visit 'unassigned' (no usable date, e.g. '***') gets its date "
                        "or its visit. The decision is recorded with who made it (--by) and why (--note); the exam "
                        "is then identified again and every step after identify runs. 'imtrial status' lists the "
                        "exams that wait.",
                env=[KEY_ENV])
    p.add_argument("exam", metavar="EXAM", help="exam key (or a unique prefix), as imtrial status lists it")
    p.add_argument("--study", required=True, metavar="STUDY", help="the study (.imtrial, or IR JSON)")
    add_workdir(p)
    p.add_argument("--subject", metavar="ID", help="an enrolled subject ID, or 'new' to enrol one")
    p.add_argument("--site", metavar="SITE", help="with --subject new: the site that enrols the subject")
    p.add_argument("--visit", metavar="NAME", help="the schedule visit of the exam")
    p.add_argument("--date", metavar="YYYY-MM-DD", help="the exam's real date (its visit then follows from the schedule)")
    p.add_argument("--by", metavar="NAME", help="who decides (recorded; default: the login name)")
    p.add_argument("--note", metavar="TEXT", help="why (recorded with the assignment)")
    p.add_argument("--no-run", action="store_true", help="only record it; the next 'imtrial run' processes the exam")
    add_json(p, "print what was recorded and the exam's state as JSON")
    p.set_defaults(func=cmd_assign)

    p = command(sub, "synth", "generate a synthetic DICOM corpus for a study", examples=[
        "imtrial synth examples/amyloid_mri.imtrial -o inbox --subjects 2 --small --deviations param_off,ghosting"],
        details="Subjects per site over the schedule's visits, one series per protocol on each site's devices, "
                "with the planted deviations listed in OUT/manifest.json (what a run must find).")
    add_study(p, ir_json=True)
    add_out(p, "the folder to write the corpus into", metavar="DIR", required=True)
    p.add_argument("--subjects", type=int, default=None, metavar="N", help="subjects per site (default 2)")
    p.add_argument("--seed", type=int, default=None, metavar="N", help="random seed (default 0): same seed, same corpus")
    p.add_argument("--deviations", metavar="LIST", help="comma-separated: param_off, wrong_device, missing_visit, "
                                                        "ghosting, corrupt_file, unknown_device, software_upgrade")
    p.add_argument("--phi", dest="phi", action="store_true", default=None, help="plant PHI in the headers (default)")
    p.add_argument("--no-phi", dest="phi", action="store_false", help="no planted PHI")
    p.add_argument("--small", action="store_true", help="small images (fast; same as --size small)")
    p.add_argument("--size", choices=["small", "medium", "full"], help="image size (default medium)")
    p.add_argument("--enhanced", dest="enhanced", action="store_true", default=None,
                   help="write every MR series as Enhanced MR (multi-frame); default: what each device writes")
    p.add_argument("--classic", dest="enhanced", action="store_false",
                   help="write every MR series as classic MR Image Storage (one file per slice)")
    p.add_argument("--visits", metavar="LIST", help="comma-separated schedule visits to generate (default all)")
    p.add_argument("--start-date", metavar="YYYY-MM-DD", help="first baseline date")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (it is off anyway when stderr is not a terminal)")
    p.set_defaults(func=cmd_synth)

    p = command(sub, "verify", "verify the archive's hash-chained audit log, its anchors and object hashes", examples=[
        "imtrial verify --workdir work --study study.imtrial", "imtrial verify --archive /data/amy01/archive --shallow"],
        details="Checks the audit chain record by record, against its anchor (the head hash and record count kept "
                "in the state database and in a checkpoint signed with the study's key), and the stored files "
                "against the log both ways. Exit 1 when anything does not hold.",
        env=[(KEY_ENV, "the study's key, with --study: checks the checkpoint's signature")])
    add_workdir(p, "the workdir (its state database holds the chain's anchor)", required=False)
    p.add_argument("--archive", metavar="DIR", help="archive folder (default WORKDIR/archive)")
    p.add_argument("--study", metavar="STUDY", help="the study: its key checks the checkpoint's MAC")
    p.add_argument("--shallow", action="store_true",
                   help="do not re-hash the stored files (chain, anchors and which files exist are still checked)")
    add_json(p)
    p.set_defaults(func=cmd_verify)
