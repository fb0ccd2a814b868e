"""Transfer through a relay: site ``imtrial transfer`` (STOW-RS) -> relay (stunnel's TLS in front of Orthanc with its DICOMweb plugin)
-> central ``imtrial pull`` (QIDO-RS, WADO-RS) -> central inbox -> ``imtrial run`` -> central workdir,
with the relay killed and restarted mid-way and the central puller killed (SIGKILL) mid-pull.

The relay speaks HTTPS with a certificate from a CA made for the test (openssl) for 127.0.0.1; both
sides verify it through SSL_CERT_FILE. TLS is terminated by stunnel (Debian stunnel4) in front of Orthanc,
as a relay often is: Debian's Orthanc 1.10 crashes on its own HTTPS requests (civetweb with OpenSSL 3). A Lua filter accepts STOW-RS only with the site's bearer token
and everything else only with the centre's basic-auth credentials, so both credentials are checked
for real (from the environment, never on a command line).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from imtrial_dsl.tools.minicorpus import MINI_STUDY, make_corpus
from netutil import free_port  # tests/netutil.py

KEY = "pull-test-key-0123456789abcdef"
PLUGINS = ("/usr/share/orthanc/plugins/libOrthancDicomWeb.so", "/usr/lib/orthanc/plugins/libOrthancDicomWeb.so")
STUDY = MINI_STUDY + '\ntransfer relay dicomweb "https://relay.example/dicom-web" auth env RELAY_SITE_TOKEN\n'


def _ca(d: Path) -> tuple[Path, Path]:
    """A CA and a server certificate for 127.0.0.1 signed by it (openssl). Returns (ca.pem, server.pem with key)."""
    run = lambda *a: subprocess.run(["openssl", *a], cwd=d, check=True, capture_output=True)
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=imtrial test CA")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "srv.key", "-out", "srv.csr", "-subj", "/CN=127.0.0.1")
    (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n")
    run("x509", "-req", "-in", "srv.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-out", "srv.crt",
        "-days", "2", "-extfile", "ext.cnf")
    (d / "server.pem").write_text((d / "srv.crt").read_text() + (d / "srv.key").read_text())
    return d / "ca.pem", d / "server.pem"


class Relay:
    """Orthanc with its DICOMweb plugin, behind stunnel's TLS; Orthanc can be killed and restarted on its storage."""

    def __init__(self, d: Path, ca: Path, server_pem: Path, site_token: str, basic: str):
        binary = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
        plugin = next((p for p in PLUGINS if Path(p).exists()), None)
        if not os.access(binary, os.X_OK) or plugin is None:
            pytest.fail("Orthanc and its DICOMweb plugin are not installed: run scripts/sysdeps.sh")
        stunnel = shutil.which("stunnel4") or shutil.which("stunnel")
        if stunnel is None:
            pytest.fail("stunnel is not installed: run scripts/sysdeps.sh")
        self.d, self.binary, self.port, self.http = d, binary, free_port(), free_port()
        self.url = f"https://127.0.0.1:{self.port}/dicom-web"
        self.rest = f"https://127.0.0.1:{self.port}"
        self.basic = basic
        self.ctx = ssl.create_default_context(cafile=str(ca))
        (d / "auth.lua").write_text(
            "function IncomingHttpRequestFilter(method, uri, ip, username, httpHeaders)\n"
            "  local a = httpHeaders['authorization']\n"
            "  if method == 'POST' and uri == '/dicom-web/studies' then\n"
            f"    return a == 'Bearer {site_token}'\n"
            "  end\n"
            f"  return a == 'Basic {basic}'\n"
            "end\n")
        cfg = {"Name": "relay", "StorageDirectory": str(d / "db"), "IndexDirectory": str(d / "db"),
               "HttpPort": self.http, "DicomServerEnabled": False, "RemoteAccessAllowed": False,
               "AuthenticationEnabled": False, "Plugins": [plugin], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
               "LuaScripts": [str(d / "auth.lua")], "SaveJobs": False, "HttpThreadsCount": 4, "StableAge": 1}
        (d / "orthanc.json").write_text(json.dumps(cfg))
        (d / "stunnel.conf").write_text(f"foreground = yes\npid =\n[relay]\naccept = 127.0.0.1:{self.port}\n"
                                        f"connect = 127.0.0.1:{self.http}\ncert = {server_pem}\n")
        self.tls = subprocess.Popen([stunnel, str(d / "stunnel.conf")], stdout=subprocess.DEVNULL,
                                    stderr=open(d / "stunnel.log", "wb"))
        self.proc = None

    def start(self) -> None:
        self.log = open(self.d / "orthanc.log", "ab")
        self.proc = subprocess.Popen([self.binary, str(self.d / "orthanc.json")], stdout=self.log,
                                     stderr=subprocess.STDOUT, cwd=self.d)
        deadline = time.time() + 30
        while True:
            try:
                self.get("/system")
                return
            except Exception as exc:
                if self.proc.poll() is not None or self.tls.poll() is not None or time.time() > deadline:
                    pytest.fail(f"the relay did not start ({exc!r}):\n" + (self.d / "orthanc.log").read_text()[-2000:]
                                + (self.d / "stunnel.log").read_text()[-1000:])
                time.sleep(0.2)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.log.close()

    def stop(self) -> None:
        for p in (self.proc, self.tls):
            if p is not None and p.poll() is None:
                p.terminate()
                p.wait(timeout=15)

    def get(self, path: str):
        req = urllib.request.Request(self.rest + path, headers={"Authorization": f"Basic {self.basic}"})
        with urllib.request.urlopen(req, timeout=30, context=self.ctx) as r:
            return json.loads(r.read())

    def sop_uids(self) -> set[str]:
        return {self.get(f"/instances/{i}")["MainDicomTags"]["SOPInstanceUID"] for i in self.get("/instances")}


