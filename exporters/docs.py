"""Imaging documentation exporter: Imaging Charter and Site Imaging Manual (Markdown, HTML, PDF).

A pure function of the checked IR and the dependency graph. Wording lives in the
jinja2 templates under ``templates/docs/``; this module turns IR values into
reviewer-readable phrases ("2 – 3.5 ms", "day 346 to day 388") so that the
templates stay declarative. Markdown is the single source of each document: the
HTML is that Markdown rendered (markdown-it) inside a print layout, and the PDF is
the HTML rendered by WeasyPrint. Outputs carry the study version and the sha256
of the study source, and no timestamps, so they are reproducible byte for byte
(Markdown, HTML, SVG and PDF) and golden-testable.
"""
from __future__ import annotations

import html
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import jinja2

from imtrial_dsl import __version__, extras, ir, source, templating
from imtrial_dsl.diagnostics import ImtrialError
from imtrial_dsl.files import atomic_write_bytes, atomic_write_text
from imtrial_dsl.deid.plan import keeps_identity
from imtrial_dsl.secrets import subprocess_env

TEMPLATES = Path(__file__).resolve().parent / "templates" / "docs"

DOCUMENTS = {
    "charter": "Imaging Charter",
    "site_manual": "Site Imaging Manual",
}

GRAPH_FILE = "graph.svg"
# The charter prints the per-exam pipeline and the study tasks as two pictures (each readable on its page).
GRAPH_PARTS = (("pipeline", "graph_pipeline.svg", "Processing pipeline (per examination, and over the study)"),
               ("tasks", "graph_tasks.svg", "Study tasks (qualification, visit tracking)"))
LANDSCAPE_RATIO = 1.0   # a picture wider than this (width / height) gets a landscape page


# --------------------------------------------------------------------------- text helpers

_MD_SPECIAL = re.compile(r"([\\`*\[\]<>|#])")


def md(text: Any) -> str:
    """Escape free text for inline Markdown (titles, descriptions, instructions)."""
    if text is None:
        return ""
    s = _MD_SPECIAL.sub(r"\\\1", str(text))
    # '_' starts emphasis only at a word boundary; escape just those so snake_case stays readable
    s = re.sub(r"(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])", r"\\_", s)
    return s.replace("\n", " ")


def code(text: Any) -> str:
    """An inline code span that survives backticks (pipes inside tables: see :func:`_escape_table_pipes`)."""
    s = str(text).replace("\n", " ")
    fence = "``" if "`" in s else "`"
    pad = " " if s.startswith("`") or s.endswith("`") else ""
    return f"{fence}{pad}{s}{pad}{fence}"


def num(v: float) -> str:
    return f"{v:g}"


def plural(n: float, word: str) -> str:
    return f"{num(n)} {word}" + ("" if abs(n) == 1 else "s")


def join_words(items: Iterable[str], last: str = "and") -> str:
    items = [i for i in items if i]
    if not items:
        return ""
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + f" {last} " + items[-1]


_ROLE_WORDS = {"imaging_pi": "imaging PI", "pi": "PI", "central": "the central team"}


def role_words(name: str) -> str:
    """A contact role as a person reads it: 'imaging_pi' -> 'imaging PI'."""
    return _ROLE_WORDS.get(name, name.replace("_", " "))


def slug(text: str) -> str:
    """GitHub-style heading anchor, also used as the HTML heading id."""
    s = re.sub(r"[`*_\\]", "", text.strip().lower())
    s = re.sub(r"[^\w\- ]", "", s)
    return s.replace(" ", "-")


# --------------------------------------------------------------------------- IR -> phrases

def attribute_label(keyword: str) -> str:
    """'RepetitionTime' -> 'Repetition Time (0018,0080)'; unknown keywords kept as written."""
    from pydicom.datadict import dictionary_description, tag_for_keyword

    tag = tag_for_keyword(keyword)
    if tag is None:
        return keyword
    return f"{dictionary_description(tag)} ({tag >> 16:04X},{tag & 0xFFFF:04X})"


# The requirement column: the shared constraint renderer's document style, text values as code spans.
REQUIREMENT = replace(source.DOCUMENT, quote=code)


def requirement_text(c: ir.Constraint) -> str:
    """The constraint as a reviewer reads it (Markdown)."""
    return source.rhs(c, REQUIREMENT)


def tolerance_text(c: ir.Constraint) -> str:
    if c.tolerance is None:
        return "exact" if c.kind == ir.ConstraintKind.EQUAL and any(isinstance(v, ir.Quantity) for v in c.values) else "—"
    return f"± {source.tolerance_amount(c)}"


def parameter_label(c: ir.Constraint) -> str:
    label = attribute_label(c.keyword)
    if c.index is not None:
        label += f", value {c.index + 1}"
    return label


def constraint_row(c: ir.Constraint, origin: str = "") -> dict:
    return {
        "keyword": source.parameter(c),
        "label": parameter_label(c),
        "requirement": requirement_text(c),
        "tolerance": tolerance_text(c),
        "accepted": source.accepted_interval(c, written=True),
        "significance": c.significance.value,
        "modifiable": "yes" if c.modifiable else "no",
        "origin": origin,
        "note": c.note or "",
    }


_MATCH_WORDS = {
    ir.MatchOp.MATCHES: "matches the regular expression",
    ir.MatchOp.EQUALS: "is exactly",
    ir.MatchOp.CONTAINS: "contains the value",
    ir.MatchOp.NOT_MATCHES: "does not match the regular expression",
}


def match_text(m: ir.MatchRule) -> str:
    return f"{attribute_label(m.attribute)} {_MATCH_WORDS.get(m.op, m.op.value)} {code(m.value)}"


def variant_label(v: Optional[ir.Variant]) -> str:
    if v is None:
        return "base protocol"
    parts = [v.vendor]
    if v.model:
        parts.append(f"model {v.model}")
    parts.append(f"software {v.software}" if v.software else "all software versions")
    return ", ".join(parts)


def device_label(d: ir.Device) -> str:
    bits = [d.vendor_text or d.vendor, d.model or ""]
    if d.software:
        bits.append(f"software {d.software}")
    return " ".join(b for b in bits if b)


# ---------------------------------------------------------------------------- schedule

def day_text(d: Optional[ir.Days]) -> str:
    if d is None:
        return ""
    unit = d.source_unit.rstrip("s") if d.source_unit else "day"
    unit = {"d": "day", "w": "week", "wk": "week", "mo": "month", "y": "year"}.get(unit, unit)
    if unit == "day":
        return f"day {num(d.days)}"
    return f"{unit} {num(d.source_value)} (day {num(d.days)})"


