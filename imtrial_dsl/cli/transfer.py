"""``imtrial transfer``: send a run's archived, de-identified instances to a declared destination."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from ..workdir import Workdir
from .common import EXIT_INPUT, EXIT_OK, EXIT_USAGE, add_json, add_out, add_study, add_workdir, command, load_trial
from .render import transfer_summary


def cmd_transfer(args) -> int:
    from ..transfer import TransferError
    from ..transfer.send import transfer

    trial = load_trial(args.study)
    w = Path(args.workdir)
    if not Workdir(w).state_db.exists():
        print(f"imtrial transfer: no state database in {w} (run 'imtrial run' first)", file=sys.stderr)
        return EXIT_INPUT
    log = (lambda s: print(s, file=sys.stderr)) if args.verbose else (lambda s: None)
    try:
        summary = transfer(trial, Workdir(w).archive, args.to, state=Workdir(w).state_db, url_override=args.url_override,
                           host_override=args.host_override, port_override=args.port_override,
                           path_override=args.path_override, dry_run=args.dry_run, log=log)
    except TransferError as exc:  # the transfer could not start (nothing was sent): a usage problem, exit 2
        print(f"imtrial transfer: {exc.diagnostic.message}", file=sys.stderr)
        return EXIT_USAGE
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    print(json.dumps(summary, indent=2, sort_keys=True) if args.json else transfer_summary(summary))
    return EXIT_OK if summary["ok"] else EXIT_INPUT


def register(sub) -> None:
    """Add ``transfer`` to the ``imtrial`` subparsers."""
    p = command(sub, "transfer", "send archived de-identified instances to a declared destination", examples=[
        "imtrial transfer examples/amyloid_mri.imtrial --workdir work --to central --dry-run",
        "imtrial transfer examples/amyloid_mri.imtrial --workdir work --to central --url-override http://127.0.0.1:8042/dicom-web"],
        details="Sends W/archive's de-identified instances to a `transfer` destination of the study (DICOMweb "
                "STOW-RS, DICOM C-STORE or folder). Resumable: only what the destination has not acknowledged "
                "is sent (ledger: the transfers table of W/state.sqlite). Exit 2 when the transfer cannot start.",
        env=[("(the study's `auth env NAME`)", "the destination's bearer token, read from the variable the study names"),
             ("IMTRIAL_AE_TITLE", "the calling AE title for DICOM C-STORE (default IMTRIAL)")])
    add_study(p, ir_json=True)
    add_workdir(p, "the run's workdir (archive/ and state.sqlite)")
    p.add_argument("--to", required=True, metavar="NAME", help="destination name declared with `transfer NAME …`")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--url-override", metavar="URL", help="DICOMweb base URL to use instead of the declared one")
    g.add_argument("--host-override", metavar="HOST", help="DICOM host to use instead of the declared one")
    g.add_argument("--path-override", metavar="DIR", help="folder to use instead of the declared one")
    p.add_argument("--port-override", type=int, metavar="PORT", help="DICOM port to use instead of the declared one")
    p.add_argument("--dry-run", action="store_true", help="report what would be sent; send nothing, record nothing")
    add_json(p, "print the summary as JSON")
    add_out(p, "also write the JSON summary to FILE", metavar="FILE")
    p.add_argument("--verbose", "-v", action="store_true", help="log each batch on stderr")
    p.set_defaults(func=cmd_transfer)
