"""The ``deidentify`` pipeline step: every file of one exam through the engine, refused files to quarantine,
the audit map to the registry, and a summary."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from .. import ir
from ..files import TMP_SUFFIX, atomic_write_bytes, atomic_write_json, sha256_file
from .part10 import ENGINE_VERSION, write_instance
from .pseudonyms import audit_entries, resolve_key, store_audit
from .walk import Deidentifier


def deidentify_exam(trial: ir.Trial, exam: Path, identity: dict, out: Path, quarantine: Optional[Path] = None,
                    registry: Optional[Path] = None, engine: Optional[Deidentifier] = None,
                    exam_key: Optional[str] = None) -> dict:
    """De-identify every file under ``exam/original`` into ``out/<new SOPInstanceUID>.dcm``; return a summary."""
    exam, out = Path(exam), Path(out)
    engine = engine or Deidentifier(trial, resolve_key(trial))
    qdir = Path(quarantine) if quarantine else None
    src_root = exam / "original" if (exam / "original").is_dir() else exam
    files = sorted(p for p in src_root.rglob("*") if p.is_file() and not p.name.endswith(TMP_SUFFIX))
    out.mkdir(parents=True, exist_ok=True)
    engine.pseudo.record = {}
    written, pixel_cleaned, passed_burned = 0, 0, 0
    quarantined = []
    for src in files:
        rel = src.relative_to(src_root).as_posix()
        res, data = engine.deidentify_file(src, identity)
        if not res.ok or data is None:
            reason = res.reason or "deidentify_failed"
            digest = _quarantine(qdir, src, rel, reason, res.detail) if qdir else sha256_file(src)
            quarantined.append({"file": str(src), "sha256": digest, "reason": reason, "detail": res.detail})
            continue
        write_instance(out, res.dataset.SOPInstanceUID, data)
        written += 1
        pixel_cleaned += res.pixel_cleaned
        passed_burned += res.burned_in_passed
    subject = str(identity.get("subject_id") or "")
    n_audit = 0
    if registry and subject:
        code = trial.study.code if trial.study else ""
        n_audit = store_audit(Path(registry), code, exam_key or exam.name, audit_entries(engine, subject))
    return {"step": "deidentify", "engine": ENGINE_VERSION, "files": len(files), "written": written, "quarantined": quarantined,
            "pixel_cleaned": pixel_cleaned, "burned_in_passed_unchecked": passed_burned,
            "profile": trial.deidentify.profile.name if trial.deidentify else None,
            "method_codes": [c for c, _ in engine.plan.method_codes], "dates": engine.plan.dates_state,
            "audit_rows": n_audit}


def _quarantine(qdir: Path, src: Path, rel: str, reason: str, detail: str) -> str:
    """Copy a refused file to ``qdir/<sha256>/file`` with ``reason.json`` beside it; return the sha256."""
    digest = sha256_file(src)
    dst = qdir / digest
    if not (dst / "file").exists():
        atomic_write_bytes(dst / "file", src.read_bytes())
    atomic_write_json(dst / "reason.json", {"reason": reason, "detail": detail, "step": "deidentify",
                                            "original_path": rel})
    return digest


def deidentify_step(ctx) -> dict:
    """The ``deidentify`` pipeline step: PS3.15 Annex E de-identification of one exam (profile, options,
    overrides; keyed UID remap, per-subject date shift, research identifiers). In a workdir, refused
    files are quarantined there (and recorded) and the UID/date map goes to its ``deid_audit`` table."""
    from ..store import Store
    from ..workdir import DEID, ORIGINAL

    W = ctx.workdir
    res = deidentify_exam(ctx.trial, ctx.path(ORIGINAL), ctx.identity, ctx.out(DEID),
                          quarantine=W.quarantine if W else None, registry=W.state_db if W else None,
                          exam_key=ctx.key)
    if W is not None and res.get("quarantined"):
        with Store(W.root) as st:
            st.mark_quarantined(res["quarantined"], "deidentify")
    return res
