"""At the scanner: ``imtrial schedule`` (research appointments), ``imtrial worklist serve`` (the Modality
Worklist SCP) and ``imtrial listen`` (a Storage SCP that gives the technologist a verdict per series)."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from .common import EXIT_OK, add_json, add_out, add_study, add_workdir, command, load_trial


def _print_steps(rows: list[dict], as_json: bool) -> None:
    if as_json:
        print(json.dumps(rows, indent=2, sort_keys=True, default=str))
        return
    if not rows:
        print("no scheduled steps")
        return
    print(f"{'accession':<14} {'subject':<18} {'site':<5} {'visit':<11} {'mod':<4} {'date':<10} {'time':<5} "
          f"{'status':<12} {'device':<9} protocols")
    for r in rows:
        print(f"{r['accession']:<14} {r['subject_id']:<18} {r['site']:<5} {r['visit']:<11} {r['modality']:<4} "
              f"{r['date']:<10} {r.get('time') or '':<5} {r['status']:<12} {r.get('device') or '':<9} "
              f"{', '.join(r['protocols'])}" + (f"  (exam {r['exam_key'][:12]})" if r.get("exam_key") else ""))


def cmd_schedule(args) -> int:
    from ..worklist import schedule as S

    trial = load_trial(args.study)
    w = args.workdir
    action = args.action
    if action == "enroll":
        res = S.enroll(trial, w, S.read_enrollment(args.csv))
        print(f"enrolled {res['enrolled']} subject(s)")
        res = S.plan(trial, w)
        print(f"scheduled {res['created']} new step(s) ({res['existing']} already scheduled)")
    elif action == "plan":
        res = S.plan(trial, w)
        print(f"scheduled {res['created']} new step(s) ({res['existing']} already scheduled, "
              f"{res['visits_done']} visit(s) already scanned)")
    elif action == "add":
        rows = S.add(trial, w, args.subject, args.visit, date=args.date, time_=args.time, modality=args.modality)
        _print_steps(rows, args.json)
    elif action == "move":
        _print_steps([S.move(trial, w, args.accession, args.date, args.time)], args.json)
    elif action == "cancel":
        _print_steps([S.cancel(trial, w, args.accession)], args.json)
    elif action == "list":
        status = None if args.all else S.ACTIVE
        _print_steps(S.steps(trial, w, site=args.site, status=status), args.json)
    elif action == "export":
        n = S.export_csv(S.steps(trial, w, site=args.site), args.out)
        print(f"wrote {n} step(s) to {args.out}")
    elif action == "import":
        res = S.import_csv(trial, w, args.csv)
        print(f"schedule import: {res['created']} new, {res['updated']} updated")
    return EXIT_OK


def cmd_worklist(args) -> int:
    from ..worklist.scp import serve

    trial = load_trial(args.study)
    svc = serve(trial, args.workdir, host=args.host, port=args.port, ae_title=args.ae_title,
                log=lambda s: print(s, flush=True))
    print(f"worklist: {svc.ae_title} listening on {args.host}:{svc.port} (Modality Worklist C-FIND, MPPS); "
          f"Ctrl-C to stop", flush=True)
    try:
        while True:
            time.sleep(3600)
    finally:
        svc.stop()


def cmd_listen(args) -> int:
    from ..listen.service import listen

    trial = load_trial(args.study)
    svc = listen(trial, args.workdir, host=args.host, port=args.port, ae_title=args.ae_title, quiet_s=args.quiet,
                 inbox=args.inbox, http_port=args.http_port, smtp=_smtp(args.smtp),
                 notify=lambda line: print(line, flush=True))
    print(f"listen: {svc.ae_title} on {args.host}:{svc.port} (C-STORE, MPPS); status page "
          f"http://{args.host}:{svc.http_port}/ ; series complete after {args.quiet:g} s without a new instance; "
          f"images go on to {svc.inbox}", flush=True)
    try:
        while True:
            time.sleep(3600)
    finally:
        svc.stop()


def _smtp(text):
    if not text:
        return None
    host, _, port = text.rpartition(":")
    return (host or "localhost", int(port or 25))


def register(sub) -> None:
    p = command(sub, "schedule", "research appointments: plan, add, move, cancel, list, CSV import/export", examples=[
        "imtrial schedule enroll study.imtrial --workdir w --csv enrolled.csv",
        "imtrial schedule plan study.imtrial --workdir w",
        "imtrial schedule move study.imtrial ACC0001 --workdir w --date 2027-03-02 --time 09:30",
        "imtrial schedule list study.imtrial --workdir w --site BOS"],
        details="Scheduled research procedure steps (what the Modality Worklist serves), kept in the workdir's "
                "state database: planned from the study's schedule and each subject's baseline exam or enrolment; "
                "a coordinator adds, moves or cancels them, and re-planning never overwrites such a change.")
    p.add_argument("action", choices=("enroll", "plan", "add", "move", "cancel", "list", "export", "import"),
                   help="what to do with the schedule")
    add_study(p, ir_json=True)
    p.add_argument("accession", nargs="?", metavar="ACCESSION", help="move/cancel: the step's accession number")
    add_workdir(p, "the site's workdir (state.sqlite)")
    p.add_argument("--csv", metavar="FILE", help="enroll: enrolment CSV; import: schedule CSV")
    add_out(p, "export: the CSV file to write", metavar="FILE")
    p.add_argument("--subject", metavar="ID", help="add: the subject")
    p.add_argument("--visit", metavar="NAME", help="add: the visit")
    p.add_argument("--modality", metavar="M", help="add: only this modality of the visit")
    p.add_argument("--date", metavar="YYYY-MM-DD", help="add/move: the appointment date")
    p.add_argument("--time", metavar="HH:MM", help="add/move: the appointment time")
    p.add_argument("--site", metavar="CODE", help="list/export: one site only")
    p.add_argument("--all", action="store_true", help="list: also completed and cancelled steps")
    add_json(p)
    p.set_defaults(func=cmd_schedule)

    p = command(sub, "worklist", "serve the research Modality Worklist to the site's scanners", examples=[
        "imtrial worklist serve study.imtrial --workdir w --port 11112 --ae-title IMTRIAL_MWL"],
        details="A DICOM Modality Worklist SCP (C-FIND) and MPPS SCP (N-CREATE/N-SET) over the scheduled steps; "
                "each scanner (calling AE title = a device's ae_title in the inventory) sees its site's steps for "
                "its modality, with the Clinical Trial attributes and the protocol code to run.")
    p.add_argument("serve", choices=("serve",), help="the action (serve)")
    add_study(p, ir_json=True)
    add_workdir(p, "the site's workdir (the scheduled steps, the registry)")
    p.add_argument("--port", type=int, default=11112, help="TCP port to listen on (default 11112)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--ae-title", default="IMTRIAL_MWL", metavar="T", help="our AE title (default IMTRIAL_MWL)")
    p.set_defaults(func=cmd_worklist)

    p = command(sub, "listen", "receive images from the scanner and give a verdict per series within seconds", examples=[
        "imtrial listen study.imtrial --workdir w --port 11113 --inbox inbox",
        "imtrial listen study.imtrial --workdir w --quiet 5 --smtp 127.0.0.1:2525"],
        details="A DICOM Storage SCP at the site: when a series is complete (no new instance for --quiet seconds, "
                "or MPPS COMPLETED) it runs classification, adherence and QC on it through the pipeline's steps "
                "and tells the technologist (console, a status page, e-mail to the site's technologist contacts on "
                "FAIL). Images land in --inbox for 'imtrial run'.",
        env=[("IMTRIAL_KEY", "the study's key (identification of the series' subject)")])
    add_study(p, ir_json=True)
    add_workdir(p, "the site's workdir (registry, listener state)")
    p.add_argument("--port", type=int, default=11113, help="DICOM port to listen on (default 11113)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--ae-title", default="IMTRIAL_SCP", metavar="T", help="our AE title (default IMTRIAL_SCP)")
    p.add_argument("--inbox", metavar="DIR", help="where received instances go on (default W/listen/inbox)")
    p.add_argument("--quiet", type=float, default=3.0, metavar="S",
                   help="a series is complete after S seconds without a new instance (default 3)")
    p.add_argument("--http-port", type=int, default=0, metavar="P", help="status page port (default: any free one)")
    p.add_argument("--smtp", metavar="HOST:PORT", help="send FAIL notices by e-mail (default: W/listen/outbox/*.eml)")
    p.set_defaults(func=cmd_listen)
