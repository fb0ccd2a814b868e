"""The effective protocol for one device: ``imtrial explain PROTOCOL --device D``.

The base constraints with every variant that applies to the device layered over them in
:data:`imtrial_dsl.ir.MERGE_ORDER` (vendor, vendor+model, vendor+software, vendor+model+software,
site, device); each line says which layer it comes from, and what was replaced or removed.
"""
from __future__ import annotations

from . import ir, source
from .diagnostics import ImtrialError, did_you_mean


class ExplainError(ImtrialError):
    code = "E115"


def effective(trial: ir.Trial, protocol: str, device: str) -> tuple[ir.Protocol, ir.Site, ir.Device, list[ir.Variant]]:
    """(protocol, site, device, the variants that apply in merge order); ExplainError for unknown names."""
    p = trial.protocol(protocol)
    if p is None:
        raise ExplainError(f"no protocol '{protocol}'", hint=did_you_mean(protocol, [x.name for x in trial.protocols]))
    hit = next(((s, d) for s, d in trial.devices() if d.id == device), None)
    if hit is None:
        raise ExplainError(f"no device '{device}'", hint=did_you_mean(device, [d.id for _, d in trial.devices()]))
    site, dev = hit
    chain = ir.effective_chain(p, dev.vendor, dev.software, dev.model, site=site.code, device=dev.id)
    return p, site, dev, chain


def explain_text(trial: ir.Trial, protocol: str, device: str) -> str:
    """The effective protocol as ``.imtrial`` text, a comment naming each constraint's layer."""
    p, site, dev, chain = effective(trial, protocol, device)
    lines = [f"# protocol {p.name} for device {dev.id} (site {site.code}, {dev.vendor} "
             f"{dev.model or ''} {dev.software or ''})".replace("  ", " ").replace(" )", ")")]
    if not dev.acquires(p.modality):
        lines.append(f"# note: {dev.id} does not acquire {p.modality}")
    if not p.applies_to(site.code, dev.id):
        lines.append(f"# note: protocol {p.name} is not in scope for {dev.id}")
    lines.append("# layers, in merge order: base" + "".join(f", variant {v.describe()} ({v.layer()})" for v in chain))
    lines.append(f"protocol {p.name} modality {p.modality}" + (f" {source.quote(p.title)}" if p.title else "") + " {")
    merged = ir.merge(list(p.constraints), chain)
    width = max((len(source.constraint(c)) for c, _ in merged), default=0)
    for c, src in merged:
        where = "base" if src is None else f"variant {src.describe()}"
        lines.append(f"  {source.constraint(c).ljust(width)}  # {where}")
    for v in chain:
        for kw in v.remove:
            lines.append(f"  # {kw}: removed by variant {v.describe()}")
    for w in ir.effective_conditionals(p, chain):
        lines.append(f"  {source.conditional(w)} {{")
        lines += [f"    {source.constraint(c)}" for c in w.constraints]
        lines.append("  }")
    lines.append("}")
    return "\n".join(lines) + "\n"
