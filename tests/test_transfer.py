"""Transfer to declared destinations, against a real Orthanc started on free 127.0.0.1 ports.

The archive is built the way a site builds it (``imtrial synth`` then ``imtrial run`` with a key);
instances are sent by STOW-RS and by C-STORE, then Orthanc's REST API is asked what arrived.
Orthanc is a system package (``scripts/sysdeps.sh`` installs it): without it these tests fail.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from imtrial_dsl import cli
from imtrial_dsl.compiler import load_trial
from imtrial_dsl.transfer import TransferError
from imtrial_dsl.transfer.destinations import resolve
from imtrial_dsl.transfer.dimse import AE_ENV
from imtrial_dsl.transfer.ledger import Ledger, transfers
from imtrial_dsl.transfer.objects import archived_objects
from imtrial_dsl.transfer.send import transfer
from imtrial_dsl.transfer.stow import STOW_MAX_INSTANCES, parse_stow_response
from imtrial_dsl.runner.archive import Archive

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "amyloid_mri.imtrial"
# Destinations the example lacks: a direct DICOM node and a folder (the example's site_relay goes via central).
EXTRA = '\ntransfer pacs dicom ae "ORTHANC" host "pacs.invalid" port 104\ntransfer outbox folder "outbox"\n'
KEY = "transfer-test-key-0123456789"
OUR_AE = "IMTRIAL_TEST"  # the only calling AE title the test Orthanc accepts
PLUGIN_CANDIDATES = ["/usr/share/orthanc/plugins/libOrthancDicomWeb.so", "/usr/lib/orthanc/libOrthancDicomWeb.so.1.7"]


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "imtrial_dsl", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A study file, a synthetic inbox (1 subject per site, baseline) and a finished run's workdir."""
    d = tmp_path_factory.mktemp("transfer_site")
    study = d / "study.imtrial"
    study.write_text(EXAMPLE.read_text() + EXTRA)
    r = _cli("synth", str(study), "--out", str(d / "inbox"), "--subjects", "1", "--visits", "baseline", "--small")
    assert r.returncode == 0, r.stderr
    r = _cli("run", str(study), "--inbox", str(d / "inbox"), "--workdir", str(d / "w"), "--no-progress",
             env={"IMTRIAL_KEY": KEY})
    assert r.returncode == 0, r.stdout + r.stderr
    objects = archived_objects(d / "w" / "archive")
    assert len(objects) > 50
    manifest = json.loads((d / "inbox" / "manifest.json").read_text())
    return {"dir": d, "study": study, "w": d / "w", "objects": objects, "phi": manifest["phi_values"],
            "trial": load_trial(study)}


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class Orthanc:
    def __init__(self, http: int, dicom: int, token: str):
        self.http, self.dicom, self.token = http, dicom, token
        self.base = f"http://127.0.0.1:{http}"
        self.dicomweb = self.base + "/dicom-web"

    def get(self, path: str, raw: bool = False):
        with urllib.request.urlopen(self.base + path, timeout=30) as resp:
            data = resp.read()
        return data if raw else json.loads(data)

    def delete(self, path: str) -> None:
        urllib.request.urlopen(urllib.request.Request(self.base + path, method="DELETE"), timeout=30).read()

    def clear(self) -> None:
        for pid in self.get("/patients"):
            self.delete(f"/patients/{pid}")

    def received(self) -> dict[str, dict]:
        """SOPInstanceUID -> {id, tags (simplified), bytes} for every stored instance."""
        out = {}
        for iid in self.get("/instances"):
            tags = self.get(f"/instances/{iid}/simplified-tags")
            out[tags["SOPInstanceUID"]] = {"id": iid, "tags": tags, "bytes": self.get(f"/instances/{iid}/file", raw=True)}
        return out


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    binary = shutil.which("Orthanc") or ("/usr/sbin/Orthanc" if os.access("/usr/sbin/Orthanc", os.X_OK) else None)
    if binary is None:
        pytest.fail("the Orthanc binary is not installed: run scripts/sysdeps.sh "
                    "(Debian/Ubuntu: apt-get install orthanc orthanc-dicomweb)")
    plugin = next((p for p in PLUGIN_CANDIDATES if Path(p).exists()), None)
    if plugin is None:
        pytest.fail(f"the Orthanc DICOMweb plugin is not installed (looked for {PLUGIN_CANDIDATES}): "
                    "run scripts/sysdeps.sh (Debian/Ubuntu: apt-get install orthanc-dicomweb)")
    d = tmp_path_factory.mktemp("orthanc")
    http, dicom = _free_ports(2)
    token = "tok-" + os.urandom(12).hex()
    # STOW-RS needs the bearer token: Orthanc checks it in a Lua HTTP filter (queries stay open).
    (d / "auth.lua").write_text(
        "function IncomingHttpRequestFilter(method, uri, ip, username, httpHeaders)\n"
        "  if method == 'POST' and string.sub(uri, 1, 11) == '/dicom-web/' then\n"
        f"    return httpHeaders['authorization'] == 'Bearer {token}'\n"
        "  end\n  return true\nend\n")
    cfg = {"Name": "imtrial-test", "StorageDirectory": str(d / "db"), "IndexDirectory": str(d / "db"),
           "HttpPort": http, "DicomPort": dicom, "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
           "HttpServerEnabled": True, "DicomServerEnabled": True, "DicomAet": "ORTHANC", "DicomCheckCalledAet": False,
           # Orthanc 1.10 has no bind-address option: HTTP refuses non-loopback clients (RemoteAccessAllowed),
           # DICOM accepts only our AE title from 127.0.0.1.
           "DicomAlwaysAllowStore": False, "DicomAlwaysAllowEcho": False, "DicomCheckModalityHost": True,
           "DicomModalities": {"imtrial": [OUR_AE, "127.0.0.1", 104]},
           "Plugins": [plugin], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}, "LuaScripts": [str(d / "auth.lua")],
           "SaveJobs": False, "SyncStorageArea": False, "HttpThreadsCount": 4, "DicomThreadsCount": 2,
           "StableAge": 1}
    (d / "orthanc.json").write_text(json.dumps(cfg, indent=2))
    log = open(d / "orthanc.log", "wb")
    proc = subprocess.Popen([binary, str(d / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT, cwd=d)
    o = Orthanc(http, dicom, token)
    try:
        deadline = time.time() + 30
        while True:
            if proc.poll() is not None:
                pytest.fail(f"Orthanc exited with {proc.returncode}:\n{(d / 'orthanc.log').read_text()[-2000:]}")
            try:
                if o.get("/system")["HttpPort"] == http:
                    break
            except (urllib.error.URLError, OSError, ValueError):
                pass
            if time.time() > deadline:
                pytest.fail(f"Orthanc did not answer /system in 30 s:\n{(d / 'orthanc.log').read_text()[-2000:]}")
            time.sleep(0.2)
        assert "dicom-web" in o.get("/plugins"), "the DICOMweb plugin did not load"
        # Orthanc answers HTTP before its DICOM listener is up; C-STORE tests need both.
        while True:
            try:
                socket.create_connection(("127.0.0.1", dicom), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline:
                    pytest.fail(f"Orthanc's DICOM port {dicom} did not open in 30 s")
                time.sleep(0.2)
        yield o
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture
def clean(orthanc):
    orthanc.clear()
    assert orthanc.get("/instances") == []
    return orthanc


def _assert_all_arrived_without_phi(site, got: dict[str, dict]) -> None:
    assert set(got) == {o["sop_uid"] for o in site["objects"]}
    assert site["phi"], "the synthetic inbox should carry planted PHI to look for"
    for uid, inst in got.items():
        assert inst["tags"].get("PatientIdentityRemoved") == "YES", uid
        assert inst["tags"]["PatientID"].startswith("AMY01-"), uid
        for value in site["phi"]:
            assert value.encode() not in inst["bytes"], f"PHI {value!r} reached the destination in {uid}"


def _rows(site, dest: str) -> list[dict]:
    return transfers(site["w"], dest)


# ----------------------------------------------------------------------------- DICOMweb

def test_stow_rs_step_sends_everything_once_and_never_leaks_the_token(site, clean, tmp_path):
    token = clean.token
    w = site["w"]
    out = tmp_path / "stow.json"
    args = ["transfer", str(site["study"]), "--workdir", str(w), "--to", "central", "--url-override", clean.dicomweb,
            "--out", str(out)]
    r = _cli(*args, env={"CENTRAL_TOKEN": token})
    assert r.returncode == 0, r.stdout + r.stderr
    s = json.loads(out.read_text())
    n = len(site["objects"])
    assert (s["sent"], s["failed"], s["refused"], s["already_sent"]) == (n, 0, 0, 0)
    assert s["ledger_destination"] == f"central@{clean.dicomweb}"
    _assert_all_arrived_without_phi(site, clean.received())
    rows = _rows(site, s["ledger_destination"])
    assert len(rows) == n and {r["status"] for r in rows} == {"sent"}

    # Re-run: the ledger says everything was acknowledged, so nothing is sent — an instance deleted
    # at the destination in between stays deleted.
    victim = next(iter(clean.received().values()))
    clean.delete(f"/instances/{victim['id']}")
    r2 = _cli(*args, env={"CENTRAL_TOKEN": token})
    assert r2.returncode == 0, r2.stdout + r2.stderr
    s2 = json.loads(out.read_text())
    assert (s2["sent"], s2["to_send"], s2["already_sent"]) == (0, 0, n)
    assert len(clean.get("/instances")) == n - 1

    # The token is in no output, no ledger row, no file of the workdir.
    for text in (r.stdout, r.stderr, r2.stdout, r2.stderr, out.read_text()):
        assert token not in text
    for f in w.rglob("*"):
        if f.is_file():
            assert token.encode() not in f.read_bytes(), f


def test_stow_rs_http_errors_are_recorded_per_instance(site, clean, monkeypatch):
    monkeypatch.setenv("CENTRAL_TOKEN", "x")
    # Orthanc's root is not a DICOMweb service: every instance fails, with the HTTP status as the reason.
    s = transfer(site["trial"], site["w"] / "archive", "central", state=site["w"] / "state.sqlite",
                    url_override=clean.base + "/no-such-service")
    n = len(site["objects"])
    assert (s["sent"], s["failed"], s["ok"]) == (0, n, False)
    assert all(p["reason"].startswith("HTTP 404") for p in s["problems"]), s["problems"][:2]
    rows = _rows(site, s["ledger_destination"])
    assert len(rows) == n and all(r["status"] == "failed" and r["detail"]["reason"].startswith("HTTP 404") for r in rows)
    assert clean.get("/instances") == []


def test_stow_rs_wrong_token_is_a_recorded_failure(site, clean, tmp_path, monkeypatch):
    wrong = "wrong-" + os.urandom(8).hex()
    monkeypatch.setenv("CENTRAL_TOKEN", wrong)
    state = tmp_path / "state.sqlite"
    s = transfer(site["trial"], site["w"] / "archive", "central", state=state, url_override=clean.dicomweb)
    n = len(site["objects"])
    assert (s["sent"], s["failed"]) == (0, n)
    reasons = [p["reason"] for p in s["problems"]]
    # the first request is refused; after a 401/403 the rest are not attempted (and say so)
    assert reasons[0].startswith("HTTP 403") and all("HTTP 403" in r for r in reasons)
    assert any(r.startswith("not attempted: HTTP 403") for r in reasons)
    assert clean.get("/instances") == []
    assert {r["status"] for r in Ledger(state).rows()} == {"failed"}
    assert wrong not in json.dumps(s)
    assert not [f for f in tmp_path.iterdir() if wrong.encode() in f.read_bytes()]  # state.sqlite, its WAL, lock


def test_interrupted_transfer_resumes_where_it_stopped(site, clean, tmp_path, monkeypatch):
    """Killed after the first STOW-RS request: that batch is in the ledger, the re-run sends only the rest."""
    monkeypatch.setenv("CENTRAL_TOKEN", clean.token)
    state = tmp_path / "state.sqlite"

    def interrupt(msg: str) -> None:
        if "STOW-RS batch" in msg:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        transfer(site["trial"], site["w"] / "archive", "central", state=state, url_override=clean.dicomweb,
                    log=interrupt)
    first = Ledger(state).rows()
    assert len(first) == STOW_MAX_INSTANCES and {r["status"] for r in first} == {"sent"}
    assert len(clean.get("/instances")) == STOW_MAX_INSTANCES
    s = transfer(site["trial"], site["w"] / "archive", "central", state=state, url_override=clean.dicomweb)
    n = len(site["objects"])
    assert (s["already_sent"], s["sent"], s["failed"]) == (STOW_MAX_INSTANCES, n - STOW_MAX_INSTANCES, 0)
    assert set(clean.received()) == {o["sop_uid"] for o in site["objects"]}


# ----------------------------------------------------------------------------- DICOM C-STORE

def test_cstore_command_rejected_ae_then_accepted_and_resumable(site, clean, monkeypatch, capsys):
    w = site["w"]
    argv = ["transfer", str(site["study"]), "--workdir", str(w), "--to", "pacs",
            "--host-override", "127.0.0.1", "--port-override", str(clean.dicom), "--json"]
    n = len(site["objects"])

    # Our default AE title is unknown to this Orthanc: the association is rejected, every instance is
    # recorded as failed with that reason, nothing arrives.
    monkeypatch.delenv(AE_ENV, raising=False)
    assert cli.main(argv) == 1
    s = json.loads(capsys.readouterr().out)
    assert (s["sent"], s["failed"]) == (0, n)
    # Orthanc normally answers with A-ASSOCIATE-RJ; on a loaded machine the association can instead be
    # aborted before Orthanc's answer arrives. Either way every instance is a recorded association failure.
    assert all(any(w in p["reason"] for w in ("rejected", "aborted", "could not be established"))
               for p in s["problems"]), s["problems"][:3]
    key = s["ledger_destination"]
    assert key == f"pacs@ORTHANC@127.0.0.1:{clean.dicom}"
    assert {r["status"] for r in _rows(site, key)} == {"failed"}
    assert clean.get("/instances") == []

    # With the AE title Orthanc knows, the failed instances are retried and all arrive.
    monkeypatch.setenv(AE_ENV, OUR_AE)
    assert cli.main(argv) == 0
    s = json.loads(capsys.readouterr().out)
    assert (s["sent"], s["failed"], s["already_sent"]) == (n, 0, 0)
    rows = _rows(site, key)
    assert {r["status"] for r in rows} == {"sent"} and {r["detail"]["attempts"] for r in rows} == {2}
    got = clean.received()
    _assert_all_arrived_without_phi(site, got)

    # Re-run sends nothing new (a deleted instance is not re-sent: the ledger holds its acknowledgement).
    clean.delete(f"/instances/{next(iter(got.values()))['id']}")
    assert cli.main(argv) == 0
    s = json.loads(capsys.readouterr().out)
    assert (s["sent"], s["to_send"], s["already_sent"]) == (0, 0, n)
    assert len(clean.get("/instances")) == n - 1


# ----------------------------------------------------------------------------- refusal

def test_only_deidentified_intact_instances_leave(site, clean, tmp_path, monkeypatch):
    """An archive holding a non-de-identified file and an altered object: both refused, the rest sent."""
    arch = Archive(tmp_path / "archive")
    good = site["objects"][:2]
    for o in good:
        arch.put_object(o["path"], subject="S", visit="baseline", series_uid="1.2.3", sop_uid=o["sop_uid"])
    identified = get_testdata_file("CT_small.dcm")  # has a PatientName, no PatientIdentityRemoved
    sha_identified, _ = arch.put_object(identified, subject="S", visit="baseline")
    tampered = site["objects"][2]
    sha_tampered, _ = arch.put_object(tampered["path"], subject="S", visit="baseline", sop_uid=tampered["sop_uid"])
    p = arch.object_path(sha_tampered)
    os.chmod(p, 0o644)
    p.write_bytes(p.read_bytes()[:-4] + b"\0\0\0\0")

    monkeypatch.setenv("CENTRAL_TOKEN", clean.token)
    state = tmp_path / "state.sqlite"
    s = transfer(site["trial"], arch.root, "central", state=state, url_override=clean.dicomweb)
    assert (s["sent"], s["refused"], s["ok"]) == (2, 2, False)
    reasons = {p["sha256"]: p["reason"] for p in s["problems"]}
    assert "PatientIdentityRemoved" in reasons[sha_identified]
    assert "altered" in reasons[sha_tampered]
    assert set(clean.received()) == {o["sop_uid"] for o in good}
    assert str(pydicom.dcmread(identified).SOPInstanceUID) not in clean.received()
    led = Ledger(state)
    try:
        st = led.statuses(s["ledger_destination"])
    finally:
        led.close()
    assert st[sha_identified][0] == "refused" and st[sha_tampered][0] == "refused"
    # Refused instances are checked again (and refused again) on every run; never sent.
    s2 = transfer(site["trial"], arch.root, "central", state=state, url_override=clean.dicomweb)
    assert (s2["sent"], s2["refused"], s2["already_sent"]) == (0, 2, 2)


# ----------------------------------------------------------------------------- folder, dry run, relay, errors

def test_folder_copy_is_verified_and_idempotent(site, tmp_path):
    state = tmp_path / "state.sqlite"
    s = transfer(site["trial"], site["w"] / "archive", "outbox", state=state, base=tmp_path)
    n = len(site["objects"])
    assert (s["sent"], s["failed"], s["ok"]) == (n, 0, True)
    copies = sorted((tmp_path / "outbox").rglob("*.dcm"))
    assert len(copies) == n
    by_sha = {hashlib.sha256(c.read_bytes()).hexdigest(): c for c in copies}
    assert set(by_sha) == {o["sha256"] for o in site["objects"]}   # byte-identical copies
    for o in site["objects"]:
        c = by_sha[o["sha256"]]
        assert c.name == f"{o['sop_uid']}.dcm" and c.parent.parent.parent.name == o["subject"]
    assert not [p for p in (tmp_path / "outbox").rglob(".*")]      # no temp files left
    s2 = transfer(site["trial"], site["w"] / "archive", "outbox", state=state, base=tmp_path)
    assert (s2["sent"], s2["already_sent"]) == (0, n)


def test_dry_run_sends_and_records_nothing(site, tmp_path, monkeypatch):
    monkeypatch.delenv("CENTRAL_TOKEN", raising=False)
    state = tmp_path / "state.sqlite"
    s = transfer(site["trial"], site["w"] / "archive", "central", state=state, dry_run=True)
    assert s["dry_run"] and s["to_send"] == len(site["objects"]) and s["sent"] == 0
    assert s["would_send_bytes"] == sum(o["path"].stat().st_size for o in site["objects"])
    assert not s["ok"] and "CENTRAL_TOKEN" in s["problems"][0]["reason"]  # the missing token is reported
    assert Ledger(state).rows() == []


def test_relay_sends_to_the_via_destinations_endpoint(site):
    ep = resolve(site["trial"], "site_relay")
    assert (ep.destination, ep.contacted, ep.kind, ep.via) == ("site_relay", "central", "dicomweb", ("central",))
    assert ep.url == "https://central.example/dicom-web" and ep.auth.ref == "CENTRAL_TOKEN"
    assert ep.ledger_key == "site_relay"
    over = resolve(site["trial"], "site_relay", url_override="http://127.0.0.1:9/dicom-web/")
    assert over.ledger_key == "site_relay@http://127.0.0.1:9/dicom-web"


@pytest.mark.parametrize("kwargs, message", [
    ({"destination": "centrl"}, "did you mean 'central'?"),
    ({"destination": "pacs", "url_override": "http://127.0.0.1:9/x"}, "use --host-override/--port-override"),
    ({"destination": "central", "host_override": "127.0.0.1"}, "apply to a dicom endpoint"),
    ({"destination": "central", "url_override": "ftp://x"}, "must be an http(s) URL"),
    ({"destination": "central"}, "environment variable CENTRAL_TOKEN"),
])
def test_requests_that_cannot_start_send_nothing(site, tmp_path, monkeypatch, kwargs, message):
    monkeypatch.delenv("CENTRAL_TOKEN", raising=False)
    state = tmp_path / "state.sqlite"
    with pytest.raises(TransferError, match=message.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")):
        transfer(site["trial"], site["w"] / "archive", state=state, **kwargs)
    assert not state.exists() or Ledger(state).rows() == []


def test_stow_response_per_instance_status_xml_and_json():
    xml = b"""<?xml version="1.0" encoding="UTF-8"?>
<NativeDicomModel>
  <DicomAttribute tag="00081199" vr="SQ" keyword="ReferencedSOPSequence">
    <Item number="1"><DicomAttribute tag="00081155" vr="UI"><Value number="1">1.2.3.1</Value></DicomAttribute></Item>
    <Item number="2"><DicomAttribute tag="00081155" vr="UI"><Value number="1">1.2.3.2</Value></DicomAttribute>
      <DicomAttribute tag="00081196" vr="US"><Value number="1">45056</Value></DicomAttribute></Item>
  </DicomAttribute>
  <DicomAttribute tag="00081198" vr="SQ" keyword="FailedSOPSequence">
    <Item number="1"><DicomAttribute tag="00081155" vr="UI"><Value number="1">1.2.3.3</Value></DicomAttribute>
      <DicomAttribute tag="00081197" vr="US"><Value number="1">42752</Value></DicomAttribute></Item>
  </DicomAttribute>
</NativeDicomModel>"""
    got = parse_stow_response(xml, "application/dicom+xml")
    assert got == {"1.2.3.1": ("sent", "stored"), "1.2.3.2": ("sent", "stored with warning 0xB000 coercion of data elements"),
                   "1.2.3.3": ("failed", "rejected: 0xA700 out of resources")}
    js = json.dumps({"00081198": {"vr": "SQ", "Value": [{"00081155": {"vr": "UI", "Value": ["9.9"]},
                                                          "00081197": {"vr": "US", "Value": [0x0111]}}]}}).encode()
    assert parse_stow_response(js, "application/dicom+json") == {"9.9": ("sent", "already at the destination (duplicate SOP instance)")}
