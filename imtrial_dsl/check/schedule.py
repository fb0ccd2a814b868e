"""The schedule: visits acquire declared protocols (E301), windows that start after they end (E402) or
overlap another visit's (E404), reminder recipients (E307) and sites where a recipient role has nobody (W416)."""
from __future__ import annotations

from typing import get_args

from .. import ir
from ..diagnostics import did_you_mean
from .context import Context
from .names import undefined


def _days(lo: float, hi: float) -> str:
    return f"days {lo:g} .. {hi:g}"


def _position(v: ir.Visit) -> tuple:
    s = v.span
    return (s.file, s.line, s.col) if s else ("", 0, 0)


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
                # at the visit declared later (the line just edited), naming the earlier one as the related place
                (a, alo, ahi), (b, blo, bhi) = sorted(((v, lo, hi), (pv, plo, phi)), key=lambda w: _position(w[0]))
                where = f" (declared at line {a.span.line})" if a.span and a.span.line else ""
                ctx.error("E404", b, f"window of visit {b.name} ({_days(blo, bhi)}) overlaps visit {a.name} ({_days(alo, ahi)})",
                          f"an exam date must fall in one visit window: shrink or move the window of {b.name} "
                          f"or of {a.name}{where}")
        active = [w for w in active if w[1] >= lo] + [(lo, hi, v)]
    rem = sch.reminders
    if rem:
        allowed = set(get_args(ir.ContactRole)) | set(ctx.roles) | {"central"}
        for who in list(rem.notify) + list(rem.escalate_to):
            if who not in allowed:
                ctx.error("E307", rem, f"unknown recipient '{who}' in reminders",
                          did_you_mean(who, allowed) or f"use a contact role ({', '.join(sorted(get_args(ir.ContactRole)))}) or a role name")
        _missing_at_sites(ctx, rem)


def _missing_at_sites(ctx: Context, rem: ir.ReminderPolicy) -> None:
    """W416: a site whose reminders (or escalations) reach nobody: none of the site roles they go to has a contact
    with an e-mail there, and neither has the fallback (``ir.REMINDER_FALLBACK_ROLES``, as ``ops.reminders`` sends)."""
    contact_roles = set(get_args(ir.ContactRole))
    central = {"central"} | {r.name for r in ctx.trial.roles if r.kind == "central"}
    kinds = {"reminders": list(rem.notify), "escalations": list(rem.escalate_to or rem.notify)}
    for site in ctx.trial.sites:
        have = {c.role for c in site.contacts if c.email}
        for what, roles in kinds.items():
            site_roles = [r for r in roles if r not in central and (r in contact_roles or r in ctx.roles)]
            if not site_roles or have & set(site_roles) or have & set(ir.REMINDER_FALLBACK_ROLES):
                continue
            ctx.warning("W416", rem, f"{what} of site {site.code} reach nobody there: it has no "
                        f"{' or '.join(site_roles)} contact with an e-mail, and no {' or '.join(ir.REMINDER_FALLBACK_ROLES)} "
                        f"to fall back to", f"add 'contact {next((r for r in site_roles if r in contact_roles), 'coordinator')} "
                        f"\"Name\" <name@example.org>' to site {site.code}")
