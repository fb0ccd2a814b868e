"""The language commands: ``imtrial check | compile | fmt | graph | schema | export | import | explain``."""
from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

from ..diagnostics import CompileErrors, Diagnostic, Severity
from .common import EXIT_INPUT, EXIT_OK, UsageError, add_out, add_study, command, compile_path, load_study
from .render import counts, plural, print_diagnostics, progress_for, write_out

# Modules of imtrial_dsl.exporters that define ``export(trial, graph, out_dir)``; imported only when chosen.
EXPORT_TARGETS = ("cwl", "docs", "eprotocol", "inventory")
EXPORT_TARGETS += ("sdtm",)   # RECIST tumour data as SDTM TU/TR/RS CSV from a workdir (exporters/sdtm.py)
EXPORT_TARGETS += ("usdm",)   # CDISC USDM study design (exporters/usdm.py)


def _exporter(name: str):
    from ..paths import exporters_package

    return importlib.import_module(f"{exporters_package().__name__}.{name}")


def cmd_check(args) -> int:
    worst = EXIT_OK
    all_diags: list[dict] = []
    from ..compiler import study_file_problems

    for path in args.studies:
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
    trial, _ = load_study(args.study)
    write_out(trial.model_dump_json(indent=2) + "\n", args.out)
    return EXIT_OK


def cmd_fmt(args) -> int:
    from ..compiler import unreadable
    from ..fmt import format_source

    if args.check and args.write:
        raise UsageError("--check and --write exclude each other")
    if len(args.studies) > 1 and not (args.check or args.write):
        raise UsageError("formatting several files needs --check or --write")
    rc = EXIT_OK
    for path in args.studies:
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

    _, graph = load_study(args.study)
    if args.format in RENDERERS:
        write_out(RENDERERS[args.format](graph), args.out)
        return EXIT_OK
    data, err = render_image(graph, args.format)
    if err is not None:
        print_diagnostics([err], {})
        return EXIT_INPUT
    if not args.out and sys.stdout.isatty():
        raise UsageError(f"refusing to write {args.format} bytes to a terminal: add -o FILE")
    write_out(data, args.out)
    return EXIT_OK


def cmd_schema(args) -> int:
    from .. import ir

    write_out(json.dumps(ir.Trial.model_json_schema(), indent=2) + "\n", args.out)
    return EXIT_OK


def cmd_export(args) -> int:
    if args.target not in EXPORT_TARGETS:
        raise UsageError(f"unknown export target '{args.target}' (available: {', '.join(EXPORT_TARGETS)})")
    mod = _exporter(args.target)
    res = compile_path(args.study)
    print_diagnostics(res.diagnostics, res.sources)
    if not res.ok:
        return EXIT_INPUT
    options = {k: v for k, v in (("granularity", args.granularity), ("docker_image", args.docker_image)) if v}
    if options and args.target != "cwl":
        raise UsageError("--granularity and --docker-image are options of 'export cwl'")
    if args.target == "docs":
        options["progress"] = progress_for(args)
    options.update(_workdir_options(args))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        written = mod.export(res.trial, res.graph, out, **options)
    except CompileErrors as exc:
        print_diagnostics(exc.diagnostics, res.sources)
        return EXIT_INPUT
    for p in written or []:
        print(p)
    return EXIT_OK


def _workdir_options(args) -> dict:
    """The options of the exports that read a workdir: sdtm (--workdir, --analysis), inventory (--workdir,
    --qualifications)."""
    wanted = {"sdtm": ("workdir", "analysis"), "inventory": ("workdir", "qualifications")}.get(args.target, ())
    given = {k: getattr(args, k) for k in ("workdir", "analysis", "qualifications") if getattr(args, k)}
    wrong = [k for k in given if k not in wanted]
    if wrong:
        raise UsageError(f"--{wrong[0]} is not an option of 'export {args.target}' (--workdir: sdtm, inventory; "
                         "--analysis: sdtm; --qualifications: inventory)")
    return given


