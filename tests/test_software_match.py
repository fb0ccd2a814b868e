"""SoftwareVersions matching, value by value (imtrial_dsl.vendors), on the forms real headers write.

The real headers themselves (GE HDxt, three Philips, Siemens XA30) are in tests/test_real_data.py; these
are the forms vendors document in their conformance statements and release notes.
"""
from __future__ import annotations

import pytest

from imtrial_dsl.runner.adherence import software_agreement, software_consistent
from imtrial_dsl.vendors import describe_software_match, software_match, software_matches, software_pattern_hint

GE = ["28", "LX", "MR Software release:DV28.0_R02_1947.a"]
GE_HD = ["24", "LX", "MR Software release:HD16.0_V02_1131.a"]
PHILIPS = ["5.1.1", "5.1.1.0"]
PHILIPS_OLD = ["2.5.3", "2.5.3.3", "PMS1.1 MIMIT EVIIMDictionary"]
SIEMENS = ["syngo MR XA30"]


@pytest.mark.parametrize("pattern,versions,form", [
    ("DV28*", GE, "release"),
    ("dv28.0_r02*", GE, "release"),
    ("HD16*", GE_HD, "release"),
    ("5.*", PHILIPS, "value"),
    ("XA30", SIEMENS, "token"),
    ("syngo MR XA3?", SIEMENS, "value"),
    ("MR Software release:DV28*", GE, "value"),
])
def test_a_glob_matches_a_value_its_release_or_a_word(pattern, versions, form):
    m = software_match(pattern, versions)
    assert m is not None and m[0].form == form
    assert pattern in describe_software_match(m)


@pytest.mark.parametrize("pattern,versions", [
    ("DV26*", GE), ("HD23*", GE_HD), ("6.*", PHILIPS), ("XA20", SIEMENS), ("R5.*", PHILIPS),
])
def test_a_glob_of_another_release_does_not_match(pattern, versions):
    assert software_match(pattern, versions) is None


def test_multi_valued_patterns_match_value_by_value():
    for versions in (GE, GE_HD, PHILIPS, PHILIPS_OLD):
        assert software_matches("\\".join(versions), versions)           # as the header writes it
        assert software_matches("\\".join(versions), "\\".join(versions))  # a header value given as one string
        assert software_matches("\\".join(reversed(versions)), versions)   # order does not matter
    assert software_matches("5.1.1\\5.1.1.0", PHILIPS + ["extra"])        # the header may hold more
    assert not software_matches("5.1.1\\5.1.1.0", ["5.1.1", "5.1.1.2"])
    assert not software_matches("5.1.1\\5.1.1", ["5.1.1"])               # each component needs its own value
    assert software_matches("5.1.1\\5.1.1", ["5.1.1", "5.1.1"])


def test_inventory_agreement_and_upgrades():
    assert software_consistent("R5.7", ["R5.7.1", "R5.7.1.2"])           # a later build of the release
    assert software_consistent("24\\LX\\MR Software release:HD16.0_V02_1131.a", GE_HD)
    assert software_consistent("HD16.0", GE_HD)
    assert software_consistent("XA30", SIEMENS)
    assert not software_consistent("24\\LX\\MR Software release:HD16.0_V02_1131.a",
                                   ["24", "LX", "MR Software release:HD23.0_V01_1911.a"])
    assert not software_consistent("5.1.1\\5.1.1.0", ["5.1.1", "5.1.1.2"])
    assert software_agreement(None, GE) == []
    assert software_agreement("XA30", []) is None


@pytest.mark.parametrize("declared,hint", [
    ("24\\LX\\MR Software release:HD16.0_V02_1131.a", "HD16.0*"),
    ("28\\LX\\MR Software release:DV28.0_R02_1947.a", "DV28.0*"),
    ("5.1.1\\5.1.1.0", "5.1.1*"),
    ("2.5.3\\2.5.3.3\\PMS1.1 MIMIT EVIIMDictionary", "2.5.3*"),
    ("syngo MR XA30", "syngo MR XA30"),
    ("R5.7", "R5.7"),
])
def test_the_suggested_glob_matches_the_declared_software(declared, hint):
    assert software_pattern_hint(declared) == hint
    assert software_matches(hint, declared)
