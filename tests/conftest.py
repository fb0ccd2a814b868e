"""Test bootstrap: make ``imtrial_dsl.exporters`` importable from a source checkout.

pyproject maps ``exporters/`` to ``imtrial_dsl.exporters`` (package-dir); an installed or
editable copy already has it, a bare checkout on PYTHONPATH does not. Additive only.
"""
import importlib.util
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

try:
    import imtrial_dsl.exporters  # noqa: F401
except ModuleNotFoundError:
    import imtrial_dsl

    for _sub in ("exporters", "grammar", "stdlib"):
        _name = f"imtrial_dsl.{_sub}"
        if _name in sys.modules or not (_ROOT / _sub / "__init__.py").exists():
            continue
        _spec = importlib.util.spec_from_file_location(
            _name, _ROOT / _sub / "__init__.py", submodule_search_locations=[str(_ROOT / _sub)]
        )
        _mod = importlib.util.module_from_spec(_spec)
        sys.modules[_name] = _mod
        _spec.loader.exec_module(_mod)
        setattr(imtrial_dsl, _sub, _mod)
