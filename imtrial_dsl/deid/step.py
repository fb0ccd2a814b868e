"""The ``deidentify`` pipeline step: every file of one exam through the engine, refused files to quarantine,
the audit map to the registry, and a summary."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from .. import ir
from ..files import TMP_SUFFIX, atomic_write_bytes, atomic_write_json, sha256_file
from . import conformance
from .part10 import ENGINE_VERSION, write_instance
from .pseudonyms import audit_entries, check_key, resolve_key, store_audit
from .walk import Deidentifier

CONFORMANCE = "conformance.json"     # inside the exam's deid/ folder (the archive stores only instances)


def deidentify_exam(trial: ir.Trial, exam: Path, identity: dict, out: Path, quarantine: Optional[Path] = None,
                    registry: Optional[Path] = None, engine: Optional[Deidentifier] = None,
                    exam_key: Optional[str] = None, written_facts: Optional[dict] = None) -> dict:
    """De-identify every file under ``exam/original`` into ``out/<new SOPInstanceUID>.dcm``, with
    ``out/conformance.json`` (what was done to each attribute); return a summary. With ``registry``, a key that
    differs from the one the registry first saw is refused before anything is written. ``written_facts``, when
    given, gets file name -> :func:`instance_facts` of every instance written (the archive step reads them
    instead of parsing the files again)."""
    exam, out = Path(exam), Path(out)
    if engine is None:
        key = resolve_key(trial)
        if registry:
            check_key(trial, key, Path(registry))
        engine = Deidentifier(trial, key)
    engine.seen.clear()
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
        path = write_instance(out, res.dataset.SOPInstanceUID, data)
        if written_facts is not None:
            written_facts[path.name] = (len(data), instance_facts(res.dataset))
        written += 1
        pixel_cleaned += res.pixel_cleaned
        passed_burned += res.burned_in_passed
    atomic_write_json(out / CONFORMANCE, conformance.build(engine.plan, engine.trial.profile(engine.deid.profile.name),
                                                       engine.deid, engine.seen, written))
    subject = str(identity.get("subject_id") or "")
    n_audit = 0
    if registry and subject and reidentification_log(trial):
        code = trial.study.code if trial.study else ""
        n_audit = store_audit(Path(registry), code, exam_key or exam.name, audit_entries(engine, subject))
    return {"step": "deidentify", "engine": ENGINE_VERSION, "files": len(files), "written": written, "quarantined": quarantined,
            "pixel_cleaned": pixel_cleaned, "burned_in_passed_unchecked": passed_burned,
            "profile": trial.deidentify.profile.name if trial.deidentify else None,
            "method_codes": [c for c, _ in engine.plan.method_codes], "dates": engine.plan.dates_state,
            "patient_identity_removed": "NO" if engine.plan.identity_kept else "YES", "audit_rows": n_audit,
            "conformance": CONFORMANCE}


def instance_facts(ds) -> tuple:
    """What the archive reads of an instance it stores: (PatientIdentityRemoved, StudyInstanceUID,
    SeriesInstanceUID, SOPInstanceUID, InstanceNumber) as reading the written file back gives them."""
    return (str(ds.get("PatientIdentityRemoved", "")).upper(), str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID),
            str(ds.SOPInstanceUID), ds.get("InstanceNumber"))


def reidentification_log(trial: ir.Trial) -> bool:
    """Does the study ask for the plain re-identification maps (``identifiers { reidentification_log yes }``)?
    Without it the UID map is not stored: a pseudonym is a keyed hash of the original, so the site can always
    go forward with the key, and nobody can go back without the originals."""
    return bool(trial.identifiers and trial.identifiers.reidentification_log)


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
    files are quarantined there (and recorded), the key is checked against the one the workdir first saw, and
    (with a re-identification log) the UID/date map goes to its ``deid_audit`` table."""
    from ..store import Store
    from ..workdir import DEID, ORIGINAL

    W = ctx.workdir
    res = deidentify_exam(ctx.trial, ctx.path(ORIGINAL), ctx.identity, ctx.out(DEID),
                          quarantine=W.quarantine if W else None, registry=W.state_db if W else None,
                          exam_key=ctx.key, written_facts=ctx.cache.get("deid_facts", dict))
    if W is not None and res.get("quarantined"):
        with Store(W.root) as st:
            st.mark_quarantined(res["quarantined"], "deidentify")
    return res
