#!/usr/bin/env python3
"""Write the units of each dimension into the e-protocol JSON Schema (its ``$defs.quantity.allOf``).

Source: the unit table of imtrial itself (``imtrial_dsl/units.py``: UNITS, CANONICAL). Usage:
    python scripts/gen_eprotocol_units.py exporters/eprotocol/schemas/imtrial-eprotocol-1.schema.json
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from imtrial_dsl.units import CANONICAL, UNITS


def main(path: str) -> None:
    p = Path(path)
    schema = json.loads(p.read_text(encoding="utf-8"))
    rules = []
    for dim, canonical in sorted(CANONICAL.items()):
        written = sorted(u for u, (d, _) in UNITS.items() if d == dim) + ([""] if canonical == "" else [])
        rules.append({"if": {"properties": {"dimension": {"const": dim}}, "required": ["dimension"]},
                      "then": {"properties": {"unit": {"const": canonical}, "source_unit": {"enum": written}}}})
    q = schema["$defs"]["quantity"]
    q["properties"]["dimension"] = {"enum": sorted(set(CANONICAL) | {"none"})}
    q["allOf"] = rules
    p.write_text(json.dumps(schema, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main(sys.argv[1])
