"""Site start-up inventory: sites (with IRB status), devices and contacts as CSV and one HTML page.

Pure function of the IR. The HTML has sortable tables (a few lines of inline script, no
external assets) and flags sites that cannot enrol yet (IRB not approved, no device for a
modality the schedule acquires, no imaging contact).
"""
from __future__ import annotations

import csv
import io
from pathlib import Path
from collections.abc import Mapping
from typing import Any, Optional

from imtrial_dsl import ir, templating
from imtrial_dsl.diagnostics import ImtrialError
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


QUALIFICATION_STATES = ("qualified", "not_qualified", "requalification_needed", "not_assessed")
# spellings a qualification CSV may use for each state
_CSV_STATES = {"qualified": "qualified", "yes": "qualified", "pass": "qualified", "passed": "qualified",
               "not_qualified": "not_qualified", "not qualified": "not_qualified", "no": "not_qualified",
               "fail": "not_qualified", "failed": "not_qualified",
               "requalification_needed": "requalification_needed", "requalification needed": "requalification_needed",
               "requalify": "requalification_needed",
               "not_assessed": "not_assessed", "not assessed": "not_assessed", "unknown": "not_assessed", "": "not_assessed"}


class InventoryError(ImtrialError):
    """A qualification record the inventory cannot use (bad CSV, unknown site or device)."""

    code = "E631"


def _needed(trial: ir.Trial, d: ir.Device) -> list[str]:
    q = trial.qualification
    return [r.name for r in (q.protocols if q else []) if trial.protocol(r.name) and d.acquires(trial.protocol(r.name).modality)]


def _state(qualified, site: str, device: str) -> str:
    """A device's recorded state: ``qualified`` maps (site, device) to a state, or is a set of qualified pairs."""
    if isinstance(qualified, Mapping):
        return qualified.get((site, device), "not_assessed")
    return "qualified" if (site, device) in qualified else "not_assessed"


def _combine(states: list[str]) -> str:
    """One device's state from its protocols' states: any negative decides; all qualified; else not assessed."""
    for s in ("not_qualified", "requalification_needed"):
        if s in states:
            return s
    return "qualified" if states and all(s == "qualified" for s in states) else "not_assessed"


def recorded_qualifications(trial: ir.Trial, workdir: Path | str | None = None,
                            csv_path: Path | str | None = None) -> dict[tuple[str, str], str]:
    """{(site, device): state} from a workdir's qualification decisions (``imtrial qualify``; re-qualification
    flags after upgrades count) and/or a CSV with columns ``site, device, status`` (optional ``protocol``); a CSV
    row overrides the workdir for its device. Devices without a record are absent (not assessed: unknown, not no)."""
    out: dict[tuple[str, str], str] = {}
    code = trial.study.code if trial.study else None
    if workdir is not None:
        from imtrial_dsl.runner.qualification import status_from
        from imtrial_dsl.store import connect
        from imtrial_dsl.workdir import Workdir

        db = Workdir(workdir).state_db
        if not db.is_file():
            raise InventoryError(f"{workdir}: not an imtrial workdir (no state.sqlite)",
                                 hint="pass the workdir where 'imtrial qualify' recorded its decisions")
        con = connect(db, create=False)
        try:
            for site, d in trial.devices():
                needed = _needed(trial, d)
                states = [status_from(con, site.code, d.id, p, code)[0] for p in needed]
                if needed and any(s != "not_assessed" for s in states):
                    out[(site.code, d.id)] = _combine(states)
        finally:
            con.close()
    if csv_path is not None:
        out.update(_read_csv(trial, Path(csv_path)))
    return out


def _read_csv(trial: ir.Trial, path: Path) -> dict[tuple[str, str], str]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise InventoryError(f"{path}: cannot read the qualification CSV: {exc}") from None
    reader = csv.DictReader(io.StringIO(text))
    cols = [c.strip().lower() for c in reader.fieldnames or []]
    if not {"site", "device", "status"} <= set(cols):
        raise InventoryError(f"{path}:1: the qualification CSV needs the columns site, device, status (has: {', '.join(cols) or 'none'})")
    devices = {(s.code, d.id) for s, d in trial.devices()}
    per: dict[tuple[str, str], list[str]] = {}
    for n, raw in enumerate(reader, start=2):
        row = {(k or "").strip().lower(): (v or "").strip() for k, v in raw.items()}
        key = (row["site"], row["device"])
        if key not in devices:
            known = ", ".join(f"{s}/{d}" for s, d in sorted(devices))
            raise InventoryError(f"{path}:{n}: no device {row['device']!r} at site {row['site']!r} in the study",
                                 hint=f"devices: {known}")
        state = _CSV_STATES.get(row["status"].lower())
        if state is None:
            raise InventoryError(f"{path}:{n}: unknown qualification status {row['status']!r}",
                                 hint="one of: qualified, not_qualified, requalification_needed, not_assessed", code="E632")
        per.setdefault(key, []).append(state)
    return {k: _combine(v) for k, v in per.items()}


def qualification_status(trial: ir.Trial, site: ir.Site, d: ir.Device, qualified=frozenset()) -> str:
    """'not required', 'qualified', 'not qualified: P, …', 'requalification needed: P, …' or
    'required: P, … (not recorded)' for a device under the qualification block.

    ``qualified``: {(site, device): state} (:func:`recorded_qualifications`), or a set of qualified pairs."""
    needed = _needed(trial, d)
    if not needed:
        return "not required"
    state = _state(qualified, site.code, d.id)
    if state == "qualified":
        return "qualified"
    if state == "not_qualified":
        return f"not qualified: {', '.join(needed)}"
    if state == "requalification_needed":
        return f"requalification needed: {', '.join(needed)}"
    return f"required: {', '.join(needed)} (not recorded)"


def site_issues(trial: ir.Trial, site: ir.Site, qualified=frozenset()) -> list[str]:
    """Why a site is not ready for participants yet (empty when it is); an unrecorded qualification is listed as
    'qualification not recorded' — unknown, not a refusal (see :func:`readiness`)."""
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
    states = [(d.id, qualification_status(trial, site, d, qualified)) for d in site.devices]
    for prefix, label in (("not qualified", "not qualified"), ("requalification needed", "requalification needed"),
                          ("required", "qualification not recorded")):
        ids = [i for i, st in states if st.startswith(prefix)]
        if ids:
            issues.append(f"{label}: {', '.join(ids)}")
    return issues


def readiness(issues: list[str]) -> str:
    """'yes', 'no', or 'unknown' when the only open point is a qualification nobody has recorded yet."""
    if not issues:
        return "yes"
    return "unknown" if all(i.startswith("qualification not recorded") for i in issues) else "no"


def rows(trial: ir.Trial, qualified=frozenset()) -> dict[str, list[dict[str, Any]]]:
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
            "ready": readiness(issues),
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


def to_html(trial: ir.Trial, qualified=frozenset()) -> str:
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
           qualified=frozenset(), *, workdir: Path | str | None = None,
           qualifications: Path | str | None = None) -> list[Path]:
    """Write ``<STUDY>_sites.csv``, ``_devices.csv``, ``_contacts.csv``, ``_site_devices.csv`` (sites as rows,
    device fields as columns) and ``_inventory.html``. Device qualification comes from ``qualified`` and/or the
    decisions recorded in ``workdir`` and the CSV ``qualifications`` (:func:`recorded_qualifications`)."""
    if workdir is not None or qualifications is not None:
        base = dict(qualified) if isinstance(qualified, Mapping) else {k: "qualified" for k in qualified}
        qualified = {**base, **recorded_qualifications(trial, workdir, qualifications)}
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
