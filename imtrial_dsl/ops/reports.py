"""Management reports per role: per-site and per-device figures, per-exam pipeline status, plots.

Access control is applied to the DATA before anything is computed, so no output file (HTML, CSV,
JSON) can contain what the role may not see:

- a role with ``scope own`` (e.g. ``role site kind site scope own``) gets one report per site and
  sees only that site's subjects, exams, devices and qualification records;
- a ``blinded`` role never sees the treatment arm; every name in ``hide`` is removed
  (``arm``, ``site`` — then site and device columns, per-site/per-device tables and plots go, and
  subject IDs are replaced by a reader code, since IDs like ``AMY01-BOS-0001`` embed the site —,
  ``exam_date``, ``device``, ``subject_id``).

Pass rates count series with a verdict; ``warn`` counts as a pass (a warning-level deviation only).
"""
from __future__ import annotations

import csv
import hashlib
import io
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any, Callable, Optional

from imtrial_dsl import ir, templating
from imtrial_dsl.source import values_text
from imtrial_dsl.files import atomic_write_json, atomic_write_text

from . import svg
from .expected import VisitStatus, expected_vs_received
from .model import ExamRecord, OpsError, StudyData
from .qualify import device_table
from .upgrades import record_upgrades, scan_upgrades

PIPELINE = ("ingest", "identify", "deidentify", "classify", "adherence", "qc", "archive", "analyses")
ALL_SECTIONS = ("enrollment", "adherence", "qc", "overdue", "qualification", "upgrades", "exams")
TEMPLATES = Path(__file__).resolve().parent / "templates"


@dataclass
class Audience:
    role: ir.Role
    site: Optional[str]          # set for own-scoped roles
    hidden: frozenset[str]
    sections: tuple[str, ...]
    report_name: str

    @property
    def label(self) -> str:
        return f"{self.role.name}" + (f" ({self.site})" if self.site else "")


def audience(trial: ir.Trial, role: ir.Role, site: Optional[str] = None) -> Audience:
    """What a role may see. An own-scoped role needs ``site``; a report declaration may narrow sections/scope."""
    decl = next(((r, a) for r in trial.reports for a in r.audience if a.role.name == role.name), None)
    scope = (decl[1].scope if decl and decl[1].scope else None) or role.scope
    if role.kind == "site" and scope != "all":
        scope = "own"
    if scope == "own" and not site:
        raise OpsError(f"role {role.name!r} sees only its own site: give a site")
    hidden = set(role.hide) | ({"arm"} if role.blinded else set())
    sections = tuple(decl[0].sections) if decl and decl[0].sections else ALL_SECTIONS
    sections = tuple(dict.fromkeys(sections + ("exams", "upgrades")))
    return Audience(role, site if scope == "own" else None, frozenset(hidden), sections,
                    decl[0].name if decl else "management")


def _rate(vs: list[Optional[str]]) -> Optional[float]:
    vs = [v for v in vs if v is not None]
    return round(sum(v in ("pass", "warn") for v in vs) / len(vs), 4) if vs else None


def _pct(v: Optional[float]) -> str:
    return "" if v is None else f"{v:.0%}"


def reader_code(trial: ir.Trial, subject_id: str) -> str:
    """A stable code that does not reveal the site (for roles that hide it)."""
    code = trial.study.code if trial.study else ""
    return "R-" + hashlib.sha256(f"{code}\0{subject_id}".encode()).hexdigest()[:10].upper()


def _exam_row(trial: ir.Trial, e: ExamRecord, visit_status: dict[tuple[str, str], VisitStatus], arm: Optional[str],
              qual: dict[tuple[str, str], str]) -> dict:
    steps = {s: e.steps.get(s, "pending") for s in PIPELINE}
    present = {s.protocol for s in e.series if s.protocol}
    applicable = [a.name for a in trial.analyses
                  if all((i.protocol is None or i.protocol.name in present) for i in a.inputs)]
    done = sorted(a for a in applicable if e.analyses.get(a) == "done")
    vs = visit_status.get((e.subject_id or "", e.visit or ""))
    return {
        "exam_key": e.exam_key, "subject_id": e.subject_id or "", "site": e.site or "", "device": e.device or "",
        "visit": e.visit or "", "exam_date": e.exam_date.isoformat() if e.exam_date else "",
        "window": vs.status if vs and e.exam_key in vs.exam_keys else ("" if e.in_window is None else
                                                                         ("received_in_window" if e.in_window else "received_out_of_window")),
        "series": len(e.series),
        "adherence_pass": sum(s.adherence in ("pass", "warn") for s in e.series),
        "adherence_fail": sum(s.adherence == "fail" for s in e.series),
        "qc_pass": sum(s.qc in ("pass", "warn") for s in e.series),
        "qc_fail": sum(s.qc == "fail" for s in e.series),
        **{f"step_{k}": v for k, v in steps.items()},
        "analyses_done": ", ".join(done),
        "analyses_remaining": ", ".join(a for a in applicable if a not in done),
        "analyses_failed": ", ".join(a for a in applicable if e.analyses.get(a) == "failed"),
        # protocols acquired on a device not (or no longer) qualified for them
        "device_unqualified": "; ".join(f"{p}: {qual[(e.device or '', p)]}" for p in sorted(present)
                                        if qual.get((e.device or "", p), "qualified") != "qualified"),
        "arm": arm or "",
    }


