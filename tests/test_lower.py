"""Lowering and loading: good scenario files against expected IR facts, error cases, imports."""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest

from imtrial_dsl import ir
from imtrial_dsl.loader import load, load_text, stdlib_files
from imtrial_dsl.lower import lower
from imtrial_dsl.parser import parse

ROOT = Path(__file__).resolve().parent.parent
GOOD = sorted((ROOT / "tests" / "good").glob("*.imtrial"))
EXAMPLE = ROOT / "examples" / "amyloid_mri.imtrial"


def subset_mismatch(expected, actual, path="$"):
    """None if every fact in ``expected`` holds in ``actual`` (dicts: listed keys; lists: same length)."""
    if isinstance(expected, dict):
        if not isinstance(actual, dict):
            return f"{path}: expected an object, got {actual!r}"
        for k, v in expected.items():
            if k not in actual:
                return f"{path}.{k}: missing"
            bad = subset_mismatch(v, actual[k], f"{path}.{k}")
            if bad:
                return bad
        return None
    if isinstance(expected, list):
        if not isinstance(actual, list) or len(actual) != len(expected):
            return f"{path}: expected {len(expected)} items, got {actual!r}"
        for i, (e, a) in enumerate(zip(expected, actual)):
            bad = subset_mismatch(e, a, f"{path}[{i}]")
            if bad:
                return bad
        return None
    if isinstance(expected, float) and isinstance(actual, (int, float)):
        return None if abs(expected - actual) <= 1e-9 * max(1.0, abs(expected)) else f"{path}: {expected} != {actual}"
    return None if expected == actual else f"{path}: expected {expected!r}, got {actual!r}"


def lower_text(text: str, name: str = "t.imtrial"):
    tree, diags = parse(text, name)
    assert diags == [], [str(d) for d in diags]
    return lower(tree, name)


@pytest.mark.parametrize("path", GOOD, ids=[p.stem for p in GOOD])
def test_good_file_lowers_to_expected_facts(path):
    trial, diags = lower_text(path.read_text(), path.name)
    assert diags == [], [str(d) for d in diags]
    expected = json.loads(path.with_suffix(".expected.json").read_text())
    assert subset_mismatch(expected, ir.strip_spans(trial)) is None, subset_mismatch(expected, ir.strip_spans(trial))


def test_every_good_file_has_expectations():
    assert GOOD, "no scenario files"
    for p in GOOD:
        assert p.with_suffix(".expected.json").exists(), p


def test_example_loads_with_imports():
    trial, diags, sources = load(EXAMPLE)
    assert diags == [], [str(d) for d in diags]
    assert trial.source_sha256 == hashlib.sha256(EXAMPLE.read_bytes()).hexdigest()
    assert trial.study.code == "AMY01" and len(trial.sites) == 3 and len(trial.protocols) == 3
    assert [i.path for i in trial.imports] == ["stdlib/deid/ps315.imtrial", "stdlib/qc/common.imtrial"]
    assert all(i.resolved and Path(i.resolved).is_file() for i in trial.imports)
    assert trial.profile("ps315_basic") is not None and len(trial.profile("ps315_basic").rules) > 600
    # imported nodes keep their own file in their spans
    stdlib_qc = [q for q in trial.qc if q.modality]
    assert stdlib_qc and all(q.span.file.endswith("common.imtrial") for q in stdlib_qc)
    assert set(sources) == {str(EXAMPLE), *(q.span.file for q in stdlib_qc), trial.deid_profiles[0].span.file}


def test_example_facts():
    trial, diags, _ = load(EXAMPLE)
    t1 = trial.protocol("T1w")
    tr = t1.constraints[0]
    assert (tr.keyword, tr.kind, tr.values[0].value, tr.tolerance.relative, tr.tolerance.value) == (
        "RepetitionTime", ir.ConstraintKind.EQUAL, 2300.0, True, 1.0)
    ps = next(c for c in t1.constraints if c.keyword == "PixelSpacing")
    assert ps.index == 0 and ps.kind == ir.ConstraintKind.RANGE_INCL
    assert [v.unit for v in ps.values] == ["mm", "mm"]  # the unit of `a .. b mm` applies to both ends
    ge = trial.devices()[1][1]
    assert (ge.vendor, ge.vendor_text) == ("GE", "GE MEDICAL SYSTEMS")
    merged, var = ir.effective_constraints(t1, "Philips", "R5.7")
    assert var is not None and "InversionTime" not in {c.keyword for c in merged}
    m12 = trial.schedule.visits[2]
    assert (m12.offset.days, m12.window_before.days, m12.window_after.days) == (360.0, 14.0, 28.0)
    assert trial.schedule.visits[0].kind == "screening" and trial.schedule.visits[1].kind == "baseline"
    assert trial.analysis("hipvol").command == ["python3", "-m", "imtrial_dsl.tools.volume", "{t1}", "{volumes}"]
    assert trial.deidentify.key == ir.KeySource(kind="env", ref="IMTRIAL_KEY", span=trial.deidentify.key.span)


