"""Parser: the example and stdlib parse; syntax errors are positioned values; it never raises."""
from __future__ import annotations

import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imtrial_dsl.diagnostics import Severity
from imtrial_dsl.parser import keywords, parse

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted([*ROOT.glob("examples/*.imtrial"), *ROOT.glob("stdlib/**/*.imtrial"), *ROOT.glob("tests/good/*.imtrial")])
EXAMPLE = (ROOT / "examples" / "amyloid_mri.imtrial").read_text()


@pytest.mark.parametrize("path", SOURCES, ids=[p.name for p in SOURCES])
def test_sources_parse(path):
    tree, diags = parse(path.read_text(), str(path))
    assert diags == [] and tree is not None, [str(d) for d in diags]


def test_newlines_are_not_significant_and_semicolons_optional():
    one_line = " ".join(line.split("#")[0] for line in EXAMPLE.splitlines() if not line.lstrip().startswith("#"))
    tree, diags = parse(one_line, "x")
    assert diags == [], [str(d) for d in diags]
    tree2, diags2 = parse("role a kind central; role b kind site;;\n", "x")
    assert diags2 == [] and len(tree2.children) == 2


def test_keywords_do_not_reserve_names():
    # `site`, `central`, `file` ... are keywords somewhere, names elsewhere
    src = 'role site kind site scope own\nreport site management for site(own)\nanalysis file { output file file }\n'
    tree, diags = parse(src, "x")
    assert diags == [], [str(d) for d in diags]


def test_keyword_after_unitless_number_stays_a_keyword():
    tree, diags = parse("protocol P modality MR { EchoTrainLength <= 12 severity warning\n Rows = 256 modifiable }", "x")
    assert diags == []
    c = tree.children[0].children[3]
    assert [m.data for m in c.children[2:]] == ["severity"]


def test_capitalized_units_vs_next_attribute():
    src = "protocol P modality MR { MagneticFieldStrength = 3 T\nTriggerTime > 10 ms\nImagingFrequency = 123 MHz\nT2Star = 1 }"
    tree, diags = parse(src, "x")
    assert diags == [], [str(d) for d in diags]
    assert len(tree.children[0].children) == 3 + 4


# (source, line, col, code, message fragment, hint fragment or None)
SYNTAX_ERRORS = [
    ("protocl T1 modality MR { }", 1, 1, "E103", "unexpected word 'protocl'", "did you mean 'protocol'?"),
    ("protocol T1 modality MR {\n  mach SeriesDescription ~ \"x\"\n}", 2, 3, "E103", "unexpected word 'mach'",
     "did you mean 'match'?"),
    ("protocol T1 modality MR {\n  EchoTime == 3 ms\n}", 2, 13, "E103", "unexpected '='", "a number"),
    ("protocol T1 modality MR {\n  EchoTime = 3 ms\n", 3, 1, "E104", "unexpected end of file", "'}'"),
    ('study S "unterminated {\n}\n', 1, 9, "E102", "unterminated string", "same line"),
    ("site S { timezone 5 }", 1, 19, "E103", "unexpected number '5'", 'a string'),
    ("site S { contact pi \"A\" rivera@x.org }", 1, 25, "E103", "unexpected", None),
    ("schedule { visit v at day 0 window -1 .. 1 d acqire T1 }", 1, 46, "E103", "acqire", "did you mean 'acquire'?"),
    ("qc q on T1 uses snr(min 10)", 1, 25, "E103", "unexpected number '10'", "'='"),
    ("\x00\x01 study", 1, 1, "E101", "unexpected character", None),
    ("study S { } }", 1, 13, "E103", "unexpected '}'", None),
    ("deid_profile p { rule (0008,0050) AccessionNumber \"A\" Q }", 1, 55, "E103", "unexpected", "action code"),
    ("protocol P modality MR { EchoTime = 3 ms ± }", 1, 44, "E103", "unexpected '}'", "a number"),
]


@pytest.mark.parametrize("src,line,col,code,msg,hint", SYNTAX_ERRORS, ids=[f"{e[3]}-{i}" for i, e in enumerate(SYNTAX_ERRORS)])
def test_syntax_errors(src, line, col, code, msg, hint):
    tree, diags = parse(src, "bad.imtrial")
    assert tree is None and diags
    d = diags[0]
    assert (d.span.file, d.span.line, d.span.col, d.code, d.severity) == ("bad.imtrial", line, col, code, Severity.ERROR), d
    assert msg in d.message, d.message
    if hint:
        assert d.hint and hint in d.hint, d.hint


def test_several_independent_errors_are_reported():
    src = (
        "protocol A modality MR {\n  EchoTime == 3 ms\n}\n"      # error 1
        "site S { timezone 5 }\n"                                 # error 2
        "role r kind central\n"                                   # fine
        "schedule { visit v at day 0 acqire X }\n"                # error 3
    )
    _tree, diags = parse(src, "x")
    assert [d.span.line for d in diags] == [2, 4, 6], [str(d) for d in diags]


def test_missing_close_brace_recovers_at_next_declaration():
    src = "protocol A modality MR {\n  EchoTime = 3 ms\nprotocol B modality MR { EchoTime = 3 }\nsite S { timezone 5 }\n"
    _tree, diags = parse(src, "x")
    assert [(d.span.line, d.code) for d in diags] == [(3, "E103"), (4, "E103")]
    assert "keyword 'protocol'" in diags[0].message


def test_error_count_is_capped():
    _tree, diags = parse("site S { timezone 5 }\n" * 200, "x")
    assert 1 < len(diags) <= 26 and diags[-1].code == "E105"


def test_keywords_list():
    kws = keywords()
    assert {"protocol", "visit", "deid_profile", "severity", "modifiable"} <= kws
    assert not any(k[0].isupper() for k in kws)


@pytest.mark.parametrize("text", [
    "", " ", "\n\n", "{", "}", "{{{{", "}}}}", '"', '"abc', "#", "# only a comment", "\ufeffrole r kind central",
    "protocol", "protocol P modality", "protocol P modality MR {", "1e99999999", "9" * 5000,
    "protocol P modality MR { EchoTime = " + "9" * 400 + " ms }", "\x00" * 100, "(" * 3000, "{" * 3000,
    "study S { registry \"\\", "rule (0008,0050)", "deid_profile p {" + " rule" * 500, "ü€𝄞" * 50,
    b"\xff\xfe binary".decode("latin-1"),
])
def test_never_raises(text):
    tree, diags = parse(text, "x")
    assert (tree is None) == bool(diags)
    for d in diags:
        assert d.span is not None and d.span.line >= 1 and d.code.startswith("E1")


def test_never_raises_on_truncations_and_splices():
    rng = random.Random(1234)
    tokens = EXAMPLE.split(" ")
    for cut in range(0, len(EXAMPLE), 211):
        tree, diags = parse(EXAMPLE[:cut], "x")
        assert (tree is None) == bool(diags)
    for _ in range(60):
        t = list(tokens)
        for _ in range(3):
            i, j = rng.randrange(len(t)), rng.randrange(len(t))
            t[i] = t[j]
        tree, diags = parse(" ".join(t), "x")
        assert (tree is None) == bool(diags)


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(list('{}[]()"#;,.=<>!~±%-+/\\\n abcxyzAZ09_') + ["protocol ", "site ", "visit "]),
                max_size=120).map("".join))
def test_never_raises_hypothesis(text):
    tree, diags = parse(text, "x")
    assert (tree is None) == bool(diags)
