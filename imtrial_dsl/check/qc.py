"""QC checks: target protocols (E301), the metric (E312) and its parameters (E313, E314, E401)."""
from __future__ import annotations

from .. import ir, source
from ..diagnostics import did_you_mean
from ..qc_metrics import QC_METRICS
from .context import Context
from .names import undefined


def check(ctx: Context) -> None:
    for q in ctx.trial.qc:
        for ref in q.targets:
            if ref.name not in ctx.protocols:
                undefined(ctx, "E301", ref, "protocol", ctx.protocols)
        spec = QC_METRICS.get(q.metric)
        if spec is None:
            ctx.error("E312", q, f"unknown QC metric '{q.metric}'",
                      did_you_mean(q.metric, QC_METRICS) or f"metrics: {', '.join(QC_METRICS)}")
            continue
        allowed = {spec.param: spec.dimensions}
        for name, val in q.params.items():
            if name not in allowed:
                ctx.error("E313", q, f"unknown parameter '{name}' of QC metric {q.metric}",
                          did_you_mean(name, allowed) or f"{q.metric} takes: {', '.join(allowed)}")
                continue
            if not isinstance(val, ir.Quantity) or isinstance(val, bool):
                ctx.error("E314", q, f"parameter {name} of {q.metric} must be a number, not {source.value(val, source.plain_quote)}",
                          f"write e.g. {q.metric}({name} = 0.1)")
            elif val.dimension not in allowed[name]:
                want = " or ".join(sorted(d if d != "none" else "a plain number" for d in allowed[name]))
                ctx.error("E401", val, f"unit mismatch: {q.metric}({name}) takes {want}, not '{val.text()}'",
                          f"write e.g. {q.metric}({name} = {val.source_value if val.source_value is not None else val.value:g})"
                          if "none" in allowed[name] else "use a matching unit")
        for name in allowed:
            if name not in q.params:
                ctx.error("E314", q, f"QC metric {q.metric} needs parameter '{name}'", f"write {q.metric}({name} = …)")
