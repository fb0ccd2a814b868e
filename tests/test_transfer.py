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
           # a re-sent SOP instance with new content (a corrected version) replaces the stored one
           "OverwriteInstances": True,
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


# ----------------------------------------------------------------------------- receivers that misbehave (issue 10)

class FakeReceiver:
    """A loopback TCP server that reads each HTTP request (headers and body) and answers with the next
    ``behaviour(request_bytes, conn)`` of a list (the last one repeats); bounded, stops with the test."""

    def __init__(self, behaviours):
        import threading

        self.behaviours, self.requests = list(behaviours), []
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/dicom-web"
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _read(self, conn) -> bytes:
        conn.settimeout(10)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                return data
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = next((int(h.split(b":", 1)[1]) for h in head.split(b"\r\n") if h.lower().startswith(b"content-length:")), 0)
        while len(body) < length:
            chunk = conn.recv(65536)
            if not chunk:
                break
            body += chunk
        return head + b"\r\n\r\n" + body

    def _serve(self) -> None:
        while not self.stop.is_set() and len(self.requests) < 200:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            with conn:
                req = self._read(conn)
                self.requests.append(req)
                b = self.behaviours[min(len(self.requests), len(self.behaviours)) - 1]
                try:
                    b(req, conn)
                except OSError:
                    pass

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.sock.close()


def _sop_uids(request: bytes) -> list[str]:
    """The SOPInstanceUIDs of the instances in a STOW-RS request body."""
    import io

    body = request.partition(b"\r\n\r\n")[2]
    boundary = request.split(b"boundary=", 1)[1].split(b"\r\n", 1)[0].strip(b'"')
    uids = []
    for part in body.split(b"--" + boundary)[1:-1]:
        data = part.partition(b"\r\n\r\n")[2].rsplit(b"\r\n", 1)[0]
        uids.append(str(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID))
    return uids


def _json_answer(status: int, doc, extra: str = ""):
    def answer(req, conn):
        body = json.dumps(doc).encode()
        conn.sendall(f"HTTP/1.1 {status} X\r\nContent-Type: application/dicom+json\r\nContent-Length: {len(body)}\r\n"
                     f"{extra}Connection: close\r\n\r\n".encode() + body)
    return answer


def _stored(uids):
    return {"00081199": {"vr": "SQ", "Value": [{"00081155": {"vr": "UI", "Value": [u]}} for u in uids]}}


def _acknowledge_all(req, conn):
    _json_answer(200, _stored(_sop_uids(req)))(req, conn)


def _garbage(req, conn):
    conn.sendall(b"this is not HTTP at all\r\n\r\n")


def _cut_short(req, conn):
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/dicom+json\r\nContent-Length: 5000\r\n\r\n{\"00081199\"")


def _reset(req, conn):
    import struct
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST, not FIN


def _hang_up(req, conn):
    pass  # close without a word


@pytest.fixture
def quick_retries(monkeypatch):
    from imtrial_dsl.transfer import sender

    monkeypatch.setattr(sender, "BACKOFF_S", 0.01)
    monkeypatch.setattr(sender, "RETRIES", 2)


@pytest.mark.parametrize("behaviour, words", [
    (_garbage, "BadStatusLine"), (_cut_short, "IncompleteRead"), (_reset, "reset"),
    (_hang_up, "closed the connection without a response"),
])
def test_http_protocol_errors_are_recorded_retryable_failures(site, tmp_path, monkeypatch, quick_retries, behaviour, words):
    monkeypatch.setenv("CENTRAL_TOKEN", "t")
    rx = FakeReceiver([behaviour])
    state = tmp_path / "state.sqlite"
    try:
        s = transfer(site["trial"], site["w"] / "archive", "central", state=state, url_override=rx.url)
    finally:
        rx.close()
    n = len(site["objects"])
    assert (s["sent"], s["failed"], s["ok"]) == (0, n, False)
    assert len(rx.requests) == 3                                        # the first request and two retries
    rows = Ledger(state).rows()
    assert len(rows) == n and {r["status"] for r in rows} == {"failed"}
    assert any(words in r["detail"]["reason"] for r in rows), rows[0]["detail"]
    assert all(r["detail"]["reason"].startswith("not attempted") or r["detail"].get("retryable") for r in rows)
    # … and a later run retries them (the receiver behaves now)
    rx = FakeReceiver([_acknowledge_all])
    try:
        s = transfer(site["trial"], site["w"] / "archive", "central", state=state, url_override=rx.url)
    finally:
        rx.close()
    assert (s["sent"], s["failed"]) == (n, 0)