def duration_text(d: Optional[ir.Days]) -> str:
    if d is None:
        return ""
    unit = d.source_unit.rstrip("s") if d.source_unit else "day"
    unit = {"d": "day", "w": "week", "wk": "week", "mo": "month", "y": "year"}.get(unit, unit)
    return plural(abs(d.source_value), unit)


def window_text(v: ir.Visit) -> tuple[str, str]:
    """('-14 / +28 days', 'day 346 to day 388')."""
    before = v.window_before.days if v.window_before else 0.0
    after = v.window_after.days if v.window_after else 0.0
    if not v.window_before and not v.window_after:
        return "on the target day", f"day {num(v.offset.days)}"
    rel = f"-{num(abs(before))} / +{num(abs(after))} days"
    return rel, f"day {num(v.offset.days - abs(before))} to day {num(v.offset.days + abs(after))}"


# ---------------------------------------------------------------------------- de-identification

ACTION_MEANING = {
    "D": "replaced with a non-identifying dummy value",
    "Z": "replaced with an empty (zero-length) or dummy value",
    "X": "removed",
    "K": "kept",
    "C": "cleaned: identifying text removed, the rest kept",
    "U": "replaced with a new UID, consistently within the study",
}

OPTION_TEXT = {
    "retain_longitudinal_full_dates": "Dates and times are kept unchanged.",
    "retain_longitudinal_modified_dates": "Dates and times are kept but shifted (see below), so intervals between a subject's examinations are preserved.",
    "retain_patient_characteristics": "Physical characteristics that do not identify a person on their own (sex, age, size, weight and similar) are kept.",
    "retain_device_identity": "Scanner identity (manufacturer, model, serial number, station name, software versions) is kept, so protocol adherence per scanner and site qualification can be verified centrally.",
    "retain_institution_identity": "The name and address of the imaging institution are kept.",
    "retain_uids": "Original UIDs are kept.",
    "retain_safe_private": "Private attributes known to be free of identifying information are kept; other private attributes are removed.",
    "clean_descriptors": "Free-text descriptions (study, series and protocol descriptions, comments) are cleaned of identifying text instead of being removed, because they carry protocol information.",
    "clean_structured_content": "Structured reports and other structured content are cleaned of identifying content.",
    "clean_graphics": "Graphic annotations and overlays are cleaned of identifying text.",
    "clean_pixel_data": "Identifying text burned into the pixel data is blanked.",
    "clean_recognizable_visual_features": "Recognizable visual features (for example the face in head scans) are removed or obscured.",
}

OPTION_TITLE = {
    "retain_longitudinal_full_dates": "Retain Longitudinal Temporal Information with Full Dates Option",
    "retain_longitudinal_modified_dates": "Retain Longitudinal Temporal Information with Modified Dates Option",
    "retain_patient_characteristics": "Retain Patient Characteristics Option",
    "retain_device_identity": "Retain Device Identity Option",
    "retain_institution_identity": "Retain Institution Identity Option",
    "retain_uids": "Retain UIDs Option",
    "retain_safe_private": "Retain Safe Private Option",
    "clean_descriptors": "Clean Descriptors Option",
    "clean_structured_content": "Clean Structured Content Option",
    "clean_graphics": "Clean Graphics Option",
    "clean_pixel_data": "Clean Pixel Data Option",
    "clean_recognizable_visual_features": "Clean Recognizable Visual Features Option",
}


def key_text(k: Optional[ir.KeySource]) -> str:
    if k is None:
        return "not configured"
    if k.kind == "env":
        return f"read at run time from the environment variable {code(k.ref)}"
    return f"read at run time from the file {code(k.ref)}"


def override_text(o: ir.DeidOverride) -> str:
    a = code(o.attribute)
    if o.action == "keep":
        return f"{a} is kept unchanged."
    if o.action == "remove":
        return f"{a} is removed."
    if o.action == "empty":
        return f"{a} is kept as an empty value."
    if o.action == "replace":
        return f"{a} is replaced with {code(o.value or '')}."
    if o.action == "hash":
        return f"{a} is replaced with a keyed hash of its value (the same input always gives the same output)."
    return f"{a}: {o.action}."


def date_sentence(d: ir.Deidentify) -> str:
    opts = {o.value for o in d.options}
    if "retain_longitudinal_full_dates" in opts:
        return "Dates and times are kept unchanged (full dates retained)."
    if "retain_longitudinal_modified_dates" in opts:
        if d.date_shift_min is not None and d.date_shift_max is not None:
            lo, hi = d.date_shift_min.days, d.date_shift_max.days
            if hi <= 0:
                span = f"between {plural(abs(hi), 'day')} and {plural(abs(lo), 'day')} into the past"
            elif lo >= 0:
                span = f"between {plural(lo, 'day')} and {plural(hi, 'day')} into the future"
            else:
                span = f"between {plural(abs(lo), 'day')} back and {plural(hi, 'day')} forward"
            return ("Dates are shifted by a per-subject offset " + span + ". The offset is derived from the study key and "
                    "the subject, so every date of one subject moves by the same amount and intervals between visits are "
                    "preserved, while different subjects get different offsets.")
        return ("Dates are shifted by a per-subject offset derived from the study key, so intervals between a subject's "
                "visits are preserved.")
    return "Dates and times are removed or replaced as the profile's action codes say; intervals between visits are not kept in the images."


def uid_sentence(d: ir.Deidentify) -> str:
    if any(o.value == "retain_uids" for o in d.options):
        return "UIDs are kept as acquired."
    return ("Every UID is replaced by a new UID computed from the original with the study key, so the same original UID "
            "always becomes the same new UID and references between images, series and studies stay consistent.")


def key_uses(d: ir.Deidentify) -> list[str]:
    """What the study key is used for under these options (for the sentence about the key)."""
    opts = {o.value for o in d.options}
    uses = []
    if "retain_longitudinal_modified_dates" in opts:
        uses.append("per-subject date shifts")
    if "retain_uids" not in opts:
        uses.append("UID replacement")
    if any(o.action == "hash" for o in d.overrides):
        uses.append("keyed hashes of attribute values")
    return uses


def action_summary(profile: Optional[ir.DeidProfile]) -> list[dict]:
    if profile is None:
        return []
    counts: dict[str, int] = {}
    for r in profile.rules:
        counts[r.action] = counts.get(r.action, 0) + 1
    order = ["X", "Z", "D", "U", "C", "K"]
    rows = []
    for action in sorted(counts, key=lambda a: (order.index(a) if a in order else len(order), a)):
        parts = [p.rstrip("*") for p in action.split("/")]
        if len(parts) == 1:
            meaning = ACTION_MEANING.get(parts[0], action)
        else:
            meaning = ("depending on the attribute's type in the object: "
                       + join_words([ACTION_MEANING.get(p, p) for p in parts], "or"))
        rows.append({"action": action, "meaning": meaning, "count": counts[action]})
    return rows


