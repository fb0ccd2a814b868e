"""Per protocol: match rules (keywords, regexes), the constraints of the base, of each variant and of each
'when' block, variants that remove what the base does not constrain (E311), variants against the inventory
(W401/W402), scope and site/device variants naming declared sites and devices (E319), modality codes
against the DICOM defined terms (E318), vendors the alias table does not know (W409), protocols no device
can acquire (W410)."""
from __future__ import annotations

from .. import ir
from ..diagnostics import did_you_mean
from .. import source
from ..nested import MODALITIES
from ..vendors import KNOWN_SPELLINGS, is_known_vendor, software_forms, software_matches, software_pattern_hint, software_values
from .constraints import constraints, regex
from .context import Context
from .names import keyword

# Words people write for a modality that DICOM spells otherwise.
_MODALITY_WORDS = {"PET": "PT", "MRI": "MR", "SPECT": "NM", "XR": "DX", "CBCT": "CT", "ULTRASOUND": "US", "PETCT": "PT"}


def modality(ctx: Context, node, code: str, where: str) -> bool:
    """E318 unless ``code`` is a DICOM Modality defined term."""
    if code in MODALITIES:
        return True
    hint = (f"did you mean '{_MODALITY_WORDS[code.upper()]}'?" if code.upper() in _MODALITY_WORDS
            else f"did you mean '{code.upper()}'?" if code.upper() in MODALITIES else did_you_mean(code, MODALITIES))
    ctx.error("E318", node, f"'{code}' is not a DICOM modality code (in {where})",
              (hint + "; " if hint else "") + "Modality (0008,0060) uses the defined terms of PS3.3 C.7.3.1.1.1 (MR, CT, PT, NM, …)")
    return False


def vendor(ctx: Context, node, text: str, where: str) -> None:
    """W409 for a vendor the alias table does not recognize (its variants and device matching rely on it)."""
    if not text or is_known_vendor(text):
        return
    ctx.warning("W409", node, f"unknown vendor '{text}' in {where}",
                did_you_mean(text, KNOWN_SPELLINGS) or "write the Manufacturer as the scanner's headers spell it")


def check(ctx: Context) -> None:
    devices = ctx.trial.devices()
    sites = {s.code for s in ctx.trial.sites}
    device_ids = {d.id for _, d in devices}
    for s, d in devices:
        for m in d.all_modalities():
            modality(ctx, d, m, f"device {d.id}")
        vendor(ctx, d, d.vendor_text, f"device {d.id}")
    for p in ctx.trial.protocols:
        modality(ctx, p, p.modality, f"protocol {p.name}")
        for r in p.match:
            keyword(ctx, r, r.attribute, f"match rule of protocol {p.name}")
            if r.op in (ir.MatchOp.MATCHES, ir.MatchOp.NOT_MATCHES):
                regex(ctx, r, r.value)
        constraints(ctx, p.constraints, f"protocol {p.name}", p.modality)
        _conditionals(ctx, p.conditionals, f"protocol {p.name}", p.modality)
        keys = {ir.constraint_key(c) for c in p.constraints} | {c.keyword for c in p.constraints}
        for var in p.variants:
            where = f"variant {var.describe()} of protocol {p.name}"
            constraints(ctx, var.constraints, where, p.modality)
            _conditionals(ctx, var.conditionals, where, p.modality)
            if var.vendor_text:
                vendor(ctx, var, var.vendor_text, where)
            _scope_ref(ctx, var, var.site, var.device, sites, device_ids)
            for kw in var.remove:
                if kw not in keys and not any(kw in ir.constraint_key(c) for v in p.variants for c in v.constraints):
                    ctx.error("E311", var, f"variant {var.describe()} removes '{kw}', which protocol {p.name} does not constrain",
                              did_you_mean(kw, [c.keyword for c in p.constraints]) or "remove only base constraints")
        if p.scope is not None:
            for site in p.scope.sites:
                _scope_ref(ctx, p.scope, site, None, sites, device_ids)
            for dev in p.scope.devices:
                _scope_ref(ctx, p.scope, None, dev, sites, device_ids)
        if devices and p.modality not in _WRITTEN_BESIDE_IMAGES and not any(d.acquires(p.modality) and p.applies_to(s.code, d.id) for s, d in devices):
            have = sorted({m for _, d in devices for m in d.all_modalities()})
            ctx.warning("W410", p, f"no site can acquire protocol {p.name}: no {p.modality} device"
                        + (" in its scope" if p.scope else " is declared"),
                        f"declared devices acquire {', '.join(have)}" if have else None)
        variants(ctx, p, devices)


# Objects any imaging device writes beside its images (dose and protocol reports, presentation states, key
# object selections): a protocol for them needs no device of that modality.
_WRITTEN_BESIDE_IMAGES = frozenset({"SR", "PR", "KO", "DOC"})


def _conditionals(ctx: Context, blocks: list[ir.Conditional], where: str, mod: str) -> None:
    for w in blocks:
        constraints(ctx, [w.condition], f"the condition of a 'when' block of {where}", mod)
        constraints(ctx, w.constraints, f"a 'when' block of {where}", mod)


def _scope_ref(ctx: Context, node, site, device, sites: set, device_ids: set) -> None:
    """E319: a scope or site/device variant names a site or device that is not declared (in a study that
    declares its sites: a protocol-only file, e.g. one imtrial import eprotocol writes, has no inventory)."""
    if not ctx.trial.sites:
        return
    if site is not None and site not in sites:
        ctx.error("E319", node, f"undefined site '{site}'", did_you_mean(site, sites) or
                  (f"declared sites: {', '.join(sorted(sites))}" if sites else "no site is declared"))
    if device is not None and device not in device_ids:
        ctx.error("E319", node, f"undefined device '{device}'", did_you_mean(device, device_ids) or
                  (f"declared devices: {', '.join(sorted(device_ids))}" if device_ids else "no device is declared"))


def variants(ctx: Context, p: ir.Protocol, devices: list[tuple[ir.Site, ir.Device]]) -> None:
    """W401: a variant no inventory device runs; W402: devices the base constraints cannot all serve."""
    same_mod = [(s, d) for s, d in devices if d.acquires(p.modality) and p.applies_to(s.code, d.id)]  # in its scope
    kinds = {(d.vendor, d.software, d.model) for _, d in same_mod}
    for var in p.variants:
        if var.site or var.device:
            continue  # checked by name (E319)
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
    if not any(v.vendor and not (v.site or v.device) for v in p.variants):
        return  # only vendor variants make the base constraints one vendor family's (site/device variants refine)
    uncovered = []
    covered: dict[tuple, bool] = {}  # many devices share vendor/software/model
    by_name = any(v.site or v.device for v in p.variants)
    for s, d in same_mod:
        key = (d.vendor, d.software, (d.model or "").lower()) + ((s.code, d.id) if by_name else ())
        if key not in covered:  # a site or device variant covers its devices too
            covered[key] = ir.effective_chain(p, d.vendor, d.software, d.model, site=s.code, device=d.id) != []
        if not covered[key]:
            uncovered.append((s, d))
    vendors_with_variant = {v.vendor for v in p.variants if v.vendor}
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
