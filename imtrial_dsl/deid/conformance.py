"""The de-identification conformance report (``deid/conformance.json`` of each exam; an HTML page of
``imtrial report``): for every attribute of PS3.15 Table E.1-1 met in the data, the table's action, what
the engine did and the option or override that decided it; counts per action; and every attribute the table
does not name that was removed or kept (private elements, retired curve and overlay groups, command and
group-length elements, others). It names tags and counts only, never a value."""
from __future__ import annotations

from collections import Counter
from typing import Any, Iterable

from .. import ir
from .plan import Plan

VERSION = 1


def keyword_of(tag: int) -> str | None:
    from pydicom.datadict import keyword_for_tag

    return keyword_for_tag(tag) or None


def _tag(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def _category(tag: int) -> str:
    group = tag >> 16
    if group in (0x0000, 0x0002):
        return "command_or_file_meta_group"
    if not tag & 0xFFFF:
        return "group_length"
    if group & 1:
        return "private"
    if 0x5000 <= group <= 0x50FF:
        return "curve"
    if 0x6000 <= group <= 0x60FF:
        return "overlay"
    return "other"


def build(plan: Plan, profile: ir.DeidProfile, deid: ir.Deidentify, seen: Counter, instances: int) -> dict[str, Any]:
    """The conformance document for the elements ``seen`` ((tag, operation) -> count) in ``instances`` files."""
    names = {}
    for r in profile.rules:
        try:
            names[int(r.tag[1:5] + r.tag[6:10], 16)] = r
        except ValueError:
            continue                             # repeating groups and private: reported by category
    rows: dict[int, dict] = {}
    others: dict[str, dict] = {}
    per_action: Counter = Counter()
    for (tag, op), n in sorted(seen.items()):
        rule = names.get(tag)
        if tag in plan.overrides or (rule is not None and _category(tag) == "other"):
            row = rows.get(tag)
            if row is None:
                action, compiled, by = plan.decided.get(tag, (rule.action if rule else None, None, None))
                verb = plan.overrides.get(tag)
                row = rows[tag] = {
                    "tag": _tag(tag), "keyword": (rule.keyword if rule else None) or keyword_of(tag),
                    "name": rule.name if rule else None, "table_action": action,
                    "decided_by": f"override {verb}" if verb else (by or "basic profile"),
                    "applied": {}, "count": 0}
            row["applied"][op] = row["applied"].get(op, 0) + n
            row["count"] += n
            per_action[row["table_action"] or "override"] += n
            continue
        cat = _category(tag) if rule is None or _category(tag) != "other" else "other"
        o = others.setdefault(cat, {"removed": 0, "kept": 0, "changed": 0, "tags": {}})
        fate = "removed" if op == "remove" else "kept" if op in ("keep", "recurse", "recurse_strict") else "changed"
        o[fate] += n
        t = o["tags"].setdefault(_tag(tag), {"keyword": keyword_of(tag), "removed": 0, "kept": 0, "changed": 0})
        t[fate] += n
    for o in others.values():
        o["tags"] = [{"tag": k, **v} for k, v in sorted(o["tags"].items())]
    return {
        "version": VERSION, "standard": "DICOM PS3.15 Annex E, Table E.1-1", "profile": deid.profile.name,
        "options": sorted(plan.options), "overrides": {_tag(t): v for t, v in sorted(plan.overrides.items())},
        "method_codes": [c for c, _ in plan.method_codes], "dates": plan.dates_state,
        "patient_identity_removed": "NO" if plan.identity_kept else "YES",
        "identity_kept": list(plan.identity_kept), "instances": instances,
        "per_table_action": dict(sorted(per_action.items())),
        "attributes": [rows[t] for t in sorted(rows)],
        "not_in_table": dict(sorted(others.items())),
    }


def merge(docs: Iterable[dict]) -> dict[str, Any]:
    """Several exams' conformance documents as one (counts added; the study's settings from the first)."""
    docs = [d for d in docs if isinstance(d, dict) and d.get("version") == VERSION]
    if not docs:
        return {}
    out = {k: docs[0][k] for k in ("version", "standard", "profile", "options", "overrides", "method_codes", "dates",
                                   "patient_identity_removed", "identity_kept")}
    out["exams"] = len(docs)
    out["instances"] = sum(d.get("instances", 0) for d in docs)
    per: Counter = Counter()
    rows: dict[str, dict] = {}
    others: dict[str, dict] = {}
    for d in docs:
        per.update(d.get("per_table_action", {}))
        for r in d.get("attributes", []):
            row = rows.setdefault(r["tag"], {**r, "applied": {}, "count": 0})
            for op, n in r["applied"].items():
                row["applied"][op] = row["applied"].get(op, 0) + n
            row["count"] += r["count"]
        for cat, o in d.get("not_in_table", {}).items():
            m = others.setdefault(cat, {"removed": 0, "kept": 0, "changed": 0, "tags": {}})
            for k in ("removed", "kept", "changed"):
                m[k] += o.get(k, 0)
            for t in o.get("tags", []):
                mt = m["tags"].setdefault(t["tag"], {"keyword": t.get("keyword"), "removed": 0, "kept": 0, "changed": 0})
                for k in ("removed", "kept", "changed"):
                    mt[k] += t.get(k, 0)
    for o in others.values():
        o["tags"] = [{"tag": k, **v} for k, v in sorted(o["tags"].items())]
    out["per_table_action"] = dict(sorted(per.items()))
    out["attributes"] = [rows[k] for k in sorted(rows)]
    out["not_in_table"] = dict(sorted(others.items()))
    return out
