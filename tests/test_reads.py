"""The `read` and `changelog` constructs: the source renderer round-trips through parse and lower,
and the examples use them (the checks themselves are scenario data: tests/scenarios/reads.*)."""
from __future__ import annotations

from pathlib import Path

import pytest

from imtrial_dsl import ir, source
from imtrial_dsl.compiler import compile_file
from imtrial_dsl.fmt import format_source
from imtrial_dsl.lower import lower
from imtrial_dsl.parser import parse

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ("oncology_ct", "amyloid_mri")


def _lowered(text: str) -> ir.Trial:
    tree, diags = parse(text, "x")
    assert diags == [], [str(d) for d in diags]
    trial, ldiags = lower(tree, "x")
    assert ldiags == [], [str(d) for d in ldiags]
    return trial


@pytest.mark.parametrize("name", EXAMPLES)
def test_reads_and_changelog_render_back_to_the_same_ir(name):
    trial = compile_file(ROOT / "examples" / f"{name}.imtrial").trial
    assert trial.reads and trial.changelog is not None
    text = "".join(source.read(r) for r in trial.reads) + source.changelog(trial.changelog)
    again = _lowered(text)
    assert ir.strip_spans(again.reads) == ir.strip_spans(trial.reads)
    assert ir.strip_spans(again.changelog) == ir.strip_spans(trial.changelog)
    assert format_source(text) == text     # the renderer writes the formatter's canonical layout


def test_oncology_read_is_recist_with_two_readers_and_an_adjudicator():
    r = compile_file(ROOT / "examples" / "oncology_ct.imtrial").trial.reads[0]
    assert (r.criteria, r.readers, r.adjudicators, r.paradigm) == ("recist_1_1", 2, 1, "independent_with_adjudication")
    assert r.variability is not None and (r.variability.metric, r.variability.op, r.variability.threshold) == ("kappa", ">=", 0.6)
    assert [(w.name, w.level, w.width) for w in r.windows][1] == ("lung", -600.0, 1500.0)