def cmd_import(args) -> int:
    from ..compiler import unreadable

    if args.kind != "eprotocol":
        raise UsageError(f"unknown import kind '{args.kind}' (available: eprotocol)")
    misses = [m for m in (unreadable(f) for f in args.files) if m]
    if misses:
        print_diagnostics(misses, {})
        return EXIT_INPUT
    eprotocol = _exporter("eprotocol")
    try:
        text, notes = eprotocol.import_document([Path(f) for f in args.files])
    except CompileErrors as exc:
        print_diagnostics(exc.diagnostics, {})
        return EXIT_INPUT
    except (ValueError, OSError) as exc:
        print_diagnostics([Diagnostic(code="E002", message=f"cannot import: {exc}")], {})
        return EXIT_INPUT
    print_diagnostics(notes, {})
    write_out(text if text.endswith("\n") else text + "\n", args.out)
    return EXIT_OK


def cmd_explain(args) -> int:
    from ..explain import explain_text

    trial, _ = load_study(args.study)
    write_out(explain_text(trial, args.protocol, args.device), args.out)
    return EXIT_OK


def register(sub) -> None:
    """Add the language commands to the ``imtrial`` subparsers."""
    p = command(sub, "check", "check study files and report every problem at once", examples=[
        "imtrial check examples/amyloid_mri.imtrial",
        "imtrial check --werror --format json studies/*.imtrial > diagnostics.json"],
        details="Parses, lowers, resolves imports and runs every semantic check. Diagnostics go to stderr as "
                "'file:line:col: error[E301]: message' with the source line, a caret and a hint ('imtrial "
                "explain-code E301' explains a code); stdout gets one summary line per file. Exit 1 when "
                "any file has an error.")
    add_study(p, several=True)
    p.add_argument("--werror", action="store_true", help="treat warnings as errors")
    p.add_argument("--format", choices=("text", "json"), default="text",
                   help="diagnostics as text (stderr) or as a JSON list (stdout), for editors and CI (default text)")
    p.set_defaults(func=cmd_check)

    p = command(sub, "compile", "print the checked IR of a study as JSON", examples=[
        "imtrial compile examples/amyloid_mri.imtrial -o amy01.ir.json"],
        details="Imports merged, values normalized (canonical units, days). Nothing is written when the "
                "study has errors. Commands that take a study also take this JSON.")
    add_study(p)
    add_out(p, "write the JSON to OUT instead of stdout", old_spelling=True)
    p.set_defaults(func=cmd_compile)

    p = command(sub, "fmt", "format study files canonically (comments kept)", examples=[
        "imtrial fmt examples/amyloid_mri.imtrial",
        "imtrial fmt --check studies/*.imtrial", "imtrial fmt --write studies/*.imtrial"],
        details="Prints the canonical layout of one file; with --check or --write several files. A file with "
                "syntax errors is reported and left alone.")
    add_study(p, several=True)
    p.add_argument("--check", action="store_true", help="change nothing; exit 1 and list the files that would change")
    p.add_argument("--write", action="store_true", help="rewrite the files in place")
    p.set_defaults(func=cmd_fmt)

    p = command(sub, "graph", "draw the study's dependency graph (pipeline and study tasks)", examples=[
        "imtrial graph examples/amyloid_mri.imtrial --format svg -o graph.svg",
        "imtrial graph examples/amyloid_mri.imtrial --format mermaid"],
        details="The per-exam pipeline and the study-level tasks (qualification, visits) are drawn as "
                "separate clusters, without the edges other paths already imply. svg and png need "
                "graphviz' dot.")
    add_study(p)
    p.add_argument("--format", choices=("dot", "mermaid", "json", "svg", "png"), default="dot",
                   help="output format (default dot); svg and png are never written to a terminal")
    add_out(p, "write to OUT instead of stdout", old_spelling=True)
    p.set_defaults(func=cmd_graph)

    p = command(sub, "schema", "print the JSON Schema of the IR", examples=[
        "imtrial schema -o imtrial-ir.schema.json"],
        details="For tools that read 'imtrial compile' output.")
    add_out(p, "write to OUT instead of stdout", old_spelling=True)
    p.set_defaults(func=cmd_schema)

    targets = ", ".join(EXPORT_TARGETS)
    p = command(sub, "export", f"export a study ({targets})", examples=[
        "imtrial export docs examples/amyloid_mri.imtrial -o out/docs",
        "imtrial export cwl examples/amyloid_mri.imtrial -o out/cwl --granularity exam",
        "imtrial export sdtm examples/oncology_ct.imtrial -o out/sdtm --workdir work",
        "imtrial export inventory examples/amyloid_mri.imtrial -o out/inventory --workdir work"],
        details="Checks the study, then writes the target's files into OUT and prints their paths. 'cwl' "
                "needs the cwl extra to validate (pip install 'imtrial[cwl]'); the PDF of 'docs' needs "
                "the docs extra (pip install 'imtrial[docs]').")
    p.add_argument("target", metavar="TARGET", help=f"one of: {targets}")
    add_study(p)
    add_out(p, "the folder to write into (created if missing)", metavar="DIR", required=True, old_spelling=True)
    p.add_argument("--granularity", choices=("step", "exam"),
                   help="cwl: one tool per pipeline node (step, the default) or one per exam (exam)")
    p.add_argument("--docker-image", metavar="IMAGE", help="cwl: a DockerRequirement hint naming this image")
    p.add_argument("--workdir", metavar="DIR", help="sdtm: the workdir of 'imtrial run' to read; inventory: read the "
                                                  "qualification decisions recorded there")
    p.add_argument("--analysis", metavar="NAME", help="sdtm: the RECIST analysis (default: the one measuring sum_diameters)")
    p.add_argument("--qualifications", metavar="CSV", help="inventory: device qualification status from a CSV "
                                                           "(site, device, status)")
    p.add_argument("--no-progress", action="store_true", help="no progress display (it is off anyway when stderr "
                                                                  "is not a terminal)")
    p.set_defaults(func=cmd_export)

    p = command(sub, "explain", "print the effective protocol for one device (variants merged)", examples=[
        "imtrial explain T1w examples/amyloid_mri.imtrial --device BOS_MR1"],
        details="Each constraint of the protocol as it applies on that device, with the layer it comes from: "
                "the base, then vendor, model, software, site and device variants in that order, each building "
                "on the ones before.")
    p.add_argument("protocol", metavar="PROTOCOL", help="the protocol's name")
    add_study(p)
    p.add_argument("--device", required=True, metavar="DEVICE", help="the inventory device id")
    add_out(p, "write to OUT instead of stdout", old_spelling=True)
    p.set_defaults(func=cmd_explain)

    p = command(sub, "import", "import electronic protocols (DPP .dcm or JSON) as .imtrial text", examples=[
        "imtrial import eprotocol out/eprotocol/AMY01_T1w_GE.json -o t1w.imtrial",
        "imtrial import eprotocol out/eprotocol/AMY01_T1w*.json -o t1w.imtrial"],
        details="Reads DICOM Defined Procedure Protocol objects or JSON e-protocols (as 'imtrial export eprotocol' "
                "writes them) and prints them as a study: a study block, the sites and devices the files list, and the "
                "protocols; the files of one protocol (base and variants) merge into one protocol. The standard DICOM attributes win over imtrial's private copies.")
    p.add_argument("kind", metavar="KIND", help="what to import: eprotocol")
    p.add_argument("files", nargs="+", metavar="FILE",
                   help="one or more files; the files of one protocol (base and variants) merge into one protocol")
    add_out(p, "write the .imtrial text to OUT instead of stdout", old_spelling=True)
    p.set_defaults(func=cmd_import)
