"""Generate exporters/eprotocol/schemas/dpp_modules.json: modules of the CT/XA Defined Procedure Protocol IODs.

Source: the project's DICOM reference data (``/work/shared/reference/dicom/protocol_iod_modules.json``,
``protocol_modules.json`` and ``sops.json``, extracted from DICOM PS3.3 Annex A and PS3.4 Annex B).
The package reads only the generated file, never the reference folder.

    python scripts/gen_dpp_modules.py [REFERENCE_DIR]
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "exporters" / "eprotocol" / "schemas" / "dpp_modules.json"
CIODS = {"CT": "ct-defined-procedure-protocol", "XA": "xa-defined-procedure-protocol"}


def main(ref_dir: str = "/work/shared/reference/dicom") -> None:
    ref = Path(ref_dir)
    iod_modules = json.loads((ref / "protocol_iod_modules.json").read_text())
    names = {m["id"]: m["name"] for m in json.loads((ref / "protocol_modules.json").read_text())}
    sops = json.loads((ref / "sops.json").read_text())
    out = {
        "source": "DICOM PS3.3 Annex A (CT/XA Defined Procedure Protocol IODs) and PS3.4 Annex B, "
                  "via the project's reference data protocol_iod_modules.json, protocol_modules.json, sops.json",
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
    OUT.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main(*sys.argv[1:])
