"""The language commands: ``imtrial check | compile | fmt | graph | schema | export | import | explain``."""
from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

from ..diagnostics import CompileErrors, Diagnostic, Severity
from .common import EXIT_INPUT, EXIT_OK, UsageError, compile_path, load_study
from .render import counts, plural, print_diagnostics, write_out

# Modules of imtrial_dsl.exporters that define ``export(trial, graph, out_dir)``; imported only when chosen.
EXPORT_TARGETS = ("cwl", "docs", "eprotocol", "inventory")


def _exporter(name: str):
    from ..paths import exporters_package

    return importlib.import_module(f"{exporters_package().__name__}.{name}")


def cmd_check(args) -> int:
    worst = EXIT_OK
    all_diags: list[dict] = []
    for path in args.files:
        from ..compiler import study_file_problems

        res = compile_path(path)
        diags = sorted(res.diagnostics + study_file_problems(res, path), key=Diagnostic.sort_key)
        if args.werror:
            diags = [d.model_copy(update={"severity": Severity.ERROR}) if d.severity == Severity.WARNING else d for d in diags]
        e, w = counts(diags)
        if args.format == "json":
            all_diags.extend(d.model_dump(mode="json") | {"file_checked": path} for d in diags)
        else:
            print_diagnostics(diags, res.sources)
            summary = "ok" if not e and not w else ", ".join(x for x in (plural(e, "error") if e else "",
                                                                          plural(w, "warning") if w else "") if x)
            print(f"{path}: {summary}")
        if e:
            worst = EXIT_INPUT
    if args.format == "json":
        print(json.dumps(all_diags, indent=2))
    return worst


def cmd_compile(args) -> int:
    trial, _ = load_study(args.file)
    write_out(trial.model_dump_json(indent=2) + "\n", args.output)
    return EXIT_OK


def cmd_fmt(args) -> int:
    from ..compiler import unreadable
    from ..fmt import format_source

    if args.check and args.write:
        raise UsageError("--check and --write exclude each other")
    if len(args.files) > 1 and not (args.check or args.write):
        raise UsageError("formatting several files needs --check or --write")
    rc = EXIT_OK
    for path in args.files:
        miss = unreadable(path)
        if miss:
            print_diagnostics([miss], {})
            rc = EXIT_INPUT
            continue
        text = Path(path).read_text(encoding="utf-8", errors="replace")
        try:
            new = format_source(text, path)
        except CompileErrors as exc:
            print_diagnostics(exc.diagnostics, {path: text})
            rc = EXIT_INPUT
            continue
        if args.check:
            if new != text:
                print(f"would reformat {path}")
                rc = max(rc, EXIT_INPUT)
        elif args.write:
            if new != text:
                Path(path).write_text(new, encoding="utf-8")
                print(f"reformatted {path}", file=sys.stderr)
        else:
            sys.stdout.write(new)
    return rc


def cmd_graph(args) -> int:
    from ..graph import RENDERERS, render_image

    _, graph = load_study(args.file)
    if args.format in RENDERERS:
        write_out(RENDERERS[args.format](graph), args.output)
        return EXIT_OK
    data, err = render_image(graph, args.format)
    if err is not None:
        print_diagnostics([err], {})
        return EXIT_INPUT
    if not args.output and sys.stdout.isatty():
        raise UsageError(f"refusing to write {args.format} bytes to a terminal: add -o FILE")
    write_out(data, args.output)
    return EXIT_OK


def cmd_schema(args) -> int:
    from .. import ir

    write_out(json.dumps(ir.Trial.model_json_schema(), indent=2) + "\n", args.output)
    return EXIT_OK