# ---------------------------------------------------------------------------- QC

_QC_WORDS = {
    ("snr", "min"): "signal-to-noise ratio at least {v}",
    ("ghosting", "max"): "ghosting ratio (ghost signal over object signal) at most {v}",
    ("clipping", "max_fraction"): "fraction of clipped (saturated) pixels at most {v}",
    ("dynamic_range", "min"): "dynamic range at least {v}",
    ("slice_spacing", "tolerance"): "slice positions evenly spaced, every gap within ± {v} of the nominal spacing",
    ("missing_slices", "max"): "at most {v} missing slices",
    ("noise", "max"): "image noise (standard deviation in a uniform region) at most {v}",
}


def qc_text(q: ir.QcCheck) -> str:
    phrases = []
    for name, value in q.params.items():
        tmpl = _QC_WORDS.get((q.metric, name))
        v = source.value(value, str)
        phrases.append(tmpl.format(v=v) if tmpl else f"{name} = {v}")
    if q.metric == "missing_slices" and all(source.value(v, str) == "0" for v in q.params.values()):
        return "no missing slices"
    return join_words(phrases) or q.metric


def qc_targets(q: ir.QcCheck) -> str:
    if q.targets:
        return ", ".join(code(t.name) for t in q.targets)
    if q.modality:
        return f"every {q.modality} protocol"
    return "—"


# ---------------------------------------------------------------------------- view model

@dataclass
class Doc:
    """The values the templates read; built once per export."""

    trial: ir.Trial
    study: dict
    sites: list = field(default_factory=list)
    devices: list = field(default_factory=list)
    contacts: list = field(default_factory=list)
    protocols: list = field(default_factory=list)
    device_cards: list = field(default_factory=list)
    schedule: Optional[dict] = None
    deid: Optional[dict] = None
    identifiers: Optional[dict] = None
    qc: list = field(default_factory=list)
    analyses: list = field(default_factory=list)
    endpoints: list = field(default_factory=list)
    transfers: list = field(default_factory=list)
    archive: Optional[dict] = None
    roles: list = field(default_factory=list)
    reports: list = field(default_factory=list)
    qualification: Optional[dict] = None
    graph: Optional[dict] = None
    modalities: list = field(default_factory=list)
    reads: list = field(default_factory=list)
    appendix_c: dict = field(default_factory=dict)


def _study(trial: ir.Trial) -> dict:
    s = trial.study
    source_name = Path(trial.source_file).name if trial.source_file else "(unsaved)"
    return {
        "code": s.code if s else "UNNAMED",
        "title": s.title if s else "Untitled study",
        "registry": s.registry if s else None,
        "sponsor": s.sponsor if s else None,
        "version": (s.version if s and s.version else "unversioned"),
        "phase": s.phase if s else None,
        "description": s.description if s else "",
        "hypothesis": s.hypothesis if s else "",
        "aims": list(s.aims) if s else [],
        "arms": list(s.arms) if s else [],
        "source": source_name,
        "sha256": trial.source_sha256 or "not recorded",
        "sha_short": (trial.source_sha256 or "")[:12] or "n/a",
        "ir_version": trial.ir_version,
        "tool_version": __version__,
        **_document_control(trial),
    }


def _document_control(trial: ir.Trial) -> dict:
    """Effective date, version history and approvers, from the study's version and its changelog."""
    log = trial.changelog
    version = trial.study.version if trial.study else None
    entries = [{"version": e.version, "date": e.date, "description": e.description} for e in (log.entries if log else [])]
    current = next((e for e in entries if e["version"] == version), None)
    if current is not None:
        effective = current["date"]
    elif version:
        effective = f"not recorded (the changelog has no entry for version {version})"
    else:
        effective = "not recorded (the study has no version)"
    approvers = [{"title": a.title, "name": a.name or ""} for a in (log.approvers if log else [])]
    return {"effective": effective, "history": entries, "approvers": approvers}


def _protocol_view(trial: ir.Trial, p: ir.Protocol) -> dict:
    variants = []
    base_on, on_variant = trial.variant_devices(p)
    for v, v_devices in zip(p.variants, on_variant):
        base = {c.keyword: c for c in p.constraints}
        changes = []
        for c in v.constraints:
            row = constraint_row(c, "variant")
            old = base.get(c.keyword)
            row["base"] = (requirement_text(old) + (f" ({tolerance_text(old)})" if old.tolerance else "")) if old else "not constrained"
            changes.append(row)
        removed = [{"keyword": k, "label": attribute_label(k),
                    "base": requirement_text(base[k]) if k in base else "not constrained"} for k in v.remove]
        devices = [f"{d.id} ({site.code})" for site, d in v_devices]
        variants.append({"label": variant_label(v), "changes": changes, "removed": removed, "devices": devices})
    base_devices = [f"{d.id} ({site.code})" for site, d in base_on]
    return {
        "name": p.name,
        "title": p.title,
        "modality": p.modality,
        "body_part": p.body_part,
        "contrast": p.contrast,
        "preparation": list(p.preparation),
        "notes": list(p.notes),
        "match": [match_text(m) for m in p.match],
        "rows": [constraint_row(c, "base") for c in p.constraints],
        "variants": variants,
        "base_devices": base_devices,
        "qc": [q.name for q in trial.qc_for(p)],
        "anchor": slug(f"{p.name}"),
    }


def _device_cards(trial: ir.Trial) -> list[dict]:
    """Per site and device: the effective parameters of every protocol the device may acquire."""
    cards = []
    for site in trial.sites:
        devs = []
        for d in site.devices:
            protos = []
            for p in trial.protocols:
                if not d.acquires(p.modality):
                    continue
                eff, chosen = ir.effective_constraints(p, d.vendor, d.software, d.model)
                variant_kws = {c.keyword for c in chosen.constraints} if chosen else set()
                protos.append({
                    "name": p.name,
                    "title": p.title,
                    "variant": variant_label(chosen),
                    "match": [match_text(m) for m in p.match],
                    "rows": [constraint_row(c, "variant" if c.keyword in variant_kws else "base") for c in eff],
                })
            devs.append({"device": d, "label": device_label(d), "protocols": protos})
        cards.append({"site": site, "devices": devs})
    return cards