def test_the_cli_reports_a_protocol_error_not_an_internal_error(site, tmp_path):
    rx = FakeReceiver([_garbage])
    w = tmp_path / "w"
    shutil.copytree(site["w"], w)
    try:
        r = _cli("transfer", str(site["study"]), "--workdir", str(w), "--to", "central", "--url-override", rx.url,
                 env={"CENTRAL_TOKEN": "t"})
    finally:
        rx.close()
    assert len(rx.requests) == 4                                        # 3 retries by default (1 + 2 + 4 s)
    assert r.returncode == 1 and "internal error" not in r.stderr and "protocol error" in r.stdout, r.stdout + r.stderr


def test_a_200_listing_other_instances_acknowledges_only_those(site, tmp_path, monkeypatch):
    monkeypatch.setenv("CENTRAL_TOKEN", "t")

    def others(req, conn):
        uids = _sop_uids(req)
        _json_answer(200, _stored(uids[:2] + ["1.2.3.4.5.6.7.8.9"]))(req, conn)   # 2 of ours, one stranger

    rx = FakeReceiver([others])
    state = tmp_path / "state.sqlite"
    try:
        s = transfer(site["trial"], site["w"] / "archive", "central", state=state, url_override=rx.url)
    finally:
        rx.close()
    batches = len(rx.requests)
    assert s["sent"] == 2 * batches and s["failed"] == len(site["objects"]) - 2 * batches
    rows = {r["detail"]["sop_uid"]: r for r in Ledger(state).rows()}
    for req in rx.requests:
        uids = _sop_uids(req)
        assert [rows[u]["status"] for u in uids[:2]] == ["sent", "sent"]
        assert all(rows[u]["status"] == "failed" and "lists other SOP instances" in rows[u]["detail"]["reason"]
                   for u in uids[2:])
        assert rows[uids[0]]["detail"]["acknowledged"] == uids[0]


def test_retry_after_is_honoured_inside_the_run(site, clean, tmp_path, monkeypatch):
    """A proxy in front of the real Orthanc answers the first two requests 503 with Retry-After: 1, then
    forwards: the run waits as asked and everything arrives in one run."""
    monkeypatch.setenv("CENTRAL_TOKEN", clean.token)

    def busy(req, conn):
        conn.sendall(b"HTTP/1.1 503 Busy\r\nRetry-After: 1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")

    def forward(req, conn):
        head, _, body = req.partition(b"\r\n\r\n")
        headers = {k.decode(): v.decode().strip() for k, v in (h.split(b":", 1) for h in head.split(b"\r\n")[1:])
                   if k.lower() not in (b"host", b"content-length", b"connection")}
        r = urllib.request.Request(clean.dicomweb + "/studies", data=body, headers=headers, method="POST")
        with urllib.request.urlopen(r, timeout=60) as resp:
            data = resp.read()
            conn.sendall(f"HTTP/1.1 {resp.status} OK\r\nContent-Type: {resp.headers['Content-Type']}\r\n"
                         f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode() + data)

    rx = FakeReceiver([busy, busy, forward])
    t0 = time.time()
    try:
        s = transfer(site["trial"], site["w"] / "archive", "central", state=tmp_path / "state.sqlite", url_override=rx.url)
    finally:
        rx.close()
    assert time.time() - t0 >= 2.0                                      # waited 1 s twice, as asked
    n = len(site["objects"])
    assert (s["sent"], s["failed"]) == (n, 0)
    rows = Ledger(tmp_path / "state.sqlite").rows()
    assert max(r["detail"]["tries"] for r in rows) == 3
    assert set(clean.received()) == {o["sop_uid"] for o in site["objects"]}


def test_a_retry_after_longer_than_the_run_waits_is_a_recorded_failure(site, tmp_path, monkeypatch):
    monkeypatch.setenv("CENTRAL_TOKEN", "t")
    rx = FakeReceiver([lambda req, conn: conn.sendall(
        b"HTTP/1.1 429 Too Many\r\nRetry-After: 86400\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")])
    try:
        s = transfer(site["trial"], site["w"] / "archive", "central", state=tmp_path / "state.sqlite", url_override=rx.url)
    finally:
        rx.close()
    assert len(rx.requests) == 1 and s["failed"] == len(site["objects"])
    assert "retry after 86400 s" in s["problems"][0]["reason"]


def test_cstore_to_a_closed_port_says_connection_refused(site, tmp_path, quick_retries):
    port = _free_ports(1)[0]  # nothing listens there
    s = transfer(site["trial"], site["w"] / "archive", "pacs", state=tmp_path / "state.sqlite",
                 host_override="127.0.0.1", port_override=port)
    assert s["sent"] == 0 and s["failed"] == len(site["objects"])
    reasons = {p["reason"] for p in s["problems"]}
    assert any("connection refused" in r for r in reasons) and not any("aborted" in r for r in reasons), reasons
    rows = Ledger(tmp_path / "state.sqlite").rows()
    assert max(r["detail"].get("tries", 0) for r in rows) == 3


