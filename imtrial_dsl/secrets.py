"""The one reader of keys and tokens named by a study (``key env NAME`` / ``key file "path"``).

Used for the pseudonymization key (``deidentify``), the lookup key (``identifiers``), transfer tokens and
the run preflight, so that all of them find the same secret with the same rules:

- ``env NAME``: the variable's value; unset and empty are errors.
- ``file "path"``: the file's bytes; ``~`` expands, and a relative path resolves against the folder of
  the study file (never the current directory, which differs between ``imtrial run``, a CWL step and a
  cron job). One trailing newline (``\\n`` or ``\\r\\n``, what editors and ``echo`` add) is dropped;
  nothing else is trimmed. A missing, unreadable or empty file is an error.

Errors name the variable or file, never the value.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from . import ir
from .diagnostics import ImtrialError


class SecretError(ImtrialError):
    """A key or token the study names is unset, unreadable or empty."""

    code = "E702"


def secret_path(ref: str, study_file: Optional[str]) -> Path:
    """Where ``key file ref`` points: ``~`` expanded, relative to the study file's folder."""
    p = Path(ref).expanduser()
    if p.is_absolute() or not study_file or study_file.startswith("<"):   # "<string>": text without a file
        return p
    return Path(study_file).resolve().parent / p


def read_secret(source: ir.KeySource, *, study_file: Optional[str], what: Optional[str] = None) -> bytes:
    """The secret's bytes. ``what`` (e.g. "de-identification key") prefixes error messages."""
    lead = f"{what}: " if what else ""
    if source.kind == "env":
        val = os.environ.get(source.ref)
        if val is None:
            raise SecretError(source, f"{lead}environment variable {source.ref} is not set",
                              f"export {source.ref}=<secret> before running (never write it into the study file)")
        data = _drop_newline(val.encode("utf-8"))
        if not data.strip():
            raise SecretError(source, f"{lead}environment variable {source.ref} is empty")
        return data
    path = secret_path(source.ref, study_file)
    try:
        data = _drop_newline(path.read_bytes())
    except OSError as exc:
        why = exc.strerror or type(exc).__name__
        raise SecretError(source, f"{lead}cannot read file '{source.ref}' ({path}): {why}",
                          "create the file (readable only by the site), or name an environment variable "
                          "instead (`env NAME`)") from None
    if not data.strip():
        raise SecretError(source, f"{lead}file '{source.ref}' ({path}) is empty")
    return data


def _drop_newline(data: bytes) -> bytes:
    if data.endswith(b"\r\n"):
        return data[:-2]
    return data[:-1] if data.endswith(b"\n") else data
