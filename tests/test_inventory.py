"""Inventory exporter: sites/devices/contacts CSV + sortable HTML. Goldens: IMTRIAL_UPDATE_GOLDEN=1."""
from __future__ import annotations

import csv
import io
import os
from html.parser import HTMLParser
from pathlib import Path

import pytest

from imtrial_dsl import ir
from imtrial_dsl.exporters import inventory as inv

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).resolve().parent / "golden" / "inventory"
EXAMPLES = sorted((ROOT / "examples").glob("*.imtrial"))
UPDATE = os.environ.get("IMTRIAL_UPDATE_GOLDEN") == "1"


def fixture_trial() -> ir.Trial:
    return ir.Trial.model_validate_json((ROOT / "tests" / "golden" / "eprotocol" / "input_trial.json").read_text())


def load_example(path: Path) -> ir.Trial:
    """Parse + lower (with imports): exporters need the IR, not the checker's verdict."""
    from imtrial_dsl.loader import load

    trial, diags, _ = load(str(path))
    errors = [d for d in diags if d.severity.value == "error"]
    assert trial is not None and not errors, "\n".join(str(d) for d in errors)
    return trial


class _Tables(HTMLParser):
    """Collects the cell texts and classes of each table by id."""

    def __init__(self):
        super().__init__()
        self.tables, self._cur, self._row, self._cell, self.classes = {}, None, None, None, {}

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table":
            self._cur = a.get("id")
            self.tables[self._cur] = []
        elif tag == "tr" and self._cur:
            self._row = []
            self.tables[self._cur].append(self._row)
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []
            if a.get("class"):
                self.classes.setdefault(self._cur, []).append(a["class"])

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "table":
            self._cur = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def _golden_compare(paths, folder: Path):
    docs = {p.name: p.read_text() for p in paths if p.suffix == ".csv"}
    if UPDATE:
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob("*.csv"):
            old.unlink()
        for name, text in docs.items():
            (folder / name).write_text(text)
    assert sorted(docs) == sorted(p.name for p in folder.glob("*.csv"))
    for name, text in docs.items():
        assert text == (folder / name).read_text(), f"{name} differs from golden (IMTRIAL_UPDATE_GOLDEN=1 to accept)"


def test_fixture_files_and_golden(tmp_path):
    paths = inv.export(fixture_trial(), None, tmp_path)
    assert [p.name for p in paths] == ["ONC02_sites.csv", "ONC02_devices.csv", "ONC02_contacts.csv",
                                       "ONC02_site_devices.csv", "ONC02_inventory.html"]
    _golden_compare(paths, GOLDEN / "fixture")


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_examples_golden(example, tmp_path):
    trial = load_example(example)
    paths = inv.export(trial, None, tmp_path)
    _golden_compare(paths, GOLDEN / example.stem)
    sites = list(csv.DictReader(io.StringIO(paths[0].read_text())))
    assert [s["site"] for s in sites] == [s.code for s in trial.sites]
    devices = list(csv.DictReader(io.StringIO(paths[1].read_text())))
    assert len(devices) == len(trial.devices())


def test_csv_matches_ir(tmp_path):
    trial = fixture_trial()
    paths = inv.export(trial, None, tmp_path)
    sites = {r["site"]: r for r in csv.DictReader(io.StringIO(paths[0].read_text()))}
    assert list(sites) == ["HOU", "OSA", "XX", "LYO"]
    assert sites["HOU"]["irb_status"] == "approved" and sites["HOU"]["irb_reference"] == "IRB-1"
    assert sites["HOU"]["ready"] == "yes" and sites["HOU"]["issues"] == ""
    # OSA: IRB pending and nobody to call about imaging
    assert sites["OSA"]["issues"] == "IRB pending; no imaging contact"
    assert sites["XX"]["issues"] == "IRB pending; no imaging contact"
    # LYO: expired IRB; has XA and MR but no CT while the schedule acquires CT_CAP
    assert sites["LYO"]["issues"] == "IRB expired; no CT device"
    assert sites["LYO"]["irb_expires"] == "2026-01-01" and sites["LYO"]["modalities"] == "MR XA"
    devices = {r["device"]: r for r in csv.DictReader(io.StringIO(paths[1].read_text()))}
    mr = devices["LYO_MR1"]
    assert (mr["manufacturer"], mr["vendor"], mr["field_strength"], mr["coils"], mr["research_agreement"]) == \
        ("GE MEDICAL SYSTEMS", "GE", "3 T", "48HNU; AIR", "yes")
    contacts = list(csv.DictReader(io.StringIO(paths[2].read_text())))
    assert {"site": "LYO", "role": "physicist", "name": "P. Durand", "email": "durand@chu.example",
            "phone": "+33 4 00 00 00 00"} in contacts