def _schedule(trial: ir.Trial) -> Optional[dict]:
    s = trial.schedule
    if s is None:
        return None
    visits = []
    for v in s.visits:
        rel, absolute = window_text(v)
        target = day_text(v.offset)
        if not v.scheduled():  # an event-driven visit: its window counts from the event, not from baseline
            target = f"on the event: {v.event}"
            absolute = f"day 0 to day {num(v.window_after.days if v.window_after else 0.0)} after the event"
        visits.append({
            "name": v.name, "kind": v.kind, "target": target, "window": rel, "days": absolute,
            "acquire": [a.name for a in v.acquire], "optional": v.optional,
            # what the visit needs of each protocol beyond one series: 'optional', 'at least 2 series'
            "acquire_notes": {a.name: ", ".join(x for x in ("optional" if a.optional else "",
                                                             f"at least {a.at_least} series" if a.at_least > 1 else "") if x)
                              for a in v.acquire},
        })
    protos = [p.name for p in trial.protocols]
    acquired = {a for v in s.visits for a in (x.name for x in v.acquire)}
    matrix = [{"protocol": p, "cells": ["●" if p in [a.name for a in v.acquire] else "" for v in s.visits]}
              for p in protos if p in acquired]
    r = s.reminders
    reminders = []
    if r is not None:
        if r.before_open is not None:
            who = join_words([role_words(x) for x in r.notify]) or "the site"
            reminders.append(f"A reminder is sent {duration_text(r.before_open)} before each visit window opens to: {who}.")
        if r.on_open:
            reminders.append("A notice is sent when a visit window opens.")
        if r.overdue_after is not None:
            who = join_words([role_words(x) for x in r.escalate_to]) or "the central team"
            when = ("when the window closes" if r.overdue_after.days == 0
                    else f"{duration_text(r.overdue_after)} after the window closes")
            reminders.append(f"If no examination has been received {when}, the visit is escalated to: {who}.")
    same = {
        "required": "Every imaging visit of a subject must be performed on the same scanner as the subject's first "
                    "examination. An examination on another scanner is flagged as a protocol deviation.",
        "preferred": "Every imaging visit of a subject should be performed on the same scanner as the subject's first "
                     "examination. An examination on another scanner is accepted but reported.",
        "none": "",
    }[s.same_device]
    return {"visits": visits, "matrix": matrix, "matrix_header": [v.name for v in s.visits],
            "same_device": same, "same_device_rule": s.same_device, "reminders": reminders}


def _deid(trial: ir.Trial) -> Optional[dict]:
    d = trial.deidentify
    if d is None:
        return None
    profile = trial.profile(d.profile.name)
    options = [{"name": o.value, "title": OPTION_TITLE.get(o.value, o.value), "text": OPTION_TEXT.get(o.value, "")}
               for o in d.options]
    regions = []
    for r in d.pixel_regions:
        sel = join_words([x for x in (r.modality, r.vendor, r.model,
                                      f"{r.columns}×{r.rows} images" if r.rows and r.columns else None) if x]) or "all images"
        regions.append(f"Rectangle ({r.x0}, {r.y0}) – ({r.x1}, {r.y1}) is blanked in {sel}.")
    return {
        "profile": d.profile.name,
        "profile_title": profile.title if profile else "",
        "profile_code": profile.code if profile else None,
        "rule_count": len(profile.rules) if profile else 0,
        "actions": action_summary(profile),
        "options": options,
        "dates": date_sentence(d),
        "uids": uid_sentence(d),
        "overrides": [override_text(o) for o in d.overrides],
        "regions": regions,
        "key": key_text(d.key),
        "key_uses": join_words(key_uses(d)),
        "quarantine_burned_in": d.quarantine_burned_in,
        "identity_kept": keeps_identity(trial),
        "identified_destinations": [t.name for t in trial.transfers if t.identified],
    }


def _identifiers(trial: ir.Trial) -> Optional[dict]:
    i = trial.identifiers
    if i is None:
        return None
    check = {"luhn": "a Luhn check digit", "mod11": "an ISO 7064 MOD 11-2 style check character",
             "mod97": "an ISO 7064 MOD 97-10 check number", "iso7064": "an ISO 7064 check character"}
    d = trial.deidentify
    if i.key is not None:
        registry = f"The registry stores source identifiers as keyed hashes (HMAC-SHA256); the key is {key_text(i.key)}."
    elif d is not None and d.key is not None:
        registry = ("The registry stores source identifiers as keyed hashes (HMAC-SHA256) under a key derived from the "
                    "study key.")
    else:
        registry = "The study names no key: the registry stores source identifiers as they are."
    if i.reidentification_log:
        registry += (" The study keeps a re-identification log: the original identifiers and UIDs beside their research "
                     "identifiers and pseudonyms, in the site's registry (the workdir's state database) only, for site "
                     "staff authorized to act on findings; it never leaves the site and can be purged.")
    else:
        registry += (" No re-identification log is kept: going from an identifier to a subject takes the site's "
                     "registry and the key.")
    return {
        "format": i.subject_format,
        "check_digit": check.get(i.check_digit or "", None),
        "source": list(i.source),
        "issuer": i.issuer,
        "key": key_text(i.key),
        "registry": registry,
    }


def _analyses(trial: ir.Trial) -> list[dict]:
    out = []
    for a in trial.analyses:
        inputs = []
        for i in a.inputs:
            src = f"series of protocol {code(i.protocol.name)}" if i.protocol else (
                f"output {code(i.analysis_output.name)}" if i.analysis_output else "—")
            inputs.append({"name": i.name, "source": src})
        out.append({
            "name": a.name, "description": a.description,
            "inputs": inputs, "outputs": [{"name": o.name, "kind": o.kind} for o in a.outputs],
            "command": " ".join(a.command),
            "measurements": [{"name": m.name, "unit": m.unit or "—", "description": m.description} for m in a.measurements],
            "timeout": a.timeout.text() if a.timeout else None,
        })
    return out


# ---------------------------------------------------------------------------- reads (image interpretation)

_READ_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}


def _count(n: int, word: str) -> str:
    return f"{_READ_WORDS.get(n, str(n))} {word}" + ("" if n == 1 else "s")


