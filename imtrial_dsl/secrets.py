"""The one reader of keys and tokens named by a study (``key env NAME`` / ``key file "path"``).

Used for the pseudonymization key (``deidentify``), the lookup key (``identifiers``), transfer tokens and
the run preflight, so that all of them find the same secret with the same rules:

- ``env NAME``: the variable's value; unset and empty are errors.
- ``file "path"``: the file's bytes; ``~`` expands, and a relative path resolves against the folder of
  the study file (never the current directory, which differs between ``imtrial run``, a CWL step and a
  cron job). One trailing newline (``\\n`` or ``\\r\\n``, what editors and ``echo`` add) is dropped;
  nothing else is trimmed. A missing, unreadable or empty file is an error.

Errors name the variable or file, never the value.

Keys (the pseudonymization and lookup keys, not transfer tokens) are read with :func:`read_key`, which also
refuses keys with less than 128 bits of material; :func:`key_fingerprint` is the keyed fingerprint a workdir
records at first use so that a run with another key is refused (``imtrial_dsl.store.check_key_fingerprint``);
:func:`generate_key` is what ``imtrial keygen`` prints.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import secrets as _random
from pathlib import Path
from typing import Optional

from . import ir
from .diagnostics import ImtrialError


class SecretError(ImtrialError):
    """A key or token the study names is unset, unreadable or empty."""

    code = "E702"


class WeakKeyError(SecretError):
    """A key with less than 128 bits of material."""

    code = "E703"


class KeyMismatchError(SecretError):
    """The key differs from the one the workdir (its registry) was first used with."""

    code = "E704"


MIN_KEY_BITS = 128
KEYGEN_BYTES = 32
_HEX = re.compile(rb"[0-9A-Fa-f]+")
_BASE64 = re.compile(rb"[A-Za-z0-9+/_-]+={0,2}")


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


def key_bits(key: bytes) -> int:
    """How many bits of material a key can hold at most: 4 per character of a hex string, 6 per character
    of a base64 string (what ``imtrial keygen`` and ``openssl rand -base64`` write), else 8 per byte."""
    if _HEX.fullmatch(key):
        return 4 * len(key)
    if _BASE64.fullmatch(key):
        return 6 * len(key.rstrip(b"="))
    return 8 * len(key)


def read_key(source: ir.KeySource, *, study_file: Optional[str], what: str) -> bytes:
    """A key's bytes (:func:`read_secret`), refused (:class:`WeakKeyError`, E703) when it holds fewer than 128
    bits of material (fewer than 16 bytes, 22 base64 or 32 hex characters) or repeats a few characters."""
    key = read_secret(source, study_file=study_file, what=what)
    where = f"environment variable {source.ref}" if source.kind == "env" else f"file '{source.ref}'"
    if key_bits(key) < MIN_KEY_BITS or len(set(key)) < 8:
        raise WeakKeyError(source, f"{what}: the key in {where} is too weak (less than {MIN_KEY_BITS} bits of "
                                   f"material: at least 16 random bytes, 22 base64 or 32 hex characters)",
                           "generate one with `imtrial keygen` and keep it where the study says")
    return key


def key_fingerprint(key: bytes, purpose: str, scope: str) -> str:
    """A keyed fingerprint of ``key`` for ``purpose`` ("deidentify", "identifiers") in ``scope`` (the trial
    code): HMAC-SHA256 under the key itself, so it tells two keys apart without revealing either."""
    msg = b"imtrial key fingerprint\x00" + purpose.encode() + b"\x00" + scope.encode("utf-8")
    return hmac.new(key, msg, hashlib.sha256).hexdigest()[:32]


def generate_key(nbytes: int = KEYGEN_BYTES) -> str:
    """A new random key: ``nbytes`` from the operating system's CSPRNG, URL-safe base64 without padding."""
    return base64.urlsafe_b64encode(_random.token_bytes(nbytes)).decode("ascii").rstrip("=")


# What a program imtrial starts (an analysis, graphviz) gets from imtrial's environment: nothing else, so that no
# key or token (IMTRIAL_KEY, CENTRAL_TOKEN, a cloud credential …) reaches a process that does not need it.
SUBPROCESS_ENV_ALLOW = ("PATH", "HOME", "TMPDIR", "TMP", "TEMP", "LANG", "LANGUAGE", "TZ", "SYSTEMROOT")


def subprocess_env(names: tuple[str, ...] | list[str] = (), **values: str) -> dict[str, str]:
    """A minimal environment for a child process: the allow-list (PATH, HOME, TMPDIR, locale), the variables
    ``names`` (what the study lets a program see), then ``values``."""
    env = {k: v for k, v in os.environ.items() if k in SUBPROCESS_ENV_ALLOW or k.startswith("LC_")}
    env.update({k: os.environ[k] for k in names if k in os.environ})
    env.update(values)
    return env


def secret_variables(trial: ir.Trial) -> set[str]:
    """The environment variables the study reads keys and tokens from (``key env NAME``, ``auth env NAME``)."""
    sources = [trial.deidentify.key if trial.deidentify else None, trial.identifiers.key if trial.identifiers else None]
    sources += [d.auth for d in trial.transfers]
    return {s.ref for s in sources if s is not None and s.kind == "env"}


def _drop_newline(data: bytes) -> bytes:
    if data.endswith(b"\r\n"):
        return data[:-2]
    return data[:-1] if data.endswith(b"\n") else data
