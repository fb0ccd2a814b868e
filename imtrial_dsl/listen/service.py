"""``imtrial listen``: a Storage SCP at the site that tells the technologist, per series, within seconds.

Each received instance is written at once, atomically, twice: into ``W/listen/series/<series UID>/``
(what the verdict is computed from) and into the inbox (``--inbox``, default ``W/listen/inbox``) that
``imtrial run`` reads, so the images flow on through the normal pipeline whatever the verdict, and an
instance acknowledged to the scanner is on disk. A series is *complete* when no new instance of it
arrived for ``quiet_s`` seconds, or when the scanner's MPPS N-SET says COMPLETED for it; then
:func:`.judge.judge_series` runs the pipeline's classification, adherence and QC steps on it, and the
verdict is shown:

* a console line (``notify``), e.g. ``T1w: FAIL RepetitionTime 2500 ms, expected 2300 ms ± 1% — repeat the series``;
* the status page (``http://HOST:HTTP_PORT/``, refreshing every 2 s; ``/status.json`` for programs);
* per the study's contacts: on FAIL an e-mail to the site's ``technologist`` contacts (and its
  ``imaging_pi`` when no technologist is listed) — by SMTP with ``smtp``, else into ``W/listen/outbox/``;
* appended to ``W/listen/verdicts.jsonl`` with the latency (last instance received → verdict shown).

A series that grows after its verdict (late instances) is judged again.
"""
from __future__ import annotations

import datetime as _dt
import json
import threading
import time
from dataclasses import dataclass, field
from email.message import EmailMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable, Optional

from .. import ir
from ..diagnostics import ImtrialError
from ..files import atomic_write_bytes
from ..workdir import Workdir
from .judge import judge_series

TEMPLATES = Path(__file__).resolve().parent / "templates"
POLL_S = 0.1


class ListenError(ImtrialError):
    """The listener cannot start (bad AE title, port in use) — E890."""

    code = "E890"


@dataclass
class _Series:
    uid: str
    study_uid: str
    folder: Path
    description: str = ""
    count: int = 0
    last: float = 0.0
    judged: int = 0
    force: bool = False