def _reads(trial: ir.Trial) -> list[dict]:
    from imtrial_dsl.reading import BLINDING, CRITERIA, PARADIGMS, TRIGGERS, VARIABILITY

    visits = [v for v in trial.schedule.visits] if trial.schedule else []
    out = []
    for r in trial.reads:
        names = {p.name for p in r.protocols}
        if r.timepoints:
            points = [t.name for t in r.timepoints]
        else:
            points = [v.name for v in visits if names & {a.name for a in v.acquire}]
        par = PARADIGMS.get(r.paradigm)
        crit = CRITERIA.get(r.criteria)
        if r.criteria == "custom":
            criteria = f"{r.criteria_name} (study-specific criteria)"
        elif crit is not None:
            criteria = crit.title + (f" ({r.criteria_name})" if r.criteria_name else "")
        else:
            criteria = ""
        var = None
        if r.variability is not None:
            v = r.variability
            what, direction = VARIABILITY.get(v.metric, (v.metric, "min"))
            bound = {">=": "at least", ">": "above", "<=": "at most", "<": "below"}[v.op]
            var = {"metric": v.metric, "what": what, "text": f"{what} {bound} {num(v.threshold)}", "action": v.action}
        readers = _count(r.readers, "reader") + (f" and {_count(r.adjudicators, 'adjudicator')}" if r.adjudicators else "")
        out.append({
            "name": r.name, "title": r.title, "protocols": [p.name for p in r.protocols], "timepoints": points,
            "readers": readers, "n_readers": r.readers, "adjudicators": r.adjudicators,
            "paradigm": r.paradigm, "paradigm_text": par.text if par else r.paradigm,
            "adjudicated": bool(par and par.adjudicators),
            "triggers": [TRIGGERS.get(t, t) for t in r.adjudicate_on], "adjudication_rule": r.adjudication_rule,
            "criteria": criteria, "criteria_reference": crit.reference if crit is not None else "",
            "qualification": r.qualification, "training": r.training,
            "blinded": [BLINDING.get(b, b) for b in r.blinded_to],
            "display": r.display, "windows": [{"name": w.name, "level": num(w.level), "width": num(w.width)} for w in r.windows],
            "unevaluable": r.unevaluable, "variability": var, "lock": r.lock,
        })
    return out


# ---------------------------------------------------------------------------- Appendix C

SECTIONS = {
    1: "1. Protocol Synopsis", 2: "2. Imaging Modalities and Acquisition Protocols", 3: "3. Site and Equipment Qualification",
    4: "4. Participant Preparation", 5: "5. Schedule of Activities", 6: "6. De-identification and Research Identifiers",
    7: "7. Image Transfer", 8: "8. Image Quality Control", 9: "9. Image Analysis and Measurements",
    10: "10. Image Interpretation", 11: "11. Blinding, Roles and Reports", 12: "12. Image Archive and Audit Trail",
    13: "13. Data Lock and Charter Amendments", 14: "14. Image Processing Workflow",
}


def section_link(n: int, sub: str = "") -> str:
    title = SECTIONS[n]
    return f"[{title}](#{slug(title)})" + (f" ({sub})" if sub else "")


def _read_topic(doc: Doc, field: str, label: str, why_none: str) -> str:
    """Where a read topic is answered: §10 when every read states it, else which reads do not."""
    if not doc.reads:
        return "not applicable because the study description defines no read (image interpretation)"
    missing = [r["name"] for r in doc.reads if not r[field]]
    if not missing:
        return section_link(10, label)
    if len(missing) == len(doc.reads):
        return f"not applicable because {why_none}"
    return section_link(10, label) + "; not stated for " + ", ".join(code(m) for m in missing)


def appendix_c(doc: Doc) -> dict:
    """Every FDA guidance topic and ICH M11 heading with where this charter answers it, or why not."""
    reads = doc.reads
    single = reads and all(r["n_readers"] == 1 for r in reads)
    fda = [
        ("Choice of imaging modality", section_link(2) if doc.protocols else "not applicable because the study defines no protocol"),
        ("Centralized image interpretation", section_link(10) if reads else
         "not applicable because the study description defines no read; images are assessed by the analyses of section 9"),
        ("Imaging site and equipment qualification", section_link(3)),
        ("Subject preparation for imaging", section_link(4)),
        ("Image acquisition protocols and device settings", section_link(2)),
        ("Timing of image acquisition", section_link(5) if doc.schedule else "not applicable because the study has no visit schedule"),
        ("Image data privacy and participant identification", section_link(6)),
        ("Image transfer to the central imaging facility", section_link(7)),
        ("Image quality control and protocol compliance", section_link(8)),
        ("Image analysis and endpoint measurement", section_link(9)),
        ("Reader qualification and training", _read_topic(doc, "qualification", "qualification and training",
                                                            "no read states the readers' qualification")),
        ("Read paradigm and number of readers", section_link(10, "paradigm") if reads else
         "not applicable because the study description defines no read"),
        ("Adjudication", ("not applicable because every read has a single reader" if single else
                          _read_topic(doc, "adjudicated", "adjudication",
                                      "no read uses an adjudicated paradigm (consensus or majority reads need none)"))),
        ("Reader-variability monitoring", ("not applicable because every read has a single reader" if single else
                                           _read_topic(doc, "variability", "reader variability",
                                                       "no read monitors reader variability"))),
        ("Image display conditions", _read_topic(doc, "display", "display", "no read states display conditions")),
        ("Response criteria", _read_topic(doc, "criteria", "response criteria", "no read names response criteria")),
        ("Handling of unevaluable images", _read_topic(doc, "unevaluable", "unevaluable images",
                                                       "no read states how unevaluable images are handled")),
        ("Blinding of image readers", section_link(10, "blinding") + "; " + section_link(11) if reads else section_link(11)),
        ("Image archiving, data integrity and audit trail", section_link(12)),
        ("Image data lock", section_link(13, "data lock")),
        ("Charter amendment control", section_link(13, "amendments") + "; version history in the document control"),
        ("Imaging process flow from acquisition to endpoint", section_link(14)),
    ]
    protocol_only = "not applicable because the study protocol covers it; this charter covers the imaging process only"
    m11 = [
        ("1.1 Protocol Synopsis", section_link(1)),
        ("1.2 Trial Schema", protocol_only),
        ("1.3 Schedule of Activities", section_link(5) if doc.schedule else "not applicable because the study has no visit schedule"),
        ("2.1 Purpose of Trial", section_link(1, "1.1")),
        ("2.2 Assessment of Risks and Benefits", protocol_only),
        ("3 Trial Objectives and Associated Estimands", section_link(1, "1.2; imaging endpoints only")),
        ("4 Trial Design", section_link(1, "1.3 Overall Design; imaging design only")),
        ("5 Trial Population", protocol_only),
        ("6 Trial Intervention and Concomitant Therapy", protocol_only + " (the arms are named in 1.3)"),
        ("7 Participant Discontinuation of Trial Intervention and Discontinuation or Withdrawal from Trial", protocol_only),
        ("8 Trial Assessments and Procedures", ", ".join(section_link(n) for n in (2, 4, 8, 9)) +
         (", " + section_link(10) if reads else "")),
        ("9 Adverse Events, Serious Adverse Events, Product Complaints, Pregnancy and Postpartum Information", protocol_only),
        ("10 Statistical Considerations", "not applicable because the statistical analysis plan covers it; the imaging "
                                          "measurements it uses are defined in section 9"),
        ("11 Trial Oversight and Other General Considerations", ", ".join(section_link(n) for n in (6, 12, 13))),
        ("12.3 Prior Protocol Amendment(s)", "version history in the document control; " + section_link(13, "amendments")),
    ]
    return {"fda": [{"topic": t, "where": w} for t, w in fda], "m11": [{"heading": h, "where": w} for h, w in m11]}