def test_html_tables_and_irb_status(tmp_path):
    trial = fixture_trial()
    html = inv.export(trial, None, tmp_path)[-1].read_text()
    parser = _Tables()
    parser.feed(html)
    assert set(parser.tables) == {"grid", "sites", "devices", "contacts"}
    assert len(parser.tables["sites"]) == 1 + len(trial.sites)
    assert len(parser.tables["devices"]) == 1 + len(trial.devices())
    assert parser.tables["sites"][0][:4] == ["site", "name", "timezone", "irb status"]
    assert {"irb-approved", "irb-pending", "irb-expired", "ready-yes", "ready-no"} <= set(parser.classes["sites"])
    assert 'addEventListener("click"' in html and 'mailto:durand@chu.example' in html
    assert "4 sites · 6 devices · 2 contacts · 1 IRB approved · 1 ready for subjects" in " ".join(html.split())


def test_deterministic(tmp_path):
    trial = fixture_trial()
    a = inv.export(trial, None, tmp_path / "a")
    b = inv.export(trial, None, tmp_path / "b")
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]


def test_site_by_field_grid_unknown_agreement_and_qualification():
    """Sites as rows, device fields as columns; an undeclared research agreement is 'not declared', not 'no';
    a device that needs qualification keeps its site from being ready until it is recorded qualified."""
    from imtrial_dsl.compiler import compile_file
    from imtrial_dsl.exporters import inventory

    trial = compile_file(ROOT / "examples" / "oncology_ct.imtrial").trial
    grid = {r["site"]: r for r in inventory.rows(trial)["grid"]}
    assert list(grid) == [s.code for s in trial.sites]
    assert grid["HOU"]["research_agreement"] == "HOU_CT1: yes; HOU_CT2: not declared"
    assert grid["OSA"]["research_agreement"] == "not declared"
    assert grid["MIL"]["vendor"] == "GE" and grid["MIL"]["model"] == "Revolution CT"
    assert "imaging_pi: G. Rossi" in grid["MIL"]["contacts"]
    # nothing recorded: unknown, not no
    assert grid["MIL"]["qualification"] == "required: CT_CAP (not recorded)" and grid["MIL"]["ready"] == "unknown"
    done = frozenset({("MIL", "MIL_CT1")})
    rows = inventory.rows(trial, done)
    assert {r["site"]: r["ready"] for r in rows["grid"]}["MIL"] == "yes"
    assert next(d for d in rows["devices"] if d["device"] == "MIL_CT1")["qualification"] == "qualified"
    assert "qualification not recorded: MIL_CT1" in inventory.site_issues(trial, trial.site("MIL"))
    assert {r["site"]: r["ready"] for r in inventory.rows(trial, {("MIL", "MIL_CT1"): "not_qualified"})["grid"]}["MIL"] == "no"


def _decide(workdir, site, device, protocol, ok, software="1", on="2026-05-01"):
    """A decision as `imtrial qualify` records it (ops.qualify.record)."""
    from imtrial_dsl.ops.qualify import ProtocolDecision, QualificationResult, record

    record(workdir, QualificationResult("ONC02", site, device, on, "physicist", software, "/phantom",
                                        [ProtocolDecision(protocol, ok, [] if ok else ["KVP out of range"])]))


