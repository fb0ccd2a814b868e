"""Identify: the subject registry, check digits, site from the device inventory, visit windows."""
from __future__ import annotations

import json
import sqlite3

from imtrial_dsl.runner.invoke import find_node, run_staged
from pathlib import Path

import pytest

from imtrial_dsl.compiler import compile_text
from imtrial_dsl.runner import identify as idf
from imtrial_dsl.store import Store as State

STUDY = """
study {code} "Identify test study" {{ sponsor "tests" }}
site BOS "Boston" {{
  device BOS_MR1 {{ modality MR vendor Siemens model "MAGNETOM Prisma" software "XA30" serial "166012" station "BOSMR1" }}
}}
site LYN "Lyon" {{
  device LYN_MR1 {{ modality MR vendor GE model "SIGNA Premier" software "MR30.1" serial "GEP0042" station "LYNMR1" }}
}}
protocol T1w modality MR "T1" {{ match SeriesDescription ~ "(?i)t1" }}
protocol FLAIR modality MR "FLAIR" {{ match SeriesDescription ~ "(?i)flair" }}
schedule {{
  {screening}
  visit baseline at day 0 window -7 .. +7 d acquire T1w, FLAIR
  visit m12 at month 12 window -14 .. +28 d acquire T1w, FLAIR
}}
identifiers {{
  subject "{code}-{{site}}-{{seq:04}}{{check}}"
  check_digit {check}
  source PatientID
  issuer IssuerOfPatientID
  key env IMTRIAL_TEST_KEY
}}
"""


def trial_for(code="AMY01", check="mod97", screening=""):
    res = compile_text(STUDY.format(code=code, check=check, screening=screening), f"{code}.imtrial")
    assert res.ok, [str(d) for d in res.diagnostics]
    return res.trial


def exam(pid, date, key, serial="166012", station="BOSMR1", series=("t1_mprage", "flair_3d"), issuer="BGH",
         model="MAGNETOM Prisma"):
    return {"exam_key": key, "study_uid": f"1.2.3.{key}", "study_date": date,
            "patient": {"PatientID": pid, "IssuerOfPatientID": issuer},
            "device": {"manufacturer": "SIEMENS", "model": model, "serial": serial, "station": station,
                       "software": ["syngo MR XA30"]},
            "series": [{"description": d, "modality": "MR"} for d in series]}


@pytest.fixture()
def db(tmp_path, monkeypatch):
    monkeypatch.setenv("IMTRIAL_TEST_KEY", "k3y-for-tests-0123456789")
    con = idf.connect_registry(tmp_path / "state.sqlite")
    yield con
    con.close()


# ----------------------------------------------------------------------------- check digits

def test_mod97_matches_iban():
    # IBAN GB82 WEST 1234 5698 7654 32: check digits over BBAN + country code (ISO 7064 MOD 97-10)
    assert idf.mod97("WEST12345698765432GB") == "82"
    assert int(idf._digits("AMY01-BOS-0007" + idf.mod97("AMY01-BOS-0007"))) % 97 == 1


def test_luhn_known_vector():
    assert idf.luhn("7992739871") == "3"
    assert idf.verify_check("79927398713", "luhn")
    assert not idf.verify_check("79927398710", "luhn")


def test_iso7064_mod11_2_orcid_vectors():
    assert idf.iso7064_mod11_2("000000021825009") == "7"     # ORCID 0000-0002-1825-0097
    assert idf.iso7064_mod11_2("000000021694233") == "X"     # ORCID 0000-0002-1694-233X


@pytest.mark.parametrize("algo", ["mod97", "luhn", "iso7064", "mod11"])
def test_formatted_ids_carry_valid_check_digits(algo):
    ids = {idf.format_subject_id("AMY01-{site}-{seq:04}{check}", site="BOS", seq=n, algorithm=algo) for n in range(1, 60)}
    assert len(ids) == 59
    assert all(idf.verify_check(i, algo) for i in ids)
    # a single typo in the sequence number is caught
    one = idf.format_subject_id("AMY01-{site}-{seq:04}{check}", site="BOS", seq=17, algorithm=algo)
    typo = one.replace("0017", "0018", 1)
    assert not idf.verify_check(typo, algo)


# ----------------------------------------------------------------------------- registry

def test_same_person_same_id_across_visits(db):
    t = trial_for()
    a = idf.identify_exam(t, exam("P1", "20250110", "e1"), db)["identity"]
    b = idf.identify_exam(t, exam("P1", "20260115", "e2"), db)["identity"]
    c = idf.identify_exam(t, exam("P2", "20250112", "e3"), db)["identity"]
    assert a["subject_id"] == b["subject_id"] != c["subject_id"]
    assert a["subject_id"].startswith("AMY01-BOS-0001") and c["subject_id"].startswith("AMY01-BOS-0002")
    assert idf.verify_check(a["subject_id"], "mod97")
    assert (a["visit"], b["visit"]) == ("baseline", "m12")
    assert b["in_window"] and b["days_from_baseline"] == 370
    # re-identifying the same exam (a re-run after a crash) changes nothing
    again = idf.identify_exam(t, exam("P1", "20260115", "e2"), db)["identity"]
    assert again == b


