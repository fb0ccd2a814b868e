"""Reads (image interpretation) and the changelog: E450–E462, W430–W434."""
from __future__ import annotations

from .. import ir
from ..diagnostics import did_you_mean
from ..reading import BLINDING, CRITERIA, PARADIGMS, TRIGGERS, VARIABILITY
from .context import Context


def _unknown(ctx: Context, code: str, node, what: str, name: str, allowed) -> None:
    allowed = list(allowed)
    ctx.error(code, node, f"unknown {what} '{name}'", did_you_mean(name, allowed) or "one of: " + ", ".join(allowed))


def check(ctx: Context) -> None:
    visits = {v.name: v for v in ctx.trial.schedule.visits} if ctx.trial.schedule else {}
    seen: dict[str, ir.Read] = {}
    for r in ctx.trial.reads:
        if r.name in seen:
            ctx.error("E459", r, f"read '{r.name}' is defined twice", f"first defined at {seen[r.name].span}")
        seen.setdefault(r.name, r)
        _what(ctx, r, visits)
        _who(ctx, r)
        _criteria(ctx, r)
        for w in r.windows:
            if w.width <= 0:
                ctx.error("E458", w, f"display window '{w.name}' has width {w.width:g}; a window's width must be positive",
                          "write 'window NAME LEVEL WIDTH', e.g. window lung -600 1500")
        _variability(ctx, r)
        if not r.unevaluable:
            ctx.warning("W433", r, f"read {r.name} does not say how unevaluable images are handled",
                        'add unevaluable "…" (e.g. time point recorded as not evaluable; site asked to repeat in window)')
    _changelog(ctx)


def _what(ctx: Context, r: ir.Read, visits: dict) -> None:
    if not r.protocols:
        ctx.error("E462", r, f"read {r.name} names no images", "add 'images PROTOCOL, …'")
    for ref in r.protocols:
        if ref.name not in ctx.protocols:
            _unknown(ctx, "E450", ref, "protocol", ref.name, ctx.protocols)
    names = {p.name for p in r.protocols}
    for ref in r.timepoints:
        v = visits.get(ref.name)
        if v is None:
            _unknown(ctx, "E451", ref, "visit", ref.name, visits)
        elif names and not names & {a.name for a in v.acquire}:
            ctx.error("E451", ref, f"visit {ref.name} acquires none of the images read by {r.name} ({', '.join(sorted(names))})",
                      "read only visits that acquire the read's protocols")


def _who(ctx: Context, r: ir.Read) -> None:
    par = PARADIGMS.get(r.paradigm)
    if par is None:
        _unknown(ctx, "E453", r.at("paradigm"), "read paradigm", r.paradigm, PARADIGMS)
    else:
        if r.readers < par.min_readers or (r.paradigm == "single_reader" and r.readers != 1):
            need = "exactly 1 reader" if r.paradigm == "single_reader" else f"at least {par.min_readers} readers"
            ctx.error("E454", r.at("readers"), f"paradigm {r.paradigm} needs {need}; read {r.name} has {r.readers}",
                      "change 'readers N' or the paradigm")
        if par.adjudicators and r.adjudicators < 1:
            ctx.error("E454", r.at("readers"), f"paradigm {r.paradigm} needs an adjudicator; read {r.name} has none",
                      f"write 'readers {r.readers} adjudicators 1'")
        if not par.adjudicators and r.adjudicators:
            ctx.error("E454", r.at("adjudicators"), f"paradigm {r.paradigm} has no adjudication, but read {r.name} names {r.adjudicators} adjudicator(s)",
                      "use paradigm independent_with_adjudication, or drop 'adjudicators'")
        if par.adjudicators and not r.adjudicate_on:
            ctx.error("E455", r.at("paradigm"), f"read {r.name} has an adjudicator but does not say what triggers adjudication",
                      "add 'adjudicate when response_differs' (triggers: " + ", ".join(TRIGGERS) + ")")
        if r.adjudicate_on and not par.adjudicators:
            ctx.error("E455", r.at("adjudicate"), f"read {r.name} says when to adjudicate, but paradigm {r.paradigm} has no adjudication",
                      "use paradigm independent_with_adjudication")
    for t in r.adjudicate_on:
        if t not in TRIGGERS:
            _unknown(ctx, "E455", r.at(f"adjudicate:{t}"), "adjudication trigger", t, TRIGGERS)
    if "measurement_differs" in r.adjudicate_on and not r.adjudication_rule:
        ctx.error("E455", r.at("adjudicate:measurement_differs"), "adjudication on measurement_differs needs the rule that says by how much",
                  'write adjudicate when measurement_differs "sum of diameters differs by more than 20%"')
    for b in r.blinded_to:
        if b not in BLINDING:
            _unknown(ctx, "E456", r.at(f"blinded:{b}"), "blinding field", b, BLINDING)
    if "arm" not in r.blinded_to:
        ctx.warning("W432", r.at("blinded"), f"the readers of {r.name} are not blinded to the treatment arm",
                    "add 'blinded to arm' (the FDA guidance recommends readers blinded to treatment)")


