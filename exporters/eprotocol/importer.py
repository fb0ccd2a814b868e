"""Reading e-protocols back: either format into ``ir.Protocol`` values, and a protocol as ``.imtrial`` source."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable, Optional

from imtrial_dsl import ir, source
from imtrial_dsl.diagnostics import Diagnostic, Severity

from . import dicom_dpp, json_io
from .targets import base_with_overridden, conditionals_from, variant_from_header


class Imported:
    """One file read back: the protocol header, its origin-tagged constraints, its variant (if any), the base
    constraints the variant overrides, its 'when' blocks, the study and devices it names, and what the import had
    to say (W612/W613/W620)."""

    def __init__(self, protocol: ir.Protocol, params: list[tuple[ir.Constraint, str]], variant: Optional[dict],
                 notes: list[Diagnostic], whens: Iterable = (), context: Optional[dict] = None):
        variant = dict(variant) if variant is not None else None
        self.overridden = variant.pop("base_overridden", []) if variant is not None else []
        self.protocol, self.params, self.variant, self.notes = protocol, params, variant, notes
        self.whens = conditionals_from(list(whens))
        self.context = context or {}

    @property
    def base(self) -> list[ir.Constraint]:
        """The base constraints: all of a base file; of a variant file, the ones it keeps plus the ones it overrides."""
        return base_with_overridden([c for c, o in self.params if o == "base"], self.overridden)

    def own_variant(self) -> ir.Variant:
        return variant_from_header(self.variant, [c for c, o in self.params if o == "variant"], self.whens.get("variant"))

    def as_protocol(self) -> ir.Protocol:
        variants = [self.own_variant()] if self.variant is not None else []
        return self.protocol.model_copy(update={"constraints": self.base, "conditionals": self.whens.get("base", []),
                                                "variants": variants})


def _read(path: Path | str) -> Imported:
    """Either format, by content (DICOM Part 10 preamble, else JSON). Malformed input -> ValueError."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(132)
    notes: list[Diagnostic] = []
    try:
        got = dicom_dpp.read(path, notes) if head[128:132] == b"DICM" else json_io.read(path, notes)
        protocol, params, variant, whens, context = got
        return Imported(protocol, params, variant, notes, whens, context)
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
            merged.append(i.own_variant())
        out.append(head.protocol.model_copy(update={"constraints": base_constraints, "conditionals": head.whens.get("base", []),
                                                    "variants": merged}))
    return out, notes


def import_document(paths: Iterable[Path | str]) -> tuple[str, list[Diagnostic]]:
    """The ``.imtrial`` text of several e-protocol files, and what the import had to say: a ``study`` block
    (the study the files name), the sites and devices they list (so that site and device variants and scopes
    resolve), then the protocols (:func:`import_report`). The text checks on its own."""
    paths = [Path(p) for p in paths]
    protocols, notes = import_report(paths)
    study, sites = None, {}
    for p in paths:
        ctx = _read(p).context
        study = study or ctx.get("study")
        for e in ctx.get("equipment") or []:
            site = sites.setdefault(e["site"], {"name": e.get("site_name") or e["site"], "devices": {}})
            site["devices"].setdefault(e["device"], e)
    parts = [study_to_source(study)] + [site_to_source(code, s["name"], list(s["devices"].values())) for code, s in sites.items()]
    parts += [protocol_to_source(p) for p in protocols]
    return "\n".join(parts), notes


def study_to_source(study: Optional[dict]) -> str:
    code = (study or {}).get("code") or "IMPORTED"
    code = code if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", code) else (re.sub(r"[^A-Za-z0-9_]", "_", code).lstrip("0123456789") or "IMPORTED")
    title = (study or {}).get("title") or "Imported e-protocols"
    return f"study {code} {source.quote(title)} {{ }}\n"


def site_to_source(code: str, name: str, devices: list[dict]) -> str:
    """A site with the devices an e-protocol lists (identity only: what variants and scopes select on)."""
    lines = [f"site {code} {source.quote(name)} {{"]
    for d in devices:
        lines.append(f"  device {d['device']} {{")
        lines.append("    modality " + ", ".join(d.get("modalities") or [d["modality"]]))
        vendor = d.get("manufacturer") or d["vendor"]
        lines.append(f"    vendor {vendor if re.fullmatch(r'[A-Za-z_][A-Za-z0-9_]*', vendor) else source.quote(vendor)}")
        for key in ("model", "software", "serial", "station"):
            if d.get(key):
                lines.append(f"    {key} {source.quote(d[key])}")
        lines.append("  }")
    lines.append("}")
    return "\n".join(lines) + "\n"


def protocol_to_source(protocol: ir.Protocol) -> str:
    """The protocol in ``.imtrial`` syntax (the style of examples/amyloid_mri.imtrial): everything the IR holds
    (scope, match rules, constraints with paths, private elements and CSA fields, 'when' blocks, variants of
    every layer with their own 'when' blocks and removals)."""
    p = protocol
    head = f"protocol {p.name} modality {p.modality}" + (f" {source.quote(p.title)}" if p.title else "") + " {"
    lines = [head]
    if p.scope is not None and (p.scope.sites or p.scope.devices):
        lines.append("  for " + ", ".join([f"site {x}" for x in p.scope.sites] + [f"device {x}" for x in p.scope.devices]))
    if p.body_part:
        lines.append(f"  body_part {source.quote(p.body_part)}")
    if p.contrast:
        lines.append(f"  contrast {source.quote(p.contrast)}")
    for text in p.preparation:
        lines.append(f"  prepare {source.quote(text)}")
    for note in p.notes:
        lines.append(f"  remark {source.quote(note)}")
    for m in p.match:
        lines.append(f"  match {m.attribute} {_MATCH_OPS[m.op]} {source.quote(m.value)}")
    for c in p.constraints:
        lines.append(f"  {source.constraint(c)}")
    lines += _when_lines(p.conditionals, "  ")
    for v in p.variants:
        if v.site or v.device:
            vh = f"  variant {'site ' + v.site if v.site else 'device ' + str(v.device)}"
        else:
            vh = f"  variant {_src_vendor(v)}"
            if v.model:
                vh += f" model {source.quote(v.model)}"
            if v.software:
                vh += f" software {source.quote(v.software)}"
        lines.append(vh + " {")
        for c in v.constraints:
            lines.append(f"    {source.constraint(c)}")
        lines += _when_lines(v.conditionals, "    ")
        if v.remove:
            lines.append(f"    remove {', '.join(v.remove)}")
        lines.append("  }")
    lines.append("}")
    return "\n".join(lines) + "\n"


_MATCH_OPS = {ir.MatchOp.MATCHES: "~", ir.MatchOp.EQUALS: "=", ir.MatchOp.CONTAINS: "has", ir.MatchOp.NOT_MATCHES: "!~",
              ir.MatchOp.NOT_CONTAINS: "!has"}


def _when_lines(blocks: list[ir.Conditional], indent: str) -> list[str]:
    out = []
    for w in blocks:
        out.append(f"{indent}{source.conditional(w)} {{")
        out += [f"{indent}  {source.constraint(c)}" for c in w.constraints]
        out.append(f"{indent}}}")
    return out


def _src_vendor(v: ir.Variant) -> str:
    text = v.vendor_text or v.vendor
    return text if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", text) else source.quote(text)
