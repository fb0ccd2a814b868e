"""Attributes that DICOM defines only inside a sequence of a modality's image IODs (generated table).

``NESTED[modality][keyword] = (sequence keyword, PS3.3 module)``; from
``scripts/gen_nested_keywords.py``. Adherence looks a bare keyword up there when the top level lacks
it; the checker warns that the protocol names a nested attribute as if it were top-level (W408).
Also the Modality defined terms the checker validates modality codes against (E318).
"""
from __future__ import annotations

import json
from importlib import resources

_DATA = json.loads(resources.files("imtrial_dsl").joinpath("data/nested_keywords.json").read_text(encoding="utf-8"))
NESTED: dict[str, dict[str, tuple[str, str]]] = {
    mod: {kw: (v[0], v[1]) for kw, v in table.items()} for mod, table in _DATA["nested"].items()
}
#: Modality (0008,0060) defined terms -> meaning (PS3.3 C.7.3.1.1.1)
MODALITIES: dict[str, str] = _DATA["modalities"]