def _transfer_text(d: ir.Destination) -> str:
    if d.kind == "dicomweb":
        s = f"DICOMweb (STOW-RS) to {code(d.url or '?')}"
    elif d.kind == "dicom":
        s = f"DICOM C-STORE to AE title {code(d.ae_title or '?')} at {code(f'{d.host}:{d.port}')}"
    else:
        s = f"copied into the folder {code(d.path or '?')}"
    if d.relay:
        s += f", relayed through {code(d.relay.name)}"
    if d.auth:
        s += f"; credentials {key_text(d.auth)}"
    return s


def _roles(trial: ir.Trial) -> list[dict]:
    kinds = {
        "central": "Central imaging team (core lab)", "site": "Site imaging staff", "reader": "Image reader",
        "sponsor": "Sponsor", "monitor": "Monitor", "statistician": "Statistician",
    }
    return [{
        "name": r.name, "kind": kinds.get(r.kind, r.kind),
        "scope": "own site only" if r.scope == "own" else "all sites",
        "blinded": "yes" if r.blinded else "no",
        "hide": ", ".join(r.hide) if r.hide else "—",
    } for r in trial.roles]


def _reports(trial: ir.Trial) -> list[dict]:
    role_kind = {x.name: x.kind for x in trial.roles}
    rows = []
    for r in trial.reports:
        aud = []
        for a in r.audience:
            aud.append(a.role.name + (" (own site)" if a.scope == "own" else ""))
        site_kind = any(role_kind.get(a.role.name) == "site" for a in r.audience)
        rows.append({"name": r.name, "kind": r.kind, "audience": ", ".join(aud) or "—", "to_sites": site_kind,
                     "every": f"every {duration_text(r.every)}" if r.every else "on demand",
                     "sections": ", ".join(r.sections) or "—"})
    return rows


def _qualification(trial: ir.Trial) -> Optional[dict]:
    q = trial.qualification
    if q is None:
        return None
    names = [p.name for p in q.protocols]
    rows = []
    for site, d in trial.devices():
        needed = [n for n in names if (trial.protocol(n) and d.acquires(trial.protocol(n).modality))]
        irb = site.irb.status.replace("_", " ") if site.irb else "not recorded"
        rows.append({"site": site.code, "device": d.id, "modality": "/".join(d.all_modalities()), "label": device_label(d),
                     "protocols": ", ".join(needed) if needed else "none required", "irb": irb})
    return {"protocols": names, "phantom": q.phantom, "requalify": q.requalify_on_upgrade, "devices": rows}


def _endpoints(trial: ir.Trial) -> list[dict]:
    if trial.study is None:
        return []
    return [{"name": e.name, "kind": e.kind, "description": e.description,
             "source": e.measurement.name if e.measurement else "—"} for e in trial.study.endpoints]


def _graph_view(graph) -> Optional[dict]:
    """Steps of the dependency graph in a stable topological order, plus the SVG picture."""
    if graph is None:
        return None
    import networkx as nx

    from imtrial_dsl.graph import drawn

    shown = drawn(graph)   # "runs after" names the steps right before, not everything upstream
    order = list(nx.lexicographical_topological_sort(graph, key=str))
    steps = []
    for n in order:
        a = graph.nodes[n]
        preds = sorted(str(p) for p in shown.predecessors(n))
        steps.append({"id": str(n), "label": a.get("label", str(n)), "kind": a.get("kind", ""),
                      "scope": a.get("scope", ""), "after": ", ".join(preds) or "—"})
    return {"steps": steps}


def build(trial: ir.Trial, graph=None) -> Doc:
    """The view model of both documents."""
    doc = Doc(trial=trial, study=_study(trial))
    doc.sites = trial.sites
    doc.devices = [{"site": s, "device": d, "label": device_label(d)} for s, d in trial.devices()]
    doc.contacts = [{"site": s.code, "contact": c} for s in trial.sites for c in s.contacts]
    doc.protocols = [_protocol_view(trial, p) for p in trial.protocols]
    doc.device_cards = _device_cards(trial)
    doc.schedule = _schedule(trial)
    doc.deid = _deid(trial)
    doc.identifiers = _identifiers(trial)
    # a modality-wide check (stdlib) with no protocol of that modality in the study does not apply
    doc.qc = [{"name": q.name, "targets": qc_targets(q), "metric": q.metric, "criterion": qc_text(q),
               "severity": q.severity.value} for q in trial.qc if any(q in trial.qc_for(p) for p in trial.protocols)]
    doc.analyses = _analyses(trial)
    doc.endpoints = _endpoints(trial)
    doc.transfers = [{"name": d.name, "text": _transfer_text(d)} for d in trial.transfers]
    a = trial.archive
    doc.archive = None if a is None else {
        "path": a.path, "hash": a.hash, "retention": duration_text(a.retention) if a.retention else None,
        "keep_originals": a.keep_originals,
    }
    doc.roles = _roles(trial)
    doc.reports = _reports(trial)
    doc.qualification = _qualification(trial)
    doc.graph = _graph_view(graph)
    doc.modalities = sorted({p.modality for p in trial.protocols} | {m for _, d in trial.devices() for m in d.all_modalities()})
    doc.reads = _reads(trial)
    doc.appendix_c = appendix_c(doc)
    return doc


# ---------------------------------------------------------------------------- rendering

def _env() -> jinja2.Environment:
    # Markdown templates are not autoescaped: escaping is explicit through the md/code filters
    return templating.environment(TEMPLATES, strict=True, filters=dict(md=md, code=code, slug=slug, role_words=role_words))


_CODE_SPAN = re.compile(r"(?<![\\`])(`+)(.+?)(?<!`)\1(?!`)")


def _escape_table_pipes(markdown: str) -> str:
    """In table rows a '|' inside a code span must be written '\\|' (GFM); elsewhere it must not."""
    out, fenced = [], False
    for line in markdown.split("\n"):
        if line.startswith("```"):
            fenced = not fenced
        if not fenced and line.startswith("|"):
            line = _CODE_SPAN.sub(lambda m: m.group(1) + re.sub(r"(?<!\\)\|", r"\\|", m.group(2)) + m.group(1), line)
        out.append(line)
    return "\n".join(out)


