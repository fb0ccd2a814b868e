"""The checker and the engine agree on the effective action of every rule of the shipped profile.

Generated from ``stdlib/deid/ps315.imtrial``: for every combination of options that some rule
mentions (and none), the checker is asked through its diagnostics (a study that overrides every rule,
once with ``keep`` and once with ``remove``) and the engine through its compiled plan.
"""
from __future__ import annotations

import itertools
import re
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest

from imtrial_dsl import ir
from imtrial_dsl.check import check
from imtrial_dsl.deid import compile_plan
from imtrial_dsl.loader import load_text

_W404 = re.compile(r"'keep (?P<attr>\S+)' contradicts profile \S+ \(action (?P<action>\S+?)(?: under (?P<via>\w+))?\)")
_W403 = re.compile(r"'remove (?P<attr>\S+)' contradicts option (?P<via>\w+), which retains")


def _load(text: str) -> ir.Trial:
    trial, diags, _ = load_text(text, "resolution.imtrial")
    assert not [d for d in diags if d.severity.value == "error"], diags[:3]
    return trial


@lru_cache(maxsize=1)
def _profile() -> ir.DeidProfile:
    return _load('import "stdlib/deid/ps315.imtrial"\n').profile("ps315_basic")


def _addressable(rule: ir.ProfileRule) -> bool:
    """The checker names an override target by keyword or by a (gggg,eeee)-shaped tag with hex or x digits;
    the private-attributes row (gggg,eeee) has neither, so the checker never reports on it."""
    return "g" not in rule.tag.lower()


def _combinations() -> list[tuple[str, ...]]:
    combos = {()}
    for rule in filter(_addressable, _profile().rules):
        opts = sorted(rule.options)
        for n in range(1, len(opts) + 1):
            combos.update(itertools.combinations(opts, n))
    return sorted(combos, key=lambda c: (len(c), c))


def _checker_actions(rules: list[ir.ProfileRule], options: tuple[str, ...]) -> dict[str, tuple[str, str | None]]:
    """What the checker reports as each rule's effective action (and deciding option) under ``options``."""
    def diags(verb: str):
        body = "\n".join(f"  {verb} {r.tag}" for r in rules)
        with_ = f" with {', '.join(options)}" if options else ""
        return check(_load(f'import "stdlib/deid/ps315.imtrial"\ndeidentify using ps315_basic{with_} {{\n{body}\n}}\n'),
                     shown_per_code=None)  # one diagnostic per rule: all of them, not the first ten

    out: dict[str, tuple[str, str | None]] = {r.tag.upper(): ("K", None) for r in rules}   # no W404: kept
    for d in diags("keep"):
        m = _W404.match(d.message) if d.code == "W404" else None
        if m:
            out[m["attr"].upper()] = (m["action"], m["via"])
    for d in diags("remove"):
        m = _W403.match(d.message) if d.code == "W403" else None
        if m:
            assert out[m["attr"].upper()][0] == "K"
            out[m["attr"].upper()] = ("K", m["via"])
    return out


_BOTH_DATES = {"retain_longitudinal_full_dates", "retain_longitudinal_modified_dates"}


@pytest.mark.parametrize("options", [c for c in _combinations() if not _BOTH_DATES <= set(c)],
                         ids=lambda c: "+".join(c) or "basic")
def test_checker_reports_the_action_the_engine_takes(options):
    profile = _profile()
    rules = [r for r in profile.rules if set(options) <= set(r.options) and _addressable(r)]
    assert rules
    plan = compile_plan(profile, ir.Deidentify(profile=ir.Ref(name=profile.name),
                                               options=[ir.DeidOption(o) for o in options]))
    reported = _checker_actions(rules, options)
    mismatches = [(r.tag, r.keyword, "checker", reported[r.tag.upper()], "engine", plan.actions[r.tag])
                  for r in rules if reported[r.tag.upper()] != plan.actions[r.tag]]
    assert not mismatches, mismatches


def test_both_date_options_are_refused_by_checker_and_engine():
    """Full and modified dates exclude each other (point 4): E706 from the checker, the engine refuses too."""
    from imtrial_dsl.deid import DeidError

    profile = _profile()
    with pytest.raises(DeidError) as err:
        compile_plan(profile, ir.Deidentify(profile=ir.Ref(name=profile.name), options=[
            ir.DeidOption("retain_longitudinal_modified_dates"), ir.DeidOption("retain_longitudinal_full_dates")]))
    assert err.value.diagnostic.code == "E706"
    trial, diags, _ = load_text('import "stdlib/deid/ps315.imtrial"\ndeidentify using ps315_basic with '
                                'retain_longitudinal_full_dates, retain_longitudinal_modified_dates {\n}\n', "both.imtrial")
    assert [d.code for d in check(trial) if d.code == "E706"] == ["E706"]


def test_the_checker_gets_the_resolution_without_pydicom():
    code = ("import sys; from imtrial_dsl.compiler import compile_file; compile_file('examples/amyloid_mri.imtrial'); "
            "assert 'imtrial_dsl.deid.plan' in sys.modules; assert 'pydicom' not in sys.modules, 'pydicom imported'")
    subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parent.parent, check=True)