def test_spans_point_at_source():
    text = EXAMPLE.read_text()
    trial, _, _ = load(EXAMPLE)
    lines = text.splitlines()
    for c in trial.protocol("T1w").constraints:
        assert c.span.file == str(EXAMPLE)
        assert lines[c.span.line - 1][c.span.col - 1:].startswith(c.keyword)
    for s in trial.sites:
        assert lines[s.span.line - 1].startswith(f"site {s.code}")
    v = trial.schedule.visits[1]
    assert lines[v.span.line - 1].strip().startswith("visit baseline")
    assert trial.protocol("T1w").variants[0].constraints[0].span.line > trial.protocol("T1w").variants[0].span.line


# (source, [(line, col, code, message fragment)]) — lowering errors, all reported at once
LOWER_ERRORS = [
    ('protocol A modality MR { EchoTime = 3 msec }', [(1, 39, "E201", "unknown unit 'msec'")]),
    ('protocol A modality MR { EchoTime in 2 s .. 3 mm }', [(1, 35, "E202", "incompatible units in range")]),
    ('protocol A modality MR { FlipAngle = 9 deg ± 1 mm }', [(1, 44, "E202", "tolerance unit 'mm'")]),
    ('protocol A modality MR { EchoTime = 3 ms severity fatal }', [(1, 51, "E204", "unknown severity 'fatal'")]),
    ('protocol A modality MR { SeriesDescription ~ "([" }', [(1, 48, "E206", "invalid regular expression")]),  # the caret at the unclosed "[" (position 1 of the pattern)
    ('protocol A modality MR { match SeriesDescription ~ "(" }', [(1, 53, "E206", "invalid regular expression")]),
    ('protocol A modality MR { PixelSpacing[0.5] < 1 mm }', [(1, 39, "E203", "whole number")]),
    ('protocol A modality MR { EchoTime = 1e400 ms }', [(1, 37, "E203", "out of range")]),
    ('protocol A modality MR { Rows > "x" }', [(1, 33, "E202", "compares numbers")]),
    ('protocol A modality MR { EchoTime = 3 ms note "a" note "b" }', [(1, 51, "E205", "duplicate 'note'")]),
    ('schedule { visit v at dya 3 }', [(1, 23, "E201", "unknown unit 'dya'")]),
    ('schedule { visit v at day 3 window 1 .. 5 d }', [(1, 29, "E209", "must contain the target day")]),
    ('schedule { visit v at day 3 window -1 .. 5 mm }', [(1, 44, "E202", "not a calendar unit")]),
    ('schedule { visit v later at day 3 }', [(1, 20, "E204", "unknown visit kind 'later'")]),
    ('schedule { same_device maybe }', [(1, 24, "E204", "unknown same_device policy")]),
    ('deidentify using p with retain_uid', [(1, 25, "E211", "unknown de-identification option 'retain_uid'")]),
    ('deidentify using p { date_shift -1 .. -30 d }', [(1, 22, "E209", "date shift range is empty")]),
    ('identifiers { check_digit mod98 }', [(1, 1, "E210", "no 'subject' format"), (1, 27, "E204", "check digit")]),
    ('analysis a { run "x \'y" }', [(1, 18, "E208", "cannot split the command line")]),
    ('analysis a { measure m furlong }', [(1, 24, "E201", "unknown unit 'furlong'")]),
    ('analysis a { timeout 3 mm }', [(1, 22, "E202", "timeout needs a time unit")]),
    ('transfer t ftp "x"', [(1, 12, "E204", "unknown transfer kind 'ftp'")]),
    ('transfer t dicom port 0', [(1, 23, "E203", "port must be a whole number between 1 and 65535")]),
    ('role r kind boss', [(1, 13, "E204", "unknown role kind 'boss'")]),
    ('report r weekly for x', [(1, 10, "E204", "unknown report kind 'weekly'")]),
    ('site S { device D { model "x" } }', [(1, 17, "E210", "device D has no modality"), (1, 17, "E210", "no vendor")]),
    ('site S { irb approved date 2026-02-30 }', [(1, 28, "E207", "invalid date")]),
    ('site S { irb fine }', [(1, 14, "E204", "unknown IRB status 'fine'")]),
    ('study X { registry "a" registry "b" }', [(1, 24, "E205", "duplicate 'registry'")]),
    ('study X { }\nstudy Y { }', [(2, 1, "E205", "duplicate 'study'")]),
    ('deid_profile p { rule (0008,0050) AccessionNumber "A" K/Z }', [(1, 55, "E212", "unknown action code 'K/Z'")]),
    ('site S { device D { modality MR vendor GE field 3 mm } }', [(1, 49, "E202", "field strength needs a field unit")]),
    ('schedule { visit v at month 1e307 }', [(1, 23, "E203", "out of range")]),
    ('protocol A modality MR { EchoTime = 1e308 s }', [(1, 37, "E203", "out of range")]),
    ('analysis a { run "   " }', [(1, 18, "E208", "empty command")]),
    ('deidentify using p { blank 10, 0, 5, 5 }', [(1, 22, "E209", "empty pixel region")]),
    ('transfer t dicom ae "A" ae "B"', [(1, 25, "E205", "duplicate 'ae'")]),
]


