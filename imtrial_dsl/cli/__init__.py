"""The ``imtrial`` command line: the only code that parses arguments, prints or exits.

Exit codes: 0 ok, 1 errors in the input, 2 usage errors, 3 internal error (a bug: please report),
130 interrupted (Ctrl-C). Diagnostics go to stderr (coloured on a terminal unless NO_COLOR is set);
data goes to stdout or ``-o``. Every error the library raises on purpose is an
:class:`~imtrial_dsl.diagnostics.ImtrialError`, rendered here as a diagnostic (exit 1).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from .. import __version__
from ..diagnostics import CompileErrors, ImtrialError
from . import desk, language, ops, pipeline, relay, render, scanner, transfer
from .common import EXIT_INPUT, EXIT_INTERNAL, EXIT_OK, EXIT_USAGE, UsageError

EXIT_INTERRUPTED = 130  # the shell's convention for a process ended by SIGINT


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="imtrial", description="Check, compile, run and export imaging clinical trial descriptions.",
                                 epilog="'imtrial COMMAND --help' explains a command, with examples; "
                                        "'imtrial explain-code E301' explains a diagnostic code.")
    ap.add_argument("--version", action="version", version=f"imtrial {__version__}")
    ap.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                    help="colour diagnostics (default: on a terminal, unless NO_COLOR is set)")
    ap.set_defaults(func=None)
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    language.register(sub)
    pipeline.register(sub)
    transfer.register(sub)
    relay.register(sub)
    scanner.register(sub)
    ops.register(sub)
    desk.register(sub)
    return ap


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = build_parser()
    if "_ARGCOMPLETE" in os.environ:  # the shell asks for completions (imtrial completion SHELL); exits
        import argcomplete

        argcomplete.autocomplete(ap)
    try:
        args = ap.parse_args(argv)
    except SystemExit as exc:  # argparse: --help/--version exit 0, usage errors 2
        return int(exc.code or 0) if isinstance(exc.code, int) else EXIT_USAGE
    render.set_color(args.color)
    if args.func is None:
        ap.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return int(args.func(args) or 0)
    except UsageError as exc:
        print(f"imtrial: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as exc:  # a command's helper stopping after it printed why (e.g. a study with errors)
        return int(exc.code) if isinstance(exc.code, int) else EXIT_INPUT
    except CompileErrors as exc:
        render.print_diagnostics(exc.diagnostics, {})
        return EXIT_INPUT
    except ImtrialError as exc:
        render.print_diagnostics([exc.diagnostic], {})
        return EXIT_INPUT
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return EXIT_OK
    except Exception as exc:  # a bug, not bad input: say so without a traceback unless asked
        if os.environ.get("IMTRIAL_DEBUG"):
            raise
        print(f"imtrial: internal error: {type(exc).__name__}: {exc} (set IMTRIAL_DEBUG=1 for a traceback)", file=sys.stderr)
        return EXIT_INTERNAL
