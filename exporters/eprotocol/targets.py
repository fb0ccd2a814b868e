"""What is exported: one :class:`Target` per protocol x variant, with the inventory devices it
serves, and its identity as plain data (protocol header, variant), which both formats carry."""
from __future__ import annotations

import re
from typing import Optional

from imtrial_dsl import ir

FORMAT = "imtrial-eprotocol/1"


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.]+", "", text.replace("*", "x").replace("?", "x")) or "x"


def study_code(trial: ir.Trial) -> str:
    return trial.study.code if trial.study else "STUDY"


class Target:
    """One export unit: a protocol, one of its variants (None = base), the devices it serves."""

    def __init__(self, protocol: ir.Protocol, variant: Optional[ir.Variant], index: Optional[int],
                 devices: list[tuple[ir.Site, ir.Device]], label: str):
        self.protocol, self.variant, self.index, self.devices, self.label = protocol, variant, index, devices, label

    @property
    def chain(self) -> list[ir.Variant]:
        """The variant layered on the variants it builds on (ir.MERGE_ORDER): for a vendor variant, the
        less specific variants of its vendor it refines; a site or device variant stands alone here."""
        v = self.variant
        if v is None:
            return []
        if v.site or v.device:
            return [v]
        under = [u for u in self.protocol.variants if u is not v and not (u.site or u.device) and u.vendor == v.vendor
                 and (not u.model or (v.model or "").lower() == u.model.lower())
                 and (not u.software or u.software == v.software)
                 and ir.MERGE_ORDER.index(u.layer()) < ir.MERGE_ORDER.index(v.layer())]
        return sorted(under, key=lambda u: ir.MERGE_ORDER.index(u.layer())) + [v]

    @property
    def constraints(self) -> list[tuple[ir.Constraint, str]]:
        """Effective constraints with their origin ('base', 'variant', or 'inherited' from a less specific
        variant this one builds on), in merge order."""
        return [(c, "base" if src is None else "variant" if src is self.variant else "inherited")
                for c, src in ir.merge(list(self.protocol.constraints), self.chain)]

    @property
    def conditionals(self) -> list[tuple[ir.Conditional, str]]:
        """The 'when' blocks of the protocol and of the variants in :attr:`chain`."""
        return [(w, "base") for w in self.protocol.conditionals] + [
            (w, "variant" if v is self.variant else "inherited") for v in self.chain for w in v.conditionals]

    @property
    def overridden_base(self) -> list[tuple[int, ir.Constraint]]:
        """(position in the base list, constraint) of the base constraints this variant replaces or removes."""
        if self.variant is None:
            return []
        v = self.variant
        overridden = {c.keyword for c in v.constraints} | set(v.remove)
        return [(i, c) for i, c in enumerate(self.protocol.constraints) if c.keyword in overridden]


def _variant_label(v: ir.Variant) -> str:
    if v.site or v.device:
        return slug(f"site-{v.site}" if v.site else f"device-{v.device}")
    parts = [v.vendor] + ([v.model] if v.model else []) + ([v.software] if v.software else [])
    return "-".join(slug(p) for p in parts)


def targets_of(trial: ir.Trial, protocol: ir.Protocol) -> list[Target]:
    """The base protocol plus one target per variant, each with the inventory devices it applies to."""
    base_devices, covered = trial.variant_devices(protocol)
    out = [Target(protocol, None, None, base_devices, "base")]
    seen = {"base"}
    for i, v in enumerate(protocol.variants):
        label = _variant_label(v)
        if label in seen:
            label = f"{label}-{i + 1}"
        seen.add(label)
        out.append(Target(protocol, v, i, covered[i], label))
    return out


def protocol_header(p: ir.Protocol) -> dict:
    head = {
        "name": p.name, "modality": p.modality, "title": p.title, "body_part": p.body_part,
        "preparation": list(p.preparation), "contrast": p.contrast,
        "match": [{"attribute": m.attribute, "op": m.op.value, "value": m.value} for m in p.match],
        "notes": list(p.notes),
    }
    if p.scope is not None:  # only when set: files of protocols without one stay as they were
        head["scope"] = {"sites": list(p.scope.sites), "devices": list(p.scope.devices)}
    return head


def variant_header(t: Target) -> Optional[dict]:
    v = t.variant
    if v is None:
        return None
    return {"index": t.index, "vendor": v.vendor, "vendor_text": v.vendor_text, "model": v.model,
            "software": v.software, "site": v.site, "device": v.device, "remove": list(v.remove)}


def base_with_overridden(effective_base: list[ir.Constraint], overridden: list[tuple[int, ir.Constraint]]) -> list[ir.Constraint]:
    """The protocol's base list from a variant file: its effective base constraints (in base order) with the
    overridden ones put back at their positions."""
    out = list(effective_base)
    for pos, c in sorted(overridden, key=lambda x: x[0]):
        out.insert(min(pos, len(out)), c)
    return out


def variant_from_header(v: dict, constraints: list[ir.Constraint],
                        conditionals: Optional[list[ir.Conditional]] = None) -> ir.Variant:
    return ir.Variant(vendor=v["vendor"], vendor_text=v.get("vendor_text", ""), model=v.get("model"),
                      software=v.get("software"), site=v.get("site"), device=v.get("device"),
                      constraints=constraints, conditionals=list(conditionals or []), remove=list(v.get("remove", [])))


def conditionals_from(blocks: list[tuple[int, str, ir.Constraint, Optional[ir.Constraint]]]) -> dict[str, list[ir.Conditional]]:
    """'when' blocks by origin from (block number, origin, condition, constraint or None for an empty block)."""
    out: dict[str, list[ir.Conditional]] = {}
    by_block: dict[tuple[str, int], ir.Conditional] = {}
    for n, origin, cond, c in blocks:
        w = by_block.get((origin, n))
        if w is None:
            w = by_block[(origin, n)] = ir.Conditional(condition=cond)
            out.setdefault(origin, []).append(w)
        if c is not None:
            w.constraints.append(c)
    return out


def protocol_from_header(h: dict) -> ir.Protocol:
    return ir.Protocol(
        name=h["name"], modality=h["modality"], title=h.get("title", ""), body_part=h.get("body_part"),
        preparation=list(h.get("preparation", [])), contrast=h.get("contrast"),
        match=[ir.MatchRule(attribute=m["attribute"], op=ir.MatchOp(m["op"]), value=m["value"]) for m in h.get("match", [])],
        notes=list(h.get("notes", [])),
        scope=ir.Scope(**h["scope"]) if h.get("scope") else None,
    )
