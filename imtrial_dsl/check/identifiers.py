"""Subject identifiers: the ID format's fields (E309, E410), the check digit (W406); and the key sources
that identifiers, de-identification and transfers read (E316)."""
from __future__ import annotations

import re
import string
from typing import Optional

from .. import ir
from ..diagnostics import did_you_mean
from .context import Context
from .names import keyword

SUBJECT_FIELDS = {"site", "seq", "check", "study"}
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def key(ctx: Context, key: Optional[ir.KeySource], what: str) -> None:
    """E316: an environment variable name or key file path that cannot be read."""
    if key is None:
        return
    if key.kind == "env" and not key.ref.strip():
        ctx.error("E316", key, f"{what}: environment variable name is empty", "write e.g. key env IMTRIAL_KEY")
    elif key.kind == "env" and not _ENV_NAME.match(key.ref):
        ctx.error("E316", key, f"{what}: '{key.ref}' is not a valid environment variable name",
                  "use letters, digits and underscores, not starting with a digit")
    elif key.kind == "file" and not key.ref.strip():
        ctx.error("E316", key, f"{what}: key file path is empty", "write e.g. key file \"/etc/imtrial/key\"")


def check(ctx: Context) -> None:
    idf = ctx.trial.identifiers
    if idf is None:
        return
    key(ctx, idf.key, "identifier key")
    for kw in idf.source:
        keyword(ctx, idf, kw, "identifier source")
    if idf.issuer:
        keyword(ctx, idf, idf.issuer, "identifier issuer")
    try:
        fields = [(f, spec) for _, f, spec, _ in string.Formatter().parse(idf.subject_format) if f is not None]
    except ValueError as exc:
        ctx.error("E309", idf, f"invalid subject ID format \"{idf.subject_format}\": {exc}", "fields look like {seq:04}")
        return
    names = {f for f, _ in fields}
    for f in sorted(names - SUBJECT_FIELDS):
        ctx.error("E309", idf, f"unknown field '{{{f}}}' in subject ID format",
                  did_you_mean(f, SUBJECT_FIELDS) or f"fields: {', '.join(sorted(SUBJECT_FIELDS))}")
    if names <= SUBJECT_FIELDS:
        try:
            idf.subject_format.format(site="BOS", seq=1, check="0", study="S")
        except (ValueError, IndexError, KeyError) as exc:
            ctx.error("E309", idf, f"invalid subject ID format \"{idf.subject_format}\": {exc}", "e.g. {seq:04}")
    if "seq" not in names:
        ctx.error("E410", idf, "subject ID format has no {seq} field: every subject would get the same ID",
                  "add a sequence number, e.g. \"{site}-{seq:04}\"")
    if "check" in names and not idf.check_digit:
        ctx.error("E410", idf, "subject ID format uses {check} but no check_digit algorithm is chosen",
                  "add e.g. check_digit mod97")
    elif idf.check_digit and "check" not in names:
        ctx.warning("W406", idf, f"check_digit {idf.check_digit} is chosen but the subject ID format has no {{check}}",
                    "append {check} to the format")
