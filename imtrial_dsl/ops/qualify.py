"""Site/device qualification: check a qualification exam (phantom or volunteer), record a decision.

``qualify()`` runs the runner's own classification, adherence and QC functions on every series
of a qualification exam folder, then decides per qualification protocol (the study's
``qualification { protocols … }``, else every protocol of the device's modality):
qualified when at least one series is classified as the protocol, passes adherence (warnings
allowed) and does not fail QC. Decisions (who, when, software release, reasons) are appended to
``ops_qualifications`` in ``W/state.sqlite``; the latest decision per (site, device, protocol) counts.

:func:`is_qualified` is what the runner calls to flag exams from unqualified devices: the latest
decision is positive and no software upgrade seen since then requires re-qualification.
"""
from __future__ import annotations

import json
import sqlite3
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path
from typing import Optional

from imtrial_dsl import ir
from imtrial_dsl.source import values_text

from ..store import tx
from .model import OpsError, connect, norm_verdict

from ..runner.qualification import (  # the ledger's reading side is the runner's: it flags exams with it
    STATUS_NONE, STATUS_NOT, STATUS_QUALIFIED, STATUS_REQUALIFY, is_qualified, latest_decision, open_flags, status_from,
)


@dataclass
class SeriesCheck:
    series_uid: str
    description: str
    protocol: Optional[str]
    adherence: Optional[str]
    qc: Optional[str]
    problems: list[str] = field(default_factory=list)


@dataclass
class ProtocolDecision:
    protocol: str
    qualified: bool
    reasons: list[str] = field(default_factory=list)
    series: list[str] = field(default_factory=list)


@dataclass
class QualificationResult:
    trial: str
    site: str
    device: str
    decided_on: str
    decided_by: str
    software: str
    folder: str
    decisions: list[ProtocolDecision] = field(default_factory=list)
    series: list[SeriesCheck] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)   # exam-level: wrong device, unreadable files, ...

    @property
    def all_qualified(self) -> bool:
        return bool(self.decisions) and all(d.qualified for d in self.decisions)

    def to_json(self) -> dict:
        return asdict(self) | {"all_qualified": self.all_qualified}


def qualification_protocols(trial: ir.Trial, device: ir.Device) -> list[str]:
    q = trial.qualification
    names = [r.name for r in q.protocols] if q and q.protocols else [p.name for p in trial.protocols]
    return [n for n in names if trial.protocol(n) and device.acquires(trial.protocol(n).modality)]


def find_device(trial: ir.Trial, site: str, device: str) -> tuple[Optional[ir.Site], Optional[ir.Device]]:
    s = trial.site(site)
    return s, next((d for d in (s.devices if s else []) if d.id == device), None)


def decide(trial: ir.Trial, device: ir.Device, checks: list[SeriesCheck], exam_problems: list[str]) -> list[ProtocolDecision]:
    """Per qualification protocol: qualified or not, with reasons (pure: no I/O)."""
    out = []
    for name in qualification_protocols(trial, device):
        mine = [c for c in checks if c.protocol == name]
        reasons = list(exam_problems)
        good = [c for c in mine if c.adherence in ("pass", "warn") and c.qc != "fail"]
        if not mine:
            reasons.append(f"no series classified as {name}")
        elif not good:
            for c in mine:
                what = []
                if c.adherence not in ("pass", "warn"):
                    what.append(f"adherence {c.adherence or 'not checked'}")
                if c.qc == "fail":
                    what.append("QC fail")
                detail = "; ".join(c.problems)
                reasons.append(f"series {c.description or c.series_uid}: {', '.join(what)}" + (f" ({detail})" if detail else ""))
        out.append(ProtocolDecision(name, not reasons, reasons, [c.series_uid for c in mine]))
    return out


def _qc(trial: ir.Trial, classification: dict, root: Path) -> dict[str, dict]:
    """series_uid -> {"verdict": pass|warn|fail|None, "problems": [...]} from the runner's pixel QC."""
    from imtrial_dsl.runner import qc

    out = {}
    for s in qc.qc_exam(trial, classification, root)["series"]:
        probs = [f"QC {c['check']}: {c.get('measured', c.get('error'))} (threshold {c.get('threshold')})"
                 for c in s["checks"] if c.get("verdict") in ("fail", "error")]
        out[s["series_uid"]] = {"verdict": norm_verdict(s["verdict"]), "problems": probs}
    return out


