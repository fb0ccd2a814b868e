"""Where the grammar, the stdlib and the exporters live, in a source checkout and in an installed wheel."""
from __future__ import annotations

import importlib
import importlib.util
import sys
from importlib import resources
from pathlib import Path
from types import ModuleType

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


def exporters_package() -> ModuleType:
    """The ``imtrial_dsl.exporters`` package. An install maps the top-level ``exporters/`` folder onto that
    name (pyproject's package-dir); in a bare source checkout this makes the same mapping."""
    name = "imtrial_dsl.exporters"
    if name in sys.modules or importlib.util.find_spec(name) is not None:
        return importlib.import_module(name)
    src = _SRC / "exporters"
    spec = importlib.util.spec_from_file_location(name, src / "__init__.py", submodule_search_locations=[str(src)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    import imtrial_dsl

    imtrial_dsl.exporters = mod  # type: ignore[attr-defined]
    return mod
