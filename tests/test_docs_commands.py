"""The manuals stay true: every command is documented, every documented command exists, the README tour runs."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from imtrial_dsl.cli import build_parser
from imtrial_dsl.parser import parse

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]
BIN = Path(sys.executable).parent


def _blocks(path: Path, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", path.read_text(), flags=re.S)


def _subcommands() -> set[str]:
    parser = build_parser()
    for action in parser._actions:  # argparse keeps subcommands on its private actions list
        if action.__class__.__name__ == "_SubParsersAction":
            return set(action.choices)
    raise AssertionError("no subcommands found")


def test_every_subcommand_is_documented_and_every_documented_one_exists():
    real = _subcommands()
    mentioned: set[str] = set()
    for doc in DOCS:
        for block in _blocks(doc, "sh") + _blocks(doc, "text") + _blocks(doc, "console"):
            mentioned |= set(re.findall(r"(?:^|[\s;&|(])imtrial ([a-z][a-z-]*)", block, flags=re.M))
    undocumented = real - mentioned - {"help"}
    assert not undocumented, f"commands without a documented example: {sorted(undocumented)}"
    unknown = mentioned - real
    assert not unknown, f"docs mention commands that do not exist: {sorted(unknown)}"


@pytest.mark.parametrize("doc", [d for d in DOCS if _blocks(d, "imtrial")], ids=lambda p: p.name)
def test_imtrial_snippets_parse(doc):
    for i, block in enumerate(_blocks(doc, "imtrial")):
        tree, diags = parse(block, f"{doc.name}[{i}]")
        assert tree is not None and not diags, [str(d) for d in diags]


def test_readme_starts_with_the_two_setup_commands():
    text = (ROOT / "README.md").read_text()
    first = _blocks(ROOT / "README.md", "sh")[0]
    assert text.index("```sh") < text.index("\n## ")
    cmds = [ln.split("#")[0].strip() for ln in first.splitlines() if ln.split("#")[0].strip()]
    assert cmds == ["make demo", "make test"]


def test_readme_tour_runs(tmp_path):
    """Run the README's tour as a new user would, in a scratch folder."""
    tour = _blocks(ROOT / "README.md", "sh")[1]
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", NO_COLOR="1")
    env.pop("IMTRIAL_KEY", None)
    script = "set -e\n" + "\n".join(ln for ln in tour.splitlines() if not ln.startswith(". .venv"))
    proc = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    for out in ("ir.json", "graph.svg", "work/archive", "docs-out/charter.pdf", "wf/workflow.cwl", "report"):
        assert (tmp_path / out).exists(), out
