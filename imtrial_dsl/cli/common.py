"""What every command module shares: exit codes, usage errors, loading the study a command names, and
registering a command with a complete help text."""
from __future__ import annotations

import argparse
import functools
import textwrap
from pathlib import Path
from typing import Sequence

from .render import print_diagnostics

EXIT_OK, EXIT_INPUT, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3


class UsageError(Exception):
    """A command-line mistake the user can fix (exit code 2)."""


def compile_path(path: str):
    """:func:`~imtrial_dsl.compiler.compile_file`, with E001 for a path that is not a readable file."""
    from ..compiler import CompileResult, compile_file, unreadable  # imported when used: keeps --help fast

    miss = unreadable(path)
    if miss:
        return CompileResult(trial=None, diagnostics=[miss])
    return compile_file(path)


def load_study(path: str | Path):
    """Compile ``path``, print its diagnostics (warnings too) and return ``(trial, graph)``;
    exit 1 (``SystemExit``) when it has errors."""
    res = compile_path(str(path))
    print_diagnostics(res.diagnostics, res.sources)
    if not res.ok:
        raise SystemExit(EXIT_INPUT)
    return res.trial, res.graph


def load_trial(path: str | Path):
    """The Trial of a ``.imtrial`` file (:func:`load_study`) or of IR JSON (``*.json``; a bad file raises
    :class:`~imtrial_dsl.diagnostics.CompileErrors`, which :func:`imtrial_dsl.cli.main` renders)."""
    if Path(path).suffix == ".json":
        from ..compiler import load_trial as load_ir

        return load_ir(path)
    return load_study(path)[0]


# --------------------------------------------------------------------------- registering a command
#
# Every subcommand is registered through :func:`command`, so that every ``--help`` has the same parts:
# a one-line purpose, what it does, the environment variables it reads, and examples. The shared
# arguments (``STUDY``, ``-o/--out``, ``--workdir``, ``--json``) are added by the helpers below, so they
# are spelled and explained the same way everywhere. ``scripts/gen_cli_docs.py`` renders the help of
# every registered command into docs/cli.md; ``tests/test_cli_help.py`` checks the parts are there.

HELP_WIDTH = 100  # help text is wrapped at this width in docs/cli.md (a terminal uses its own width)

KEY_ENV = ("IMTRIAL_KEY", "the pseudonymization key, read from the variable (or file) the study's "
           "`deidentify { key env NAME }` and `identifiers { key env NAME }` name; the examples name IMTRIAL_KEY. "
           "Never written anywhere.")


def command(sub, name: str, purpose: str, *, examples: Sequence[str], details: str = "",
            env: Sequence[tuple[str, str]] = (), aliases: Sequence[str] = ()) -> argparse.ArgumentParser:
    """Add subcommand ``name`` to ``sub`` with a complete help text; returns its parser.

    ``purpose`` is one line (shown in ``imtrial --help``), ``details`` a paragraph or more (blank lines
    separate paragraphs), ``env`` the environment variables it reads as ``(NAME, meaning)``, and
    ``examples`` command lines (each starting with ``imtrial NAME``), optionally followed by ``  # comment``.
    """
    if not purpose or "\n" in purpose:
        raise ValueError(f"{name}: the purpose is one line")
    if not examples or not all(e.startswith(f"imtrial {name}") for e in examples):
        raise ValueError(f"{name}: examples must start with 'imtrial {name}'")
    desc = [_fill(purpose[0].upper() + purpose[1:].rstrip(".") + ".")]
    desc += [_fill(par) for par in details.strip().split("\n\n") if par.strip()]
    epilog = []
    if env:
        epilog.append("environment:")
        for var, what in env:
            epilog += [f"  {var}", _fill(what, indent="      ")]
        epilog.append("")
    epilog.append("examples:")
    epilog += [f"  {e}" for e in examples]
    p = sub.add_parser(name, help=purpose, description="\n\n".join(desc), epilog="\n".join(epilog),
                       formatter_class=argparse.RawDescriptionHelpFormatter, aliases=list(aliases))
    p.imtrial_purpose, p.imtrial_examples, p.imtrial_env = purpose, list(examples), [v for v, _ in env]
    return p


def _fill(text: str, indent: str = "", subsequent: str = "") -> str:
    return textwrap.fill(" ".join(text.split()), width=HELP_WIDTH, initial_indent=indent,
                         subsequent_indent=subsequent or indent, break_on_hyphens=False)


def add_study(p: argparse.ArgumentParser, *, several: bool = False, ir_json: bool = False) -> None:
    """The positional ``STUDY`` (``STUDY ...`` with ``several``)."""
    what = "a .imtrial study file" + (" (or IR JSON written by 'imtrial compile')" if ir_json else "")
    if several:
        p.add_argument("studies", nargs="+", metavar="STUDY", help=what + "; several may be given")
    else:
        p.add_argument("study", metavar="STUDY", help=what)


def add_out(p: argparse.ArgumentParser, what: str, *, metavar: str = "OUT", required: bool = False,
            old_spelling: bool = False) -> None:
    """``-o/--out`` (``--output`` too where earlier releases spelled it so)."""
    flags = ["-o", "--out"] + (["--output"] if old_spelling else [])
    p.add_argument(*flags, dest="out", metavar=metavar, required=required, help=what)


def add_workdir(p: argparse.ArgumentParser, what: str = "the run's workdir (state.sqlite, archive/, …)",
                required: bool = True) -> None:
    p.add_argument("--workdir", required=required, metavar="DIR", help=what)


def add_json(p: argparse.ArgumentParser, what: str = "print the result as JSON instead of text") -> None:
    p.add_argument("--json", action="store_true", help=what)


def help_text(parser: argparse.ArgumentParser, width: int = HELP_WIDTH) -> str:
    """``parser``'s ``--help`` at a fixed width (for docs/cli.md, independent of the terminal)."""
    saved = parser.formatter_class
    parser.formatter_class = functools.partial(saved, width=width)
    try:
        return parser.format_help()
    finally:
        parser.formatter_class = saved
