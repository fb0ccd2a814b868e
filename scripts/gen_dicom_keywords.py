"""Generate imtrial_dsl/data/dicom_keywords.json: DICOM attribute keyword -> [tag, VR].

Source: pydicom's data dictionary (``pydicom.datadict.DicomDictionary``, the file
``src/pydicom/_dicom_dict.py`` of the pydicom project on GitHub, MIT licence), which pydicom
generates from DICOM PS3.6 "Data Dictionary". It is read from the pydicom installed with the
project (a clean clone gets it from ``make venv``); the generated file records that version. The
checker reads this table to validate keywords in constraints and match rules without importing
pydicom (importing it costs ~0.4 s at start-up of `imtrial check`).

Regenerate after upgrading pydicom:  .venv/bin/python scripts/gen_dicom_keywords.py [--out PATH]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pydicom
from pydicom.datadict import DicomDictionary

OUT = Path(__file__).resolve().parent.parent / "imtrial_dsl" / "data" / "dicom_keywords.json"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args(argv)
    table = {entry[4]: [tag, entry[0]] for tag, entry in sorted(DicomDictionary.items()) if entry[4]}
    doc = {"source": f"pydicom {pydicom.__version__} data dictionary (DICOM PS3.6)",
           "generated_by": "scripts/gen_dicom_keywords.py", "keywords": table}
    a.out.write_text(json.dumps(doc, separators=(",", ":"), sort_keys=True) + "\n")
    print(f"wrote {len(table)} keywords to {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
