"""Checker tests: bad scenarios as data, clean examples, and the match-set decision procedure.

``tests/scenarios/<name>.imtrial`` holds a study with mistakes; ``<name>.expected``
holds the exact diagnostics (``line:col: severity[CODE]: message``, as ``imtrial check`` prints them; a diagnostic from
another file is prefixed with that file's base name). Regenerate an expectation only
after reading the new output: ``PYTHONPATH=. .venv/bin/python tests/test_checker.py NAME``.
"""
from __future__ import annotations

import itertools
import re
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from imtrial_dsl.compiler import compile_file  # noqa: E402
from imtrial_dsl.matchsets import Term, common_string  # noqa: E402

SCENARIOS = ROOT / "tests" / "scenarios"
CASES = sorted(SCENARIOS.glob("*.imtrial"))
EXAMPLES = sorted((ROOT / "examples").glob("*.imtrial"))


def diagnostic_lines(path: Path) -> list[str]:
    res = compile_file(path)
    out = []
    for d in res.diagnostics:
        s = d.span
        where = f"{s.line}:{s.col}" if s else "0:0"
        if s and Path(s.file).resolve() != path.resolve():
            where = f"{Path(s.file).name}:{where}"
        out.append(f"{where}: {d.label()}: {d.message}")
    return out


@pytest.mark.parametrize("path", CASES, ids=lambda p: p.stem)
def test_scenario(path: Path) -> None:
    expected = path.with_suffix(".expected").read_text(encoding="utf-8").splitlines()
    assert diagnostic_lines(path) == expected


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_examples_check_clean(path: Path) -> None:
    res = compile_file(path)
    assert [str(d) for d in res.diagnostics] == []
    assert res.ok and res.graph is not None


def _documented_codes() -> set[str]:
    text = (ROOT / "docs" / "diagnostics.md").read_text(encoding="utf-8")
    return set(re.findall(r"^\| ([EW][34]\d\d) \|", text, re.M))


def _ir_only_trial():
    """Mistakes the lowering already stops in source text (so no scenario can reach the checker's
    copy of the check), built directly as IR: the checker must still catch them."""
    from imtrial_dsl import ir
    from imtrial_dsl.diagnostics import Span

    def sp(line: int) -> Span:
        return Span(file="built.imtrial", line=line, col=1, end_line=line, end_col=2)

    return ir.Trial(
        protocols=[ir.Protocol(name="T1w", modality="MR", span=sp(1), match=[
            ir.MatchRule(attribute="SeriesDescription", op=ir.MatchOp.MATCHES, value="(?i)t1w(", span=sp(2))])],
        deidentify=ir.Deidentify(profile=ir.Ref(name="p", span=sp(3)), span=sp(3),
                                 date_shift_min=ir.Days(days=-1, source_value=-1, span=sp(4)),
                                 date_shift_max=ir.Days(days=-365, source_value=-365, span=sp(4))),
        deid_profiles=[ir.DeidProfile(name="p", span=sp(5))],
    )


def test_checker_on_ir_built_in_python() -> None:
    from imtrial_dsl.check import check

    got = [f"{d.code} {d.span.line}: {d.message}" for d in check(_ir_only_trial())]
    assert got == [
        'E408 2: invalid regular expression "(?i)t1w(": missing ), unterminated subpattern at position 7: '
        '"(?i)t1w" ▸ "("',
        "E402 4: empty date shift range -1 .. -365 d",
    ]


def test_every_checker_code_is_documented_and_exercised() -> None:
    from imtrial_dsl.check import check

    documented = _documented_codes()
    source = "".join(p.read_text(encoding="utf-8") for p in sorted((ROOT / "imtrial_dsl" / "check").glob("*.py")))
    emitted = set(re.findall(r'"([EW][34]\d\d)"', source))
    assert emitted == documented, "codes in imtrial_dsl/check/ and docs/diagnostics.md differ"
    seen = {d.code for d in check(_ir_only_trial())}
    for path in CASES:
        seen |= {d.code for d in compile_file(path).diagnostics}
    missing = documented - seen
    assert not missing, f"no scenario exercises {sorted(missing)}"