def test_ready_accounts_for_the_qualifications_recorded_in_a_workdir(tmp_path):
    """`imtrial qualify` decisions in W/state.sqlite: qualified -> ready; failed -> no; a re-qualification flag
    after an upgrade -> no; nothing recorded -> unknown (not no)."""
    import sqlite3

    from imtrial_dsl.compiler import compile_file
    from imtrial_dsl.exporters import inventory
    from imtrial_dsl.store import connect

    trial = compile_file(ROOT / "examples" / "oncology_ct.imtrial").trial
    w = tmp_path / "w"
    w.mkdir()
    _decide(w, "HOU", "HOU_CT1", "CT_CAP", True)
    _decide(w, "HOU", "HOU_CT2", "CT_CAP", True)
    _decide(w, "MIL", "MIL_CT1", "CT_CAP", True)
    _decide(w, "MIL", "MIL_CT1", "CT_CAP", False, on="2026-05-02")        # the latest decision counts
    _decide(w, "OSA", "OSA_CT1", "CT_CAP", True)
    con = connect(w / "state.sqlite")
    con.execute("INSERT INTO ops_requalification VALUES (?,?,?,?,?,?,?,?)",
                ("ONC02", "OSA", "OSA_CT1", "CT_CAP", "V9.0", "exam1", "2026-06-01", None))
    con.close()
    rec = inventory.recorded_qualifications(trial, w)
    assert rec == {("HOU", "HOU_CT1"): "qualified", ("HOU", "HOU_CT2"): "qualified",
                   ("MIL", "MIL_CT1"): "not_qualified", ("OSA", "OSA_CT1"): "requalification_needed"}
    paths = inventory.export(trial, None, tmp_path / "out", workdir=w)
    sites = {r["site"]: r for r in csv.DictReader(io.StringIO(paths[0].read_text()))}
    assert (sites["HOU"]["ready"], sites["HOU"]["issues"]) == ("yes", "")
    assert (sites["MIL"]["ready"], sites["MIL"]["issues"]) == ("no", "not qualified: MIL_CT1")
    assert (sites["OSA"]["ready"], sites["OSA"]["issues"]) == ("no", "requalification needed: OSA_CT1")
    assert (sites["SEA"]["ready"], sites["SEA"]["issues"]) == ("no", "IRB pending; qualification not recorded: SEA_CT1")
    devices = {r["device"]: r for r in csv.DictReader(io.StringIO(paths[1].read_text()))}
    assert devices["MIL_CT1"]["qualification"] == "not qualified: CT_CAP"
    assert devices["SEA_CT1"]["qualification"] == "required: CT_CAP (not recorded)"
    assert 'class="ready-unknown"' not in paths[-1].read_text()
    # without the workdir nothing is known: every CT site is unknown (SEA: its IRB is a definite no)
    plain = {r["site"]: r["ready"] for r in inventory.rows(trial)["sites"]}
    assert plain == {"HOU": "unknown", "MIL": "unknown", "OSA": "unknown", "SEA": "no"}


def test_qualifications_from_a_csv_and_its_errors(tmp_path):
    from imtrial_dsl.compiler import compile_file
    from imtrial_dsl.diagnostics import ImtrialError
    from imtrial_dsl.exporters import inventory

    trial = compile_file(ROOT / "examples" / "oncology_ct.imtrial").trial
    f = tmp_path / "q.csv"
    f.write_text("Site,Device,Status\nHOU,HOU_CT1,passed\nHOU,HOU_CT2,qualified\nMIL,MIL_CT1,unknown\nOSA,OSA_CT1,failed\n")
    assert inventory.recorded_qualifications(trial, csv_path=f) == {
        ("HOU", "HOU_CT1"): "qualified", ("HOU", "HOU_CT2"): "qualified", ("MIL", "MIL_CT1"): "not_assessed",
        ("OSA", "OSA_CT1"): "not_qualified"}
    ready = {r["site"]: r["ready"] for r in inventory.rows(trial, inventory.recorded_qualifications(trial, csv_path=f))["sites"]}
    assert ready == {"HOU": "yes", "MIL": "unknown", "OSA": "no", "SEA": "no"}
    f.write_text("site,device,status\nHOU,HOU_CT9,qualified\n")
    with pytest.raises(ImtrialError) as e:
        inventory.recorded_qualifications(trial, csv_path=f)
    assert e.value.code == "E631" and ":2:" in str(e.value) and "HOU_CT9" in str(e.value)
    f.write_text("site,device,status\nHOU,HOU_CT1,maybe\n")
    with pytest.raises(ImtrialError) as e:
        inventory.recorded_qualifications(trial, csv_path=f)
    assert e.value.code == "E632"
    f.write_text("site,device\nHOU,HOU_CT1\n")
    with pytest.raises(ImtrialError) as e:
        inventory.recorded_qualifications(trial, csv_path=f)
    assert e.value.code == "E631" and "status" in str(e.value)
