"""Per protocol: match rules (keywords, regexes), the constraints of the base and of each variant,
variants that remove what the base does not constrain (E311), variants against the inventory (W401/W402)."""
from __future__ import annotations

from .. import ir
from ..diagnostics import did_you_mean
from .. import source
from ..vendors import software_forms, software_matches, software_pattern_hint, software_values
from .constraints import constraints, regex
from .context import Context
from .names import keyword


def check(ctx: Context) -> None:
    devices = ctx.trial.devices()
    for p in ctx.trial.protocols:
        for r in p.match:
            keyword(ctx, r, r.attribute, f"match rule of protocol {p.name}")
            if r.op in (ir.MatchOp.MATCHES, ir.MatchOp.NOT_MATCHES):
                regex(ctx, r, r.value)
        constraints(ctx, p.constraints, f"protocol {p.name}")
        for var in p.variants:
            constraints(ctx, var.constraints, f"variant {var.vendor} of protocol {p.name}")
            for kw in var.remove:
                if kw not in {c.keyword for c in p.constraints}:
                    ctx.error("E311", var, f"variant {var.vendor} removes '{kw}', which protocol {p.name} does not constrain",
                              did_you_mean(kw, [c.keyword for c in p.constraints]) or "remove only base constraints")
        variants(ctx, p, devices)


def variants(ctx: Context, p: ir.Protocol, devices: list[tuple[ir.Site, ir.Device]]) -> None:
    """W401: a variant no inventory device runs; W402: devices the base constraints cannot all serve."""
    mod = p.modality.upper()
    same_mod = [(s, d) for s, d in devices if d.modality.upper() == mod]
    kinds = {(d.vendor, d.software, d.model) for _, d in same_mod}
    for var in p.variants:
        hit = any(
            vendor == var.vendor
            and (not var.model or (model or "").lower() == var.model.lower())
            and software_matches(var.software, software)
            for vendor, software, model in kinds
        )
        if not hit:
            desc = " ".join(x for x in (var.vendor, f'model "{var.model}"' if var.model else "",
                                        f'software "{var.software}"' if var.software else "") if x)
            have = ", ".join(_device_software(d) for _, d in same_mod)
            ctx.warning("W401", var, f"variant {desc} of protocol {p.name} matches no {p.modality} device in the inventory",
                        f"inventory {p.modality} devices: {have}" if have else f"no {p.modality} device is declared")
    if not p.variants:
        return
    uncovered = []
    covered: dict[tuple, bool] = {}  # many devices share vendor/software/model
    for s, d in same_mod:
        key = (d.vendor, d.software, (d.model or "").lower())
        if key not in covered:
            covered[key] = ir.effective_constraints(p, d.vendor, d.software, d.model)[1] is not None
        if not covered[key]:
            uncovered.append((s, d))
    vendors_with_variant = {v.vendor for v in p.variants}
    uncovered_vendors = {d.vendor for _, d in uncovered}
    for s, d in uncovered:
        # The base constraints serve one vendor family; warn when that cannot be the whole story.
        if d.vendor in vendors_with_variant:
            what = " ".join(x for x in (f'model "{d.model}"' if d.model else "",
                                        f'software "{d.software}"' if d.software else "") if x) or "it"
            why = f"device {d.id}: protocol {p.name} has {d.vendor} variants, but none for {what}"
        elif len(uncovered_vendors) > 1:
            why = (f"no variant of protocol {p.name} covers device {d.id} ({d.vendor}); devices of "
                   f"{len(uncovered_vendors)} vendors ({', '.join(sorted(uncovered_vendors))}) would all use the base constraints")
        else:
            continue
        hint = software_pattern_hint(d.software)
        ctx.warning("W402", d, why, f"add 'variant {d.vendor} software {source.quote(hint)} {{ … }}' to protocol {p.name}"
                    if hint else f"add a '{d.vendor}' variant to protocol {p.name}")


def _device_software(d: ir.Device) -> str:
    """'GE_MR1 (GE; software values '24', 'LX', 'MR Software release:HD16.0_V02_1131.a' [release HD16.0_V02_1131.a])':
    the forms a variant's software glob is matched against (each value, its release suffix, its words)."""
    values = software_values(d.software)
    if not values:
        return f"{d.id} ({d.vendor}, no software declared)"
    parts = []
    for v in values:
        rel = [t for f, t in software_forms(v) if f == "release"]
        parts.append(f"'{v}'" + (f" [release {rel[0]}]" if rel else ""))
    return f"{d.id} ({d.vendor}; software value{'s' if len(values) > 1 else ''} {', '.join(parts)})"
