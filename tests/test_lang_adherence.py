"""Adherence paths of the language constructs, on real headers (tests/data/real) where a header can say it,
with expectations read from the files by pydicom or written down from the documented rules:
'when' blocks per frame and per instance, 'if present', protocol and variant scope (site, device),
'at least N' and optional acquisitions, the same-device rule per modality of a hybrid PET/CT, event-driven
visits, and ``imtrial explain PROTOCOL --device D`` (variants stacked in the merge order of docs/language.md).
"""
from __future__ import annotations

import collections
import datetime as dt
from pathlib import Path

import pydicom
import pytest

from imtrial_dsl import cli, explain, ir
from imtrial_dsl.compiler import compile_file, compile_text
from imtrial_dsl.ops.expected import expected_vs_received
from imtrial_dsl.ops.model import ExamRecord, SeriesRecord, StudyData
from imtrial_dsl.runner import adherence, classify, identify

ROOT = Path(__file__).resolve().parent.parent
REAL = ROOT / "tests" / "data" / "real"
CARDIAC = ROOT / "examples" / "cardiac_sarcoid_mr_petct.imtrial"


def _trial(text: str) -> ir.Trial:
    res = compile_text(text, str(ROOT / "tests" / "lang.imtrial"))
    assert res.ok, [str(d) for d in res.diagnostics]
    return res.trial


def _exam(trial: ir.Trial, folder: Path) -> dict:
    cls = classify.classify_folder(trial, folder)
    assert all(s["status"] == "matched" for s in cls["series"]), cls["series"]
    return adherence.check_exam(trial, cls, adherence.headers_for(cls, folder))


def _rows(res: dict) -> dict[str, dict]:
    return {p["parameter"]: p for s in res["series"] for p in s["parameters"]}


GE_SITE = """
site GEN "GE site" {
  device SIGNA { modality MR vendor "GE MEDICAL SYSTEMS" model "Signa HDxt" software "HD16.0*" serial "3282424594434339" }
  device OTHER { modality MR vendor "GE MEDICAL SYSTEMS" model "Signa HDxt" software "HD16.0*" serial "999" }
}
site TWO "Second site" {
  device TWO_MR { modality MR vendor Siemens model "MAGNETOM Prisma" software "XA30" serial "1" }
}
"""


# ----------------------------------------------------------------------------- 'when' blocks

def test_when_selects_the_frames_of_an_enhanced_object_by_their_own_b_value():
    """XA30 DWI (one Enhanced MR object): every Per-frame Functional Groups item holds its b-value and TE."""
    folder = REAL / "siemens_xa30" / "12_DWI_dir80_PA"
    ds = pydicom.dcmread(next(folder.iterdir()), stop_before_pixels=True)
    per_frame = collections.Counter((float(f.MRDiffusionSequence[0].DiffusionBValue), float(f.MREchoSequence[0].EffectiveEchoTime))
                                    for f in ds.PerFrameFunctionalGroupsSequence)
    assert per_frame == {(2500.0, 68.0): 39}   # read here with pydicom, independently of imtrial
    trial = _trial(f"""
study W "w" {{ }}
site IU "IU" {{ device PRISMA {{ modality MR vendor "Siemens Healthineers" model "MAGNETOM Prisma Fit" software "syngo MR XA30" serial "67093" }} }}
protocol DWI modality MR {{
  match SeriesDescription ~ "(?i)dwi"
  when DiffusionBValue = 2500 s/mm2 {{ EchoTime = 68 ms ± 0.5 ms }}
  when DiffusionBValue >= 2500 s/mm2 {{ EchoTime < 60 ms severity warning }}
  when DiffusionBValue = 1000 s/mm2 {{ EchoTime = 50 ms }}
}}""")
    res = _exam(trial, folder)
    rows = _rows(res)
    ok = rows["when DiffusionBValue = 2500 s/mm2: EchoTime"]
    assert ok["ok"] and ok["frames_selected"] == 39 and ok["condition"] == "when DiffusionBValue = 2500 s/mm2"
    warn = rows["when DiffusionBValue >= 2500 s/mm2: EchoTime"]
    assert not warn["ok"] and warn["significance"] == "warning" and warn["actual_text"] == "68 ms"
    none = rows["when DiffusionBValue = 1000 s/mm2: EchoTime"]
    assert none["ok"] and none["detail"] == "no frame or instance satisfies the condition" and "frames_selected" not in none
    assert res["series"][0]["verdict"] == "warn"   # the warning-significance block alone


