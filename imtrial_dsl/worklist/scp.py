"""The site's Modality Worklist SCP (C-FIND) and Modality Performed Procedure Step SCP (N-CREATE/N-SET).

Who sees what: the calling AE title names a device of the inventory (``device … { ae_title "…" }``);
an association from any other AE title is rejected. A device sees the active steps (SCHEDULED or
IN PROGRESS, no exam identified yet) of *its own site* and *its own modality*, and nothing of other
sites. MPPS N-CREATE (IN PROGRESS) and N-SET (COMPLETED / DISCONTINUED) update the step's status, so
the reminders and ``imtrial schedule list`` see an exam under way before its images arrive.

Every request reads the state database afresh: a step the coordinator adds, moves or cancels is
served (or withdrawn) at the next query, without restarting the service.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from .. import ir
from ..store import connect_workdir
from . import WorklistError
from .items import item, matches, project
from .schedule import ACTIVE, first_devices, has_same_device_rule, set_status, steps, trial_code

DEFAULT_AE = "IMTRIAL_MWL"


def valid_ae(title: str) -> bool:
    return 0 < len(title) <= 16 and title.strip() != "" and "\\" not in title and title.isprintable()


def device_aes(trial: ir.Trial) -> dict[str, tuple[ir.Site, ir.Device]]:
    """AE title -> (site, device) of every device of the inventory that declares one."""
    return {d.ae_title: (s, d) for s, d in trial.devices() if d.ae_title}


@dataclass
class WorklistService:
    """A running worklist service (``stop()`` ends it)."""

    server: object
    port: int
    ae_title: str
    queries: list = field(default_factory=list)   # (calling AE, number of matches) of every C-FIND

    def stop(self) -> None:
        self.server.shutdown()


def query(trial: ir.Trial, workdir: str | Path, calling_ae: str, identifier) -> list:
    """The response identifiers for one C-FIND from ``calling_ae`` (empty for an unknown AE title)."""
    known = device_aes(trial)
    if calling_ae not in known:
        return []
    site, device = known[calling_ae]
    db = connect_workdir(workdir)
    try:
        rows = steps(trial, workdir, site=site.code, status=ACTIVE, db=db)
        if has_same_device_rule(trial):  # a subject scanned since the step was planned: its first device now
            firsts: dict[str, dict] = {}
            for st in rows:
                if not st.get("device"):
                    sid = st["subject_id"]
                    firsts.setdefault(sid, first_devices(db, trial_code(trial), sid))
                    st["device"] = firsts[sid].get(st["modality"])
    finally:
        db.close()
    out = []
    for st in rows:
        if st.get("exam_key") or not device.acquires(st["modality"]):
            continue
        entry = item(trial, st, calling_ae)
        if matches(identifier, entry):
            out.append(project(identifier, entry))
    return out


def serve(trial: ir.Trial, workdir: str | Path, *, host: str = "127.0.0.1", port: int = 11112,
          ae_title: str = DEFAULT_AE, log: Callable[[str], None] = lambda s: None) -> WorklistService:
    """Start the worklist + MPPS service in the background; returns it (``stop()`` to end)."""
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import ModalityPerformedProcedureStep, ModalityWorklistInformationFind

    if not valid_ae(ae_title):
        raise WorklistError(f"--ae-title must be 1–16 printable characters without a backslash, got {ae_title!r}",
                            code="E872")
    known = device_aes(trial)
    if not known:
        raise WorklistError("no device of the study declares an ae_title: the worklist cannot tell which scanner "
                            "calls (add `ae_title \"…\"` to each device block)", code="E872")
    code = trial_code(trial)
    workdir = Path(workdir)
    connect_workdir(workdir).close()   # the state database exists (and has the schedule tables) before any call
    ae = AE(ae_title=ae_title)
    ae.require_calling_aet = sorted(known)
    ae.add_supported_context(ModalityWorklistInformationFind)
    ae.add_supported_context(ModalityPerformedProcedureStep)
    svc_queries: list = []

    def on_find(event):
        calling = event.assoc.requestor.ae_title
        try:
            found = query(trial, workdir, calling, event.identifier)
        except Exception as exc:  # a failed query is answered with a failure status, never a dropped association
            log(f"worklist: C-FIND from {calling} failed: {type(exc).__name__}: {exc}")
            yield 0xC000, None
            return
        svc_queries.append((calling, len(found)))
        log(f"worklist: C-FIND from {calling}: {len(found)} item(s)")
        for ds in found:
            if event.is_cancelled:
                yield 0xFE00, None
                return
            yield 0xFF00, ds

    def _accession(ds) -> Optional[str]:
        seq = ds.get("ScheduledStepAttributesSequence") or []
        acc = str(seq[0].get("AccessionNumber", "") or "") if seq else ""
        return acc or None

    mpps: dict[str, str] = {}  # MPPS SOP instance UID -> accession

    def on_create(event):
        from pydicom.dataset import Dataset

        ds = event.attribute_list
        uid = event.request.AffectedSOPInstanceUID
        acc = _accession(ds)
        status = str(ds.get("PerformedProcedureStepStatus", "") or "")
        if status != "IN PROGRESS":
            return 0x0106, None  # invalid attribute value (PS3.4 F.7.2.1: N-CREATE must be IN PROGRESS)
        if acc:
            mpps[str(uid)] = acc
            ok = set_status(code, workdir, acc, "IN PROGRESS", str(uid))
            log(f"worklist: MPPS {uid} IN PROGRESS for {acc}" + ("" if ok else " (no such scheduled step)"))
        out = Dataset()
        out.PerformedProcedureStepStatus = status
        return 0x0000, out

    def on_set(event):
        from pydicom.dataset import Dataset

        uid = str(event.request.RequestedSOPInstanceUID)
        ds = event.modification_list
        status = str(ds.get("PerformedProcedureStepStatus", "") or "")
        acc = mpps.get(uid)
        if acc is None:
            db = connect_workdir(workdir)
            try:
                row = db.execute("SELECT accession FROM scheduled_steps WHERE trial=? AND mpps_uid=?", (code, uid)).fetchone()
            finally:
                db.close()
            acc = row["accession"] if row else None
        if status in ("COMPLETED", "DISCONTINUED") and acc:
            set_status(code, workdir, acc, status, uid)
            log(f"worklist: MPPS {uid} {status} for {acc}")
        out = Dataset()
        if status:
            out.PerformedProcedureStepStatus = status
        return 0x0000, out

    handlers = [(evt.EVT_C_FIND, on_find), (evt.EVT_N_CREATE, on_create), (evt.EVT_N_SET, on_set)]
    try:
        server = ae.start_server((host, port), block=False, evt_handlers=handlers)
    except OSError as exc:
        raise WorklistError(f"cannot listen on {host}:{port}: {exc.strerror or exc}", code="E872") from None
    return WorklistService(server, server.server_address[1], ae_title, svc_queries)