def check_folder(trial: ir.Trial, device: ir.Device, folder: str | Path) -> tuple[list[SeriesCheck], list[str], str]:
    """Classify, adherence-check and QC every series in ``folder``: (series checks, exam problems, software).

    Uses the runner's own step cores, so a qualification exam is judged exactly as a subject exam.
    """
    from imtrial_dsl.runner import adherence, classify  # the runner's step cores

    scan = classify.scan(folder)
    cls = classify.classify_scan(trial, scan)
    root = scan.root
    headers = adherence.headers_for(cls, root)
    adh = adherence.check_exam(trial, cls, headers)
    problems = [f"{p['file']}: {p['reason']}" for p in scan.problems]
    hit = adh.get("device_match")
    if hit is None:
        problems.append("the exam's device is not in the study inventory")
    elif hit["device"] != device.id:
        problems.append(f"the exam was acquired on {hit['device']} (matched by {hit['matched_by']}), not {device.id}")
    problems += [f["message"] for f in adh["findings"] if f.get("code") in ("unknown_device", "device_serial_mismatch")]
    qc_by_series = _qc(trial, cls, root)
    adh_by_series = {s["series_uid"]: s for s in adh["series"]}
    checks = []
    for entry in cls["series"]:
        uid = entry["series_uid"]
        a = adh_by_series.get(uid)
        q = qc_by_series.get(uid, {})
        probs = [f"{r.get('parameter', r.get('keyword'))}: {r.get('actual_text', r.get('actual'))} (expected {r.get('expected_text', r.get('expected'))})"
                 for r in (a or {}).get("parameters", []) if not r.get("ok", True) and r.get("significance") == "error"]
        probs += q.get("problems", [])
        if entry.get("status") == "ambiguous":
            probs.append("ambiguous: matches " + ", ".join(entry.get("candidates", [])))
        checks.append(SeriesCheck(uid, entry.get("series_description", ""), entry.get("protocol"),
                                  a["verdict"] if a else None, q.get("verdict"), probs))
    ident = adh.get("device") or {}
    software = "\\".join(ident.get("software") or [])
    return checks, problems, software


def qualify(trial: ir.Trial, workdir: str | Path, site: str, device: str, folder: str | Path, *,
            by: str, on: date) -> QualificationResult:
    """Check a qualification exam and record the decision per protocol. Raises OpsError on unknown site/device."""
    s, dev = find_device(trial, site, device)
    if s is None:
        raise OpsError(f"unknown site {site!r}; sites: {', '.join(x.code for x in trial.sites)}")
    if dev is None:
        raise OpsError(f"unknown device {device!r} at site {site}; devices: {', '.join(d.id for d in s.devices)}")
    checks, problems, software = check_folder(trial, dev, folder)
    res = QualificationResult(trial.study.code if trial.study else "", site, device, on.isoformat(), by,
                              software, str(Path(folder).resolve()), decide(trial, dev, checks, problems), checks, problems)
    record(workdir, res)
    return res


def record(workdir: str | Path, res: QualificationResult) -> None:
    """Append the decisions; a positive one resolves open re-qualification flags for that protocol."""
    con = connect(workdir)
    try:
        with tx(con):
            for d in res.decisions:
                cur = con.execute(
                    "INSERT INTO ops_qualifications (trial, site, device, protocol, qualified, reasons, decided_on, "
                    "decided_by, software, source, details) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                    (res.trial, res.site, res.device, d.protocol, int(d.qualified), json.dumps(d.reasons),
                     res.decided_on, res.decided_by, res.software, res.folder,
                     json.dumps({"series": d.series}, sort_keys=True)))
                if d.qualified:
                    con.execute("UPDATE ops_requalification SET resolved_by=? WHERE trial=? AND site=? AND device=? "
                                "AND protocol=? AND resolved_by IS NULL",
                                (cur.lastrowid, res.trial, res.site, res.device, d.protocol))
    finally:
        con.close()


def status(workdir: str | Path, site: str, device: str, protocol: str, trial: Optional[str] = None) -> tuple[str, Optional[dict], list[dict]]:
    """(status, latest decision, open re-qualification flags) for one device and protocol."""
    con = connect(workdir)
    try:
        return status_from(con, site, device, protocol, trial)
    finally:
        con.close()


def device_table(trial: ir.Trial, workdir: Optional[str | Path], sites: Optional[set[str]] = None) -> list[dict]:
    """One row per (site, device, qualification protocol) with the current status, for reports."""
    code = trial.study.code if trial.study else None
    rows = []
    for s, d in trial.devices():
        if sites is not None and s.code not in sites:
            continue
        for proto in qualification_protocols(trial, d):
            st, dec, flags = status(workdir, s.code, d.id, proto, code) if workdir else (STATUS_NONE, None, [])
            rows.append({
                "site": s.code, "device": d.id, "protocol": proto, "status": st,
                "decided_on": dec["decided_on"] if dec else "", "decided_by": dec["decided_by"] if dec else "",
                "software": values_text(dec["software"]) if dec and dec["software"] else "",
                "reasons": "; ".join(json.loads(dec["reasons"])) if dec else "",
                "pending_upgrades": ", ".join(values_text(f["software"]) for f in flags),
            })
    return rows
