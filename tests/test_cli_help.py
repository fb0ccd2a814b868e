"""A command line that teaches: every command's help is complete, its examples parse, names agree across
commands, docs/cli.md is the parser's own help, and every diagnostic code can be explained."""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from imtrial_dsl.cli import build_parser, main

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


GEN_DOCS = _script("gen_cli_docs")
COMMANDS = GEN_DOCS.subcommands(build_parser())


def _argv(example: str) -> list[str]:
    """An example line as argv: comments, redirections and pipes cut off, the leading 'imtrial' dropped."""
    words = shlex.split(example.split("  #")[0])
    for i, w in enumerate(words):
        if w in (">", ">>", "|", "&&", "2>") or w.startswith((">", "2>")):
            words = words[:i]
            break
    assert words[0] == "imtrial"
    return words[1:]


def test_there_are_commands():
    assert {"check", "run", "report", "lsp", "explain-code", "completion"} <= set(COMMANDS)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_has_purpose_options_and_examples(name):
    p = COMMANDS[name]
    assert getattr(p, "imtrial_purpose", None), f"{name}: register it with cli.common.command()"
    assert "\n" not in p.imtrial_purpose and len(p.imtrial_purpose) <= 100
    assert p.imtrial_examples
    for action in p._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help and action.help != argparse.SUPPRESS, f"{name}: {action.option_strings or action.dest} has no help"
    text = p.format_help()
    assert "examples:" in text and all(e in text for e in p.imtrial_examples)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_examples_parse(name):
    """An example that no longer fits the options is caught here, not by a user."""
    ap = build_parser()
    for ex in COMMANDS[name].imtrial_examples:
        args = ap.parse_args(_argv(ex))
        assert args.command == name


def test_argument_names_agree_across_commands():
    for name, p in COMMANDS.items():
        for a in p._actions:
            if a.dest in ("study", "studies"):
                assert a.metavar == "STUDY", name
            if a.dest == "out":
                assert a.option_strings[:2] == ["-o", "--out"], name
            if a.dest == "workdir":
                assert a.option_strings == ["--workdir"] and a.metavar == "DIR", name
    # where earlier releases spelled it --output, it still works
    ap = build_parser()
    assert ap.parse_args(["compile", "x.imtrial", "--output", "y.json"]).out == "y.json"
    assert ap.parse_args(["export", "docs", "x.imtrial", "--output", "d"]).out == "d"


def test_the_key_variable_is_named_where_it_is_needed():
    for name in ("run", "step"):
        assert "IMTRIAL_KEY" in COMMANDS[name].format_help(), name


def test_docs_cli_md_is_the_parsers_help():
    current = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    assert GEN_DOCS.render(current) == current, "docs/cli.md is out of date: run scripts/gen_cli_docs.py"
    for name in COMMANDS:
        assert f"### imtrial {name}\n" in current


def test_diagnostic_code_table_matches_the_manuals():
    gen = _script("gen_diagnostic_codes")
    committed = json.loads((ROOT / "imtrial_dsl" / "data" / "diagnostic_codes.json").read_text(encoding="utf-8"))
    assert gen.build(ROOT / "docs") == committed, "run scripts/gen_diagnostic_codes.py"


def test_every_code_the_package_raises_can_be_explained():
    from imtrial_dsl.codes import table

    used = set()
    for folder in ("imtrial_dsl", "exporters"):
        for f in (ROOT / folder).rglob("*.py"):
            used |= set(re.findall(r"""["']([EW]\d{3})["']""", f.read_text(encoding="utf-8")))
    missing = sorted(used - set(table()) - {"E000"})
    assert not missing, f"codes without an entry in docs/diagnostics.md or docs/language.md: {missing}"


def test_explain_code(capsys):
    assert main(["explain-code", "E301"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("E301: undefined protocol") and "acquire T1" in out and "docs/diagnostics.md" in out
    assert main(["explain-code", "e900"]) == 0 and "imtrial[EXTRA]" in capsys.readouterr().out
    assert main(["explain-code", "E3O1"]) == 2
    assert "unknown diagnostic code" in capsys.readouterr().err
    assert main(["explain-code"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(ln.startswith("E103  unexpected token") for ln in lines) and len(lines) > 80


def test_text_diagnostics_print_their_code():
    bad = ROOT / "tests" / "scenarios" / "undefined_names.imtrial"
    p = subprocess.run([str(BIN / "imtrial"), "check", str(bad)], capture_output=True, text=True,
                       env=dict(os.environ, NO_COLOR="1"))
    assert p.returncode == 1
    assert re.search(r":\d+:\d+: error\[E301\]: undefined protocol", p.stderr), p.stderr


def test_bash_completion_completes_commands_and_options():
    """The script `imtrial completion bash` prints, sourced in a real bash, completes a command and an option."""
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    script = ('source <(imtrial completion bash); '
              'complete_for() { COMP_LINE="$1"; COMP_POINT=${#COMP_LINE}; read -ra COMP_WORDS <<< "$1"; '
              '[[ "$1" == *" " ]] && COMP_WORDS+=(""); COMP_CWORD=$(( ${#COMP_WORDS[@]} - 1 )); COMPREPLY=(); '
              '_python_argcomplete imtrial; printf "%s\\n" "${COMPREPLY[@]}"; echo --; }; '
              'complete_for "imtrial expl"; complete_for "imtrial status --a"; complete_for "imtrial completion "')
    p = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env, timeout=60)
    first, second, third = [[w.strip() for w in part.split("\n") if w.strip()] for part in p.stdout.split("--\n")[:3]]
    assert first == ["explain-code"], p.stdout + p.stderr
    assert second == ["--all"], p.stdout
    assert {"bash", "fish", "zsh"} <= set(third) and "lsp" not in third, p.stdout


@pytest.mark.parametrize("shell", ["zsh", "fish"])
def test_completion_scripts_for_other_shells(shell):
    p = subprocess.run([str(BIN / "imtrial"), "completion", shell], capture_output=True, text=True)
    assert p.returncode == 0 and "_ARGCOMPLETE" in p.stdout