@dataclass
class Listener:
    """A running listener: ``stop()`` ends it; ``verdicts`` lists what was shown (newest last)."""

    trial: ir.Trial
    root: Path
    inbox: Path
    ae_title: str
    quiet_s: float
    port: int = 0
    http_port: int = 0
    verdicts: list = field(default_factory=list)
    series: dict = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list = field(default_factory=list)
    _servers: list = field(default_factory=list)

    def stop(self) -> None:
        self._stop.set()
        for s in self._servers:
            s.shutdown()
        for t in self._threads:
            t.join(timeout=30)

    def wait_for(self, n: int, timeout: float = 60) -> list:
        """Block until ``n`` verdicts were shown (tests, scripts)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            with self.lock:
                if len(self.verdicts) >= n:
                    return list(self.verdicts)
            time.sleep(0.05)
        with self.lock:
            return list(self.verdicts)


def _now_text(t: float) -> str:
    return _dt.datetime.fromtimestamp(t).strftime("%H:%M:%S")


def _recipients(trial: ir.Trial, site_code: Optional[str]) -> list[ir.Contact]:
    site = trial.site(site_code) if site_code else (trial.sites[0] if len(trial.sites) == 1 else None)
    if site is None:
        return []
    techs = [c for c in site.contacts if c.role == "technologist" and c.email]
    return techs or [c for c in site.contacts if c.role == "imaging_pi" and c.email]


def _notice(trial: ir.Trial, v: dict, to: list[ir.Contact], sender: str) -> EmailMessage:
    code = trial.study.code if trial.study else "study"
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = ", ".join(c.email for c in to)
    msg["Subject"] = f"[{code}] {v['verdict']}: {v['message']}"[:200]
    msg.set_content(
        f"{v['message']}\n\nSubject {v.get('subject_id') or '?'}, visit {v.get('visit') or '?'}, device "
        f"{v.get('device') or '?'}, series {v.get('series_number')} {v.get('series_description') or ''} "
        f"({v.get('n_instances')} images), judged {v['shown']}.\n\nProblems:\n" +
        "\n".join(f"- {p}" for p in v.get("problems", [])) + "\n")
    return msg


def listen(trial: ir.Trial, workdir: str | Path, *, host: str = "127.0.0.1", port: int = 11113,
           ae_title: str = "IMTRIAL_SCP", quiet_s: float = 3.0, inbox: Optional[str | Path] = None,
           http_port: int = 0, smtp: Optional[tuple[str, int]] = None, sender: str = "imtrial@localhost",
           notify: Callable[[str], None] = lambda s: None) -> Listener:
    """Start the listener in the background and return it."""
    from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
    from pynetdicom.sop_class import ModalityPerformedProcedureStep, Verification

    from ..worklist.scp import valid_ae

    if not valid_ae(ae_title):
        raise ListenError(f"--ae-title must be 1–16 printable characters without a backslash, got {ae_title!r}")
    W = Workdir(Path(workdir).resolve())
    root = W.listen
    inbox_dir = Path(inbox).resolve() if inbox else root / "inbox"
    (root / "series").mkdir(parents=True, exist_ok=True)
    inbox_dir.mkdir(parents=True, exist_ok=True)
    L = Listener(trial, root, inbox_dir, ae_title, quiet_s)

    def on_store(event):
        ds = event.dataset
        uid, study, sop = str(ds.SeriesInstanceUID), str(ds.StudyInstanceUID), str(ds.SOPInstanceUID)
        data = event.encoded_dataset()
        folder = root / "series" / uid
        atomic_write_bytes(inbox_dir / study / uid / f"{sop}.dcm", data)
        atomic_write_bytes(folder / f"{sop}.dcm", data)
        with L.lock:
            s = L.series.setdefault(uid, _Series(uid, study, folder, str(ds.get("SeriesDescription", "") or "")))
            s.count = len(list(folder.glob("*.dcm")))
            s.last = time.time()
        return 0x0000

    def on_create(event):
        return 0x0000, event.attribute_list

    def on_set(event):
        ds = event.modification_list
        if str(ds.get("PerformedProcedureStepStatus", "")) == "COMPLETED":
            done = {str(p.get("SeriesInstanceUID", "")) for p in ds.get("PerformedSeriesSequence", []) or []}
            with L.lock:
                for uid in done:
                    if uid in L.series:
                        L.series[uid].force = True
        return 0x0000, ds

    ae = AE(ae_title=ae_title)
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    ae.add_supported_context(Verification)
    ae.add_supported_context(ModalityPerformedProcedureStep)
    ae.maximum_pdu_size = 0
    try:
        scp = ae.start_server((host, port), block=False, evt_handlers=[
            (evt.EVT_C_STORE, on_store), (evt.EVT_N_CREATE, on_create), (evt.EVT_N_SET, on_set)])
    except OSError as exc:
        raise ListenError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    L.port = scp.server_address[1]
    L._servers.append(scp)

    def show(s: _Series, res: dict, last: float) -> None:
        shown = time.time()
        v = {k: val for k, val in res.items() if k != "exam_info"}
        v.update({"series_uid": s.uid, "received": s.count, "last_instance": last, "shown_at": shown,
                  "shown": _now_text(shown), "latency_s": round(shown - last, 3)})
        with L.lock:
            L.verdicts.append(v)
        with open(root / "verdicts.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(v, sort_keys=True, default=str) + "\n")
        notify(f"{v['shown']} {v.get('site') or ''} {v.get('subject_id') or '?'} {v.get('visit') or '?'} series "
               f"{v.get('series_number')}: {v['message']}  ({v['latency_s']:.1f} s after its last instance)")
        if v["verdict"] == "FAIL":
            to = _recipients(trial, v.get("site"))
            if to:
                msg = _notice(trial, v, to, sender)
                try:
                    if smtp:
                        import smtplib

                        with smtplib.SMTP(smtp[0], smtp[1], timeout=30) as conn:
                            conn.send_message(msg)
                        v["notified"] = [c.email for c in to]
                    else:
                        atomic_write_bytes(root / "outbox" / f"{int(shown * 1000)}-{s.uid[-12:]}.eml", bytes(msg))
                        v["notified"] = [f"outbox: {c.email}" for c in to]
                except OSError as exc:
                    notify(f"listen: could not e-mail {', '.join(c.email for c in to)}: {exc}")

    def watch() -> None:
        while not L._stop.is_set():
            due = []
            now = time.time()
            with L.lock:
                for s in L.series.values():
                    if s.count > s.judged and (s.force or now - s.last >= quiet_s):
                        due.append((s, s.count, s.last))
                        s.judged, s.force = s.count, False
            for s, _, last in due:
                try:
                    res = judge_series(trial, s.folder, W.root)
                except Exception as exc:  # a verdict that could not be computed is shown as such, never dropped
                    res = {"verdict": "ERROR", "problems": [f"{type(exc).__name__}: {exc}"],
                           "message": f"{s.description or 'series'}: NOT CHECKED — {type(exc).__name__}: {exc}"}
                show(s, res, last)
            L._stop.wait(POLL_S)

    page = _status_server(L, host, http_port)
    L.http_port = page.server_address[1]
    L._servers.append(page)
    threading.Thread(target=page.serve_forever, daemon=True, name="listen-http").start()
    t = threading.Thread(target=watch, daemon=True, name="listen-watch")
    t.start()
    L._threads.append(t)
    return L


def _status_server(L: Listener, host: str, port: int) -> ThreadingHTTPServer:
    from ..templating import environment

    template = environment(TEMPLATES).get_template("status.html.j2")
    code = L.trial.study.code if L.trial.study else "study"

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # the console is the technologist's: no access log there
            pass

        def do_GET(self) -> None:
            with L.lock:
                verdicts = list(reversed(L.verdicts))
                pending = [{"series_uid": s.uid, "description": s.description, "count": s.count}
                           for s in L.series.values() if s.count > s.judged]
            if self.path.startswith("/status.json"):
                body = json.dumps({"verdicts": verdicts, "pending": pending}, default=str).encode()
                ctype = "application/json"
            elif self.path in ("/", "/index.html"):
                body = template.render(study=code, ae_title=L.ae_title, verdicts=verdicts, pending=pending,
                                       quiet=f"{L.quiet_s:g}", refresh=2, now=_now_text(time.time())).encode()
                ctype = "text/html; charset=utf-8"
            else:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

    try:
        return ThreadingHTTPServer((host, port), Handler)
    except OSError as exc:
        raise ListenError(f"cannot serve the status page on {host}:{port}: {exc.strerror or exc}") from None
