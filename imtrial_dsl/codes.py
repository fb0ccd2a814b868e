"""What each diagnostic code means, for ``imtrial explain-code`` and the language server's hovers.

The table is generated from the manuals' code tables (``scripts/gen_diagnostic_codes.py``), so the
command and the documentation say the same thing.
"""
from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from typing import Optional

from .diagnostics import did_you_mean


@lru_cache(maxsize=1)
def table() -> dict[str, dict]:
    """code -> {section, doc, meaning, [example], [raised_as]}."""
    text = resources.files("imtrial_dsl").joinpath("data/diagnostic_codes.json").read_text(encoding="utf-8")
    return json.loads(text)["codes"]


def explain(code: str) -> Optional[dict]:
    """The entry for ``code`` (case-insensitive), with its ``code``; None when it is not a known code."""
    code = code.strip().upper()
    entry = table().get(code)
    return {"code": code, **entry} if entry else None


def suggest(code: str) -> Optional[str]:
    """A did-you-mean for an unknown code."""
    return did_you_mean(code.strip().upper(), table())


def plain(text: str) -> str:
    """Table text as a terminal shows it (Markdown backticks and bold dropped)."""
    return text.replace("`", "").replace("**", "")