@pytest.mark.parametrize("src,expected", LOWER_ERRORS, ids=[e[1][0][2] + "-" + str(i) for i, e in enumerate(LOWER_ERRORS)])
def test_lowering_errors(src, expected):
    tree, pdiags = parse(src, "bad.imtrial")
    assert pdiags == [], [str(d) for d in pdiags]
    _trial, diags = lower(tree, "bad.imtrial")
    got = sorted((d.span.line, d.span.col, d.code, d.message) for d in diags)
    assert len(got) == len(expected), got
    for (line, col, code, msg), g in zip(sorted(expected), got):
        assert (line, col, code) == g[:3], (g, msg)
        assert msg in g[3], g


def test_unknown_unit_has_did_you_mean():
    tree, _ = parse('protocol A modality MR { EchoTime = 3 msec }', "x")
    _t, diags = lower(tree, "x")
    assert diags[0].hint == "did you mean 'ms'?; units of time: us, ms, s, min, h"


def test_unknown_unit_lists_the_units_of_the_attributes_dimension():
    tree, _ = parse('protocol A modality PT { RadionuclideTotalDose <= 10 mCu  DiffusionBValue = 1000 smm }', "x")
    _t, diags = lower(tree, "x")
    assert [d.hint for d in diags] == ["did you mean 'mCi'?; units of activity: Bq, kBq, MBq, GBq, uCi, µCi, mCi",
                                       "did you mean 's/mm²'?; units of diffusion: s/mm2, s/mm²"]


def test_lower_never_raises_on_none():
    trial, diags = lower(None, "x")
    assert isinstance(trial, ir.Trial) and diags == []


# --------------------------------------------------------------------------- loader

def write(tmp_path, name, text):
    p = tmp_path / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return p


def test_relative_imports_merge_and_load_once(tmp_path):
    write(tmp_path, "lib/protos.imtrial", 'import "common.imtrial"\nprotocol P modality MR { EchoTime < 5 ms }\n')
    write(tmp_path, "lib/common.imtrial", "qc c on modality MR uses snr(min = 5)\n")
    main = write(tmp_path, "study.imtrial",
                 'import "lib/protos.imtrial"\nimport "lib/common.imtrial"\nqc local on P uses noise(max = 3)\n')
    trial, diags, sources = load(main)
    assert diags == [], [str(d) for d in diags]
    assert [q.name for q in trial.qc] == ["c", "local"]  # common loaded once; imports before own declarations
    assert trial.protocols[0].span.file.endswith("protos.imtrial")
    assert len(sources) == 3
    assert [Path(i.resolved).name for i in trial.imports] == ["protos.imtrial", "common.imtrial", "common.imtrial"]


def test_stdlib_import_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main = write(tmp_path, "s.imtrial", 'import "stdlib/qc/common.imtrial"\n')
    trial, diags, _ = load(main)
    assert diags == [] and any(q.modality == "MR" for q in trial.qc)


def test_missing_import_is_a_diagnostic_at_the_import(tmp_path):
    main = write(tmp_path, "s.imtrial", '# x\nimport "stdlib/qc/comon.imtrial"\nimport "nope.imtrial"\n')
    trial, diags, _ = load(main)
    assert [(d.code, d.span.line, d.span.col) for d in diags] == [("E220", 2, 1), ("E220", 3, 1)]
    assert diags[0].hint == "did you mean 'stdlib/qc/common.imtrial'?"
    assert "nope.imtrial" in diags[1].message


