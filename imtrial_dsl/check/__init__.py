"""Semantic checks on a lowered trial: every problem at once, each with a span, a message and a hint.

Codes: E3xx names (undefined, duplicate, unknown), E4xx semantics, W4xx warnings.
Every code is documented in ``docs/diagnostics.md``. The checker never raises
for a well-typed IR; it only reads the IR, never the syntax tree. One module per
concern; :func:`check` runs them all.
"""
from __future__ import annotations

from .. import ir
from typing import Optional

from ..diagnostics import SHOWN_PER_CODE, Diagnostic, cap
from . import analyses, deid, devices, identifiers, matching, names, privacy, protocols, qc, schedule, transfers
from .context import Context
from . import reads

# Each pass reads the trial and records what it finds; the order only breaks ties between equal sort keys.
_PASSES = (
    names.duplicates, names.endpoints, protocols.check, matching.check, schedule.check, deid.check,
    identifiers.check, qc.check, analyses.check, transfers.check, names.report_roles, names.qualification_protocols,
    devices.check,
    privacy.check,
)
_PASSES += (reads.check,)


def check(trial: ir.Trial, shown_per_code: Optional[int] = SHOWN_PER_CODE) -> list[Diagnostic]:
    """Every semantic problem of ``trial``, sorted by position; past ``shown_per_code`` of one code, a
    summary stands for the rest (``diagnostics.cap``). ``None``: every one (E405/W405 still counted past
    the cap, since they can be millions)."""
    ctx = Context(trial)
    for run in _PASSES:
        run(ctx)
    if shown_per_code is None:
        return cap(ctx.diags, ctx.omitted, per_code=len(ctx.diags) + 1)
    return cap(ctx.diags, ctx.omitted, per_code=shown_per_code)