def test_when_selects_the_instances_of_a_classic_series():
    """Philips DTI (classic, a file per image): b = 0 and b = 2000 images, the b-value public and private."""
    folder = REAL / "philips" / "Vanderbilt_2018_dti"
    per_b = collections.Counter(float(pydicom.dcmread(p, stop_before_pixels=True).DiffusionBValue) for p in folder.iterdir())
    assert per_b == {2000.0: 64, 0.0: 4}
    study = """
study W "w" { }
site VAN "Vanderbilt" { device VAN_MR { modality MR vendor "Philips Medical Systems" model "Achieva dStream" software "5.3.0\\\\5.3.0.3" serial "17240" } }
protocol DTI modality MR {
  match SeriesDescription ~ "(?i)dti"
  when DiffusionBValue = 0 s/mm2 { private "Philips Imaging DD 001" (2001,xx03) = 0 s/mm2 }
  when DiffusionBValue > 0 s/mm2 { private "Philips Imaging DD 001" (2001,xx03) = B s/mm2 }
}"""
    res = _exam(_trial(study.replace("= B", "= 2000")), folder)
    assert res["series"][0]["verdict"] == "pass", _rows(res)
    # the b = 0 block only looks at the four b = 0 images: asking them for 2000 fails that block alone
    res = _exam(_trial(study.replace("(2001,xx03) = 0 s/mm2", "(2001,xx03) = 2000 s/mm2").replace("= B", "= 2000")), folder)
    bad = [p["parameter"] for p in res["series"][0]["parameters"] if not p["ok"]]
    assert bad == ['when DiffusionBValue = 0 s/mm2: private "Philips Imaging DD 001" (2001,xx03)']


# ----------------------------------------------------------------------------- 'if present', presence, multi-valued

def test_if_present_excuses_an_absent_attribute_never_a_wrong_one():
    folder = REAL / "ge_signa_hdxt"
    ds = pydicom.dcmread(next(folder.iterdir()), stop_before_pixels=True)
    assert "ContrastBolusAgent" not in ds and list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "OTHER"]
    trial = _trial(GE_SITE + """
study W "w" { }
protocol T1 modality MR {
  match SeriesDescription ~ "(?i)spgr"
  ContrastBolusAgent = "Gadobutrol" if present
  ImageType = "DERIVED" if present
  ContrastBolusAgent !has "Gadobutrol"
  PatientWeight present
  ImageType has any {"OTHER", "M"}
}""")
    res = _exam(trial, folder)
    rows = {(p["parameter"], p["kind"]): p for p in res["series"][0]["parameters"]}
    absent = rows[("ContrastBolusAgent", "EQUAL")]
    assert absent["ok"] and absent["actual_text"] == "absent" and absent["detail"] == "absent (constraint applies if present)"
    assert rows[("ContrastBolusAgent", "NOT_CONTAINS")]["ok"]          # '!has' holds on an absent attribute
    assert not rows[("ImageType", "EQUAL")]["ok"]       # present with another value: 'if present' does not excuse it
    assert rows[("ImageType", "CONTAINS_ANY")]["ok"] and rows[("ImageType", "CONTAINS_ANY")]["actual_text"] == "ORIGINAL\\PRIMARY\\OTHER"
    weight = "PatientWeight" in ds and str(ds.PatientWeight) != ""   # this de-identified header has none
    assert [p["parameter"] for p in res["series"][0]["parameters"] if not p["ok"]] == ["ImageType"] + ["PatientWeight"] * (not weight)
    assert rows[("PatientWeight", "PRESENT")]["ok"] == weight