def test_import_cycle(tmp_path):
    write(tmp_path, "a.imtrial", 'import "b.imtrial"\nrole ra kind central\n')
    write(tmp_path, "b.imtrial", 'import "a.imtrial"\nrole rb kind site\n')
    trial, diags, _ = load(tmp_path / "a.imtrial")
    assert [d.code for d in diags] == ["E221"]
    assert diags[0].span.file.endswith("b.imtrial") and diags[0].span.line == 1
    assert "a.imtrial -> " in diags[0].message
    assert [r.name for r in trial.roles] == ["rb", "ra"]


def test_singleton_blocks_clash_across_imports(tmp_path):
    write(tmp_path, "lib.imtrial", "archive { path \"x\" }\n")
    main = write(tmp_path, "s.imtrial", 'import "lib.imtrial"\narchive { path "y" }\n')
    trial, diags, _ = load(main)
    assert [d.code for d in diags] == ["E222"] and diags[0].span.line == 2
    assert trial.archive.path == "y"


def test_errors_in_imported_file_carry_its_name(tmp_path):
    write(tmp_path, "lib.imtrial", "protocol P modality MR { EchoTime = 3 parsecs }\n")
    main = write(tmp_path, "s.imtrial", 'import "lib.imtrial"\n')
    _trial, diags, sources = load(main)
    assert [d.code for d in diags] == ["E201"] and diags[0].span.file in sources
    assert diags[0].span.file.endswith("lib.imtrial")


def test_syntax_error_in_imported_file(tmp_path):
    write(tmp_path, "lib.imtrial", "protocl P modality MR { }\n")
    main = write(tmp_path, "s.imtrial", 'import "lib.imtrial"\nrole r kind central\n')
    trial, diags, sources = load(main)
    assert [(d.code, d.span.line) for d in diags] == [("E103", 1)] and diags[0].span.file.endswith("lib.imtrial")
    assert trial.roles[0].name == "r"


def test_unreadable_and_non_utf8(tmp_path):
    _t, diags, _ = load(tmp_path / "missing.imtrial")
    assert [d.code for d in diags] == ["E223"]
    p = tmp_path / "latin1.imtrial"
    p.write_bytes(b'study X "caf\xe9" { }\n')
    trial, diags, _ = load(p)
    assert [d.code for d in diags] == ["E223"] and trial.study.code == "X"


def test_load_text_resolves_against_base_dir(tmp_path):
    write(tmp_path, "lib.imtrial", "role r kind reader\n")
    trial, diags, sources = load_text('import "lib.imtrial"\n', "<mem>", base_dir=tmp_path)
    assert diags == [] and trial.roles[0].name == "r" and "<mem>" in sources
    assert trial.source_file == "<mem>" and len(trial.source_sha256) == 64


def test_stdlib_files_all_load_cleanly():
    files = stdlib_files()
    assert "stdlib/qc/common.imtrial" in files
    for f in files:
        trial, diags, _ = load_text(f'import "{f}"\n', "<stdlib>")
        assert diags == [], (f, [str(d) for d in diags])


def test_stdlib_qc_uses_builtin_metric_names():
    metrics = {"snr", "ghosting", "clipping", "dynamic_range", "slice_spacing", "missing_slices", "noise"}
    params = {"snr": "min", "ghosting": "max", "clipping": "max_fraction", "dynamic_range": "min",
              "slice_spacing": "tolerance", "missing_slices": "max", "noise": "max"}
    trial, diags, _ = load_text('import "stdlib/qc/common.imtrial"\n', "<s>")
    assert {q.metric for q in trial.qc} == metrics
    for q in trial.qc:
        assert list(q.params) == [params[q.metric]] and q.modality in ("MR", "CT")


# --------------------------------------------------------------------------- docs

DOC = ROOT / "docs" / "language.md"


def doc_blocks():
    text = DOC.read_text()
    return [m.group(1) for m in re.finditer(r"```imtrial\n(.*?)```", text, re.S)]


def test_docs_examples_lower_cleanly(tmp_path):
    blocks = doc_blocks()
    assert len(blocks) >= 15
    for i, block in enumerate(blocks):
        trial, diags, _ = load_text(block, f"language.md#{i}", base_dir=ROOT)
        assert diags == [], (block, [str(d) for d in diags])


def test_whole_stdlib_imported_together_checks_without_errors():
    from imtrial_dsl.compiler import compile_text

    src = "".join(f'import "{f}"\n' for f in stdlib_files())
    result = compile_text(src, "all_stdlib.imtrial")
    errors = [str(d) for d in result.diagnostics if d.severity.value == "error"]
    assert errors == []
    names = {p.name for p in result.trial.protocols}
    assert {"ADNI3_T1_MPRAGE", "ACR_T1", "ACR_T2", "ACR_LOCALIZER", "CT_CHEST_RECIST"} <= names
