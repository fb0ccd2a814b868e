"""Completion: what may be written at a place of a ``.imtrial`` document.

The keywords come from the grammar itself: the text before the cursor is fed to the LALR parser, which
says which terminals it accepts next (``accepts()``), so a keyword is offered exactly where the language
allows it. Where it accepts a name, the keyword that leads the statement says which names fit
(``acquire`` → protocols, ``for`` → roles, …); where it accepts a DICOM keyword or a unit, those are offered,
units of the attribute's dimension first. When the text before the cursor does not parse (an error
earlier in the file), the enclosing block decides.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from .. import ir
from .analysis import Index, Pos, dicom_detail, dicom_dictionary, offset_of, unit_of, units_for


@dataclass(frozen=True)
class Item:
    label: str
    kind: str            # keyword | dicom | protocol | site | device | role | unit | option | value | ...
    detail: str = ""
    sort: str = ""       # sort text: lower sorts first


_TOKEN = re.compile(r'"(?:[^"\\\n]|\\.)*"?|#[^\n]*|[A-Za-zµ_%][A-Za-z0-9_/]*|[+-]?\d+(?:\.\d+)?|\S')
_WORD_BEFORE = re.compile(r"[A-Za-zµ_%][A-Za-z0-9_/]*$")

# statement keyword -> what the names after it are
NAME_CONTEXT = {
    "acquire": "protocol", "on": "protocol", "protocols": "protocol", "from": "input_ref",
    "for": "role", "via": "transfer", "using": "profile", "with": "deid_option", "notify": "recipient",
    "to": "recipient", "same_device": "same_device", "severity": "severity", "modality": "modality",
    "kind": "kind", "scope": "scope", "hide": "hide", "source": "dicom", "issuer": "dicom",
    "check_digit": "check_digit", "uses": "metric", "sections": "section", "hash": "hash_algorithm",
}
VALUES = {
    "same_device": ("required", "preferred", "none"),
    "severity": ("error", "warning", "info"),
    "modality": ("MR", "CT", "PT", "NM", "US", "XA", "MG", "DX", "CR", "OT"),
    "scope": ("all", "own"),
    "hide": ("arm", "site", "exam_date", "device", "subject_id", "reader_results"),
    "check_digit": ("luhn", "mod11", "mod97", "iso7064"),
    "section": ("enrollment", "adherence", "qc", "overdue", "qualification", "upgrades", "exams"),
    "hash_algorithm": ("sha256",),
}
ROLE_KINDS = ("central", "site", "reader", "sponsor", "monitor", "statistician")
CONTACT_ROLES = ("imaging_pi", "physicist", "technologist", "coordinator", "pi", "data_manager", "radiologist")


def complete(text: str, pos: Pos, idx: Optional[Index], trial: Optional[ir.Trial]) -> list[Item]:
    """The completion items at ``pos`` (0-based) of ``text``."""
    from ..parser import get_lark

    off = offset_of(text, pos)
    prefix = text[:off]
    m = _WORD_BEFORE.search(prefix)
    before = prefix[: m.start()] if m else prefix
    lark = get_lark()
    accepts: Optional[set[str]] = None
    try:
        ip = lark.parse_interactive(before)
        ip.exhaust_lexer()
        accepts = set(ip.accepts())
    except Exception:  # the text before the cursor does not parse: fall back to the enclosing block
        accepts = None
    words = [t for t in _TOKEN.findall(before) if not t.startswith("#")]
    items: list[Item] = []
    if accepts is None:
        items += _fallback(words, idx)
    else:
        for term in sorted(accepts):
            lit = _literal(lark, term)
            if lit and re.fullmatch(r"[a-z_]+", lit):
                items.append(Item(lit, "keyword", "keyword", "2"))
        if "NAME" in accepts:
            items += _names(words, idx, trial)
        if "ATTR" in accepts:
            items += dicom_items()
        if "UNIT" in accepts or "CUNIT" in accepts:
            items += _units(words)
    seen, out = set(), []
    for it in items:
        if (it.label, it.kind) not in seen:
            seen.add((it.label, it.kind))
            out.append(it)
    return out


def _literal(lark, term: str) -> Optional[str]:
    from lark.lexer import PatternStr

    try:
        pat = lark.get_terminal(term).pattern
    except KeyError:
        return None
    return pat.value if isinstance(pat, PatternStr) else None


def _statement_lead(words: list[str]) -> Optional[str]:
    """The keyword that governs the names being written: skip back over ``NAME ,`` runs."""
    i = len(words) - 1
    while i >= 0:
        w = words[i]
        if w in NAME_CONTEXT:
            return w
        if w == "," or re.fullmatch(r"[A-Za-z_]\w*", w) or w in ("(", ")"):
            i -= 1
            continue
        return None
    return None


def _defs(idx: Optional[Index], kind: str) -> list[str]:
    return sorted({d.name for d in idx.definitions(kind)}) if idx else []


def _names(words: list[str], idx: Optional[Index], trial: Optional[ir.Trial]) -> list[Item]:
    lead = _statement_lead(words)
    ctx = NAME_CONTEXT.get(lead or "")
    if lead == "on" and "qc" not in words[-6:]:
        ctx = None
    if lead == "modality" and words[-2:-1] == ["on"]:
        ctx = "modality"
    if ctx == "protocol":
        return [Item(n, "protocol", "protocol", "0") for n in _defs(idx, "protocol")]
    if ctx == "input_ref":
        return ([Item(n, "protocol", "protocol", "0") for n in _defs(idx, "protocol")]
                + [Item(n, "output", "analysis output", "1") for n in _defs(idx, "output")]
                + [Item(n, "measurement", "measurement", "1") for n in _defs(idx, "measurement")])
    if ctx == "role":
        return [Item(n, "role", "role", "0") for n in _defs(idx, "role")]
    if ctx == "transfer":
        return [Item(n, "transfer", "transfer destination", "0") for n in _defs(idx, "transfer")]
    if ctx == "profile":
        return [Item(n, "profile", "de-identification profile", "0") for n in _defs(idx, "profile")]
    if ctx == "deid_option":
        return [Item(o.value, "option", "de-identification option (PS3.15 Annex E)", "0") for o in ir.DeidOption]
    if ctx == "recipient":
        return ([Item(r, "value", "contact role", "0") for r in CONTACT_ROLES] + [Item("central", "value", "the central team", "0")]
                + [Item(n, "role", "role", "1") for n in _defs(idx, "role")])
    if ctx == "kind":
        return [Item(k, "value", "role kind", "0") for k in ROLE_KINDS]
    if ctx == "dicom":
        return dicom_items()
    if ctx == "metric":
        from ..qc_metrics import QC_METRICS

        return [Item(k, "value", f"QC metric {k}({m.param}): {m.description}", "0") for k, m in QC_METRICS.items()]
    if ctx in VALUES:
        return [Item(v, "value", ctx.replace("_", " "), "0") for v in VALUES[ctx]]
    # a name with no context (a new declaration's own name, a vendor): the study's names help to stay consistent
    out = []
    for kind in ("protocol", "site", "device", "role"):
        out += [Item(n, kind, kind, "3") for n in _defs(idx, kind)]
    return out


def dicom_items() -> list[Item]:
    """Every DICOM keyword (not retired), attributes with a physical unit first."""
    out = []
    for kw, e in dicom_dictionary().items():
        if e[4]:
            continue
        out.append(Item(kw, "dicom", dicom_detail(kw) or "", "0" if unit_of(kw) else "1"))
    return out


def _units(words: list[str]) -> list[Item]:
    from ..units import CALENDAR

    attr = next((w for w in reversed(words) if re.fullmatch(r"(?:[A-Z]|dBdt)[A-Za-z0-9_]*", w)), None)
    u = unit_of(attr) if attr else None
    dim = u[0] if u else None
    out = [Item(x, "unit", f"unit ({dim})", "0") for x in units_for(dim)] if dim and dim != "none" else []
    out += [Item(x, "unit", "unit", "1") for x in units_for(None)]
    if "schedule" in words or "visit" in words:
        out += [Item(x, "unit", "calendar unit", "0") for x in CALENDAR]
    return out


_BLOCK_KEYWORDS = {
    "protocol": ("match", "variant", "body_part", "prepare", "contrast", "remark"),
    "variant": ("remove",),
    "schedule": ("visit", "same_device", "remind", "escalate"),
    "site": ("contact", "irb", "timezone", "device"),
    "device": ("modality", "vendor", "model", "software", "serial", "station", "institution", "field", "coils",
               "research_agreement"),
    "deidentify": ("keep", "remove", "empty", "hash", "replace", "key", "date_shift", "blank", "quarantine_burned_in"),
}


def _fallback(words: list[str], idx: Optional[Index]) -> list[Item]:
    """The enclosing block's statement keywords (and DICOM keywords inside protocols)."""
    stack: list[str] = []
    last_kw = None
    for w in words:
        if w in _BLOCK_KEYWORDS or w in ("study", "analysis", "identifiers", "archive", "qualification", "report",
                                         "deid_profile"):
            last_kw = w
        if w == "{":
            stack.append(last_kw or "")
            last_kw = None
        elif w == "}" and stack:
            stack.pop()
    block = stack[-1] if stack else None
    items = [Item(k, "keyword", "keyword", "2") for k in _BLOCK_KEYWORDS.get(block or "", ())]
    if block in ("protocol", "variant", "deidentify"):
        items += dicom_items()
    lead = _statement_lead(words)
    if lead:
        items = _names(words, idx, None) + items
    return items