# ----------------------------------------------------------------------------- scope

def test_protocol_scope_and_site_device_variants_on_the_real_ge_exam():
    folder = REAL / "ge_signa_hdxt"
    flip = float(pydicom.dcmread(next(folder.iterdir()), stop_before_pixels=True).FlipAngle)
    base = GE_SITE + """
study W "w" { }
protocol T1 modality MR {
  match SeriesDescription ~ "(?i)spgr"
  SCOPE
  FlipAngle = FLIP deg ± 0.5 deg
  VARIANTS
}""".replace("FLIP", f"{flip:g}")
    res = _exam(_trial(base.replace("SCOPE", "").replace("VARIANTS", "")), folder)
    assert res["verdict"] == "pass" and res["device_match"]["device"] == "SIGNA"
    # a variant for another device or another site does not apply; one for this device (or site) does
    for variants, verdict in (('variant device OTHER { FlipAngle = 90 deg }', "pass"),
                              ('variant site TWO { FlipAngle = 90 deg }', "pass"),
                              ('variant device SIGNA { FlipAngle = 90 deg }', "fail"),
                              ('variant site GEN { FlipAngle = 90 deg }', "fail")):
        res = _exam(_trial(base.replace("SCOPE", "").replace("VARIANTS", variants)), folder)
        assert res["series"][0]["verdict"] == verdict, variants
        if verdict == "fail":
            assert res["series"][0]["variant"]["device" if "device" in variants else "site"] in ("SIGNA", "GEN")
    # a protocol for another site is still checked, and the exam says it is out of scope
    res = _exam(_trial(base.replace("SCOPE", "for site TWO").replace("VARIANTS", "")), folder)
    assert res["series"][0]["verdict"] == "pass"
    assert [(f["code"], f["severity"], f["protocol"]) for f in res["findings"]] == [("protocol_out_of_scope", "warning", "T1")]
    assert "is for site TWO" in res["findings"][0]["message"] and "on SIGNA at site GEN" in res["findings"][0]["message"]
    res = _exam(_trial(base.replace("SCOPE", "for device SIGNA").replace("VARIANTS", "")), folder)
    assert res["findings"] == []


# ----------------------------------------------------------------------------- at least N, optional

def _visit_status(trial: ir.Trial, series: list[tuple[str, str]]) -> dict:
    exam = ExamRecord("e1", subject_id="S1", site="HEL", device="HEL_MR1", visit="baseline", exam_date=dt.date(2026, 3, 1),
                      series=[SeriesRecord(series_uid=f"u{i}", protocol=p, adherence=v, qc="pass") for i, (p, v) in enumerate(series)])
    vs = next(v for v in expected_vs_received(trial, StudyData(exams=[exam]), dt.date(2026, 3, 2)) if v.visit == "baseline")
    return {"incomplete": vs.incomplete, **{a.protocol: a.status for a in vs.acquisitions}}


def test_at_least_and_optional_acquisitions_of_a_visit():
    """baseline: CINE_LAX at least 2, optional T1MAP (examples/cardiac_sarcoid_mr_petct.imtrial)."""
    trial = compile_file(CARDIAC).trial
    visit = next(v for v in trial.schedule.visits if v.name == "baseline")
    acq = {a.name: (a.optional, a.at_least) for a in visit.acquire}
    assert acq["CINE_LAX"] == (False, 2) and acq["T1MAP"] == (True, 1) and acq["CINE_SAX"] == (False, 1)
    full = [("CINE_SAX", "pass"), ("CINE_LAX", "pass"), ("CINE_LAX", "warn"), ("LGE_PSIR", "pass"), ("LGE_MAG", "pass"),
            ("FDG_CARDIAC", "pass"), ("CT_AC", "pass")]
    st = _visit_status(trial, full)
    assert st["CINE_LAX"] == "ok" and st["T1MAP"] == "optional_missing" and not st["incomplete"]
    st = _visit_status(trial, full + [("T1MAP", "pass")])
    assert st["T1MAP"] == "ok" and not st["incomplete"]
    st = _visit_status(trial, [s for s in full if s != ("CINE_LAX", "warn")])   # one long-axis cine of two
    assert st["CINE_LAX"] == "too_few" and st["incomplete"]
    st = _visit_status(trial, [s for s in full if s != ("CINE_LAX", "warn")] + [("CINE_LAX", "fail")])
    assert st["CINE_LAX"] == "too_few" and st["incomplete"]   # a failing series does not count
    # the classify step does not list an optional acquisition as missing
    assert "T1MAP" not in classify.expected_protocols(trial, "baseline")
    assert classify.expected_protocols(trial, "baseline").count("CINE_LAX") == 1


