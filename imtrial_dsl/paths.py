"""Where the grammar and the stdlib live, in a source checkout and in an installed wheel."""
from __future__ import annotations

from importlib import resources
from pathlib import Path

_SRC = Path(__file__).resolve().parent.parent


def _packaged(sub: str) -> Path:
    try:
        return Path(str(resources.files(f"imtrial_dsl.{sub}")))
    except (ModuleNotFoundError, TypeError):
        return _SRC / sub


def grammar_file() -> Path:
    src = _SRC / "grammar" / "imtrial.lark"
    return src if src.exists() else _packaged("grammar") / "imtrial.lark"


def stdlib_root() -> Path:
    """The folder that ``import "stdlib/..."`` resolves against (its parent holds ``stdlib``)."""
    src = _SRC / "stdlib"
    return src if src.is_dir() else _packaged("stdlib")