def _toc(markdown: str) -> str:
    """A linked list of the '## ' headings (outside code fences)."""
    items, fenced = [], False
    for line in markdown.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        if not fenced and line.startswith("## ") and line.strip() != "## Contents":
            title = line[3:].strip()
            items.append(f"- [{title}](#{slug(title)})")
    return "\n".join(items)


def render_markdown(doc: Doc, kind: str, graph_svg: Optional[dict] = None) -> str:
    """One document as Markdown (``kind``: 'charter' or 'site_manual'); ``graph_svg``: file name -> SVG text."""
    env = _env()
    parts = [{"file": f, "title": t} for _, f, t in GRAPH_PARTS if graph_svg and f in graph_svg]
    text = env.get_template(f"{kind}.md.j2").render(
        d=doc, s=doc.study, doc_title=DOCUMENTS[kind], graph_parts=parts)
    text = _escape_table_pipes(re.sub(r"\n{3,}", "\n\n", text).rstrip() + "\n")
    return text.replace("<!-- toc -->", _toc(text), 1)


def _markdown_it():
    from markdown_it import MarkdownIt

    mdi = MarkdownIt("commonmark", {"html": False, "xhtmlOut": True}).enable("table")

    def heading_open(self, tokens, idx, options, env):
        tok = tokens[idx]
        title = tokens[idx + 1].content if idx + 1 < len(tokens) else ""
        seen = env.setdefault("ids", {})
        base = slug(title)
        n = seen.get(base, 0)
        seen[base] = n + 1
        tok.attrSet("id", base if n == 0 else f"{base}-{n}")  # GitHub's rule for repeated headings
        return self.renderToken(tokens, idx, options, env)

    def image(self, tokens, idx, options, env):
        tok = tokens[idx]
        svg = (env.get("graph_svg") or {}).get(tok.attrGet("src"))
        if svg:
            wide = " landscape" if svg_ratio(svg) > LANDSCAPE_RATIO else ""
            caption = html.escape(tok.content)
            return f'<span class="graph{wide}"><span class="caption">{caption}</span>{_inline_svg(svg, Path(tok.attrGet("src")).stem)}</span>'
        return self.image(tokens, idx, options, env)

    mdi.add_render_rule("heading_open", heading_open)
    mdi.add_render_rule("image", image)
    return mdi


def _inline_svg(svg: str, prefix: str = "") -> str:
    """The <svg> element alone (no XML prolog, DOCTYPE or comments), fit to the page width; element ids
    get ``prefix`` so that two pictures in one page keep unique ids."""
    start = svg.find("<svg")
    body = svg[start:] if start >= 0 else svg
    body = re.sub(r"<!--.*?-->", "", body, flags=re.S)
    if prefix:
        body = re.sub(r'\bid="([^"]+)"', lambda m: f'id="{prefix}-{m.group(1)}"', body)
    # graphviz sizes in pt; let CSS scale it while keeping the viewBox aspect ratio
    body = re.sub(r'(<svg[^>]*?)\swidth="[^"]*"', r"\1", body, count=1)
    body = re.sub(r'(<svg[^>]*?)\sheight="[^"]*"', r"\1", body, count=1)
    return body.strip()


def svg_ratio(svg: str) -> float:
    """Width / height of an SVG picture from its viewBox (1.0 when it has none)."""
    m = re.search(r'viewBox="[-\d.]+ [-\d.]+ ([\d.]+) ([\d.]+)"', svg)
    return float(m.group(1)) / float(m.group(2)) if m and float(m.group(2)) > 0 else 1.0


def render_html(doc: Doc, kind: str, markdown: str, graph_svg: Optional[dict] = None) -> str:
    """The Markdown of a document inside the print layout, graph SVGs inlined (a wide one on a landscape page)."""
    env = _env()
    mdi = _markdown_it()
    body = mdi.render(markdown, {"graph_svg": graph_svg or {}})
    # a picture is the only content of its paragraph; make it a block so that it can start a named (landscape) page
    body = re.sub(r'<p><span class="(graph[^"]*)">(.*?)</span></p>', r'<div class="\1">\2</div>', body, flags=re.S)
    css = (TEMPLATES / "style.css").read_text(encoding="utf-8")
    return env.get_template("layout.html.j2").render(
        s=doc.study, doc_title=DOCUMENTS[kind], kind=kind, body=jinja2.utils.markupsafe.Markup(body),
        css=jinja2.utils.markupsafe.Markup(css), running=_css_string(f"{doc.study['code']} {DOCUMENTS[kind]} · version {doc.study['version']}"),
        running_sha=_css_string(f"study source sha256 {doc.study['sha_short']}…"))


def _css_string(text: str) -> jinja2.utils.markupsafe.Markup:
    """A CSS string literal (for @page margin boxes)."""
    esc = text.replace("\\", "\\\\").replace('"', '\\"').replace("<", "\\3c ").replace("\n", " ")
    return jinja2.utils.markupsafe.Markup(f'"{esc}"')


def _weasyprint():
    """The weasyprint module: E900 without the 'docs' extra, E611 without its system libraries."""
    try:
        return extras.load("weasyprint", "writing PDF documents")
    except OSError as exc:  # WeasyPrint is installed but its Pango/HarfBuzz system libraries are not
        raise ImtrialError(f"PDF documents not written: WeasyPrint cannot load its system libraries ({exc})",
                           code="E611", hint="install WeasyPrint's system libraries (Debian: libpango-1.0-0 "
                                             "libpangoft2-1.0-0); the Markdown and HTML documents were written") from None


def render_pdf(html_text: str, out: Path, base_url: Path) -> Path:
    """PDF through WeasyPrint, byte-reproducible.

    The embedded font subsets carry a 'modified' timestamp (fontTools takes the current
    time unless SOURCE_DATE_EPOCH is set), which would make every PDF differ; pin it.
    """
    HTML = _weasyprint().HTML

    saved = os.environ.get("SOURCE_DATE_EPOCH")
    if saved is None:
        os.environ["SOURCE_DATE_EPOCH"] = "0"
    try:
        atomic_write_bytes(out, HTML(string=html_text, base_url=str(base_url)).write_pdf())
    finally:
        if saved is None:
            os.environ.pop("SOURCE_DATE_EPOCH", None)
    return out


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _import_weasyprint() -> None:
    _weasyprint()


def pdf_workers(n: int):
    """Processes to render ``n`` PDFs side by side, started now so that they import WeasyPrint (0.6 s of
    pycparser) while the caller builds the documents: ``(pool, warm-up futures)``, or None on one core."""
    if n < 2 or _cores() < 2 or not hasattr(os, "fork"):
        return None
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    pool = ProcessPoolExecutor(max_workers=min(n, _cores()), mp_context=multiprocessing.get_context("fork"))
    return pool, [pool.submit(_import_weasyprint) for _ in range(min(n, _cores()))]