def test_a_corrected_instance_is_sent_again_and_replaces_the_old_one(site, clean, tmp_path, monkeypatch):
    """Point 6 + 11: a new version of an archived instance (same SOPInstanceUID, other bytes) is the only
    instance sent after a correction, and the receiver then holds the new bytes; the ledger has a row per version."""
    monkeypatch.setenv(AE_ENV, OUR_AE)
    w = tmp_path / "w"
    shutil.copytree(site["w"], w)
    led = Ledger(w / "state.sqlite")
    led.db.execute("DELETE FROM transfers")  # the module's site may have been sent to this Orthanc before
    led.close()
    kw = dict(state=w / "state.sqlite", host_override="127.0.0.1", port_override=clean.dicom)
    n = len(site["objects"])
    assert transfer(site["trial"], w / "archive", "pacs", **kw)["sent"] == n
    old = site["objects"][0]
    ds = pydicom.dcmread(old["path"])
    ds.ImageComments = "corrected after the first transfer"
    fixed = tmp_path / "fixed.dcm"
    ds.save_as(fixed)
    (sha, added), = Archive(w / "archive").put_objects([(fixed, {k: old[k] for k in ("subject", "visit", "series_uid", "sop_uid")})])
    assert added
    s = transfer(site["trial"], w / "archive", "pacs", **kw)
    assert (s["archived"], s["already_sent"], s["sent"]) == (n, n - 1, 1)   # the newest version of each instance
    rows = {r["sha256"]: r for r in transfers(w, s["ledger_destination"])}
    assert rows[old["sha256"]]["status"] == "sent" and rows[sha]["status"] == "sent"
    assert rows[sha]["detail"]["version"] == 2 and rows[sha]["detail"]["supersedes"] == old["sha256"]
    assert rows[sha]["detail"]["replaces_sent_version"] and rows[sha]["detail"]["acknowledged"] == old["sop_uid"]
    held = clean.received()[old["sop_uid"]]
    assert held["tags"].get("ImageComments") == "corrected after the first transfer"
    assert len(clean.get("/instances")) == n


def test_every_transfer_syntax_reaches_the_receiver_as_it_was_archived(clean, tmp_path, monkeypatch):
    """Point 2, end to end: deflate, big endian, JPEG baseline, JPEG-LS, JPEG 2000 and RLE instances are run,
    archived and sent by C-STORE (one presentation context per syntax) and by STOW-RS; Orthanc stores each
    in the syntax it was archived in."""
    from imtrial_dsl.compiler import compile_file
    from imtrial_dsl.runner.run import run_study
    from imtrial_dsl.tools.minicorpus import make_corpus
    from syntax_corpus import SYNTAXES, transfer_syntax_inbox  # tests/syntax_corpus.py

    monkeypatch.setenv("IMTRIAL_KEY", KEY)
    mini = make_corpus(tmp_path / "corpus", subjects=1, slices=2)
    transfer_syntax_inbox(mini)
    study = tmp_path / "study.imtrial"
    study.write_text(Path(mini["study"]).read_text() + '\ntransfer pacs dicom ae "ORTHANC" host "pacs.invalid" port 104\n'
                     'transfer central dicomweb "https://central.invalid/dicom-web" auth env CENTRAL_TOKEN\n')
    trial = compile_file(study).trial
    w = tmp_path / "w"
    assert not run_study(trial, inbox=mini["inbox"], workdir=w, jobs=1)["failed"]
    archived = {}
    for o in archived_objects(w / "archive"):
        ds = pydicom.dcmread(o["path"], stop_before_pixels=True)
        archived[o["sop_uid"]] = (str(ds.SeriesDescription), str(ds.file_meta.TransferSyntaxUID))
    assert {ts for _, ts in archived.values()} >= set(SYNTAXES.values())
    monkeypatch.setenv(AE_ENV, OUR_AE)
    monkeypatch.setenv("CENTRAL_TOKEN", clean.token)
    for dest, kw in (("pacs", dict(host_override="127.0.0.1", port_override=clean.dicom)),
                     ("central", dict(url_override=clean.dicomweb))):
        clean.clear()
        s = transfer(trial, w / "archive", dest, state=w / "state.sqlite", **kw)
        assert (s["sent"], s["failed"], s["refused"]) == (len(archived), 0, 0), s["problems"][:3]
        for uid, inst in clean.received().items():
            meta = clean.get(f"/instances/{inst['id']}/metadata?expand")
            assert meta["TransferSyntax"] == archived[uid][1], (dest, archived[uid])