def test_issuer_is_part_of_identity(db):
    t = trial_for()
    a = idf.identify_exam(t, exam("P1", "20250110", "e1", issuer="BGH"), db)["identity"]
    b = idf.identify_exam(t, exam("P1", "20250111", "e2", issuer="OTHER-HOSPITAL"), db)["identity"]
    assert a["subject_id"] != b["subject_id"]


def test_two_trials_give_unrelated_ids_and_keys(db):
    t1, t2 = trial_for("AMY01"), trial_for("CTX02", check="luhn")
    other = idf.identify_exam(t2, exam("X9", "20250101", "x0"), db)["identity"]  # shifts CTX02's sequence
    a = idf.identify_exam(t1, exam("P1", "20250110", "e1"), db)["identity"]
    b = idf.identify_exam(t2, exam("P1", "20250110", "e2"), db)["identity"]
    assert a["subject_id"] != b["subject_id"]
    assert a["subject_id"].split("-")[2] != b["subject_id"].split("-")[2]   # not the same sequence number
    assert b["subject_id"].startswith("CTX02-BOS-") and idf.verify_check(b["subject_id"], "luhn")
    assert other["subject_id"] != b["subject_id"]
    rows = db.execute("SELECT trial, source_key FROM subjects").fetchall()
    keys = {r["trial"]: set() for r in rows}
    for r in rows:
        keys[r["trial"]].add(r["source_key"])
    assert not (keys["AMY01"] & keys["CTX02"])                              # no shared lookup key


def test_registry_stores_only_keyed_hashes_for_lookup(db, tmp_path):
    t = trial_for()
    res = idf.identify_exam(t, exam("MRN-123456", "20250110", "e1"), db)
    lookup = [dict(r) for r in db.execute("SELECT * FROM subjects")]
    assert all(r["source_key"].startswith("hmac:") for r in lookup)
    assert "MRN-123456" not in json.dumps(lookup)
    assert "MRN-123456" not in json.dumps(res["identity"])
    # the site's audit of source identifiers holds keyed hashes too (no re-identification log asked for) …
    st = State(tmp_path)
    audit = st.audit_map()
    assert [r["source_value"][:5] for r in audit] == ["hmac:"] and "MRN-123456" not in json.dumps(audit)
    assert "BGH" not in json.dumps(audit)                                    # nor the issuer
    assert idf.find_subject(t, db, {"PatientID": "MRN-123456"}, "BGH") == res["identity"]["subject_id"]
    assert st.purge_audit_map() == 1
    st.close()
    again = idf.identify_exam(t, exam("MRN-123456", "20260110", "e2"), db)["identity"]
    assert again["subject_id"] == res["identity"]["subject_id"]


def test_missing_key_is_an_error(db, monkeypatch):
    monkeypatch.delenv("IMTRIAL_TEST_KEY")
    with pytest.raises(idf.IdentifyError) as err:
        idf.identify_exam(trial_for(), exam("P1", "20250110", "e1"), db)
    assert err.value.reason == "key_missing" and "IMTRIAL_TEST_KEY" in err.value.detail


# ----------------------------------------------------------------------------- sites, devices

def test_site_from_inventory_serial_then_station(db):
    t = trial_for()
    by_serial = idf.identify_exam(t, exam("P1", "20250110", "e1", serial="GEP0042", station="?"), db)["identity"]
    assert (by_serial["site"], by_serial["device"], by_serial["device_match"]) == ("LYN", "LYN_MR1", "serial")
    by_station = idf.identify_exam(t, exam("P2", "20250110", "e2", serial="", station="BOSMR1"), db)["identity"]
    assert (by_station["site"], by_station["device_match"]) == ("BOS", "station")
    by_model = idf.identify_exam(t, exam("P3", "20250110", "e3", serial="", station=""), db)["identity"]
    assert (by_model["device"], by_model["device_match"]) == ("BOS_MR1", "model")


def test_unknown_device_uses_known_subject_or_is_unmatched(db):
    t = trial_for()
    idf.identify_exam(t, exam("P1", "20250110", "e1"), db)
    follow = idf.identify_exam(t, exam("P1", "20260110", "e2", serial="NEW1", station="NEWST", model="MAGNETOM Vida"), db)["identity"]
    assert follow["site"] == "BOS" and follow["device"] is None
    assert any(w["code"] == "unknown_device" for w in follow["warnings"])
    with pytest.raises(idf.IdentifyError) as err:
        idf.identify_exam(t, exam("P9", "20250110", "e3", serial="NEW1", station="NEWST", model="MAGNETOM Vida"), db)
    assert err.value.reason == "unmatched"


