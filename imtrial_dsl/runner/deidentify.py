"""The ``deidentify`` step: one exam's original instances through the de-identification engine."""
from __future__ import annotations

from ..workdir import DEID, ORIGINAL
from .deid import deidentify_exam


def deidentify_step(ctx) -> dict:
    """PS3.15 Annex E de-identification of one exam (profile, options, overrides; keyed UID remap, per-subject
    date shift, research identifiers). In a workdir, refused files are quarantined there (and recorded)."""
    from ..store import Store

    W = ctx.workdir
    res = deidentify_exam(ctx.trial, ctx.path(ORIGINAL), ctx.identity, ctx.out(DEID),
                          quarantine=W.quarantine if W else None, registry=W.state_db if W else None,
                          exam_key=ctx.key)
    if W is not None and res.get("quarantined"):
        with Store(W.root) as st:
            st.mark_quarantined(res["quarantined"], "deidentify")
    return res
