"""The command line is one layer: only ``imtrial_dsl/cli/`` parses arguments, prints or exits, and every
error the library raises on purpose is an ImtrialError (which the CLI renders as a diagnostic).

Checked on the syntax tree of every module (not by grep, so strings and comments do not count and
aliases do), over ``imtrial_dsl/**`` and ``exporters/**``.
"""
from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
from pathlib import Path

import pytest

import imtrial_dsl
from imtrial_dsl.cli.language import EXPORT_TARGETS
from imtrial_dsl.diagnostics import ImtrialError
from imtrial_dsl.paths import exporters_package

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "imtrial_dsl"
CLI = PKG / "cli"
# imtrial_dsl/tools/ holds stand-alone demo analysis programs. A study runs them as analysis subprocesses
# (``run "python3 -m imtrial_dsl.tools.volume {t1} {out}"``) with their own argv, and their output is the
# program's, as for any third-party analysis; no library module imports them.
TOOLS = PKG / "tools"
MAIN = PKG / "__main__.py"  # ``python -m imtrial_dsl``: sys.exit(main())


def _library_files() -> list[Path]:
    files = sorted(PKG.rglob("*.py")) + sorted((ROOT / "exporters").rglob("*.py"))
    return [f for f in files if CLI not in f.parents and TOOLS not in f.parents]


def _dotted(node: ast.AST) -> str:
    """``sys.exit`` for ``sys.exit``; '' for anything that is not a plain dotted name."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else ""
    return ""


def _module_of(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] == "exporters":
        parts = ["imtrial_dsl", *parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(node: ast.AST, path: Path) -> list[str]:
    """Absolute names an import statement brings in (relative imports resolved against ``path``'s package)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level:
        pkg = _module_of(path).split(".")
        if path.name != "__init__.py":
            pkg = pkg[:-1]
        base = ".".join(pkg[: len(pkg) - node.level + 1] + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    return [base] + [f"{base}.{a.name}" for a in node.names]


def violations(path: Path, text: str | None = None) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8") if text is None else text, str(path))
    found = []
    for node in ast.walk(tree):
        where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Call):
            name = _dotted(node.func)
            if name == "SystemExit":
                found.append(f"{where}: raises SystemExit")
            elif name in ("print", "exit", "quit", "sys.exit", "os._exit", "builtins.print"):
                if not (path == MAIN and name == "sys.exit"):
                    found.append(f"{where}: calls {name}")
        elif isinstance(node, ast.Raise) and node.exc is not None and _dotted(node.exc) == "SystemExit":
            found.append(f"{where}: raises SystemExit")
        for name in _imported(node, path):
            if name == "argparse" or name.startswith("argparse."):
                found.append(f"{where}: imports argparse")
            elif name in ("sys.exit", "builtins.print"):
                found.append(f"{where}: imports {name}")
            elif (name == "imtrial_dsl.cli" or name.startswith("imtrial_dsl.cli.")) and path != MAIN:
                found.append(f"{where}: imports the CLI ({name})")
    return found


def test_only_the_cli_prints_exits_or_parses_arguments():
    files = _library_files()
    assert len(files) > 40 and MAIN in files
    problems = [v for f in files for v in violations(f)]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("snippet, what", [
    ("print('x')", "calls print"),
    ("import sys\nsys.exit(1)", "calls sys.exit"),
    ("raise SystemExit(2)", "raises SystemExit"),
    ("raise SystemExit", "raises SystemExit"),
    ("from argparse import ArgumentParser", "imports argparse"),
    ("import argparse as ap", "imports argparse"),
    ("from sys import exit", "imports sys.exit"),
    ("from ..cli import load_study", "imports the CLI"),
])
def test_the_check_sees_each_kind(snippet, what):
    found = violations(PKG / "runner" / "example.py", snippet)
    assert any(what in v for v in found), found


def _all_modules():
    yield from pkgutil.walk_packages(imtrial_dsl.__path__, "imtrial_dsl.")
    pkg = exporters_package()
    yield from pkgutil.walk_packages(pkg.__path__, pkg.__name__ + ".")


def test_every_exception_the_library_defines_is_an_imtrial_error():
    """One error root: every error carries a Diagnostic with a code, and the CLI renders it (exit 1)."""
    allowed = {"imtrial_dsl.cli.common.UsageError"}  # a command-line mistake: exit 2, never raised by the library
    outside = []
    for info in _all_modules():
        if info.name == "imtrial_dsl.__main__" or info.name.startswith("imtrial_dsl.tools."):
            continue  # __main__ runs the CLI when imported
        mod = importlib.import_module(info.name)
        for _, cls in inspect.getmembers(mod, inspect.isclass):
            name = f"{cls.__module__}.{cls.__qualname__}"
            if (cls.__module__ == mod.__name__ and issubclass(cls, BaseException) and name not in allowed
                    and not issubclass(cls, ImtrialError)):
                outside.append(name)
    assert not outside, outside


def test_export_targets_are_the_exporters_that_define_export():
    found = []
    modules = [(f.stem, f) for f in (ROOT / "exporters").glob("*.py")]
    modules += [(f.parent.name, f) for f in (ROOT / "exporters").glob("*/__init__.py")]   # an exporter package
    for name, f in sorted(modules):
        tree = ast.parse(f.read_text(encoding="utf-8"))
        if any(isinstance(n, ast.FunctionDef) and n.name == "export" for n in tree.body):
            found.append(name)
    assert tuple(found) == EXPORT_TARGETS