def build(trial: ir.Trial, data: StudyData, aud: Audience, as_of: date, workdir: Optional[str | Path] = None) -> dict:
    """The report model for one audience, computed from data already restricted to what it may see."""
    if aud.site:
        data = data.only_site(aud.site)
    hidden = aud.hidden
    sites = [s for s in trial.sites if aud.site is None or s.code == aud.site]
    site_codes = {s.code for s in sites}
    # as of a date: exams acquired later do not exist yet (qualification status is always the current one)
    data = StudyData([e for e in data.exams if e.site in site_codes and (e.exam_date is None or e.exam_date <= as_of)],
                     {k: v for k, v in data.enrollments.items() if v.site in site_codes and v.enrolled_on <= as_of})
    subjects = data.subjects()
    statuses = expected_vs_received(trial, data, as_of)
    vmap = {(s.subject_id, s.visit): s for s in statuses}
    day0 = {s.subject_id: s.day0 for s in statuses}
    arms = {k: v.arm for k, v in data.enrollments.items()}
    show_arm = "arm" not in hidden and any(arms.values())

    site_rows = []
    for s in sites:
        exams = [e for e in data.exams if e.site == s.code]
        sv = [v for v in statuses if v.site == s.code]
        site_rows.append({
            "site": s.code, "name": s.name,
            "subjects_enrolled": sum(1 for v in subjects.values() if v == s.code),
            "exams_received": len(exams),
            "series_checked": sum(1 for e in exams for x in e.series if x.adherence is not None),
            "adherence_pass_rate": _rate([x.adherence for e in exams for x in e.series]),
            "qc_pass_rate": _rate([x.qc for e in exams for x in e.series]),
            "visits_received_in_window": sum(v.status == "received_in_window" for v in sv),
            "visits_out_of_window": sum(v.status == "received_out_of_window" for v in sv),
            "visits_incomplete": sum(v.incomplete for v in sv),
            "overdue_visits": sum(v.status == "overdue" and not v.optional for v in sv),
            "irb": s.irb.status if s.irb else "",
        })
    qual_rows = device_table(trial, workdir, site_codes)
    for r in site_rows:
        mine = [q for q in qual_rows if q["site"] == r["site"]]
        r["device_qualification"] = "; ".join(f"{q['device']} {q['protocol']}: {q['status']}" for q in mine)

    upgrades = [f.to_json() for f in scan_upgrades(trial, data)]
    device_rows = []
    for s, d in trial.devices():
        if s.code not in site_codes:
            continue
        exams = [e for e in data.exams if e.device == d.id]
        seen = sorted({values_text(e.software) for e in exams if e.software})
        device_rows.append({
            "site": s.code, "device": d.id, "vendor": d.vendor, "model": d.model or "",
            "inventory_software": d.software or "", "observed_software": ", ".join(seen),
            "exams": len(exams),
            "adherence_pass_rate": _rate([x.adherence for e in exams for x in e.series]),
            "qc_pass_rate": _rate([x.qc for e in exams for x in e.series]),
            "upgrade_detected": any(u["device"] == d.id for u in upgrades),
            "qualification": "; ".join(f"{q['protocol']}: {q['status']}" for q in qual_rows if q["device"] == d.id),
        })

    qual = {(q["device"], q["protocol"]): q["status"] for q in qual_rows}
    exam_rows = [_exam_row(trial, e, vmap, arms.get(e.subject_id or ""), qual) for e in
                 sorted(data.exams, key=lambda e: (e.site or "", e.subject_id or "", e.exam_date or date.max, e.exam_key))]
    visit_rows = []
    for v in statuses:
        visit_rows.append({
            "subject_id": v.subject_id, "site": v.site, "visit": v.visit, "target": v.target.isoformat(),
            "opens": v.opens.isoformat(), "closes": v.closes.isoformat(), "status": v.status,
            "exam_date": v.exam_date.isoformat() if v.exam_date else "",
            "days_from_target": "" if v.days_from_target is None else v.days_from_target,
            "acquisitions": "; ".join(f"{a.protocol}: {a.status}" for a in v.acquisitions),
            # received, but a protocol of the visit is missing or failed
            "incomplete": v.incomplete,
            "optional": v.optional, "arm": arms.get(v.subject_id) or "",
        })

    enroll: dict[str, list[tuple[date, int]]] = {}
    for s in sites:
        ds = sorted(d for sid, d in day0.items() if subjects.get(sid) == s.code)
        enroll[s.code] = [(d, i + 1) for i, d in enumerate(ds)]

    model = {
        "study": {"code": trial.study.code if trial.study else "", "title": trial.study.title if trial.study else "",
                  "version": (trial.study.version if trial.study else None) or "", "source_sha256": trial.source_sha256 or ""},
        "report": aud.report_name, "role": aud.role.name, "role_kind": aud.role.kind, "site_scope": aud.site or "all",
        "blinded": aud.role.blinded, "hidden_fields": sorted(hidden), "as_of": as_of.isoformat(),
        "sections": list(aud.sections),
        "sites": site_rows, "devices": device_rows, "qualification": qual_rows, "upgrades": upgrades,
        "exams": exam_rows, "visits": visit_rows,
        "overdue": [r for r in visit_rows if r["status"] == "overdue" and not r["optional"]],
        "enrollment": {k: [(d.isoformat(), n) for d, n in v] for k, v in enroll.items()},
    }
    return _redact(trial, model, hidden, show_arm)


