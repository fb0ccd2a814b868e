"""``imtrial pull`` (the centre fetches from a relay) and ``imtrial manifest`` (the site's list of what it sent)."""
from __future__ import annotations

import json
import re
import sys

from .common import EXIT_INPUT, EXIT_OK, EXIT_USAGE, add_json, add_out, add_study, add_workdir, command, load_trial


def _client(trial, source: str, delete: str):
    from ..transfer.destinations import auth_source, read_token, resolve
    from ..transfer.relay import RelayClient

    if re.match(r"(?i)https?://", source):
        return RelayClient(source, delete=delete)
    ep = resolve(trial, source)
    if ep.kind != "dicomweb":
        from ..transfer.relay import RelayError

        raise RelayError(f"--from {source}: a relay is a dicomweb destination, {ep.contacted!r} is {ep.kind}", code="E880")
    token = read_token(ep.auth)
    return RelayClient(ep.url, token=token, token_source=auth_source(ep.auth), delete=delete) if token else \
        RelayClient(ep.url, delete=delete)


def _line(s: dict) -> str:
    if "error" in s:
        return f"pull: FAILED ({s.get('code')}): {s['error']}"
    text = (f"pull from {s['relay']}: {s['listed']} on the relay, {s['received']} received, {s['already']} already "
            f"received, {s['deleted']} deleted from the relay, {s['waiting_for_archive']} waiting for the archive, "
            f"{s['rejected']} rejected, {s['foreign']} of other studies")
    for p in s["problems"][:10]:
        text += f"\n  rejected: {p}"
    return text


def cmd_pull(args) -> int:
    from ..transfer.pull import parse_every, pull_every, pull_once, read_manifests

    trial = load_trial(args.study)
    client = _client(trial, args.source, args.delete)
    manifest = read_manifests(args.manifest or [])
    log = (lambda s: print(s, file=sys.stderr)) if args.verbose else (lambda s: None)

    def show(s: dict) -> None:
        print(json.dumps(s, indent=2, sort_keys=True) if args.json else _line(s), flush=True)

    if args.every:
        pull_every(trial, client, args.inbox, args.workdir, parse_every(args.every), manifest=manifest, log=log,
                   passes=args.passes, report=show)
        return EXIT_OK
    s = pull_once(trial, client, args.inbox, args.workdir, manifest=manifest, log=log)
    show(s)
    return EXIT_OK if s["ok"] else EXIT_INPUT


def cmd_manifest(args) -> int:
    from ..transfer.pull import write_manifest

    trial = load_trial(args.study)
    doc = write_manifest(trial, args.workdir, args.to, args.out)
    if not doc["instances"]:
        print(f"imtrial manifest: nothing was sent to {args.to} yet", file=sys.stderr)
        return EXIT_USAGE
    print(f"wrote {len(doc['instances'])} instance(s) sent to {args.to} into {args.out}")
    return EXIT_OK


def register(sub) -> None:
    p = command(sub, "pull", "fetch what sites pushed to a relay (QIDO-RS, WADO-RS) into the central inbox", examples=[
        "imtrial pull study.imtrial --from https://relay.example/dicom-web --inbox central/inbox --workdir central/w",
        "imtrial pull study.imtrial --from relay --inbox central/inbox --workdir central/w --every 5m  # a destination of the study"],
        details="At the central site, behind its firewall: list the relay's instances, retrieve those not received "
                "yet, verify each (it parses, is de-identified, belongs to this study, matches the site's manifest), "
                "hand it to --inbox, and delete it from the relay once the central workdir (imtrial run over --inbox) "
                "has it. Resumable: a pull killed at any point loses and duplicates nothing.",
        env=[("IMTRIAL_RELAY_TOKEN", "bearer token for the relay"),
             ("IMTRIAL_RELAY_USER, IMTRIAL_RELAY_PASSWORD", "basic authentication instead of a token"),
             ("SSL_CERT_FILE", "CA bundle to verify the relay's certificate")])
    add_study(p, ir_json=True)
    p.add_argument("--from", dest="source", required=True, metavar="RELAY",
                   help="the relay's DICOMweb base URL, or a dicomweb `transfer` destination of the study")
    p.add_argument("--inbox", required=True, metavar="DIR", help="the central inbox (what 'imtrial run --inbox' reads)")
    add_workdir(p, "the central workdir: the pull ledger, and the archive whose receipt allows deleting")
    p.add_argument("--every", metavar="DURATION", help="pull again every DURATION (30s, 5m, 1h) until stopped")
    p.add_argument("--passes", type=int, metavar="N", help="with --every: stop after N passes")
    p.add_argument("--manifest", action="append", metavar="FILE",
                   help="a site's transfer manifest (imtrial manifest): each listed instance must match its sha256")
    p.add_argument("--delete", choices=("orthanc", "dicomweb", "keep"), default="orthanc",
                   help="how an archived instance leaves the relay (default orthanc: its REST API)")
    add_json(p, "print the pass summaries as JSON")
    p.add_argument("--verbose", "-v", action="store_true", help="say what each pass does")
    p.set_defaults(func=cmd_pull)

    p = command(sub, "manifest", "write the site's transfer manifest (SOP instance -> sha256 of what was sent)",
                examples=["imtrial manifest study.imtrial --workdir w --to relay -o manifest.json"],
                details="From the transfer ledger of the workdir: every instance acknowledged by destination NAME, "
                        "with the sha256 of the bytes sent, for 'imtrial pull --manifest' at the centre.")
    add_study(p, ir_json=True)
    add_workdir(p)
    p.add_argument("--to", required=True, metavar="NAME", help="the destination (the ledger's name for it)")
    add_out(p, "the manifest file to write", metavar="FILE", required=True)
    p.set_defaults(func=cmd_manifest)
