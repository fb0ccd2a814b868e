"""The ``imtrial`` command line. Only this module prints diagnostics or exits.

Exit codes: 0 ok, 1 errors in the input, 2 usage errors, 3 internal error (a bug: please report).
Diagnostics go to stderr (coloured on a terminal unless NO_COLOR is set); data goes to stdout or ``-o``.
"""
from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import json
import os
import pkgutil
import sys
from pathlib import Path
from typing import Optional, Sequence

from . import __version__
from .diagnostics import CompileErrors, Diagnostic, Severity, render

EXIT_OK, EXIT_INPUT, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3
EXTENSION_MODULES = ("imtrial_dsl.runner.commands", "imtrial_dsl.runner.transfer", "imtrial_dsl.ops.commands")

_color_mode = "auto"


class UsageError(Exception):
    """A command-line mistake the user can fix (exit code 2)."""


# --------------------------------------------------------------------------- output helpers

def use_color(stream=None) -> bool:
    """Colour for ``stream``: --color always/never, else a TTY without NO_COLOR."""
    stream = stream or sys.stderr
    if _color_mode == "always":
        return True
    if _color_mode == "never" or os.environ.get("NO_COLOR"):
        return False
    return bool(getattr(stream, "isatty", lambda: False)())


def print_diagnostics(diags: Sequence[Diagnostic], sources: dict[str, str], stream=None) -> None:
    stream = stream or sys.stderr
    if diags:
        stream.write(render(diags, sources, color=use_color(stream)) + "\n")


def _counts(diags: Sequence[Diagnostic]) -> tuple[int, int]:
    e = sum(d.severity == Severity.ERROR for d in diags)
    w = sum(d.severity == Severity.WARNING for d in diags)
    return e, w


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _missing(path: str) -> Optional[Diagnostic]:
    p = Path(path)
    if p.is_file():
        return None
    why = "no such file" if not p.exists() else "not a file"
    return Diagnostic(code="E001", message=f"cannot read '{path}': {why}", hint=None)


def _compile(path: str):
    from .compiler import CompileResult, compile_file

    miss = _missing(path)
    if miss:
        return CompileResult(trial=None, diagnostics=[miss])
    return compile_file(path)


def load_study(path: str | Path):
    """For subcommands of other modules: compile ``path``, print its diagnostics (warnings too),
    and return ``(trial, graph)``; raise ``SystemExit(1)`` when it has errors."""
    res = _compile(str(path))
    print_diagnostics(res.diagnostics, res.sources)
    if not res.ok:
        raise SystemExit(EXIT_INPUT)
    return res.trial, res.graph


def _write_out(data: str | bytes, out: Optional[str]) -> None:
    if out and out != "-":
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        if isinstance(data, bytes):
            Path(out).write_bytes(data)
        else:
            Path(out).write_text(data, encoding="utf-8")
        return
    if isinstance(data, bytes):
        sys.stdout.flush()
        sys.stdout.buffer.write(data)
    else:
        sys.stdout.write(data)


# --------------------------------------------------------------------------- exporters

def exporters_package():
    """The ``imtrial_dsl.exporters`` package; in a source checkout (not installed) it maps the top-level
    ``exporters/`` folder onto that name, as the wheel's package-dir mapping does."""
    name = "imtrial_dsl.exporters"
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name != name:
            raise
    src = Path(__file__).resolve().parent.parent / "exporters"
    spec = importlib.util.spec_from_file_location(name, src / "__init__.py", submodule_search_locations=[str(src)])
    if spec is None or spec.loader is None or not (src / "__init__.py").exists():
        raise ModuleNotFoundError(name)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    import imtrial_dsl

    imtrial_dsl.exporters = mod  # type: ignore[attr-defined]
    return mod