def cmd_export(args) -> int:
    if args.target not in EXPORT_TARGETS:
        raise UsageError(f"unknown export target '{args.target}' (available: {', '.join(EXPORT_TARGETS)})")
    mod = _exporter(args.target)
    res = compile_path(args.file)
    print_diagnostics(res.diagnostics, res.sources)
    if not res.ok:
        return EXIT_INPUT
    options = {k: v for k, v in (("granularity", args.granularity), ("docker_image", args.docker_image)) if v}
    if options and args.target != "cwl":
        raise UsageError("--granularity and --docker-image are options of 'export cwl'")
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    try:
        written = mod.export(res.trial, res.graph, out, **options)
    except CompileErrors as exc:
        print_diagnostics(exc.diagnostics, res.sources)
        return EXIT_INPUT
    for p in written or []:
        print(p)
    return EXIT_OK


def cmd_import(args) -> int:
    from ..compiler import unreadable

    if args.kind != "eprotocol":
        raise UsageError(f"unknown import kind '{args.kind}' (available: eprotocol)")
    miss = unreadable(args.file)
    if miss:
        print_diagnostics([miss], {})
        return EXIT_INPUT
    eprotocol = _exporter("eprotocol")
    try:
        protocol = eprotocol.import_file(Path(args.file))
    except CompileErrors as exc:
        print_diagnostics(exc.diagnostics, {})
        return EXIT_INPUT
    except (ValueError, OSError) as exc:
        print_diagnostics([Diagnostic(code="E002", message=f"cannot import '{args.file}': {exc}")], {})
        return EXIT_INPUT
    text = eprotocol.protocol_to_source(protocol)
    write_out(text if text.endswith("\n") else text + "\n", args.output)
    return EXIT_OK


def cmd_explain(args) -> int:
    from ..explain import explain_text

    trial, _ = load_study(args.file)
    write_out(explain_text(trial, args.protocol, args.device), args.output)
    return EXIT_OK


def register(sub) -> None:
    """Add the language commands to the ``imtrial`` subparsers."""
    p = sub.add_parser("check", help="check study files and report every problem")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument("--werror", action="store_true", help="treat warnings as errors")
    p.add_argument("--format", choices=("text", "json"), default="text", help="diagnostics as text (stderr) or JSON (stdout)")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("compile", help="print the checked IR as JSON")
    p.add_argument("file", metavar="FILE")
    p.add_argument("-o", "--output", metavar="OUT", help="write to OUT instead of stdout")
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("fmt", help="format study files canonically")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument("--check", action="store_true", help="exit 1 if a file is not formatted")
    p.add_argument("--write", action="store_true", help="rewrite files in place")
    p.set_defaults(func=cmd_fmt)

    p = sub.add_parser("graph", help="draw the dependency graph")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--format", choices=("dot", "mermaid", "json", "svg", "png"), default="dot")
    p.add_argument("-o", "--output", metavar="OUT")
    p.set_defaults(func=cmd_graph)

    p = sub.add_parser("schema", help="print the JSON Schema of the IR")
    p.add_argument("-o", "--output", metavar="OUT")
    p.set_defaults(func=cmd_schema)

    targets = ", ".join(EXPORT_TARGETS)
    p = sub.add_parser("export", help=f"export a study (targets: {targets})")
    p.add_argument("target", metavar="TARGET", help=f"one of: {targets}")
    p.add_argument("file", metavar="FILE")
    p.add_argument("-o", "--output", metavar="DIR", required=True)
    p.add_argument("--granularity", choices=("step", "exam"),
                   help="cwl: one tool per pipeline node (step, the default) or one per exam (exam)")
    p.add_argument("--docker-image", metavar="IMAGE", help="cwl: a DockerRequirement hint naming this image")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("explain", help="print the effective protocol for one device (variants merged)")
    p.add_argument("protocol", metavar="PROTOCOL")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--device", required=True, metavar="DEVICE", help="the inventory device id")
    p.add_argument("-o", "--output", metavar="OUT")
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("import", help="import an electronic protocol as .imtrial text")
    p.add_argument("kind", metavar="KIND", help="eprotocol")
    p.add_argument("file", metavar="FILE")
    p.add_argument("-o", "--output", metavar="OUT")
    p.set_defaults(func=cmd_import)
