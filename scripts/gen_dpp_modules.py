"""Generate exporters/eprotocol/schemas/dpp_modules.json: modules of the CT/XA Defined Procedure Protocol IODs.

Source: DICOM PS3.3 Annex A (the IODs' modules and their usage) and PS3.4 Annex B (SOP classes) as
JSON tables extracted from the standard by the innolitics/dicom-standard project on GitHub (MIT
licence): ``protocol_iod_modules.json`` and ``protocol_modules.json`` (its ``standard/ciod_to_modules.json``
and ``standard/modules.json`` limited to the protocol IODs) and ``sops.json`` (its ``standard/sops.json``).
The package reads only the generated file, never the source folder.

    .venv/bin/python scripts/gen_dpp_modules.py SOURCE_DIR [--out PATH]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "exporters" / "eprotocol" / "schemas" / "dpp_modules.json"
CIODS = {"CT": "ct-defined-procedure-protocol", "XA": "xa-defined-procedure-protocol"}
SOURCES = ("protocol_iod_modules.json", "protocol_modules.json", "sops.json")


def build(ref: Path) -> dict:
    iod_modules, modules, sops = (json.loads((ref / name).read_text(encoding="utf-8")) for name in SOURCES)
    names = {m["id"]: m["name"] for m in modules}
    out = {
        "source": "DICOM PS3.3 Annex A (CT/XA Defined Procedure Protocol IODs) and PS3.4 Annex B, as extracted by "
                  f"innolitics/dicom-standard (MIT licence): {', '.join(SOURCES)}",
        "generator": "scripts/gen_dpp_modules.py",
        "iods": {},
    }
    for modality, ciod in CIODS.items():
        sop = next(s for s in sops if s["name"] == f"{modality} Defined Procedure Protocol Storage")
        out["iods"][modality] = {
            "ciod": ciod,
            "sop_class_name": sop["name"],
            "sop_class_uid": sop["id"],
            "modules": [
                {"id": m["moduleId"], "name": names.get(m["moduleId"], m["moduleId"]), "usage": m["usage"],
                 "ie": m["informationEntity"]}
                for m in iod_modules if m["ciodId"] == ciod
            ],
        }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source_dir", metavar="SOURCE_DIR", type=Path, help=f"folder holding {', '.join(SOURCES)}")
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args(argv)
    a.out.write_text(json.dumps(build(a.source_dir), indent=1) + "\n")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