def render_pdfs(pages: list[tuple[str, str]], out: Path, bar=None, workers=None) -> list[Path]:
    """``<kind>.pdf`` of every (kind, HTML) page; with several cores each PDF in a process of its own
    (``workers``: from :func:`pdf_workers`, else started here).

    WeasyPrint's layout and drawing is pure Python on one core and makes up most of the export's time
    (docs/benchmarks.md, "Documents export"); the documents are independent, so they render side by side.
    Each is the same bytes either way (the renders share nothing)."""
    jobs = [(page, out / f"{kind}.pdf", out) for kind, page in pages]
    if workers is None:
        workers = pdf_workers(len(jobs))
    if workers is None:
        written = []
        for job in jobs:
            written.append(render_pdf(*job))
            if bar is not None:
                bar.update(1)
        return written
    pool, warm = workers
    with pool:
        for f in warm:
            f.result()          # E900 / E611 from a child's import: raised here, after the Markdown and HTML
        futures = [pool.submit(render_pdf, *job) for job in jobs]
        written = []
        for f in futures:
            written.append(f.result())         # an ImtrialError (E611) raised in a child is raised here
            if bar is not None:
                bar.update(1)
    return written


# ---------------------------------------------------------------------------- graph picture

ROW = 3  # nodes per row of a wide rank in the picture


def _dot_quote(s: str) -> str:
    return '"' + str(s).replace("\\", "\\\\").replace('"', '\\"') + '"'


def layout_dot(graph) -> str:
    """The graph module's DOT with layout hints for a portrait page.

    Parallel siblings (the QC checks after adherence, the analyses, one qualification per
    device) would all sit on one rank and make the picture too wide to read on A4; invisible
    edges fold each such group into rows of ``ROW``. Only the drawing changes, not the graph.
    """
    from imtrial_dsl.graph import to_dot

    dot = to_dot(graph).rstrip()
    groups: dict[str, list[str]] = {}
    for n in sorted(graph.nodes, key=str):
        prefix = str(n).split(":", 1)[0] if ":" in str(n) else None
        if prefix in ("qc", "analysis", "qualify"):
            groups.setdefault(prefix, []).append(str(n))
    hints = []
    for members in groups.values():
        for i in range(len(members) - ROW):
            hints.append(f"  {_dot_quote(members[i])} -> {_dot_quote(members[i + ROW])} [style=invis];")
    if not hints:
        return dot + "\n"
    assert dot.endswith("}")
    return dot[:-1] + "\n".join(hints) + "\n}\n"


def graph_part(graph, part: str):
    """The subgraph a charter picture shows: the pipeline nodes, or the study tasks."""
    keep = [n for n, d in graph.nodes(data=True) if (d.get("kind") == "study_task") == (part == "tasks")]
    return graph.subgraph(keep).copy()


def graph_pictures(graph) -> tuple[dict, Optional[str]]:
    """({file name: SVG}, None) for the whole graph and each non-empty part, or ({}, reason)."""
    svg, why_not = graph_svg(graph)
    if svg is None:
        return {}, why_not
    out = {GRAPH_FILE: svg}
    for part, name, _ in GRAPH_PARTS:
        sub = graph_part(graph, part)
        if sub.number_of_nodes():
            text, why_not = graph_svg(sub)
            if text is None:
                return {}, why_not
            out[name] = text
    return out, None


def graph_svg(graph) -> tuple[Optional[str], Optional[str]]:
    """(SVG text, None), or (None, reason) when the picture cannot be drawn (no graph, no graphviz)."""
    if graph is None:
        return None, "no dependency graph was given to the document exporter"
    exe = shutil.which("dot")
    if exe is None:
        return None, "graphviz 'dot' is not installed, so the picture could not be drawn"
    try:
        proc = subprocess.run([exe, "-Tsvg"], input=layout_dot(graph).encode(), capture_output=True, timeout=60,
                              env=subprocess_env())   # no key or token reaches graphviz
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"graphviz 'dot' failed: {exc}"
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip().splitlines()
        return None, f"graphviz 'dot' failed: {err[-1] if err else proc.returncode}"
    return proc.stdout.decode("utf-8"), None


# ---------------------------------------------------------------------------- entry point

def export(trial: ir.Trial, graph=None, out_dir: Path | str = ".", *, formats: Iterable[str] = ("md", "html", "pdf"),
           documents: Iterable[str] = tuple(DOCUMENTS), progress: Optional[Callable[[str, int], Any]] = None) -> list[Path]:
    """Write the Imaging Charter and the Site Imaging Manual into ``out_dir``; return the files written.

    Files: ``charter.{md,html,pdf}``, ``site_manual.{md,html,pdf}`` and the dependency graph's pictures
    (when a graph is given and graphviz is installed; otherwise the charter says why there is none).
    The PDFs are written last: without the 'docs' extra (WeasyPrint) :class:`~imtrial_dsl.extras.MissingExtra`
    (E900) is raised after the Markdown and HTML were written; E611 when WeasyPrint's system libraries
    are missing. ``progress(desc, total)``: a progress display advanced per file.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    formats = tuple(formats)
    documents = tuple(documents)
    workers = pdf_workers(len(documents)) if "pdf" in formats else None
    try:
        return _export(trial, graph, out, formats, documents, progress, workers)
    finally:
        if workers is not None:
            workers[0].shutdown(cancel_futures=True)


def _export(trial, graph, out: Path, formats, documents, progress, workers) -> list[Path]:
    doc = build(trial, graph)
    svgs, why_not = graph_pictures(graph)
    if doc.graph is not None:
        doc.graph["missing"] = why_not
    written: list[Path] = []
    for name, svg in svgs.items():
        p = out / name
        atomic_write_text(p, svg)
        written.append(p)
    steps = len(documents) * (1 + ("pdf" in formats))
    bar = progress("export docs", steps) if progress else None
    pages: list[tuple[str, str]] = []
    try:
        for kind in documents:
            text = render_markdown(doc, kind, svgs)
            if "md" in formats:
                p = out / f"{kind}.md"
                atomic_write_text(p, text)
                written.append(p)
            if "html" in formats or "pdf" in formats:
                page = render_html(doc, kind, text, svgs)
                pages.append((kind, page))
                if "html" in formats:
                    p = out / f"{kind}.html"
                    atomic_write_text(p, page)
                    written.append(p)
            if bar is not None:
                bar.update(1)
        if "pdf" in formats:
            written += render_pdfs(pages, out, bar, workers)
    finally:
        if bar is not None:
            bar.close()
    return written
