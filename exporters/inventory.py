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
DEVICE_COLUMNS += ["qualification"]
# the start-up team's grid: one row per site, the device fields as columns (several devices: '; '-joined, each
# prefixed with its device id)
GRID_COLUMNS = ["site", "name", "modality", "field_strength", "vendor", "model", "software", "coils",
                "research_agreement", "qualification", "contacts", "ready"]
IMAGING_ROLES = {"imaging_pi", "technologist", "physicist"}


def _required_modalities(trial: ir.Trial) -> list[str]:
    """Modalities of the protocols the schedule acquires (all protocols when there is no schedule)."""
    names = {r.name for v in trial.schedule.visits for r in v.acquire} if trial.schedule else {p.name for p in trial.protocols}
    return sorted({p.modality for p in trial.protocols if p.name in names})


def _agreement(d: ir.Device) -> str:
    return "not declared" if d.research_agreement is None else ("yes" if d.research_agreement else "no")


def qualification_status(trial: ir.Trial, site: ir.Site, d: ir.Device, qualified: frozenset = frozenset()) -> str:
    """'not required', 'qualified', or 'required: P, … (not recorded)' for a device under the qualification block.

    ``qualified``: (site, device) pairs with a recorded passing qualification (e.g. from ``imtrial qualify``)."""
    q = trial.qualification
    needed = [r.name for r in (q.protocols if q else []) if trial.protocol(r.name) and d.acquires(trial.protocol(r.name).modality)]
    if not needed:
        return "not required"
    if (site.code, d.id) in qualified:
        return "qualified"
    return f"required: {', '.join(needed)} (not recorded)"


def site_issues(trial: ir.Trial, site: ir.Site, qualified: frozenset = frozenset()) -> list[str]:
    """Why a site is not ready for participants yet (empty when it is)."""
    issues = []
    status = site.irb.status if site.irb else "pending"
    if status not in ("approved", "not_required"):
        issues.append(f"IRB {status}")
    have = {m for d in site.devices for m in d.all_modalities()}
    for m in _required_modalities(trial):
        if m not in have:
            issues.append(f"no {m} device")
    if not any(c.role in IMAGING_ROLES for c in site.contacts):
        issues.append("no imaging contact")
    unqualified = [d.id for d in site.devices if qualification_status(trial, site, d, qualified).startswith("required")]
    if unqualified:
        issues.append(f"not qualified: {', '.join(unqualified)}")
    return issues


def rows(trial: ir.Trial, qualified: frozenset = frozenset()) -> dict[str, list[dict[str, Any]]]:
    """The tables as lists of dicts (CSV/HTML share them): sites, devices, contacts, and the site-by-field grid."""
    sites, devices, contacts, grid = [], [], [], []
    for s in trial.sites:
        issues = site_issues(trial, s, qualified)
        sites.append({
            "site": s.code, "name": s.name, "timezone": s.timezone or "",
            "irb_status": s.irb.status if s.irb else "pending",
            "irb_reference": (s.irb.reference or "") if s.irb else "",
            "irb_date": (s.irb.date or "") if s.irb else "",
            "irb_expires": (s.irb.expires or "") if s.irb else "",
            "devices": len(s.devices),
            "modalities": " ".join(sorted({m for d in s.devices for m in d.all_modalities()})),
            "contacts": len(s.contacts),
            "ready": "yes" if not issues else "no",
            "issues": "; ".join(issues),
        })
        for d in s.devices:
            devices.append({
                "site": s.code, "device": d.id, "modality": "/".join(d.all_modalities()), "vendor": d.vendor,
                "manufacturer": d.vendor_text or d.vendor, "model": d.model or "", "software": d.software or "",
                "field_strength": d.field_strength.text() if d.field_strength else "",
                "serial": d.serial or "", "station": d.station or "", "institution": d.institution or "",
                "coils": "; ".join(d.coils), "research_agreement": _agreement(d),
                "qualification": qualification_status(trial, s, d, qualified),
            })
        for c in s.contacts:
            contacts.append({"site": s.code, "role": c.role, "name": c.name, "email": c.email or "", "phone": c.phone or ""})
        mine = [r for r in devices if r["site"] == s.code]

        def cell(key: str) -> str:
            vals = [r[key] for r in mine]
            if len(mine) == 1 or len(set(vals)) == 1:
                return vals[0] if vals else ""
            return "; ".join(f"{r['device']}: {r[key] or '—'}" for r in mine)

        grid.append({"site": s.code, "name": s.name, **{k: cell(k) for k in GRID_COLUMNS[2:10]},
                     "contacts": "; ".join(f"{c.role}: {c.name}" + (f" <{c.email}>" if c.email else "") for c in s.contacts),
                     "ready": sites[-1]["ready"]})
    return {"sites": sites, "devices": devices, "contacts": contacts, "grid": grid}


def to_csv(table: list[dict[str, Any]], columns: list[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    w.writeheader()
    for r in table:
        w.writerow(r)
    return buf.getvalue()


def to_html(trial: ir.Trial, qualified: frozenset = frozenset()) -> str:
    data = rows(trial, qualified)
    study = trial.study
    env = templating.environment(Path(__file__).resolve().parent / "templates" / "inventory")
    return env.get_template("inventory.html.j2").render(
        study=study, sites=data["sites"], devices=data["devices"], contacts=data["contacts"],
        site_columns=SITE_COLUMNS, device_columns=DEVICE_COLUMNS, contact_columns=CONTACT_COLUMNS,
        grid=data["grid"], grid_columns=GRID_COLUMNS,
        required=_required_modalities(trial),
    )


def export(trial: ir.Trial, graph: Optional[Any] = None, out_dir: Path | str = ".",
           qualified: frozenset = frozenset()) -> list[Path]:
    """Write ``<STUDY>_sites.csv``, ``_devices.csv``, ``_contacts.csv``, ``_site_devices.csv`` (sites as rows,
    device fields as columns) and ``_inventory.html``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    code = trial.study.code if trial.study else "STUDY"
    data = rows(trial, qualified)
    written = []
    for name, cols in (("sites", SITE_COLUMNS), ("devices", DEVICE_COLUMNS), ("contacts", CONTACT_COLUMNS),
                       ("grid", GRID_COLUMNS)):
        name = "site_devices" if name == "grid" else name
        key = "grid" if name == "site_devices" else name
        p = out / f"{code}_{name}.csv"
        atomic_write_text(p, to_csv(data[key], cols))
        written.append(p)
    h = out / f"{code}_inventory.html"
    atomic_write_text(h, to_html(trial, qualified))
    written.append(h)
    return written