def test_every_diagnostic_has_span_message_hint() -> None:
    for path in CASES:
        for d in compile_file(path).diagnostics:
            if d.code[1] in "34":  # the checker's own
                assert d.span is not None and d.span.line > 0, d
                assert d.message and d.hint, d


# --------------------------------------------------------------------------- match sets

# (terms, witness expected?) -- terms as (pattern, mode, negated)
MATCH_CASES = [
    ([("(?i)mprage|t1w|t1_3d", "full", False), ("(?i)flair", "search", False)], False),
    ([("(?i)t1.*gd", "full", False), ("(?i)t1", "search", False)], True),
    ([("^t1$", "full", False), ("t1", "search", False)], True),
    ([("^ab$", "search", False), ("c", "search", False)], False),
    ([("x", "search", False), ("y", "search", False)], True),
    ([("(?i)t1", "search", False), ("1", "search", True)], False),
    ([("(?i)^T1_\\w+\\d{2}", "full", False), ("gd", "search", True)], True),
    ([("[^a-z]+", "full", False), ("\\d", "search", False)], True),
    ([("T1", "equal", False), ("(?i)^t1$", "search", False)], True),
    ([("T1", "equal", False), ("^t1$", "search", False)], False),
    ([("a{3}", "full", False), ("aaaa", "search", False)], False),
    ([("a{2,5}", "full", False), ("aaaa", "search", False)], True),
    ([("(?i:ab)c", "full", False), ("ABc", "equal", False)], True),
    ([("(?i:ab)c", "full", False), ("ABC", "equal", False)], False),
    ([("\\Aab\\Z", "search", False), ("b$", "search", False)], True),
    ([("flair", "search", False), ("(?i)t2", "search", True), ("^3D", "search", False)], True),
]


@pytest.mark.parametrize("terms,sat", MATCH_CASES, ids=[str(i) for i in range(len(MATCH_CASES))])
def test_common_string_table(terms, sat) -> None:
    ts = [Term(p, m, n) for p, m, n in terms]
    res = common_string(ts)
    assert res.decided
    assert (res.witness is not None) == sat
    if sat:
        assert all(t.holds(res.witness) for t in ts)


_ATOMS = ["a", "b", "1", "[ab]", "[^a]", ".", "\\d", "\\w", "_", "A"]


def _regex_strategy():
    atom = st.sampled_from(_ATOMS)

    def extend(inner):
        return st.one_of(
            st.tuples(inner, inner).map(lambda t: t[0] + t[1]),
            st.tuples(inner, inner).map(lambda t: f"(?:{t[0]}|{t[1]})"),
            st.tuples(inner, st.sampled_from(["*", "+", "?", "{1,2}", "{2}"])).map(lambda t: f"(?:{t[0]}){t[1]}"),
        )

    body = st.recursive(atom, extend, max_leaves=5)
    return st.tuples(st.sampled_from(["", "^", "(?i)"]), body, st.sampled_from(["", "$"])).map("".join)


_BRUTE = ["".join(p) for n in range(0, 5) for p in itertools.product("aAb1_", repeat=n)]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(_regex_strategy(), st.sampled_from(["search", "full"]), st.booleans()), min_size=1, max_size=3))
def test_common_string_agrees_with_brute_force(raw) -> None:
    terms = [Term(p, m, n) for p, m, n in raw]
    res = common_string(terms)
    brute = next((s for s in _BRUTE if all(t.holds(s) for t in terms)), None)
    if res.witness is not None:
        assert all(t.holds(res.witness) for t in terms)
    else:
        assert brute is None, f"missed witness {brute!r}"
        assert res.decided or any("\\b" in p for p, _, _ in raw)
    if brute is not None:
        assert res.witness is not None and len(res.witness) <= len(brute)


if __name__ == "__main__":  # regenerate one expectation after reading it
    for name in sys.argv[1:]:
        p = SCENARIOS / f"{name}.imtrial"
        lines = diagnostic_lines(p)
        print("\n".join(lines))
        p.with_suffix(".expected").write_text("\n".join(lines) + ("\n" if lines else ""), encoding="utf-8")


