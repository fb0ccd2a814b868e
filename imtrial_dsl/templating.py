"""The one jinja2 environment factory for every template the project renders.

Documents, scanner cards, the inventory page and management reports share one policy: HTML
templates (``*.html.j2``) escape what they insert, Markdown ones (``*.md.j2``) do not (their
exporter escapes through explicit filters); block tags leave no blank lines behind; a template's
final newline is kept. Each caller keeps its own template folder and passes its own filters.
"""
from __future__ import annotations

import os
from typing import Callable, Mapping, Optional

import jinja2


def environment(folder: str | os.PathLike, *, filters: Optional[Mapping[str, Callable]] = None,
                strict: bool = False) -> jinja2.Environment:
    """An environment loading templates from ``folder``; ``strict`` makes an undefined name an error."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(os.fspath(folder)),
        autoescape=jinja2.select_autoescape(enabled_extensions=("html", "html.j2"), default_for_string=False),
        undefined=jinja2.StrictUndefined if strict else jinja2.Undefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters.update(filters or {})
    return env
