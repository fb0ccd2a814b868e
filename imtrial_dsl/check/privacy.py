"""Privacy rules that hold the study to what it can honestly claim (issue 9):

- E705: an option the engine cannot carry out (clean_recognizable_visual_features, 113102: no defacing);
- E706: retain_longitudinal_full_dates with retain_longitudinal_modified_dates (dates are kept or shifted);
- E707: overrides that keep identity (``keep PatientID``…) with no destination declared ``receives identified``;
- E708: a role's ``hide`` naming a field reports do not know (``hide arm, sites`` would hide nothing);
- E711: an analysis ``env`` naming the variable of a key or transfer token;
- W440: an identity registry with no key to hash source identifiers with.

The de-identification rules come from ``imtrial_dsl.deid.plan`` (the engine refuses the same studies).
"""
from __future__ import annotations

from .. import ir
from ..deid.plan import identity_overrides, option_conflicts, option_names
from ..diagnostics import did_you_mean
from ..secrets import secret_variables
from .context import Context


def check(ctx: Context) -> None:
    t = ctx.trial
    d = t.deidentify
    if d is not None:
        for code, opt, message in option_conflicts(option_names(d)):
            node = next((o for o in d.options if (o.value if isinstance(o, ir.DeidOption) else o) == opt), d)
            hint = ("blank burned-in text with `blank` regions (113101) and leave defacing to a dedicated tool"
                    if code == "E705" else "choose one: full dates keep dates as they are, modified dates shift them")
            ctx.error(code, getattr(node, "span", None) or d, message, hint)
        prof = t.profile(d.profile.name)
        identity = identity_overrides(prof, d)[0] if prof is not None else []
        if identity and not any(dest.identified for dest in t.transfers):
            ov = next(o for o in d.overrides if o.attribute in identity)
            ctx.error("E707", ov, f"the overrides keep identity ({', '.join(identity)}): the instances will say "
                                  "PatientIdentityRemoved NO and no destination may receive them",
                      "declare the destination that may receive identified data, e.g. "
                      "`transfer irb_registry folder \"/secure/path\" receives identified`, or drop the override")
    for role in t.roles:
        for name in role.hide:
            if name not in ir.ROLE_HIDE_FIELDS:
                ctx.error("E708", role, f"role {role.name} hides unknown field '{name}': it would hide nothing",
                          did_you_mean(name, ir.ROLE_HIDE_FIELDS) or f"fields: {', '.join(ir.ROLE_HIDE_FIELDS)}")
    secret = secret_variables(t)
    for a in t.analyses:
        for name in a.env:
            if name in secret:
                ctx.error("E711", a, f"analysis {a.name} asks for environment variable {name}, which holds a key or "
                                     "token of the study: analysis programs never receive secrets",
                          f"remove {name} from the analysis' env")
    ids = t.identifiers
    if ids is not None and ids.key is None and (d is None or d.key is None):
        ctx.warning("W440", ids, "the identity registry has no key: source identifiers (PatientID…) are stored "
                                 "as they are, not as keyed hashes",
                    "add `key env NAME` to the identifiers (or deidentify) block")
