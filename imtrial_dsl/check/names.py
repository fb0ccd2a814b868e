"""References by name: duplicate declarations (E310), undefined names with a did-you-mean (E301-E307),
DICOM attribute keywords (E311), and the references of endpoints, reports and qualification."""
from __future__ import annotations

import json
from typing import Any, Iterable, Optional

from .. import ir
from ..diagnostics import did_you_mean
from .context import Context

_keyword_cache: Optional[dict[str, list]] = None


def dicom_keywords() -> dict[str, list]:
    """DICOM keyword -> [tag, VR], from the generated table (scripts/gen_dicom_keywords.py)."""
    global _keyword_cache
    if _keyword_cache is None:
        from importlib import resources

        text = resources.files("imtrial_dsl").joinpath("data/dicom_keywords.json").read_text()
        _keyword_cache = json.loads(text)["keywords"]
    return _keyword_cache


def vr_of(keyword: str) -> Optional[str]:
    """The keyword's VR as PS3.6 lists it ('US or SS' for some), None for an unknown keyword."""
    entry = dicom_keywords().get(keyword)
    return entry[1] if entry else None


def _plural(word: str) -> str:
    return word[:-2] + "es" if word.endswith("is") else word + "s"


def undefined(ctx: Context, code: str, ref: ir.Ref, what: str, names: Iterable[str], name: Optional[str] = None) -> None:
    name = name if name is not None else ref.name
    names = list(names)
    hint = (None if ctx.many(code) else did_you_mean(name, names)) or (
        f"declared {_plural(what)}: {', '.join(names[:8])}{' …' if len(names) > 8 else ''}" if names else f"no {what} is declared"
    )
    ctx.error(code, ref, f"undefined {what} '{name}'", hint)


def keyword(ctx: Context, node: Any, kw: str, where: str) -> bool:
    """E311 unless ``kw`` is a DICOM keyword (pydicom's data dictionary)."""
    if kw in dicom_keywords():
        return True
    hint = (None if ctx.many("E311") else did_you_mean(kw, dicom_keywords())) or \
        "use the attribute keyword from DICOM PS3.6 (e.g. EchoTime)"
    ctx.error("E311", node, f"unknown DICOM keyword '{kw}' in {where}", hint)
    return False


def _dup(ctx: Context, what: str, items: Iterable[tuple[str, Any]]) -> None:
    first: dict[str, Any] = {}
    for name, node in items:
        if name in first:
            prev = getattr(first[name], "span", None)
            where = f" at line {prev.line}" if prev and prev.line else ""
            if prev and prev.file and node is not None and getattr(node, "span", None) and node.span.file != prev.file:
                where = f" at {prev}"
            ctx.error("E310", node, f"duplicate {what} '{name}'", f"first declared{where}; {what} names must be unique")
        else:
            first[name] = node


def duplicates(ctx: Context) -> None:
    """E310: two declarations of one kind with one name."""
    t = ctx.trial
    _dup(ctx, "site", ((s.code, s) for s in t.sites))
    _dup(ctx, "device", ((d.id, d) for _, d in t.devices()))
    _dup(ctx, "protocol", ((p.name, p) for p in t.protocols))
    if t.schedule:
        _dup(ctx, "visit", ((v.name, v) for v in t.schedule.visits))
    _dup(ctx, "qc check", ((q.name, q) for q in t.qc))
    _dup(ctx, "analysis", ((a.name, a) for a in t.analyses))
    _dup(ctx, "role", ((r.name, r) for r in t.roles))
    _dup(ctx, "transfer destination", ((d.name, d) for d in t.transfers))
    _dup(ctx, "report", ((r.name, r) for r in t.reports))
    _dup(ctx, "de-identification profile", ((p.name, p) for p in t.deid_profiles))
    if t.study:
        _dup(ctx, "endpoint", ((e.name, e) for e in t.study.endpoints))
    for a in t.analyses:
        _dup(ctx, f"input of analysis {a.name}", ((i.name, i) for i in a.inputs))
        _dup(ctx, f"output of analysis {a.name}", ((o.name, o) for o in a.outputs))
        _dup(ctx, f"measurement of analysis {a.name}", ((m.name, m) for m in a.measurements))


def endpoints(ctx: Context) -> None:
    """Endpoints name an analysis measurement."""
    if not ctx.trial.study:
        return
    for e in ctx.trial.study.endpoints:
        if e.measurement is not None:
            analysis_member(ctx, e.measurement, "measurement")


def analysis_member(ctx: Context, ref: ir.Ref, member: str) -> Optional[ir.Analysis]:
    """Resolve 'analysis.member' (member: 'output' | 'measurement'); report E302/E306."""
    aname, _, mname = ref.name.partition(".")
    a = ctx.analyses.get(aname)
    if a is None:
        undefined(ctx, "E302", ref, "analysis", ctx.analyses, aname)
        return None
    if not mname:
        ctx.error("E302", ref, f"'{ref.name}' names an analysis, not one of its {member}s",
                  f"write {aname}.<{member}>")
        return None
    names = [o.name for o in a.outputs] if member == "output" else [m.name for m in a.measurements]
    if mname not in names:
        code = "E302" if member == "output" else "E306"
        hint = did_you_mean(mname, names) or (
            f"analysis {aname} has {member}s: {', '.join(names)}" if names else f"analysis {aname} declares no {member}s")
        ctx.error(code, ref, f"analysis '{aname}' has no {member} '{mname}'", hint)
        return None
    return a


def report_roles(ctx: Context) -> None:
    for r in ctx.trial.reports:
        for aud in r.audience:
            if aud.role.name not in ctx.roles:
                undefined(ctx, "E303", aud.role, "role", ctx.roles)


def qualification_protocols(ctx: Context) -> None:
    q = ctx.trial.qualification
    if q is None:
        return
    for ref in q.protocols:
        if ref.name not in ctx.protocols:
            undefined(ctx, "E301", ref, "protocol", ctx.protocols)
