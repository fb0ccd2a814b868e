"""The scanner card: one printable HTML page a technologist can follow at the console."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import jinja2

from imtrial_dsl import ir, templating

from .json_io import to_json
from .targets import Target


@lru_cache(maxsize=1)
def _env() -> jinja2.Environment:
    return templating.environment(Path(__file__).resolve().parent / "templates")


def render(doc: dict) -> str:
    """The card of a target's JSON document (:func:`json_io.to_json`)."""
    return _env().get_template("card.html.j2").render(doc=doc)


def scanner_card(trial: ir.Trial, t: Target) -> str:
    return render(to_json(trial, t))