def _cli(*args, env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "imtrial_dsl", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def _ledger(w: Path) -> dict[str, int]:
    if not (w / "state.sqlite").exists():
        return {}
    db = sqlite3.connect(w / "state.sqlite", timeout=30)
    try:
        return dict(db.execute("SELECT status, count(*) FROM pulls GROUP BY status").fetchall())
    except sqlite3.OperationalError:
        return {}
    finally:
        db.close()


def _kill_pull_when(args, env, ready) -> int:
    """Start ``imtrial pull`` and SIGKILL it as soon as ``ready()`` holds; returns how far the ledger got."""
    proc = subprocess.Popen([sys.executable, "-m", "imtrial_dsl", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline:
        if ready():
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait()
    return proc.returncode


def test_site_to_relay_to_central_archive_survives_killed_relay_and_killed_puller(tmp_path):
    for tool in ("openssl",):
        assert shutil.which(tool), f"{tool} is not installed: run scripts/sysdeps.sh"
    ca, server_pem = _ca(tmp_path)
    site_token, user, password = "site-" + os.urandom(8).hex(), "central", "pw-" + os.urandom(8).hex()
    import base64
    relay = Relay(tmp_path, ca, server_pem, site_token, base64.b64encode(f"{user}:{password}".encode()).decode())
    relay.start()
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("IMTRIAL_RELAY")}
    site_env = {**base_env, "IMTRIAL_KEY": KEY, "RELAY_SITE_TOKEN": site_token, "SSL_CERT_FILE": str(ca)}
    central_env = {**base_env, "IMTRIAL_KEY": "central-" + KEY, "IMTRIAL_RELAY_USER": user,
                   "IMTRIAL_RELAY_PASSWORD": password, "SSL_CERT_FILE": str(ca)}
    try:
        m = make_corpus(tmp_path / "site", subjects=2, slices=8)
        study = tmp_path / "site" / "mini.imtrial"
        study.write_text(STUDY)
        site_w, inbox, central_w = tmp_path / "site_w", tmp_path / "central_inbox", tmp_path / "central_w"
        r = _cli("run", str(study), "--inbox", m["inbox"], "--workdir", str(site_w), "--no-progress", env=site_env)
        assert r.returncode == 0, r.stderr
        push = ("transfer", str(study), "--workdir", str(site_w), "--to", "relay", "--url-override", relay.url)
        r = _cli(*push, env=site_env)
        assert r.returncode == 0, r.stdout + r.stderr
        sent = {row[0]: row[1] for row in sqlite3.connect(site_w / "state.sqlite").execute(
            "SELECT json_extract(detail, '$.sop_uid'), sha256 FROM transfers WHERE status='sent'")}
        assert len(sent) == 64 and relay.sop_uids() == set(sent)
        r = _cli("manifest", str(study), "--workdir", str(site_w), "--to", "relay@" + relay.url,
                 "--out", str(tmp_path / "manifest.json"), env=site_env)
        assert r.returncode == 0, r.stderr
        pull = ("pull", str(study), "--from", relay.url, "--inbox", str(inbox), "--workdir", str(central_w),
                "--manifest", str(tmp_path / "manifest.json"), "--json")

        # no credentials / no CA: refused with the reason, nothing fetched
        r = _cli(*pull, env={**central_env, "IMTRIAL_RELAY_PASSWORD": "wrong"})
        assert r.returncode == 1 and "refused our credentials" in r.stderr and password not in r.stderr + r.stdout
        r = _cli(*pull, env={k: v for k, v in central_env.items() if k != "SSL_CERT_FILE"})
        assert r.returncode == 1 and "certificate does not verify" in r.stderr
        assert _ledger(central_w).get("received", 0) == 0

        # the relay dies while the centre pulls: the pass fails cleanly, what was received stays received
        proc = subprocess.Popen([sys.executable, "-m", "imtrial_dsl", *pull], env=central_env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 60
        while _ledger(central_w).get("received", 0) < 8 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.005)
        relay.kill()
        out, err = proc.communicate(timeout=120)
        got = _ledger(central_w).get("received", 0)
        if got < 64:  # the pass was cut by the dead relay
            assert proc.returncode == 1 and "cannot reach the relay" in err, (out, err)
        relay.start()

        # the centre is killed mid-pull (twice, at different points), then completes
        assert got < 40, "the relay was killed too late to cut the pass"
        assert _kill_pull_when(pull, central_env, lambda: _ledger(central_w).get("received", 0) >= got + 10) == -9
        assert _kill_pull_when(pull, central_env, lambda: _ledger(central_w).get("received", 0) >= got + 20) == -9
        assert 0 < _ledger(central_w)["received"] < 64
        r = _cli(*pull, env=central_env)
        assert r.returncode == 0, r.stdout + r.stderr
        s = json.loads(r.stdout)
        assert s["listed"] == 64 and s["deleted"] == 0 and s["waiting_for_archive"] == 64
        assert relay.sop_uids() == set(sent)             # nothing leaves the relay before the archive has it
        files = sorted(inbox.rglob("*.dcm"))
        assert len(files) == 64 and not list((central_w / "pull" / "staging").glob("*"))
        from imtrial_dsl.files import sha256_file
        assert {f.stem: sha256_file(f) for f in files} == sent   # byte-identical to what the site sent

        # the central archive takes the inbox; the next pull deletes from the relay (killed mid-delete once)
        r = _cli("run", str(study), "--inbox", str(inbox), "--workdir", str(central_w), "--no-progress", "--move",
                 env=central_env)
        assert r.returncode in (0, 1), r.stderr
        db = sqlite3.connect(central_w / "state.sqlite")
        archived = [row[0] for row in db.execute("SELECT sha256 FROM files")]
        db.close()
        assert sorted(archived) == sorted(sent.values())   # exactly once each
        assert _kill_pull_when(pull, central_env, lambda: _ledger(central_w).get("deleted", 0) >= 20) == -9
        assert 0 < _ledger(central_w)["deleted"] < 64
        r = _cli(*pull, env=central_env)
        assert r.returncode == 0, r.stdout + r.stderr
        assert relay.sop_uids() == set()
        assert _ledger(central_w) == {"deleted": 64}
        assert not list(inbox.rglob("*.dcm"))             # --move took them; a further pull brings nothing back
        r = _cli(*pull, env=central_env)
        s = json.loads(r.stdout)
        assert (s["listed"], s["received"]) == (0, 0) and not list(inbox.rglob("*.dcm"))

        # a tampered instance on the relay is rejected against the manifest and stays there
        import pydicom
        f = next((site_w / "exams").rglob("deid/*.dcm"))
        ds = pydicom.dcmread(f)
        assert ds.SOPInstanceUID in sent
        ds.SeriesDescription = "tampered"
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        fake = tmp_path / "fake.dcm"
        ds.save_as(fake)
        boundary = "b0undary"
        body = (f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + fake.read_bytes()
                + f"\r\n--{boundary}--\r\n".encode())
        req = urllib.request.Request(relay.url + "/studies", data=body, method="POST", headers={
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Authorization": f"Bearer {site_token}", "Accept": "application/dicom+json"})
        urllib.request.urlopen(req, timeout=30, context=relay.ctx).read()
        r = _cli(*pull, env=central_env)
        s = json.loads(r.stdout)
        assert r.returncode == 1 and s["rejected"] == 1 and "differs from the sender's manifest" in s["problems"][0]
        assert relay.sop_uids() == {ds.SOPInstanceUID}
    finally:
        relay.stop()
