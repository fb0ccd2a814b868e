"""The schedule: visits acquire declared protocols (E301), windows that start after they end (E402) or
overlap another visit's (E404), reminder recipients (E307)."""
from __future__ import annotations

from typing import get_args

from .. import ir
from ..diagnostics import did_you_mean
from .context import Context
from .names import undefined


def _days(lo: float, hi: float) -> str:
    return f"days {lo:g} .. {hi:g}"


def check(ctx: Context) -> None:
    sch = ctx.trial.schedule
    if not sch:
        return
    windows = []
    for v in sch.visits:
        for ref in v.acquire:
            if ref.name not in ctx.protocols:
                undefined(ctx, "E301", ref, "protocol", ctx.protocols)
        before = v.window_before.days if v.window_before else 0.0
        after = v.window_after.days if v.window_after else 0.0
        if before < 0 or after < 0:
            ctx.error("E402", v, f"visit {v.name} has a window that ends before it starts",
                      "write the window as -before .. +after, e.g. window -14 .. +28 d")
            continue
        if not v.scheduled():  # an event-driven visit's window counts from the event, not from baseline
            continue
        windows.append((v.offset.days - before, v.offset.days + after, v))
    windows.sort(key=lambda w: (w[0], w[1]))
    active: list[tuple[float, float, ir.Visit]] = []
    for lo, hi, v in windows:
        for plo, phi, pv in active:
            if lo <= phi:
                ctx.error("E404", v, f"window of visit {v.name} ({_days(lo, hi)}) overlaps visit {pv.name} ({_days(plo, phi)})",
                          "an exam date must fall in one visit window: shrink or move one window")
        active = [w for w in active if w[1] >= lo] + [(lo, hi, v)]
    rem = sch.reminders
    if rem:
        allowed = set(get_args(ir.ContactRole)) | set(ctx.roles) | {"central"}
        for who in list(rem.notify) + list(rem.escalate_to):
            if who not in allowed:
                ctx.error("E307", rem, f"unknown recipient '{who}' in reminders",
                          did_you_mean(who, allowed) or f"use a contact role ({', '.join(sorted(get_args(ir.ContactRole)))}) or a role name")
