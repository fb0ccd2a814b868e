"""Fuzzing: thousands of mutated study texts through ``compile_text`` — never an exception.

Seeds are the examples and the scenario files (imports dropped, so each input stays small and
fast); mutations are byte flips, token deletions / duplications / swaps, truncations, splices of
two seeds and insertions of hostile snippets. The random generator is seeded, so a failure
replays; the failing input is written to the pytest temp folder and named in the message.
"""
from __future__ import annotations

import random
import re
import sys
import traceback
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from imtrial_dsl.compiler import compile_text  # noqa: E402
from imtrial_dsl.diagnostics import Diagnostic, render  # noqa: E402

BATCHES, PER_BATCH = 8, 250  # 2000 inputs

_IMPORT = re.compile(r'^\s*import\s+"[^"\n]*"\s*$', re.M)
_TOKEN = re.compile(r'"(?:[^"\\\n]|\\.)*"|\s+|[A-Za-z_][A-Za-z0-9_]*|[+-]?\d+(?:\.\d+)?|.', re.S)
SNIPPETS = [
    "{", "}", "(", ")", '"', "\\", "..", "±", "+/-", ";", "\n", "\x00", "\ufeff", "é", "🙂", "#", "~", "!~",
    "9" * 400, "1e999", "-0", "0.0.0", "protocol", "site", "visit", "variant", "qc", "analysis", "import",
    'import "nowhere/missing.imtrial"', 'import "stdlib/../../etc/passwd"', "deid_profile", "rule (gggg,eeee) - \"x\" X",
    "EchoTime in 5 .. 1 ms", "match SeriesDescription ~ \"(\"", "window -1 .. -9 d", "at month 99999999999",
    "{" * 50, "}" * 50, "input x from a.b.c", "from .", "key env \"\"", "(0010,0010)", "X/Z/U*",
]


def _seeds() -> list[str]:
    files = sorted((ROOT / "examples").glob("*.imtrial")) + sorted((ROOT / "tests" / "scenarios").glob("*.imtrial"))
    return [_IMPORT.sub("", f.read_text(encoding="utf-8")) for f in files]


SEEDS = _seeds()


def _pools() -> dict[str, list[str]]:
    pools: dict[str, set[str]] = {"str": set(), "num": set(), "word": set()}
    for seed in SEEDS:
        for t in _TOKEN.findall(seed):
            kind = _kind(t)
            if kind:
                pools[kind].add(t)
    pools["num"] |= {"0", "-1", "1e308", "99999999999999999999", "0.0000001", "-0", "+7"}
    pools["str"] |= {'""', '"("', '"[a-"', '"(?i)t1w"', '"{seq}"', '"{"', '"\\\\"', '"{site}-{seq:04}{check}"', '"*"'}
    return {k: sorted(v) for k, v in pools.items()}


def _kind(tok: str):
    if tok.startswith('"'):
        return "str"
    if re.fullmatch(r"[+-]?\d+(?:\.\d+)?", tok):
        return "num"
    if re.fullmatch(r"[A-Z][A-Za-z0-9_]*", tok):
        return "word"  # names and DICOM keywords; lowercase words are mostly keywords
    return None


POOLS = _pools()


def mutate(rng: random.Random, text: str, op: int | None = None) -> str:
    toks = _TOKEN.findall(text) or [""]
    op = rng.randrange(11) if op is None else op
    if op == 0:  # byte flips
        b = bytearray(text.encode("utf-8"))
        for _ in range(rng.randint(1, 8)):
            if b:
                b[rng.randrange(len(b))] = rng.randrange(256)
        return b.decode("utf-8", errors="replace")
    if op == 1:  # token deletions
        for _ in range(rng.randint(1, 6)):
            if len(toks) > 1:
                del toks[rng.randrange(len(toks))]
    elif op == 2:  # token duplications
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(len(toks))
            toks.insert(i, toks[i])
    elif op == 3:  # swaps
        for _ in range(rng.randint(1, 4)):
            i, j = rng.randrange(len(toks)), rng.randrange(len(toks))
            toks[i], toks[j] = toks[j], toks[i]
    elif op == 4:  # truncation
        return text[: rng.randrange(len(text) + 1)]
    elif op == 5:  # splice two seeds
        other = rng.choice(SEEDS)
        return text[: rng.randrange(len(text) + 1)] + other[rng.randrange(len(other) + 1):]
    elif op == 6:  # hostile snippets
        for _ in range(rng.randint(1, 3)):
            toks.insert(rng.randrange(len(toks) + 1), " " + rng.choice(SNIPPETS) + " ")
    elif op >= 8:  # same-kind replacements: mostly still valid syntax, so the lowering and checker get exercised
        idx = [i for i, t in enumerate(toks) if _kind(t)]
        for _ in range(rng.randint(1, 5)):
            if idx:
                i = rng.choice(idx)
                kind = _kind(toks[i])
                if kind:  # an earlier replacement here may have left a token of no kind ('1e308')
                    toks[i] = rng.choice(POOLS[kind])
    else:  # a block moved elsewhere (declarations out of order, nested wrongly)
        i = rng.randrange(len(toks))
        j = min(len(toks), i + rng.randint(1, 40))
        chunk = toks[i:j]
        del toks[i:j]
        k = rng.randrange(len(toks) + 1)
        toks[k:k] = chunk
    return "".join(toks)


@pytest.mark.parametrize("batch", range(BATCHES))
def test_mutated_inputs_never_raise(batch: int, tmp_path: Path) -> None:
    rng = random.Random(20261129 + batch)
    name = str(tmp_path / "fuzz.imtrial")
    for n in range(PER_BATCH):
        text = rng.choice(SEEDS)
        if rng.random() < 0.4:  # syntax-preserving: reaches lowering and checker
            text = mutate(rng, text, op=8)
        else:
            for _ in range(rng.choice((1, 1, 2, 3))):
                text = mutate(rng, text)
        try:
            res = compile_text(text, name)
            assert all(isinstance(d, Diagnostic) and (d.span is None or d.span.line >= 0) for d in res.diagnostics)
            render(res.diagnostics, res.sources)
            if res.ok:
                assert nx.is_directed_acyclic_graph(res.graph)
        except Exception:
            bad = tmp_path / f"failing_{batch}_{n}.imtrial"
            bad.write_text(text, encoding="utf-8", errors="replace")
            pytest.fail(f"input {bad} raised:\n{traceback.format_exc(limit=6)}")
