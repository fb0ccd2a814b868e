"""The operations commands: ``imtrial reminders | report | qualify | expected | upgrades``.

Each returns 0, or 1 for a problem with the input or a failed delivery; an ``OpsError`` (an undeclared
site, device or role, a bad enrollment file) is rendered by :func:`imtrial_dsl.cli.main`.
"""
from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from datetime import date
from pathlib import Path

from ..workdir import Workdir
from .common import EXIT_INPUT, EXIT_OK, EXIT_USAGE, add_json, add_out, add_study, add_workdir, command, load_study
from .render import progress_for


def _iso_date(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO date (YYYY-MM-DD): {text!r}")


def _date(d: date | None) -> date:
    return d or date.today()


def _data(trial, workdir: str, enrollment: str | None = None):
    """The ops view of ``workdir``; exit 1 when it has no state database yet."""
    from ..ops.model import load_study_data

    wd = Path(workdir)
    if not Workdir(wd).state_db.exists():
        print(f"error: no state database in {wd} (run 'imtrial run' first)", file=sys.stderr)
        raise SystemExit(EXIT_INPUT)
    return load_study_data(wd, trial.study.code if trial.study else None, enrollment)


def cmd_reminders(args) -> int:
    from ..ops.reminders import run_reminders

    trial = load_study(args.study)[0]
    data = _data(trial, args.workdir, args.enrollment)
    smtp = None
    if args.smtp:
        host, _, port = args.smtp.rpartition(":")
        if not host or not port.isdigit():
            print(f"error: --smtp wants HOST:PORT, got {args.smtp!r}", file=sys.stderr)
            return EXIT_USAGE
        smtp = (host, int(port))
    run = run_reminders(trial, data, args.workdir, _date(args.as_of), dry_run=args.dry_run, smtp=smtp,
                        sender=args.sender, out_dir=args.out, central_emails=args.central_email)
    for m in run.messages:
        print(f"[{m.status}] To: {m.recipient.email} ({m.recipient.role}, {m.recipient.site or 'central'}) — {m.subject}"
              + (f" — {m.error}" if m.error else ""))
        if args.dry_run:
            print("    " + m.body.replace("\n", "\n    ").rstrip())
    if run.already_sent:
        print(f"{len(run.already_sent)} notice(s) already sent earlier: not sent again")
    for u in run.undeliverable:
        print(f"warning: {u['site']} {u['subject_id']} {u['visit']} ({u['kind']}): {u['reason']}", file=sys.stderr)
    if not run.messages:
        print("nothing to send")
    for f in run.files:
        print(f"wrote {f}")
    return EXIT_OK if run.ok else EXIT_INPUT


def cmd_report(args) -> int:
    from ..ops import reports

    trial = load_study(args.study)[0]
    data = _data(trial, args.workdir, args.enrollment)
    out = reports.generate(trial, data, args.out, _date(args.as_of), role=args.role, site=args.site,
                           workdir=args.workdir, progress=progress_for(args))
    for label, files in out.items():
        print(f"{label}: {files[0].parent}")
    return EXIT_OK


def cmd_qualify(args) -> int:
    from ..ops.qualify import qualify

    trial = load_study(args.study)[0]
    if not Path(args.folder).is_dir():
        print(f"error: not a folder: {args.folder}", file=sys.stderr)
        return EXIT_INPUT
    res = qualify(trial, args.workdir, args.site, args.device, args.folder, by=args.by, on=_date(args.date))
    if args.json:
        print(json.dumps(res.to_json(), indent=2, sort_keys=True))
    else:
        for d in res.decisions:
            print(f"{res.site}/{res.device} {d.protocol}: {'QUALIFIED' if d.qualified else 'NOT QUALIFIED'}"
                  + ("".join(f"\n    - {r}" for r in d.reasons)))
        print(f"recorded on {res.decided_on} by {res.decided_by} (software {res.software or 'unknown'})")
    return EXIT_OK if res.all_qualified else EXIT_INPUT


def cmd_expected(args) -> int:
    from ..ops.expected import expected_vs_received

    trial = load_study(args.study)[0]
    rows = expected_vs_received(trial, _data(trial, args.workdir, args.enrollment), _date(args.as_of))
    if args.json:
        print(json.dumps([r.to_json() for r in rows], indent=2, sort_keys=True))
        return EXIT_OK
    for r in rows:
        acq = ", ".join(f"{a.protocol}:{a.status}" for a in r.acquisitions if a.status != "ok")
        print(f"{r.site:6} {r.subject_id:20} {r.visit:10} {r.opens}..{r.closes}  {r.status}" + (f"  [{acq}]" if acq else ""))
    return EXIT_OK


def cmd_upgrades(args) -> int:
    from ..ops.upgrades import record_upgrades, scan_upgrades

    trial = load_study(args.study)[0]
    found = scan_upgrades(trial, _data(trial, args.workdir))
    flags = record_upgrades(trial, found, args.workdir)
    for f in found:
        print(f.message())
    print(f"{len(found)} exam(s) with a software release differing from the inventory; {flags} new re-qualification flag(s)")
    return EXIT_OK


def register(sub) -> None:
    """Add the operations commands to the ``imtrial`` subparsers."""
    def common(p, enrollment=True):
        add_study(p)
        add_workdir(p, "the run's workdir (holds state.sqlite)")
        if enrollment:
            p.add_argument("--enrollment", metavar="CSV", help="subject_id,site,enrolled_on[,arm]: day 0 per subject "
                                                                "(default: each subject's baseline exam)")

    def as_of(p):
        p.add_argument("--as-of", metavar="DATE", type=_iso_date, help="evaluate on this date, YYYY-MM-DD (default today)")

    p = command(sub, "reminders", "send visit-window reminders and escalations (SMTP, .ics, JSON)", examples=[
        "imtrial reminders examples/amyloid_mri.imtrial --workdir work --dry-run",
        "imtrial reminders examples/amyloid_mri.imtrial --workdir work --smtp mail.example.org:25 -o out"],
        details="Works out, per subject and visit, who must be told what as of the date: a window about to open, "
                "a visit overdue. A notice sent once is not sent again.",
        env=[("IMTRIAL_SMTP", "default for --smtp (HOST:PORT)"), ("IMTRIAL_MAIL_FROM", "default for --from"),
             ("IMTRIAL_CENTRAL_EMAIL", "central team addresses, comma-separated")])
    common(p)
    as_of(p)
    p.add_argument("--dry-run", action="store_true", help="print what would be sent; send and record nothing")
    p.add_argument("--smtp", metavar="HOST:PORT", default=os.environ.get("IMTRIAL_SMTP"),
                   help="SMTP server (default $IMTRIAL_SMTP); without it messages go to OUT/outbox/*.eml")
    p.add_argument("--from", dest="sender", default=os.environ.get("IMTRIAL_MAIL_FROM", "imtrial@localhost"),
                   metavar="ADDR", help="sender address (default $IMTRIAL_MAIL_FROM or imtrial@localhost)")
    p.add_argument("--central-email", action="append", default=[], metavar="ADDR",
                   help="central team address (repeatable; also $IMTRIAL_CENTRAL_EMAIL, comma-separated)")
    add_out(p, "write reminders.json, visit_windows_*.ics (and the outbox) here", metavar="DIR")
    p.set_defaults(func=cmd_reminders)

    p = command(sub, "report", "write management reports per role (HTML with charts, CSV, JSON)", examples=[
        "imtrial report examples/amyloid_mri.imtrial --workdir work -o report",
        "imtrial report examples/amyloid_mri.imtrial --workdir work -o report --role site --site BOS"],
        details="One folder per audience (role, and site for roles that see their own site): report.html, "
                "report.json and a CSV per table. What a role may not see is removed from the data before "
                "anything is computed, so no file holds it; the HTML says what is hidden.")
    common(p)
    add_out(p, "output folder (one subfolder per role/site)", metavar="DIR", required=True)
    p.add_argument("--role", help="only this study role (default: the roles the study's reports name)")
    p.add_argument("--site", help="only this site (for roles that see their own site)")
    as_of(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar (it is off anyway when stderr is not a terminal)")
    p.set_defaults(func=cmd_report)

    p = command(sub, "qualify", "check a qualification exam folder and record the decision", examples=[
        "imtrial qualify examples/phantom_qualification.imtrial phantom/ --site BOS --device BOS_MR1 --workdir work"],
        details="Classifies the folder's series and checks each against the protocols of the study's "
                "qualification block on that device; the decision (and who made it) goes to the workdir's "
                "state database, where reports and the run read it. Exit 1 unless every protocol qualifies.",
        env=[("IMTRIAL_USER", "default for --by")])
    add_study(p)
    p.add_argument("folder", metavar="FOLDER", help="folder with the qualification exam (phantom or volunteer) DICOM files")
    p.add_argument("--site", required=True, help="the site code, as declared in the study")
    p.add_argument("--device", required=True, help="the device name, as declared in the site")
    add_workdir(p, "the runner's workdir (decisions go to its state.sqlite)")
    p.add_argument("--by", default=os.environ.get("IMTRIAL_USER") or getpass.getuser(),
                   help="who decides (default $IMTRIAL_USER or the login name)")
    p.add_argument("--date", metavar="DATE", type=_iso_date, help="decision date, YYYY-MM-DD (default today)")
    add_json(p, "print the full result as JSON")
    p.set_defaults(func=cmd_qualify)

    p = command(sub, "expected", "list expected vs received visits per subject", examples=[
        "imtrial expected examples/amyloid_mri.imtrial --workdir work --as-of 2026-09-01"],
        details="One line per subject and visit: its window, whether it was received (in or out of window), "
                "and the acquisitions that are missing or failed.")
    common(p)
    as_of(p)
    add_json(p)
    p.set_defaults(func=cmd_expected)

    p = command(sub, "upgrades", "list software upgrades seen in exams; record re-qualification needs", examples=[
        "imtrial upgrades examples/amyloid_mri.imtrial --workdir work"],
        details="Compares each exam's software release with the device's inventory entry; a new release flags "
                "the device's protocols for re-qualification (when the study's qualification block asks for it).")
    common(p, enrollment=False)
    p.set_defaults(func=cmd_upgrades)
