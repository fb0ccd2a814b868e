"""Study-level steps over a folder of exams, for engines that cannot share mutable state between steps.

A CWL engine stages each step's inputs read-only and scatters exams in parallel, so
the two places where exams meet shared state — the identity registry and the
archive — run as one step over all exams, in the same order as the local runner
(exam date, then exam key). They call the very functions the local runner calls.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

from .steps import Param, step


def _exam_dirs(exams: str | Path) -> list[Path]:
    """Exam folders (those holding exam.json) under ``exams``, in the local runner's identify order."""
    found = [p.parent for p in Path(exams).glob("*/exam.json")]
    info = {d: json.loads((d / "exam.json").read_text()) for d in found}
    return sorted(found, key=lambda d: (info[d].get("study_date") or "", info[d].get("exam_key") or d.name))


@step("identify-all",
      inputs=[Param("exams", "directory", "Folder of ingested exam folders (exam.json + original/)"),
              Param("registry", "file", "An existing SQLite registry to continue from", optional=True)],
      outputs=[Param("out", "directory", "Copies of the exam folders, each with results/identity.json"),
               Param("registry_out", "file", "The registry after this batch (site-side: holds originals)")])
def identify_all(trial, exams, out, registry_out, registry: Optional[str] = None) -> dict:
    """Assign subject IDs, sites and visits to every exam of a folder, serially through one registry."""
    from .identify import IdentifyError, connect_registry, identify_exam, unmatched_identity
    from .ingest import atomic_write_json

    out_p, reg_p = Path(out), Path(registry_out)
    out_p.mkdir(parents=True, exist_ok=True)
    if registry and Path(registry).resolve() != reg_p.resolve():
        shutil.copyfile(registry, reg_p)
    db = connect_registry(reg_p)
    summary = {"identified": 0, "unmatched": []}
    try:
        for src in _exam_dirs(exams):
            dst = out_p / src.name
            if not dst.exists():
                shutil.copytree(src, dst)
            exam = json.loads((dst / "exam.json").read_text())
            try:
                identity = identify_exam(trial, exam, db, exam_key=exam.get("exam_key"))["identity"]
                summary["identified"] += 1
            except IdentifyError as err:
                identity = unmatched_identity(trial, exam, err)
                summary["unmatched"].append({"exam_key": exam.get("exam_key"), "error": err.reason})
            atomic_write_json(dst / "results" / "identity.json", identity)
    finally:
        db.close()
    return summary


@step("archive-all",
      inputs=[Param("exams", "directory", "Folder of processed exam folders (deid/ + results/)"),
              Param("existing", "directory", "An existing archive to add to", optional=True)],
      outputs=[Param("archive", "directory", "The content-addressed archive")])
def archive_all(trial, exams, archive, existing: Optional[str] = None) -> dict:
    """Archive every identified exam of a folder (idempotent: the same bytes are never stored twice)."""
    from .archive import archive_step

    arch = Path(archive)
    if existing and not arch.exists():
        shutil.copytree(existing, arch)
    summary = {"archived": [], "skipped": []}
    for d in _exam_dirs(exams):
        ident_p = d / "results" / "identity.json"
        ident = json.loads(ident_p.read_text()) if ident_p.exists() else {}
        if not ident.get("subject_id") or not any((d / "deid").glob("*")):
            summary["skipped"].append({"exam": d.name, "reason": "no subject" if not ident.get("subject_id") else "nothing de-identified"})
            continue
        res = archive_step(trial, exam=str(d), results=str(d / "results"), archive=str(arch))
        summary["archived"].append({"exam": d.name, "instances": res["instances"]})
    arch.mkdir(parents=True, exist_ok=True)
    return summary
