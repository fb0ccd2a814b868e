"""Reading e-protocols back: either format into ``ir.Protocol`` values, and a protocol as ``.imtrial`` source."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable, Optional

from imtrial_dsl import ir, source

from . import dicom_dpp, json_io
from .targets import variant_from_header


class Imported:
    """One file read back: the protocol header, its origin-tagged constraints, its variant (if any)."""

    def __init__(self, protocol: ir.Protocol, params: list[tuple[ir.Constraint, str]], variant: Optional[dict]):
        self.protocol, self.params, self.variant = protocol, params, variant

    def as_protocol(self) -> ir.Protocol:
        base = [c for c, o in self.params if o == "base"]
        variants = []
        if self.variant is not None:
            variants.append(variant_from_header(self.variant, [c for c, o in self.params if o == "variant"]))
        return self.protocol.model_copy(update={"constraints": base, "variants": variants})


def _read(path: Path | str) -> Imported:
    """Either format, by content (DICOM Part 10 preamble, else JSON). Malformed input -> ValueError."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(132)
    try:
        return Imported(*(dicom_dpp.read(path) if head[128:132] == b"DICM" else json_io.read(path)))
    except (KeyError, TypeError, AttributeError, IndexError) as exc:
        raise ValueError(f"{path}: malformed e-protocol ({type(exc).__name__}: {exc})") from exc
    except Exception as exc:  # pydicom and pydantic errors are not ValueErrors in every version
        if isinstance(exc, (ValueError, OSError)):
            raise
        raise ValueError(f"{path}: {exc}") from exc


def import_file(path: Path | str) -> ir.Protocol:
    """Read one DPP object or ``imtrial-eprotocol/1`` JSON file back into an ``ir.Protocol`` (no spans).

    A base file gives the complete base protocol; a variant file gives that variant plus the base
    constraints it did not override (use :func:`import_files` to merge a protocol's files).
    """
    return _read(path).as_protocol()


def import_files(paths: Iterable[Path | str]) -> list[ir.Protocol]:
    """Read several files and merge them per protocol: base constraints from the base file, one
    variant per variant file (in their original order). Protocols come out in first-seen order."""
    groups: dict[str, list[Imported]] = {}
    for p in paths:
        imp = _read(p)
        groups.setdefault(imp.protocol.name, []).append(imp)
    out = []
    for name, imps in groups.items():
        bases = [i for i in imps if i.variant is None]
        variants = sorted((i for i in imps if i.variant is not None), key=lambda i: i.variant.get("index") or 0)
        if bases:
            head = bases[0]
            base_constraints = [c for c, _ in head.params]
        else:  # no base file: keep the base constraints the variant files carried, first-seen order
            head = imps[0]
            base_constraints, seen = [], set()
            for i in imps:
                for c, o in i.params:
                    key = json.dumps(ir.strip_spans(c), sort_keys=True)
                    if o == "base" and key not in seen:
                        seen.add(key)
                        base_constraints.append(c)
        merged, seen_v = [], set()
        for i in variants:
            key = json.dumps(i.variant, sort_keys=True)
            if key in seen_v:
                continue
            seen_v.add(key)
            merged.append(variant_from_header(i.variant, [c for c, o in i.params if o == "variant"]))
        out.append(head.protocol.model_copy(update={"constraints": base_constraints, "variants": merged}))
    return out


def protocol_to_source(protocol: ir.Protocol) -> str:
    """The protocol in ``.imtrial`` syntax (the style of examples/amyloid_mri.imtrial)."""
    p = protocol
    head = f"protocol {p.name} modality {p.modality}" + (f" {source.quote(p.title)}" if p.title else "") + " {"
    lines = [head]
    if p.body_part:
        lines.append(f"  body_part {source.quote(p.body_part)}")
    if p.contrast:
        lines.append(f"  contrast {source.quote(p.contrast)}")
    for text in p.preparation:
        lines.append(f"  prepare {source.quote(text)}")
    for note in p.notes:
        lines.append(f"  remark {source.quote(note)}")
    ops = {ir.MatchOp.MATCHES: "~", ir.MatchOp.EQUALS: "=", ir.MatchOp.CONTAINS: "has", ir.MatchOp.NOT_MATCHES: "!~"}
    for m in p.match:
        lines.append(f"  match {m.attribute} {ops[m.op]} {source.quote(m.value)}")
    for c in p.constraints:
        lines.append(f"  {source.constraint(c)}")
    for v in p.variants:
        vh = f"  variant {_src_vendor(v)}"
        if v.model:
            vh += f" model {source.quote(v.model)}"
        if v.software:
            vh += f" software {source.quote(v.software)}"
        lines.append(vh + " {")
        for c in v.constraints:
            lines.append(f"    {source.constraint(c)}")
        for r in v.remove:
            lines.append(f"    remove {r}")
        lines.append("  }")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _src_vendor(v: ir.Variant) -> str:
    text = v.vendor_text or v.vendor
    return text if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", text) else source.quote(text)