def hidden_parts(m: dict) -> set[str]:
    """The parts of the report the role may not see (the page says "hidden for your role" there, not "no data")."""
    h = set(m["hidden_fields"])
    out = set()
    if "site" in h:
        out |= {"sites", "devices", "qualification", "by_site", "by_device"}
    if "device" in h:
        out |= {"devices", "by_device"}
    if "exam_date" in h:
        out |= {"enrollment"}
    return out


def _redact(trial: ir.Trial, m: dict, hidden: frozenset[str], show_arm: bool) -> dict:
    """Drop hidden fields everywhere (columns, tables, plots)."""
    drop = set(hidden)
    if not show_arm:
        drop.add("arm")
    if "site" in hidden:
        drop |= {"device", "site", "name"}
        m["sites"], m["devices"], m["qualification"], m["upgrades"] = [], [], [], []
        dates = sorted(d for v in m["enrollment"].values() for d, _ in v)
        m["enrollment"] = {"all sites": [(d, i + 1) for i, d in enumerate(dates)]}
    if "device" in hidden:
        m["devices"], m["upgrades"] = [], []
        for r in m["sites"]:
            r.pop("device_qualification", None)
    mask_subjects = "site" in hidden or "subject_id" in hidden
    for table in ("exams", "visits", "overdue"):
        for r in m[table]:
            if mask_subjects and "subject_id" in r:
                r["subject_id"] = reader_code(trial, r["subject_id"])
            for k in list(r):
                if k in drop:
                    del r[k]
    if "exam_date" in hidden:
        for table in ("visits", "overdue"):
            for r in m[table]:
                for k in ("target", "opens", "closes", "exam_date"):
                    r.pop(k, None)
        for r in m["exams"]:
            r.pop("exam_date", None)
        for u in m["upgrades"]:
            u.pop("exam_date", None)
        m["enrollment"] = {}  # enrolment dates are baseline exam dates
    if mask_subjects:
        # exam keys and devices would let a reader re-link rows to sites through other reports
        for r in m["exams"]:
            r.pop("exam_key", None)
    return m


def _csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    if rows:
        cols = list(dict.fromkeys(k for r in rows for k in r))
        w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in cols})
    return buf.getvalue()