# ----------------------------------------------------------------------------- visits

def test_out_of_window_is_flagged(db):
    t = trial_for()
    idf.identify_exam(t, exam("P1", "20250110", "e1"), db)
    late = idf.identify_exam(t, exam("P1", "20260301", "e2"), db)["identity"]   # day 415: m12 window is 351..393
    assert late["visit"] == "m12" and late["in_window"] is False
    assert any(w["code"] == "out_of_window" for w in late["warnings"])


def test_screening_rule_uses_content_and_windows(db):
    t = trial_for(screening="visit screening screening at day -28 window -14 .. +0 d acquire FLAIR")
    scr = idf.identify_exam(t, exam("P1", "20250101", "e1", series=("flair_3d",)), db)["identity"]
    assert scr["visit"] == "screening"
    base = idf.identify_exam(t, exam("P1", "20250130", "e2"), db)["identity"]
    assert base["visit"] == "baseline" and base["in_window"]
    m12 = idf.identify_exam(t, exam("P1", "20260201", "e3"), db)["identity"]
    assert m12["visit"] == "m12" and m12["days_from_baseline"] == 367
    # a first exam with baseline-only protocols is the baseline even in a study with screening
    other = idf.identify_exam(t, exam("P2", "20250105", "e4"), db)["identity"]
    assert other["visit"] == "baseline"
    # screening is judged against its window once the baseline exists: 29 days before is inside -42..-28
    row = db.execute("SELECT in_window, days_from_baseline FROM exams WHERE exam_key='e1'").fetchone()
    assert (row["in_window"], row["days_from_baseline"]) == (1, -29)
    idf.identify_exam(t, exam("P3", "20250101", "e5", series=("flair_3d",)), db)
    idf.identify_exam(t, exam("P3", "20250301", "e6"), db)          # 59 days later: screening was too early
    row = db.execute("SELECT in_window, warnings FROM exams WHERE exam_key='e5'").fetchone()
    assert row["in_window"] == 0 and "out_of_window" in row["warnings"]


def test_identify_step_writes_identity_without_original_identifiers(tmp_path, monkeypatch):
    monkeypatch.setenv("IMTRIAL_TEST_KEY", "k3y-for-tests-0123456789")
    t = trial_for()
    src = tmp_path / "exam.json"
    src.write_text(json.dumps(exam("MRN-777", "20250110", "e1")))
    # as a CWL engine runs it: one batch over the exams, the registry staged into the output folder
    res = run_staged(t, find_node(t, "identify"), [("exam.json", src)], tmp_path)
    assert res["exams"]["e1"]["identified"]
    out = tmp_path / "e1" / "results" / "identity.json"
    text = out.read_text()
    ident = json.loads(text)
    assert ident["subject_id"].startswith("AMY01-BOS-0001") and ident["visit"] == "baseline"
    assert "MRN-777" not in text and "20250110" not in text and "BGH" not in text
    con = sqlite3.connect(tmp_path / "state.sqlite")
    assert con.execute("SELECT exam_date FROM exams WHERE exam_key='e1'").fetchone()[0] == "20250110"
    con.close()


def test_first_exam_uses_the_next_exam_date_when_content_cannot_tell(db):
    # screening acquires the same protocols as baseline: content cannot tell them apart
    t = trial_for(screening="visit screening screening at day -28 window -14 .. +0 d acquire T1w, FLAIR")
    d = idf.parse_date
    # next exam ~a year later: this one is the baseline (a screening would precede the baseline by 21..49 days)
    a = idf.identify_exam(t, exam("P1", "20250110", "e1"), db, later=[d("20260115")])["identity"]
    assert a["visit"] == "baseline"
    # next exam 30 days later: screening then baseline
    b = idf.identify_exam(t, exam("P2", "20250110", "e2"), db, later=[d("20250209")])["identity"]
    assert b["visit"] == "screening"
    assert idf.identify_exam(t, exam("P2", "20250209", "e3"), db)["identity"]["visit"] == "baseline"
    # nothing else known: the documented default, screening
    c = idf.identify_exam(t, exam("P3", "20250110", "e4"), db)["identity"]
    assert c["visit"] == "screening"


def test_later_exam_dates_groups_by_person():
    t = trial_for()
    exams = [exam("P1", "20250110", "a"), exam("P1", "20260110", "b"), exam("P2", "20250111", "c"),
             exam("P1", "20250301", "d", issuer="OTHER")]
    later = idf.later_exam_dates(t, exams)
    assert later["a"] == [idf.parse_date("20260110")] and later["b"] == [idf.parse_date("20250110")]
    assert later["c"] == [] and later["d"] == []
