"""The editor package: the TextMate grammar is generated from the language, scopes every token of every
example and stdlib file, and the VS Code extension starts ``imtrial lsp``.

The grammar is run by a small TextMate tokenizer below (the rules VS Code's vscode-textmate applies:
at each position the earliest match among the current rule's patterns wins, the first listed on a tie,
a begin/end rule's end pattern tried before its patterns; ``include`` of ``#repository`` entries). The
grammar's regular expressions use only what Python's ``re`` and Oniguruma read alike.
"""
from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from typing import Optional

import pytest

ROOT = Path(__file__).resolve().parent.parent
GRAMMAR_FILE = ROOT / "editors" / "vscode" / "syntaxes" / "imtrial.tmLanguage.json"
FILES = sorted((ROOT / "examples").glob("*.imtrial")) + sorted((ROOT / "stdlib").rglob("*.imtrial")) \
    + sorted((ROOT / "tests" / "scenarios").glob("*.imtrial"))


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class TextMate:
    """Enough of a TextMate engine for a grammar of match and begin/end rules."""

    def __init__(self, grammar: dict):
        self.g = grammar
        self._re: dict[str, re.Pattern] = {}

    def rx(self, pattern: str) -> re.Pattern:
        if pattern not in self._re:
            self._re[pattern] = re.compile(pattern)
        return self._re[pattern]

    def expand(self, patterns: list[dict]) -> list[dict]:
        out = []
        for p in patterns:
            inc = p.get("include")
            if inc == "$self":
                out += self.expand(self.g["patterns"])
            elif inc:
                out += self.expand([self.g["repository"][inc.lstrip("#")]])
            elif "match" in p or "begin" in p:
                out.append(p)
            else:
                out += self.expand(p.get("patterns", []))
        return out

    def tokenize(self, text: str) -> list[tuple[int, int, int, list[str]]]:
        """(line, start, end, scopes) for every piece of text; the root scope is left out."""
        out = []
        stack: list[dict] = []  # open begin/end rules
        for ln, line in enumerate(text.split("\n")):
            pos = 0
            while pos <= len(line):
                rule = stack[-1] if stack else None
                cands = self.expand(rule.get("patterns", []) if rule else self.g["patterns"])
                best: Optional[tuple[int, int, dict, re.Match]] = None
                if rule is not None:
                    m = self.rx(rule["end"]).search(line, pos)
                    if m:
                        best = (m.start(), -1, {"__end__": True}, m)
                for i, p in enumerate(cands):
                    m = self.rx(p.get("match") or p["begin"]).search(line, pos)
                    if m and (best is None or m.start() < best[0]):
                        best = (m.start(), i, p, m)
                base = [s for r in stack for s in (r.get("name"), r.get("contentName")) if s]
                if best is None:
                    if pos < len(line):
                        out.append((ln, pos, len(line), base))
                    break
                start, _, p, m = best
                if start > pos:
                    out.append((ln, pos, start, base))
                if p.get("__end__"):
                    self._emit(out, ln, m, base, rule.get("endCaptures", {}), None)
                    stack.pop()
                elif "begin" in p:
                    self._emit(out, ln, m, base + ([p["name"]] if p.get("name") else []), p.get("beginCaptures", {}), None)
                    stack.append(p)
                else:
                    self._emit(out, ln, m, base, p.get("captures", {}), p.get("name"))
                if m.end() == pos and not p.get("__end__") and "begin" not in p:
                    pos += 1  # an empty match must not loop
                else:
                    pos = m.end()
                if pos >= len(line) and not stack:
                    break
                if pos >= len(line) and stack and not self.rx(stack[-1]["end"]).search(line, pos):
                    break
        return out

    @staticmethod
    def _emit(out, ln, m: re.Match, base: list[str], captures: dict, name: Optional[str]) -> None:
        scopes = base + ([name] if name else [])
        covered = [list(scopes) for _ in range(m.end() - m.start())]
        for gi, cap in captures.items():
            g = int(gi)
            if m.group(g) is not None and cap.get("name"):
                for k in range(m.start(g), m.end(g)):
                    covered[k - m.start()].append(cap["name"])
        k = 0
        while k < len(covered):
            j = k
            while j < len(covered) and covered[j] == covered[k]:
                j += 1
            out.append((ln, m.start() + k, m.start() + j, covered[k]))
            k = j


@pytest.fixture(scope="module")
def engine() -> TextMate:
    return TextMate(json.loads(GRAMMAR_FILE.read_text(encoding="utf-8")))


def test_grammar_is_generated_from_the_language():
    gen = _script("gen_textmate")
    assert gen.build() == json.loads(GRAMMAR_FILE.read_text(encoding="utf-8")), "run scripts/gen_textmate.py"


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_unscoped_token(engine, path):
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    bare = [(ln + 1, s + 1, lines[ln][s:e]) for ln, s, e, scopes in engine.tokenize(text)
            if not scopes and lines[ln][s:e].strip()]
    assert not bare, f"text without a scope (line, col, text): {bare[:10]}"


def test_scopes_are_the_right_ones(engine):
    text = ('protocol T1w modality MR "3D T1" {  # a comment\n'
            '  EchoTime in 2.0 .. 3.5 ms severity warning\n'
            '  match SeriesDescription ~ "(?i)t1\\"w"\n'
            '}\n'
            'deidentify using ps315_basic with retain_uids\n')
    toks = {(ln, text.split("\n")[ln][s:e]): scopes for ln, s, e, scopes in engine.tokenize(text)}
    assert toks[(0, "protocol")] == ["storage.type.imtrial"]
    assert toks[(0, "T1w")] == ["entity.name.type.imtrial"]
    assert "comment.line.number-sign.imtrial" in toks[(0, "# a comment")]
    assert toks[(1, "EchoTime")] == ["support.variable.attribute.imtrial"]
    assert toks[(1, "2.0")] == ["constant.numeric.imtrial"] and toks[(1, "ms")] == ["keyword.other.unit.imtrial"]
    assert toks[(1, "severity")] == ["keyword.other.imtrial"]
    assert toks[(2, "\\\"")] == ["string.quoted.double.imtrial", "constant.character.escape.imtrial"]
    assert toks[(4, "retain_uids")] == ["support.constant.option.imtrial"]


def test_every_keyword_of_the_language_is_highlighted_as_one(engine):
    from imtrial_dsl.parser import keywords

    for kw in sorted(keywords()):
        (tok,) = [t for t in engine.tokenize(kw) if t[2] > t[1]]
        assert tok[3] and tok[3][0] in ("keyword.other.imtrial", "storage.type.imtrial",
                                        "constant.language.boolean.imtrial"), (kw, tok)


def test_vscode_extension_starts_the_language_server():
    ext = ROOT / "editors" / "vscode"
    pkg = json.loads((ext / "package.json").read_text(encoding="utf-8"))
    (lang,) = pkg["contributes"]["languages"]
    assert lang["id"] == "imtrial" and lang["extensions"] == [".imtrial"]
    (gram,) = pkg["contributes"]["grammars"]
    assert (ext / gram["path"]).resolve() == GRAMMAR_FILE.resolve() and gram["scopeName"] == "source.imtrial"
    assert "vscode-languageclient" in pkg["dependencies"]
    main = (ext / pkg["main"]).read_text(encoding="utf-8")
    assert "'lsp'" in main and "imtrial.server.path" in main  # runs `imtrial lsp`, the path configurable
    assert "imtrial.server.path" in pkg["contributes"]["configuration"]["properties"]
    json.loads((ext / lang["configuration"]).read_text(encoding="utf-8"))