def test_generated_dicom_keyword_table_matches_pydicom():
    """imtrial_dsl/data/dicom_keywords.json is pydicom's PS3.6 dictionary (regenerate: scripts/gen_dicom_keywords.py)."""
    from pydicom.datadict import DicomDictionary

    from imtrial_dsl.check.names import dicom_keywords

    expected = {e[4]: [tag, e[0]] for tag, e in DicomDictionary.items() if e[4]}
    assert dicom_keywords() == expected


_PATTERNS = ['(?i)t1', '(?i)^t1', '(?i)^t1_mprage$', '^T1', '^t2_(tse|space)$', '(?i)flair', '(?i)^flair',
             '(?i)^dwi', '(?i)^dwi_b0', '^adc(?!_map)', '^adc_map', 'swi|swan', '(?i)^p0001[_ ]t1', '(?i)^p0002[_ ]t1',
             '(?i)^p000', '^(T1)_x', '\\Aab', '(?m)^ab', '[ab]c', '^é']


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(_PATTERNS), st.sampled_from(["~", "=", "!~", "has", "none"]),
                          st.sampled_from(["SeriesDescription", "ProtocolName"]), st.sampled_from(["MR", "CT"])),
                min_size=2, max_size=9))
def test_match_ambiguity_index_finds_every_overlapping_pair(spec) -> None:
    """The prefix index and the classes of identical rules (check/matching.py) find every overlapping pair the
    all-pairs comparison finds (E405 counts equal). W405 may only drop: a pair whose literal prefixes differ is
    disjoint, even where the witness search gives up on a look-around of the other rules."""
    from imtrial_dsl import ir
    from imtrial_dsl.check import matching
    from imtrial_dsl.check.context import Context
    from imtrial_dsl.diagnostics import Span

    ops = {"~": ir.MatchOp.MATCHES, "=": ir.MatchOp.EQUALS, "!~": ir.MatchOp.NOT_MATCHES, "has": ir.MatchOp.CONTAINS}
    protos = []
    for k, (pat, op, attr, mod) in enumerate(spec):
        rules = [] if op == "none" else [ir.MatchRule(attribute=attr, op=ops[op], value=pat, span=Span(line=k + 1))]
        if op == "!~":
            rules.append(ir.MatchRule(attribute="SeriesDescription", op=ir.MatchOp.MATCHES, value="(?i)^p0", span=Span(line=k + 1)))
        protos.append(ir.Protocol(name=f"P{k}", modality=mod, match=rules, span=Span(line=k + 1)))
    ctx = Context(ir.Trial(protocols=protos))
    matching.check(ctx)
    got = {d.code: 0 for d in ctx.diags}
    for d in ctx.diags:
        got[d.code] += 1
    for code, n in ctx.omitted.items():
        got[code] = got.get(code, 0) + n
    alts = [matching._alternatives(p) for p in protos]
    pats = [(v, m) for a in alts for alt in a for rules in alt.values() for op, v in rules for m in matching._MODES[op]]
    alphabet = matching.alphabet_for(pats)
    want: dict[str, int] = {}
    for j in range(len(protos)):
        for i in range(j):
            if protos[i].modality != protos[j].modality:
                continue
            res = matching._decide(alts[i], alts[j], alphabet)
            if res is not None:
                want[res[0]] = want.get(res[0], 0) + 1
    assert got.get("E405", 0) == want.get("E405", 0)
    assert got.get("W405", 0) <= want.get("W405", 0)


def test_unknown_unit_hints_list_the_units_of_the_dimension() -> None:
    """Every E201 hint lists units to choose from: of the dimension the place needs (a device's field, a
    timeout), else of the closest unit's; a micro sign is named as such."""
    res = compile_file(SCENARIOS / "units_unknown.imtrial")
    hints = {d.message.split("'")[1]: d.hint for d in res.diagnostics if d.code == "E201"}
    assert hints["tesla"] == "units of field: mT, T"
    assert hints["msec"].endswith("units of time: us, ms, s, min, h")
    assert hints["minutes"] == "did you mean 'min'?; units of time: us, ms, s, min, h"
    assert hints["µs"].startswith("write 'us'")
    assert hints["mmm"].endswith("units of length: um, mm, cm, m")
    assert hints["yrs"].startswith("did you mean 'years'?; calendar units: d, day")
    assert not [d for d in res.diagnostics if d.code == "E314"], "a parameter with a bad unit is not also missing"


