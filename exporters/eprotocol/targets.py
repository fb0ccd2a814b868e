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
    def constraints(self) -> list[tuple[ir.Constraint, str]]:
        """Effective constraints with their origin ('base' or 'variant'), in effective_constraints order."""
        if self.variant is None:
            return [(c, "base") for c in self.protocol.constraints]
        v = self.variant
        overridden = {c.keyword for c in v.constraints} | set(v.remove)
        return [(c, "base") for c in self.protocol.constraints if c.keyword not in overridden] + [(c, "variant") for c in v.constraints]

    @property
    def overridden_base(self) -> list[tuple[int, ir.Constraint]]:
        """(position in the base list, constraint) of the base constraints this variant replaces or removes."""
        if self.variant is None:
            return []
        v = self.variant
        overridden = {c.keyword for c in v.constraints} | set(v.remove)
        return [(i, c) for i, c in enumerate(self.protocol.constraints) if c.keyword in overridden]


def _variant_label(v: ir.Variant) -> str:
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
    return {
        "name": p.name, "modality": p.modality, "title": p.title, "body_part": p.body_part,
        "preparation": list(p.preparation), "contrast": p.contrast,
        "match": [{"attribute": m.attribute, "op": m.op.value, "value": m.value} for m in p.match],
        "notes": list(p.notes),
    }


def variant_header(t: Target) -> Optional[dict]:
    v = t.variant
    if v is None:
        return None
    return {"index": t.index, "vendor": v.vendor, "vendor_text": v.vendor_text, "model": v.model,
            "software": v.software, "remove": list(v.remove)}


def base_with_overridden(effective_base: list[ir.Constraint], overridden: list[tuple[int, ir.Constraint]]) -> list[ir.Constraint]:
    """The protocol's base list from a variant file: its effective base constraints (in base order) with the
    overridden ones put back at their positions."""
    out = list(effective_base)
    for pos, c in sorted(overridden, key=lambda x: x[0]):
        out.insert(min(pos, len(out)), c)
    return out


def variant_from_header(v: dict, constraints: list[ir.Constraint]) -> ir.Variant:
    return ir.Variant(vendor=v["vendor"], vendor_text=v.get("vendor_text", ""), model=v.get("model"),
                      software=v.get("software"), constraints=constraints, remove=list(v.get("remove", [])))


def protocol_from_header(h: dict) -> ir.Protocol:
    return ir.Protocol(
        name=h["name"], modality=h["modality"], title=h.get("title", ""), body_part=h.get("body_part"),
        preparation=list(h.get("preparation", [])), contrast=h.get("contrast"),
        match=[ir.MatchRule(attribute=m["attribute"], op=ir.MatchOp(m["op"]), value=m["value"]) for m in h.get("match", [])],
        notes=list(h.get("notes", [])),
    )
