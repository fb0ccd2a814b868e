"""De-identification: profile options (E315), date shift and pixel regions (E402), the profile (E305),
overrides that contradict the profile or an option (W403/W404). (W407, a match rule on an attribute the
profile removes, is retired: series are classified on the original headers at the site.)"""
from __future__ import annotations

import re
from typing import Optional

from .. import ir
from ..deid.plan import resolve_action
from ..diagnostics import did_you_mean
from .context import Context
from .identifiers import key
from .names import keyword, undefined

_TAG = re.compile(r"\(([0-9A-Fa-fx]{4}),([0-9A-Fa-fx]{4})\)\Z")
_DEID_OPTIONS = [o.value for o in ir.DeidOption]


def check(ctx: Context) -> None:
    for prof in ctx.trial.deid_profiles:
        bad = sorted({o for r in prof.rules for o in r.options if o not in _DEID_OPTIONS})
        for o in bad:
            node = next(r for r in prof.rules if o in r.options)
            ctx.error("E315", node, f"unknown de-identification option '{o}' in profile {prof.name}",
                      did_you_mean(o, _DEID_OPTIONS) or f"options: {', '.join(_DEID_OPTIONS)}")
    d = ctx.trial.deidentify
    if d is None:
        return
    key(ctx, d.key, "de-identification key")
    if d.date_shift_min and d.date_shift_max and d.date_shift_min.days > d.date_shift_max.days:
        ctx.error("E402", d.date_shift_min, f"empty date shift range {d.date_shift_min.days:g} .. {d.date_shift_max.days:g} d",
                  "write the lower bound first")
    for r in d.pixel_regions:
        if r.x0 >= r.x1 or r.y0 >= r.y1:
            ctx.error("E402", r, f"empty pixel region ({r.x0},{r.y0})-({r.x1},{r.y1})", "x0 < x1 and y0 < y1")
    prof = ctx.trial.profile(d.profile.name)
    if prof is None:
        undefined(ctx, "E305", d.profile, "de-identification profile", [p.name for p in ctx.trial.deid_profiles])
    by_kw = {}
    if prof is not None:
        by_kw = {r.keyword: r for r in prof.rules if r.keyword}
        by_kw.update({r.tag.upper(): r for r in prof.rules})
    chosen = [o.value for o in d.options]
    for ov in d.overrides:
        attr = ov.attribute
        if _TAG.match(attr):
            rule = by_kw.get(attr.upper())
        else:
            if not keyword(ctx, ov, attr, "de-identification override"):
                continue
            rule = by_kw.get(attr)
        if rule is None or prof is None:
            continue
        action, via = resolve_action(rule, chosen)
        if ov.action == "keep" and action != "K":
            retaining = [o for o, a in rule.options.items() if a == "K"]
            hint = (f"the option {retaining[0]} retains it; choose that option instead of overriding"
                    if retaining and retaining[0] not in chosen else
                    "remove the override unless the study has a documented need for this identifier")
            ctx.warning("W404", ov, f"'keep {attr}' contradicts profile {prof.name} "
                        f"(action {action}{' under ' + via if via else ''}): the attribute may identify the subject", hint)
        elif ov.action != "keep" and action == "K" and via:
            ctx.warning("W403", ov, f"'{ov.action} {attr}' contradicts option {via}, which retains {attr}",
                        f"drop the override, or drop the option {via}")
