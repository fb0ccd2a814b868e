"""Electronic protocols: DICOM Defined Procedure Protocol objects, vendor-neutral JSON, scanner cards.

One output per protocol x device variant. The base protocol is always exported (it is what
the study's devices not covered by a variant run); each ``variant`` gets its own output with
the *effective* constraints for its devices (base overridden by the variant).

* ``.dcm``  — CT / XA Defined Procedure Protocol Storage (PS3.3 A.82/A.86), CT and XA only.
* ``.json`` — ``imtrial-eprotocol/1`` (schema: ``schemas/imtrial-eprotocol-1.schema.json``), every modality.
* ``.html`` — a one-page printable scanner card for the technologist.

``import_file`` / ``import_files`` read either format back into ``ir.Protocol`` values; the
mapping is documented in ``docs/eprotocol.md``. Pure functions of the IR: nothing here reads
the syntax tree, the clock or the environment.

One module per concern: ``targets`` (what is exported), ``json_io`` (the JSON format and its
schema), ``dicom_dpp`` (the DICOM object), ``card`` (the scanner card), ``importer`` (reading back).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from imtrial_dsl import ir
from imtrial_dsl.diagnostics import CompileErrors, ImtrialError
from imtrial_dsl.files import atomic_write_dataset, atomic_write_text

from . import card, dicom_dpp, json_io
from .importer import import_document, import_file, import_files, import_report, protocol_to_source
from .targets import slug, study_code, targets_of

__all__ = ["export", "import_document", "import_file", "import_files", "import_report", "protocol_to_source"]


def export(trial: ir.Trial, graph: Any = None, out_dir: Path | str = ".") -> list[Path]:
    """Write JSON + scanner card for every protocol x variant, and a DPP object for CT/XA ones.

    Returns the written paths in a stable order. Raises ``CompileErrors`` (every problem at once,
    before anything is written) when a constraint has no DICOM encoding. ``graph`` is accepted
    for the exporter interface; e-protocols depend only on the IR.
    """
    code = study_code(trial)
    planned: list[tuple[str, Any]] = []  # file name, text or DICOM data set
    diags = []
    for p in trial.protocols:
        for t in targets_of(trial, p):
            stem = f"{slug(code)}_{slug(p.name)}_{t.label}"
            doc = json_io.to_json(trial, t)
            planned.append((f"{stem}.json", json_io.dumps(doc)))
            planned.append((f"{stem}.html", card.render(doc)))
            if p.modality in dicom_dpp.DPP_MODALITIES:
                try:
                    planned.append((f"{stem}.dcm", dicom_dpp.to_dicom(trial, t)))
                except ImtrialError as exc:
                    diags.append(exc.diagnostic)
    if diags:
        unique = {(d.message, str(d.span)): d for d in diags}
        raise CompileErrors(list(unique.values()))
    planned.append((json_io.SCHEMA_FILE, json_io.schema_text()))
    out = Path(out_dir)
    written: list[Path] = []
    for name, content in planned:
        path = out / name
        if isinstance(content, str):
            atomic_write_text(path, content)
        else:
            atomic_write_dataset(path, content)
        written.append(path)
    return written
