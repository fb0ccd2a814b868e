"""Generate imtrial_dsl/data/dicom_keywords.json: DICOM attribute keyword -> [tag, VR].

Source: pydicom's data dictionary (pydicom.datadict.DicomDictionary), which pydicom generates from
DICOM PS3.6 "Data Dictionary". The checker reads this table to validate keywords in constraints and
match rules without importing pydicom (importing it costs ~0.4 s at start-up of `imtrial check`).

Regenerate after upgrading pydicom:  .venv/bin/python scripts/gen_dicom_keywords.py
"""
from __future__ import annotations

import json
from pathlib import Path

import pydicom
from pydicom.datadict import DicomDictionary

OUT = Path(__file__).resolve().parent.parent / "imtrial_dsl" / "data" / "dicom_keywords.json"


def main() -> None:
    table = {entry[4]: [tag, entry[0]] for tag, entry in sorted(DicomDictionary.items()) if entry[4]}
    doc = {"source": f"pydicom {pydicom.__version__} data dictionary (DICOM PS3.6)",
           "generated_by": "scripts/gen_dicom_keywords.py", "keywords": table}
    OUT.write_text(json.dumps(doc, separators=(",", ":"), sort_keys=True) + "\n")
    print(f"wrote {len(table)} keywords to {OUT}")


if __name__ == "__main__":
    main()
