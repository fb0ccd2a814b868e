"""What every command module shares: exit codes, usage errors, and loading the study a command names."""
from __future__ import annotations

from pathlib import Path

from .render import print_diagnostics

EXIT_OK, EXIT_INPUT, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3
EXIT_ENVIRONMENT = 4  # the machine, not imtrial or its input: a full disk, a read-only path, permissions


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