# ----------------------------------------------------------------------------- hybrid devices

def test_same_device_rule_per_modality_of_a_hybrid_pet_ct():
    trial = compile_file(CARDIAC).trial
    hel = {d.id: d for _, d in trial.devices()}["HEL_PETCT1"]
    assert hel.all_modalities() == ["PT", "CT"] and hel.acquires("CT") and hel.acquires("pt") and not hel.acquires("MR")
    prior = {"MR": ["HEL_MR1"], "PT": ["HEL_PETCT1"], "CT": ["HEL_PETCT1"]}
    # the PET/CT exam (PT and CT series) on the subject's PET/CT; the MR on its MR: no device change
    assert adherence.same_device_finding(trial, "HEL_PETCT1", prior, ["PT", "CT"]) is None
    assert adherence.same_device_finding(trial, "HEL_MR1", prior, ["MR"]) is None
    # the CT alone on another PET/CT is a change of the CT device only
    f = adherence.same_device_finding(trial, "MAD_PETCT1", prior, ["CT"])
    assert (f["code"], f["severity"], f["modalities"], f["prior_devices"]) == ("same_device", "error", ["CT"], ["HEL_PETCT1"])
    # a hybrid's software upgrade is covered (or not) for the protocols of both its modalities
    cov = adherence.upgrade_coverage(trial, hel, ["VG90"])
    assert sorted(c["protocol"] for c in cov) == ["CT_AC", "FDG_CARDIAC"]


# ----------------------------------------------------------------------------- event-driven visits

def test_an_event_driven_visit_is_never_missing_and_never_assigned_by_date():
    trial = compile_file(CARDIAC).trial
    relapse = next(v for v in trial.schedule.visits if v.name == "relapse")
    assert relapse.kind == "unscheduled" and relapse.event.startswith("suspected relapse") and not relapse.scheduled()
    base = dt.date(2026, 3, 1)
    vf = adherence.visit_findings(trial, [base, base + dt.timedelta(days=180), base + dt.timedelta(days=360)],
                                  base + dt.timedelta(days=800))
    assert vf["findings"] == [] and [v["visit"] for v in vf["visits"]] == ["baseline", "m06", "m12"]
    prior = [{"date": base, "visit": "baseline", "visit_kind": "baseline"}]
    got = identify.assign_visit(trial, base + dt.timedelta(days=5), prior, set())
    assert got["visit"] != "relapse" and got["in_window"] is False   # a stray exam waits for imtrial assign --visit
    assert identify._visit_named(trial, "relapse", base + dt.timedelta(days=5), base)["visit_kind"] == "unscheduled"


# ----------------------------------------------------------------------------- explain: the merge order

LAYERS = """
study E "e" { }
site S1 "one" { device D1 { modality MR vendor Siemens model "MAGNETOM Prisma" software "XA30" } }
protocol P modality MR {
  FlipAngle = 1 deg
  EchoTime = 1 ms
  RepetitionTime = 1 ms
  variant device D1 { FlipAngle = 6 deg }
  variant site S1 { FlipAngle = 5 deg  EchoTime = 5 ms }
  variant Siemens model "MAGNETOM Prisma" software "XA*" { FlipAngle = 4 deg  InversionTime = 4 ms }
  variant Siemens software "XA30" { FlipAngle = 3 deg  remove RepetitionTime }
  variant Siemens model "MAGNETOM Prisma" { FlipAngle = 2 deg  SliceThickness = 2 mm }
  variant Siemens { FlipAngle = 1.5 deg  PixelBandwidth = 1 Hz/px }
  variant GE { FlipAngle = 99 deg }
}
"""