def _criteria(ctx: Context, r: ir.Read) -> None:
    if not r.criteria:
        return
    c = CRITERIA.get(r.criteria)
    if c is None:
        _unknown(ctx, "E452", r.at("criteria"), "response criteria", r.criteria, CRITERIA)
        return
    if r.criteria == "custom" and not r.criteria_name:
        ctx.error("E452", r.at("criteria"), "custom response criteria need a name", 'write criteria custom "NAME (reference)"')
        return
    for ref in r.protocols:
        p = ctx.protocols.get(ref.name)
        if p is not None and c.modalities and p.modality not in c.modalities:
            ctx.warning("W430", ref, f"{c.title} is defined for {'/'.join(c.modalities)}, not for {p.modality} "
                                     f"(protocol {p.name})", "check the response criteria of this read")


def _variability(ctx: Context, r: ir.Read) -> None:
    v = r.variability
    if v is None:
        if r.readers > 1:
            ctx.warning("W431", r.at("readers"), f"read {r.name} has {r.readers} readers but no reader-variability monitoring",
                        "add e.g. 'variability kappa >= 0.6 action \"…\"'")
        return
    spec = VARIABILITY.get(v.metric)
    if spec is None:
        _unknown(ctx, "E457", v, "reader-variability metric", v.metric, VARIABILITY)
        return
    if not 0 <= v.threshold <= 1 and not (v.metric in ("kappa", "weighted_kappa", "icc") and -1 <= v.threshold <= 1):
        ctx.error("E457", v, f"{v.metric} threshold {v.threshold:g} is outside the metric's range",
                  "kappa and ICC lie in -1 … 1; agreement and adjudication rate are fractions 0 … 1")
    want = (">=", ">") if spec[1] == "min" else ("<=", "<")
    if v.op not in want:
        ctx.error("E457", v, f"{v.metric} measures {'agreement' if spec[1] == 'min' else 'disagreement'}: its bound is "
                             f"'{want[0]}', not '{v.op}'", f"write 'variability {v.metric} {want[0]} {v.threshold:g}'")
    if r.readers < 2 and v.metric != "adjudication_rate":
        ctx.error("E457", v, f"read {r.name} has one reader: {v.metric} between readers cannot be measured",
                  "monitor variability only with two or more readers")
    if not v.action:
        ctx.warning("W431", v, f"read {r.name} monitors {v.metric} but does not say what happens when the bound is missed",
                    'add action "…" (e.g. retraining and re-read)')


def _changelog(ctx: Context) -> None:
    log = ctx.trial.changelog
    study = ctx.trial.study
    if log is None:
        return
    seen: dict[str, ir.ChangelogEntry] = {}
    prev = None
    for e in log.entries:
        if e.version in seen:
            ctx.error("E460", e, f"version {e.version} is listed twice in the changelog", f"first at {seen[e.version].span}")
        seen.setdefault(e.version, e)
        if prev is not None and e.date and prev.date and e.date < prev.date:
            ctx.error("E461", e, f"version {e.version} ({e.date}) is dated before version {prev.version} ({prev.date})",
                      "list versions oldest first, each dated on or after the one before")
        prev = e
    if study is not None and study.version and (not log.entries or log.entries[-1].version != study.version):
        ctx.warning("W434", log, f"the study's version {study.version} is not the last version of the changelog, so the "
                                 f"documents cannot state its effective date",
                    f'add version "{study.version}" date YYYY-MM-DD "…" as the last entry')