def test_missing_brace_names_the_block_and_where_it_opened() -> None:
    res = compile_file(SCENARIOS / "syntax_block_left_open.imtrial")
    (d,) = res.diagnostics
    assert d.hint == "add the closing '}' of 'variant GE' before line 10"


def test_overlapping_windows_relate_the_earlier_visit() -> None:
    """The caret is on the visit declared later; the hint names the earlier one by line (the language server
    turns 'at line N' into a related location)."""
    res = compile_file(SCENARIOS / "visit_windows.imtrial")
    last = [d for d in res.diagnostics if d.code == "E404"][-1]
    assert last.span.line == 11 and "baseline (declared at line 5)" in last.hint


def test_capped_diagnostics_count_what_they_stand_for() -> None:
    """150 copies of one overlapping protocol: 11,175 ambiguities, 10 shown, one summary with the rest."""
    lines = ['study CAP02 "Copies" { }']
    for i in range(150):
        lines += [f"protocol C{i:03d} modality MR {{", '  match SeriesDescription ~ "(?i)t1"', "}"]
    from imtrial_dsl.compiler import compile_text

    res = compile_text("\n".join(lines) + "\n", "copies.imtrial")
    e405 = [d for d in res.diagnostics if d.code == "E405"]
    assert len(e405) == 11 and e405[-1].omitted == 150 * 149 // 2 - 10
    assert e405 == sorted(e405, key=type(e405[0]).sort_key)


def test_modality_and_vendor_did_you_mean() -> None:
    """The hints of the lang_checks scenario: DICOM's spelling of a modality word, the alias table's of a vendor."""
    res = compile_file(SCENARIOS / "lang_checks.imtrial")
    hints = {(d.code, d.span.line): d.hint for d in res.diagnostics}
    assert hints[("E318", 7)].startswith("did you mean 'PT'?")        # protocol FDG modality PET
    assert hints[("E318", 5)].startswith("did you mean 'MR'?")        # device modality MRI
    assert hints[("W409", 5)] == "did you mean 'TOSHIBA'?"            # vendor TOSHBA
    from imtrial_dsl.vendors import normalize_vendor
    assert normalize_vendor("TOSHIBA") == normalize_vendor("Canon Medical Systems")  # the alias the hint leads to


def test_reminder_and_unit_warnings_are_documented() -> None:
    assert {"W415", "W416"} <= _documented_codes()


# Text pasted from a word processor and letters names cannot hold (inline, not a scenario file: the editor
# grammar test requires every character of a scenario to be scoped, and these are not the language's).
_NON_ASCII = '# Text pasted from a word processor, and letters names cannot hold: each error says so plainly.\nstudy ASCII01 "Non-ASCII text outside strings" { }\n\nprotocöl T1w modality MR {\n  match SeriesDescription ~ "(?i)t1w"\n}\n\nprotocol FLAIR modality MR {\n  match SeriesDescription ~ “(?i)flair”\n}\n\nprotocol SWI modality MR {\n  match SeriesDescription ~ "(?i)swi"\n}\n\nprotocol PD\xa0modality MR {\n  match SeriesDescription ~ "(?i)pd"\n}\n'


def test_non_ascii_outside_strings_is_named_plainly(tmp_path) -> None:
    path = tmp_path / "non_ascii.imtrial"
    path.write_text(_NON_ASCII, encoding="utf-8")
    assert diagnostic_lines(path) == ["4:7: error[E101]: unexpected character 'ö' in 'protocöl': names and keywords must be ASCII", "9:29: error[E101]: unexpected character '“': a typographic quote", '16:12: error[E101]: unexpected character U+00A0 (a non-ASCII space, e.g. pasted from a document)']