def test_explain_layers_variants_in_the_documented_merge_order():
    """docs/language.md: 1 vendor, 2 vendor+model, 3 vendor+software, 4 vendor+model+software, 5 site, 6 device,
    whatever order they are written in; each layer replaces the earlier ones on the same attribute."""
    trial = _trial(LAYERS)
    _, _, _, chain = explain.effective(trial, "P", "D1")
    assert [v.layer() for v in chain] == list(ir.MERGE_ORDER)
    text = explain.explain_text(trial, "P", "D1")
    lines = [ln.strip() for ln in text.splitlines()]
    expected = {  # attribute -> (value, layer it comes from), worked out by hand from the rule above
        "FlipAngle = 6 deg": "variant device D1",
        "EchoTime = 5 ms": "variant site S1",
        "InversionTime = 4 ms": 'variant Siemens model "MAGNETOM Prisma" software "XA*"',
        "SliceThickness = 2 mm": 'variant Siemens model "MAGNETOM Prisma"',
        "PixelBandwidth = 1 Hz/px": "variant Siemens",
    }
    body = {ln.split("#")[0].strip(): ln.split("#")[1].strip() for ln in lines if "#" in ln and not ln.startswith("#")}
    assert body == expected
    assert "# RepetitionTime: removed by variant Siemens software \"XA30\"" in lines
    assert lines[1] == ("# layers, in merge order: base, variant Siemens (vendor), variant Siemens model \"MAGNETOM Prisma\" "
                        "(vendor+model), variant Siemens software \"XA30\" (vendor+software), variant Siemens model "
                        "\"MAGNETOM Prisma\" software \"XA*\" (vendor+model+software), variant site S1 (site), "
                        "variant device D1 (device)")
    # adherence uses the same effective constraints
    cons, last = ir.effective_constraints(trial.protocol("P"), "Siemens", "XA30", "MAGNETOM Prisma", site="S1", device="D1")
    assert sorted(f"{c.keyword}={c.values[0].value:g}" for c in cons) == \
        ["EchoTime=5", "FlipAngle=6", "InversionTime=4", "PixelBandwidth=1", "SliceThickness=2"]
    assert last.device == "D1"


def test_imtrial_explain_on_the_cardiac_example(capsys):
    """Two SIGNA Artist scanners of one site on MR29 and MR30: the MR30 software variant refines the GE one."""
    assert cli.main(["explain", "CINE_SAX", str(CARDIAC), "--device", "MAD_MR2"]) == 0
    out = capsys.readouterr().out
    assert "layers, in merge order: base, variant GE (vendor), variant GE software \"MR30*\" (vendor+software)" in out
    assert "TemporalResolution <= 40 ms" in out and "TemporalResolution <= 45 ms" not in out
    assert 'private "GEMS_ACQU_01" (0019,xx9c) ~ "(?i)fiesta"' in out
    assert cli.main(["explain", "CINE_SAX", str(CARDIAC), "--device", "MAD_MR1"]) == 0
    out = capsys.readouterr().out
    assert "TemporalResolution <= 45 ms" in out and "MR30" not in out.split("\n", 2)[1]
    assert cli.main(["explain", "CT_AC", str(CARDIAC), "--device", "UTR_PETCT1"]) == 0
    out = capsys.readouterr().out
    assert "KVP = 120 kV" in out and "# variant device UTR_PETCT1" in out and "KVP in 100 .. 140 kV" not in out
    assert cli.main(["explain", "CT_AC", str(CARDIAC), "--device", "UTR_MR1"]) == 0
    assert "# note: UTR_MR1 does not acquire CT" in capsys.readouterr().out
    assert cli.main(["explain", "CT_AC", str(CARDIAC), "--device", "UTR_PETCT"]) != 0
    assert "did you mean" in capsys.readouterr().err