def charts(m: dict) -> dict[str, str]:
    out = {}
    hidden = hidden_parts(m)
    series = {k: [(date.fromisoformat(d), n) for d, n in v] for k, v in m["enrollment"].items()}
    if "enrollment" in hidden:
        out["enrollment"] = svg.empty("Subjects enrolled over time", note="hidden for your role")
    else:
        out["enrollment"] = svg.step_chart("Subjects enrolled over time" + (" per site" if len(series) > 1 else ""), series,
                                           until=date.fromisoformat(m["as_of"]))
    if m["sites"]:
        cats = [r["site"] for r in m["sites"]]
        out["by_site"] = svg.bar_chart("Adherence and QC pass rate by site", cats,
                                       {"adherence": [r["adherence_pass_rate"] for r in m["sites"]],
                                        "QC": [r["qc_pass_rate"] for r in m["sites"]]})
    if m["devices"]:
        cats = [r["device"] for r in m["devices"]]
        out["by_device"] = svg.bar_chart("Adherence and QC pass rate by device", cats,
                                         {"adherence": [r["adherence_pass_rate"] for r in m["devices"]],
                                          "QC": [r["qc_pass_rate"] for r in m["devices"]]})
    return out


def write(m: dict, out_dir: str | Path) -> list[Path]:
    """report.html, report.json and one CSV per table; returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for name in ("sites", "devices", "qualification", "exams", "visits"):
        p = out / f"{name}.csv"
        atomic_write_text(p, _csv(m[name]))
        files.append(p)
    p = out / "report.json"
    atomic_write_json(p, m)
    files.append(p)
    env = templating.environment(TEMPLATES, filters={"pct": _pct})
    p = out / "report.html"
    atomic_write_text(p, env.get_template("report.html.j2").render(m=m, charts=charts(m), hidden=hidden_parts(m),
                                                                  pipeline=PIPELINE))
    files.append(p)
    return files


def audiences(trial: ir.Trial, role_name: Optional[str] = None, site: Optional[str] = None) -> list[Audience]:
    """Every audience to produce, own-scoped roles once per site.

    The named role; else the roles the study's ``report … for …`` declarations name; else every role.
    """
    roles = list(trial.roles) or [ir.Role(name="central", kind="central")]
    declared = {a.role.name for r in trial.reports for a in r.audience}
    if declared and not role_name:
        # by default, the audiences the study's report declarations name; --role reaches any role
        roles = [r for r in roles if r.name in declared]
    if role_name:
        roles = [r for r in roles if r.name == role_name]
        if not roles:
            raise OpsError(f"unknown role {role_name!r}; roles: {', '.join(r.name for r in trial.roles)}")
    out = []
    for r in roles:
        try:
            out.append(audience(trial, r, site))
        except OpsError:
            out += [audience(trial, r, s.code) for s in trial.sites if site is None or s.code == site]
    return out


def generate(trial: ir.Trial, data: StudyData, out_dir: str | Path, as_of: date, *, role: Optional[str] = None,
             site: Optional[str] = None, workdir: Optional[str | Path] = None,
             progress: Optional[Callable[[str, int], Any]] = None) -> dict[str, list[Path]]:
    """Write a report per audience under ``out_dir/<role>[/<site>]``; returns audience label -> files.

    ``progress(desc, total)``: a progress display (``update(n)``/``close()``), advanced per audience."""
    if site and not trial.site(site):
        raise OpsError(f"unknown site {site!r}; sites: {', '.join(s.code for s in trial.sites)}")
    if workdir is not None:
        # exams received since the last run may reveal upgrades that change qualification status
        record_upgrades(trial, scan_upgrades(trial, data), workdir)
    out: dict[str, list[Path]] = {}
    auds = audiences(trial, role, site)
    bar = progress("report", len(auds)) if progress else None
    for aud in auds:
        sub = Path(out_dir) / aud.role.name / (aud.site or "")
        out[aud.label] = write(build(trial, data, aud, as_of, workdir), sub)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return out


def to_text(m: dict) -> str:
    """A short plain-text summary (for the CLI)."""
    lines = [f"{m['study']['code']} {m['report']} report for {m['role']} ({m['site_scope']}) as of {m['as_of']}"]
    for r in m["sites"]:
        lines.append(f"  {r['site']}: {r['subjects_enrolled']} subjects, {r['exams_received']} exams, adherence "
                     f"{_pct(r['adherence_pass_rate']) or 'n/a'}, QC {_pct(r['qc_pass_rate']) or 'n/a'}, "
                     f"{r['overdue_visits']} overdue")
    return "\n".join(lines)