def _defines(path: Optional[str], func: str) -> bool:
    """Does the module file define a top-level function ``func``? (read, not imported: fast and side-effect free)"""
    if not path or not path.endswith(".py"):
        return False
    try:
        tree = ast.parse(Path(path).read_text(encoding="utf-8"))
    except (OSError, SyntaxError, ValueError):
        return False
    return any(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == func for n in tree.body)


def export_targets() -> list[str]:
    """Modules of the exporters package that define ``export(trial, graph, out_dir)``."""
    try:
        pkg = exporters_package()
    except ImportError:
        return []
    found = []
    for info in pkgutil.iter_modules(pkg.__path__):
        spec = importlib.util.find_spec(f"{pkg.__name__}.{info.name}")
        if spec is not None and _defines(spec.origin, "export"):
            found.append(info.name)
    return sorted(found)


# --------------------------------------------------------------------------- commands

def cmd_check(args) -> int:
    worst = EXIT_OK
    all_diags: list[dict] = []
    for path in args.files:
        res = _compile(path)
        diags = res.diagnostics
        if args.werror:
            diags = [d.model_copy(update={"severity": Severity.ERROR}) if d.severity == Severity.WARNING else d for d in diags]
        e, w = _counts(diags)
        if args.format == "json":
            all_diags.extend(d.model_dump(mode="json") | {"file_checked": path} for d in diags)
        else:
            print_diagnostics(diags, res.sources)
            summary = "ok" if not e and not w else ", ".join(x for x in (_plural(e, "error") if e else "",
                                                                          _plural(w, "warning") if w else "") if x)
            print(f"{path}: {summary}")
        if e:
            worst = EXIT_INPUT
    if args.format == "json":
        print(json.dumps(all_diags, indent=2))
    return worst


def cmd_compile(args) -> int:
    res = _compile(args.file)
    print_diagnostics(res.diagnostics, res.sources)
    if not res.ok:
        return EXIT_INPUT
    _write_out(res.trial.model_dump_json(indent=2) + "\n", args.output)
    return EXIT_OK


def cmd_fmt(args) -> int:
    from .fmt import format_source

    if args.check and args.write:
        raise UsageError("--check and --write exclude each other")
    if len(args.files) > 1 and not (args.check or args.write):
        raise UsageError("formatting several files needs --check or --write")
    rc = EXIT_OK
    for path in args.files:
        miss = _missing(path)
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
    from .graph import RENDERERS, render_image

    res = _compile(args.file)
    print_diagnostics(res.diagnostics, res.sources)
    if not res.ok:
        return EXIT_INPUT
    if args.format in RENDERERS:
        _write_out(RENDERERS[args.format](res.graph), args.output)
        return EXIT_OK
    data, err = render_image(res.graph, args.format)
    if err is not None:
        print_diagnostics([err], {})
        return EXIT_INPUT
    if not args.output and sys.stdout.isatty():
        raise UsageError(f"refusing to write {args.format} bytes to a terminal: add -o FILE")
    _write_out(data, args.output)
    return EXIT_OK


def cmd_schema(args) -> int:
    from . import ir

    _write_out(json.dumps(ir.Trial.model_json_schema(), indent=2) + "\n", args.output)
    return EXIT_OK


def cmd_export(args) -> int:
    targets = export_targets()
    if args.target not in targets:
        raise UsageError(f"unknown export target '{args.target}' (available: {', '.join(targets) or 'none'})")
    mod = importlib.import_module(f"{exporters_package().__name__}.{args.target}")
    res = _compile(args.file)
    print_diagnostics(res.diagnostics, res.sources)
    if not res.ok:
        return EXIT_INPUT
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    options = {k: v for k, v in (("granularity", args.granularity), ("docker_image", args.docker_image)) if v}
    if options and args.target != "cwl":
        raise UsageError("--granularity and --docker-image are options of 'export cwl'")
    try:
        written = mod.export(res.trial, res.graph, out, **options)
    except CompileErrors as exc:
        print_diagnostics(exc.diagnostics, res.sources)
        return EXIT_INPUT
    for p in written or []:
        print(p)
    return EXIT_OK


