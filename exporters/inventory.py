"""Site start-up inventory: sites (with IRB status), devices and contacts as CSV and one HTML page.

Pure function of the IR. The HTML has sortable tables (a few lines of inline script, no
external assets) and flags sites that cannot enrol yet (IRB not approved, no device for a
modality the schedule acquires, no imaging contact).
"""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, Optional

from imtrial_dsl import ir, templating
from imtrial_dsl.files import atomic_write_text

SITE_COLUMNS = ["site", "name", "timezone", "irb_status", "irb_reference", "irb_date", "irb_expires",
                "devices", "modalities", "contacts", "ready", "issues"]
DEVICE_COLUMNS = ["site", "device", "modality", "vendor", "manufacturer", "model", "software", "field_strength",
                  "serial", "station", "institution", "coils", "research_agreement"]
CONTACT_COLUMNS = ["site", "role", "name", "email", "phone"]
IMAGING_ROLES = {"imaging_pi", "technologist", "physicist"}


def _required_modalities(trial: ir.Trial) -> list[str]:
    """Modalities of the protocols the schedule acquires (all protocols when there is no schedule)."""
    names = {r.name for v in trial.schedule.visits for r in v.acquire} if trial.schedule else {p.name for p in trial.protocols}
    return sorted({p.modality for p in trial.protocols if p.name in names})


def site_issues(trial: ir.Trial, site: ir.Site) -> list[str]:
    """Why a site is not ready for subjects yet (empty when it is)."""
    issues = []
    status = site.irb.status if site.irb else "pending"
    if status not in ("approved", "not_required"):
        issues.append(f"IRB {status}")
    have = {d.modality for d in site.devices}
    for m in _required_modalities(trial):
        if m not in have:
            issues.append(f"no {m} device")
    if not any(c.role in IMAGING_ROLES for c in site.contacts):
        issues.append("no imaging contact")
    return issues


def rows(trial: ir.Trial) -> dict[str, list[dict[str, Any]]]:
    """The three tables as lists of dicts (CSV/HTML share them)."""
    sites, devices, contacts = [], [], []
    for s in trial.sites:
        issues = site_issues(trial, s)
        sites.append({
            "site": s.code, "name": s.name, "timezone": s.timezone or "",
            "irb_status": s.irb.status if s.irb else "pending",
            "irb_reference": (s.irb.reference or "") if s.irb else "",
            "irb_date": (s.irb.date or "") if s.irb else "",
            "irb_expires": (s.irb.expires or "") if s.irb else "",
            "devices": len(s.devices),
            "modalities": " ".join(sorted({d.modality for d in s.devices})),
            "contacts": len(s.contacts),
            "ready": "yes" if not issues else "no",
            "issues": "; ".join(issues),
        })
        for d in s.devices:
            devices.append({
                "site": s.code, "device": d.id, "modality": d.modality, "vendor": d.vendor,
                "manufacturer": d.vendor_text or d.vendor, "model": d.model or "", "software": d.software or "",
                "field_strength": d.field_strength.text() if d.field_strength else "",
                "serial": d.serial or "", "station": d.station or "", "institution": d.institution or "",
                "coils": "; ".join(d.coils), "research_agreement": "yes" if d.research_agreement else "no",
            })
        for c in s.contacts:
            contacts.append({"site": s.code, "role": c.role, "name": c.name, "email": c.email or "", "phone": c.phone or ""})
    return {"sites": sites, "devices": devices, "contacts": contacts}


def to_csv(table: list[dict[str, Any]], columns: list[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    w.writeheader()
    for r in table:
        w.writerow(r)
    return buf.getvalue()


def to_html(trial: ir.Trial) -> str:
    data = rows(trial)
    study = trial.study
    env = templating.environment(Path(__file__).resolve().parent / "templates" / "inventory")
    return env.get_template("inventory.html.j2").render(
        study=study, sites=data["sites"], devices=data["devices"], contacts=data["contacts"],
        site_columns=SITE_COLUMNS, device_columns=DEVICE_COLUMNS, contact_columns=CONTACT_COLUMNS,
        required=_required_modalities(trial),
    )


def export(trial: ir.Trial, graph: Optional[Any] = None, out_dir: Path | str = ".") -> list[Path]:
    """Write ``<STUDY>_sites.csv``, ``_devices.csv``, ``_contacts.csv`` and ``_inventory.html``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    code = trial.study.code if trial.study else "STUDY"
    data = rows(trial)
    written = []
    for name, cols in (("sites", SITE_COLUMNS), ("devices", DEVICE_COLUMNS), ("contacts", CONTACT_COLUMNS)):
        p = out / f"{code}_{name}.csv"
        atomic_write_text(p, to_csv(data[name], cols))
        written.append(p)
    h = out / f"{code}_inventory.html"
    atomic_write_text(h, to_html(trial))
    written.append(h)
    return written
