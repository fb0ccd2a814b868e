"""Software upgrades and qualification records: coverage by variants, re-qualification, is_qualified."""
from imtrial_dsl.ops import qualify
from imtrial_dsl.ops.qualify import ProtocolDecision, QualificationResult, is_qualified, record
from imtrial_dsl.ops.upgrades import check_software, record_upgrades, scan_upgrades
from ops_data.data import study_data
from ops_data.trial import trial


def _decide(wd, protocol, ok, software, reasons=()):
    record(wd, QualificationResult("AMY01", "BOS", "BOS_MR1", "2026-01-20", "QA physicist", software, "/qa",
                                   [ProtocolDecision(protocol, ok, list(reasons))]))


def test_software_differences_and_coverage():
    t = trial()
    assert check_software(t, "BOS", "BOS_MR1", ["syngo MR XA30"]) is None       # token match: same release
    assert check_software(t, "TOK", "TOK_MR1", ["R5.7.1"]) is None              # a patch of the inventory release
    f = check_software(t, "BOS", "BOS_MR1", ["syngo MR XA31"], "k1")
    cov = {c.protocol: (c.inventory_variant, c.new_variant, c.covered) for c in f.coverage}
    assert cov == {"T1w": ("Siemens software 'XA30'", "base", False),
                   "FLAIR": ("base", "base", True), "SWI": ("base", "base", True)}
    assert f.requalify_protocols == ["T1w", "FLAIR"] and not f.covered
    assert "NOT covered by a variant for T1w" in f.message()
    # Philips R5.* variant covers a new R5 release; the R6 release falls back to the base constraints
    assert check_software(t, "TOK", "TOK_MR1", ["R5.9"]).covered
    r6 = check_software(t, "TOK", "TOK_MR1", ["R6.1"])
    assert {c.protocol: c.covered for c in r6.coverage}["T1w"] is False


def test_no_requalification_when_study_does_not_ask():
    t = trial()
    t.qualification.requalify_on_upgrade = False
    assert check_software(t, "BOS", "BOS_MR1", ["XA31"]).requalify_protocols == []


def test_upgrade_invalidates_qualification_until_requalified(tmp_path):
    t, wd = trial(), tmp_path / "w"
    assert not is_qualified(wd, "BOS", "BOS_MR1", "T1w")                        # never assessed
    _decide(wd, "T1w", True, "syngo MR XA30")
    _decide(wd, "FLAIR", False, "syngo MR XA30", ["no series classified as FLAIR"])
    assert is_qualified(wd, "BOS", "BOS_MR1", "T1w") and not is_qualified(wd, "BOS", "BOS_MR1", "FLAIR")

    found = scan_upgrades(t, study_data())
    assert [(f.exam_key, f.device) for f in found] == [("bos1m12", "BOS_MR1")]
    assert record_upgrades(t, found, wd) == 2                                   # T1w and FLAIR flags
    assert record_upgrades(t, found, wd) == 0                                   # idempotent
    st, dec, flags = qualify.status(wd, "BOS", "BOS_MR1", "T1w")
    assert st == "requalification_needed" and [f["software"] for f in flags] == ["syngo MR XA31"]
    assert not is_qualified(wd, "BOS", "BOS_MR1", "T1w")

    _decide(wd, "T1w", True, "syngo MR XA31")                                  # re-qualified on the new release
    assert is_qualified(wd, "BOS", "BOS_MR1", "T1w")
    assert record_upgrades(t, found, wd) == 0 and is_qualified(wd, "BOS", "BOS_MR1", "T1w")
    rows = {(r["device"], r["protocol"]): r for r in qualify.device_table(t, wd)}
    assert rows[("BOS_MR1", "T1w")]["status"] == "qualified"
    assert rows[("BOS_MR1", "FLAIR")]["status"] == "not_qualified"
    assert rows[("BOS_MR1", "FLAIR")]["reasons"] == "no series classified as FLAIR"
    assert rows[("LYN_MR1", "T1w")]["status"] == "not_assessed"


def test_qualification_on_the_new_release_first_needs_no_requalification(tmp_path):
    t, wd = trial(), tmp_path / "w"
    _decide(wd, "T1w", True, "syngo MR XA31")
    _decide(wd, "FLAIR", True, "syngo MR XA31")
    assert record_upgrades(t, scan_upgrades(t, study_data()), wd) == 0
    assert is_qualified(wd, "BOS", "BOS_MR1", "T1w") and is_qualified(wd, "BOS", "BOS_MR1", "FLAIR")