def cmd_import(args) -> int:
    if args.kind != "eprotocol":
        raise UsageError(f"unknown import kind '{args.kind}' (available: eprotocol)")
    miss = _missing(args.file)
    if miss:
        print_diagnostics([miss], {})
        return EXIT_INPUT
    mod = importlib.import_module(f"{exporters_package().__name__}.eprotocol")
    try:
        protocol = mod.import_file(Path(args.file))
    except CompileErrors as exc:
        print_diagnostics(exc.diagnostics, {})
        return EXIT_INPUT
    except (ValueError, OSError) as exc:
        print_diagnostics([Diagnostic(code="E002", message=f"cannot import '{args.file}': {exc}")], {})
        return EXIT_INPUT
    if hasattr(mod, "protocol_to_source"):
        text = mod.protocol_to_source(protocol)
        _write_out(text if text.endswith("\n") else text + "\n", args.output)
    else:
        _write_out(protocol.model_dump_json(indent=2) + "\n", args.output)
    return EXIT_OK


# --------------------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="imtrial", description="Check, compile, run and export imaging clinical trial descriptions.")
    ap.add_argument("--version", action="version", version=f"imtrial {__version__}")
    ap.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                    help="colour diagnostics (default: on a terminal, unless NO_COLOR is set)")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")

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

    targets = ", ".join(export_targets()) or "none"
    p = sub.add_parser("export", help=f"export a study (targets: {targets})")
    p.add_argument("target", metavar="TARGET", help=f"one of: {targets}")
    p.add_argument("file", metavar="FILE")
    p.add_argument("-o", "--output", metavar="DIR", required=True)
    p.add_argument("--granularity", choices=("step", "exam"),
                   help="cwl: one tool per pipeline node (step, the default) or one per exam (exam)")
    p.add_argument("--docker-image", metavar="IMAGE", help="cwl: a DockerRequirement hint naming this image")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("import", help="import an electronic protocol as .imtrial text")
    p.add_argument("kind", metavar="KIND", help="eprotocol")
    p.add_argument("file", metavar="FILE")
    p.add_argument("-o", "--output", metavar="OUT")
    p.set_defaults(func=cmd_import)

    for modname in EXTENSION_MODULES:
        try:
            mod = importlib.import_module(modname)
        except ModuleNotFoundError as exc:
            if exc.name is not None and modname.startswith(exc.name):
                continue  # that part of the tool is not installed
            print(f"imtrial: warning: {modname} is unavailable: {exc}", file=sys.stderr)
            continue
        except Exception as exc:  # a broken extension must not take the core commands down
            print(f"imtrial: warning: {modname} is unavailable: {type(exc).__name__}: {exc}", file=sys.stderr)
            continue
        register = getattr(mod, "register", None)
        if register is not None:
            register(sub)
    return ap


def main(argv: Optional[Sequence[str]] = None) -> int:
    global _color_mode
    ap = build_parser()
    try:
        args = ap.parse_args(argv)
    except SystemExit as exc:  # argparse: --help/--version exit 0, usage errors 2
        return int(exc.code or 0) if isinstance(exc.code, int) else EXIT_USAGE
    _color_mode = args.color
    if not getattr(args, "func", None):
        ap.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return int(args.func(args) or 0)
    except UsageError as exc:
        print(f"imtrial: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as exc:
        return int(exc.code) if isinstance(exc.code, int) else EXIT_INPUT
    except CompileErrors as exc:
        print_diagnostics(exc.diagnostics, {})
        return EXIT_INPUT
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return EXIT_OK
    except Exception as exc:  # a bug, not bad input: say so without a traceback unless asked
        if os.environ.get("IMTRIAL_DEBUG"):
            raise
        print(f"imtrial: internal error: {type(exc).__name__}: {exc} (set IMTRIAL_DEBUG=1 for a traceback)", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
