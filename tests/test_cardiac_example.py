"""examples/cardiac_sarcoid_mr_petct.imtrial end to end: synthesized over four vendors (hybrid PET/CT
scanners, 'at least 2' long-axis cines, derived uptake time and activity per kg, private GE sequence name),
run through the pipeline with one planted deviation that fails alone, and exported."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pydicom
import pytest

from imtrial_dsl.compiler import compile_file
from imtrial_dsl.runner.run import run_study
from imtrial_dsl.store import Store
from imtrial_dsl.synth import synthesize

ROOT = Path(__file__).resolve().parent.parent
STUDY = ROOT / "examples" / "cardiac_sarcoid_mr_petct.imtrial"
KEY = "cardiac-example-test-key-0123456789abcdef"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    os.environ["IMTRIAL_KEY"] = KEY
    base = tmp_path_factory.mktemp("csar03")
    res = compile_file(STUDY)
    assert res.ok and res.diagnostics == [], [str(d) for d in res.diagnostics]   # checks clean, no warning
    manifest = synthesize(res.trial, base / "inbox", subjects_per_site=1, seed=7, small=True, phi=False,
                          visits=["baseline"], deviations=["param_off"])
    summary = run_study(res.trial, inbox=base / "inbox", workdir=base / "w", jobs=1)
    return {"trial": res.trial, "manifest": manifest, "summary": summary, "inbox": base / "inbox", "work": base / "w"}


def test_the_corpus_is_what_the_four_vendors_scanners_write(run):
    m, trial = run["manifest"], run["trial"]
    assert not m["notes"], m["notes"]            # every constraint could be satisfied the vendor's way
    by_device: dict[str, list[str]] = {}
    for e in m["exams"]:
        by_device[e["device"]] = [s["protocol"] for s in e["series"]]
    # one MR exam and one PET/CT exam per subject; the hybrid's PT and CT series are one study
    assert sorted(by_device) == ["HEL_MR1", "HEL_PETCT1", "KYO_MR1", "KYO_PETCT1", "MAD_MR1", "MAD_PETCT1",
                                 "UTR_MR1", "UTR_PETCT1"]
    for dev, protos in by_device.items():
        if dev.endswith("PETCT1"):
            assert protos == ["FDG_CARDIAC", "CT_AC"]
        else:
            assert protos == ["CINE_SAX", "CINE_LAX", "CINE_LAX", "LGE_PSIR", "LGE_MAG", "T1MAP"]   # at least 2
    manufacturers = {}
    for e in m["exams"]:
        files = [run["inbox"] / f for s in e["series"] for f in s["files"][:1]]
        headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
        assert len({h.StudyInstanceUID for h in headers}) == 1
        manufacturers[e["device"]] = headers[0].Manufacturer
        for h in headers:
            if h.Modality == "PT":
                item = h.RadiopharmaceuticalInformationSequence[0]
                assert "RadionuclideTotalDose" not in h and 185e6 <= float(item.RadionuclideTotalDose) <= 555e6
                start = float(str(h.SeriesTime)[:2]) * 60 + float(str(h.SeriesTime)[2:4])
                inj = str(item.RadiopharmaceuticalStartTime)
                assert abs(start - (float(inj[:2]) * 60 + float(inj[2:4])) - 60) <= 10   # uptake 60 min ± 10
            if e["device"] == "MAD_MR1" and h.Modality == "MR" and "cine" in h.SeriesDescription.lower() \
                    and "sax" in h.SeriesDescription.lower():
                assert h.private_block(0x0019, "GEMS_ACQU_01")[0x9C].value.lower() == "fiesta"
    assert {trial.site(e["site"]).code for e in m["exams"]} == {"HEL", "MAD", "UTR", "KYO"}
    assert manufacturers["HEL_MR1"] == "Siemens Healthineers" and manufacturers["MAD_MR1"] == "GE MEDICAL SYSTEMS"
    assert manufacturers["UTR_MR1"] == "Philips Medical Systems" and manufacturers["KYO_MR1"] == "CANON_MEC"


def test_every_series_is_classified_and_only_the_planted_deviation_fails(run):
    s, m = run["summary"], run["manifest"]
    n_series = sum(len(e["series"]) for e in m["exams"])
    assert s["exams"] == 8 and s["exam_status"] == {"done": 8} and not s["failed"]
    assert s["classification"] == {"matched": n_series} and s["series"] == n_series == 32
    assert s["quarantined"] == 1 and s["quarantine_reasons"] == {"not_dicom": 1}   # the manifest beside the files
    assert s["incomplete"] == []   # each exam misses nothing of its own modalities; the optional T1MAP is not required
    assert "same_device" not in s["warnings"] and set(s["warnings"]) <= {"unqualified_device"}
    planted = [d for d in m["deviations"] if d["type"] == "param_off"]
    assert len(planted) == 1 and s["adherence"] == {"pass": n_series - 1, "fail": 1}
    st = Store(run["work"])
    try:
        failing = [(sr["classification"]["protocol"], sr["adherence"]["verdict"])
                   for e in st.exams() for sr in e["series"] if sr["adherence"]["verdict"] != "pass"]
    finally:
        st.close()
    assert failing == [(planted[0]["protocol"], "fail")]
    rows = [(s["protocol"], [p["parameter"] for p in s["parameters"] if not p["ok"]])
            for f in (run["work"] / "exams").glob("*/results/adherence.json") for s in json.loads(f.read_text())["series"]
            if s["verdict"] != "pass"]
    assert rows == [(planted[0]["protocol"], [planted[0]["parameter"]])]


def test_adherence_reads_derived_quantities_private_elements_and_device_variants(run):
    rows = {}
    for p in sorted((run["work"] / "exams").glob("*/results/adherence.json")):
        d = json.loads(p.read_text())
        for s in d["series"]:
            rows[(d["device_match"]["device"], s["protocol"])] = s
    fdg = {p["parameter"]: p for p in rows[("KYO_PETCT1", "FDG_CARDIAC")]["parameters"]}
    assert fdg["UptakeTime"]["ok"] and fdg["UptakeTime"]["actual_text"].endswith(" min")
    assert fdg["InjectedActivityPerKg"]["ok"] and fdg["InjectedActivityPerKg"]["actual_text"].endswith(" MBq/kg")
    assert fdg["RadiopharmaceuticalInformationSequence[0].RadionuclideTotalDose"]["actual_text"].endswith(" MBq")
    ge = {p["parameter"]: p for p in rows[("MAD_MR1", "CINE_SAX")]["parameters"]}
    assert ge['private "GEMS_ACQU_01" (0019,xx9c)']["ok"] and ge["TemporalResolution"]["expected"] == "<= 45 ms"
    ct = rows[("UTR_PETCT1", "CT_AC")]
    assert ct["variant"]["device"] == "UTR_PETCT1" and {p["parameter"]: p["expected"] for p in ct["parameters"]}["KVP"] == "= 120 kV"
    assert rows[("HEL_PETCT1", "CT_AC")]["variant"] is None
