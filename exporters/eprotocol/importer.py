"""Reading e-protocols back: either format into ``ir.Protocol`` values, and a protocol as ``.imtrial`` source."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable, Optional

from imtrial_dsl import ir, source
from imtrial_dsl.diagnostics import Diagnostic, Severity

from . import dicom_dpp, json_io
from .targets import base_with_overridden, variant_from_header


class Imported:
    """One file read back: the protocol header, its origin-tagged constraints, its variant (if any), the base
    constraints the variant overrides, and what the import had to say (W612/W613)."""

    def __init__(self, protocol: ir.Protocol, params: list[tuple[ir.Constraint, str]], variant: Optional[dict],
                 notes: list[Diagnostic]):
        variant = dict(variant) if variant is not None else None
        self.overridden = variant.pop("base_overridden", []) if variant is not None else []
        self.protocol, self.params, self.variant, self.notes = protocol, params, variant, notes

    @property
    def base(self) -> list[ir.Constraint]:
        """The base constraints: all of a base file; of a variant file, the ones it keeps plus the ones it overrides."""
        return base_with_overridden([c for c, o in self.params if o == "base"], self.overridden)

    def as_protocol(self) -> ir.Protocol:
        variants = []
        if self.variant is not None:
            variants.append(variant_from_header(self.variant, [c for c, o in self.params if o == "variant"]))
        return self.protocol.model_copy(update={"constraints": self.base, "variants": variants})


def _read(path: Path | str) -> Imported:
    """Either format, by content (DICOM Part 10 preamble, else JSON). Malformed input -> ValueError."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(132)
    notes: list[Diagnostic] = []
    try:
        got = dicom_dpp.read(path, notes) if head[128:132] == b"DICM" else json_io.read(path, notes)
        return Imported(*got, notes)
    except (KeyError, TypeError, AttributeError, IndexError) as exc:
        raise ValueError(f"{path}: malformed e-protocol ({type(exc).__name__}: {exc})") from exc
    except Exception as exc:  # pydicom and pydantic errors are not ValueErrors in every version
        if isinstance(exc, (ValueError, OSError)):
            raise
        raise ValueError(f"{path}: {exc}") from exc


def import_file(path: Path | str) -> ir.Protocol:
    """Read one DPP object or ``imtrial-eprotocol/1`` JSON file back into an ``ir.Protocol`` (no spans).

    A base file gives the complete base protocol; a variant file gives the whole base protocol (the
    constraints it keeps and the ones it overrides, which it carries) with that one variant.
    """
    return _read(path).as_protocol()


def import_files(paths: Iterable[Path | str]) -> list[ir.Protocol]:
    """Read several files and merge them per protocol (see :func:`import_report`)."""
    return import_report(paths)[0]


def import_report(paths: Iterable[Path | str]) -> tuple[list[ir.Protocol], list[Diagnostic]]:
    """Read several files and merge them per protocol: base constraints from the base file (else from the
    variant files, which carry them), one variant per variant file in their original order. Protocols come out
    in first-seen order; the diagnostics say where a file's standard values overrode imtrial's private copy
    (W612/W613) and where files of one protocol disagree about its base (W614)."""
    groups: dict[str, list[tuple[Path, Imported]]] = {}
    notes: list[Diagnostic] = []
    for p in paths:
        imp = _read(p)
        notes += imp.notes
        groups.setdefault(imp.protocol.name, []).append((Path(p), imp))
    out = []
    for name, items in groups.items():
        imps = [i for _, i in items]
        bases = [(p, i) for p, i in items if i.variant is None]
        head_path, head = bases[0] if bases else items[0]
        base_constraints = head.base
        key = json.dumps(ir.strip_spans(base_constraints), sort_keys=True)
        for p, i in items:
            if i is not head and json.dumps(ir.strip_spans(i.base), sort_keys=True) != key:
                notes.append(Diagnostic(severity=Severity.WARNING, code="W614",
                                        message=f"{p.name}: the base constraints of protocol {name} differ from "
                                                f"{head_path.name}'s; {head_path.name}'s are used",
                                        hint="import the files of one export together, or re-export after editing"))
        merged, seen_v = [], set()
        for i in sorted((i for i in imps if i.variant is not None), key=lambda i: i.variant.get("index") or 0):
            vkey = json.dumps(i.variant, sort_keys=True)
            if vkey in seen_v:
                continue
            seen_v.add(vkey)
            merged.append(variant_from_header(i.variant, [c for c, o in i.params if o == "variant"]))
        out.append(head.protocol.model_copy(update={"constraints": base_constraints, "variants": merged}))
    return out, notes


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
    if p.scope is not None:  # 'for site S, device D'
        lines.append("  for " + ", ".join([f"site {x}" for x in p.scope.sites] + [f"device {x}" for x in p.scope.devices]))
    ops = {ir.MatchOp.MATCHES: "~", ir.MatchOp.EQUALS: "=", ir.MatchOp.CONTAINS: "has", ir.MatchOp.NOT_MATCHES: "!~",
           ir.MatchOp.NOT_CONTAINS: "!has"}
    for m in p.match:
        lines.append(f"  match {m.attribute} {ops[m.op]} {source.quote(m.value)}")
    for c in p.constraints:
        lines.append(f"  {source.constraint(c)}")
    lines += _conditionals_source(p.conditionals, "  ")
    for v in p.variants:
        if v.site or v.device:
            vh = f"  variant site {v.site}" if v.site else f"  variant device {v.device}"
        else:
            vh = f"  variant {_src_vendor(v)}"
        if v.model:
            vh += f" model {source.quote(v.model)}"
        if v.software:
            vh += f" software {source.quote(v.software)}"
        lines.append(vh + " {")
        for c in v.constraints:
            lines.append(f"    {source.constraint(c)}")
        lines += _conditionals_source(v.conditionals, "    ")
        for r in v.remove:
            lines.append(f"    remove {r}")
        lines.append("  }")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _conditionals_source(blocks: list[ir.Conditional], indent: str) -> list[str]:
    """'when COND { … }' blocks as source lines."""
    out = []
    for w in blocks:
        out.append(f"{indent}{source.conditional(w)} {{")
        out += [f"{indent}  {source.constraint(c)}" for c in w.constraints]
        out.append(f"{indent}}}")
    return out


def _src_vendor(v: ir.Variant) -> str:
    text = v.vendor_text or v.vendor
    return text if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", text) else source.quote(text)
