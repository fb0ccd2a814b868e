"""Software-upgrade tracking: an exam whose SoftwareVersions differs from the device inventory.

For each such exam we say, per protocol of the device's modality, which protocol variant applied
under the inventory release and which applies under the new one. The new release is *covered*
when a variant explicitly names it (its software pattern matches), or when the choice does not
depend on software at all (same variant, no software pin). Otherwise the series would silently
fall back to a less specific variant or the base constraints — the study team must look.

When the study says ``requalify_on_upgrade``, the device needs re-qualification for the study's
qualification protocols (table ``ops_requalification``; see :mod:`imtrial_dsl.ops.qualify`).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from imtrial_dsl import ir
from imtrial_dsl.source import values_text
from imtrial_dsl.vendors import software_matches

from ..store import tx
from .model import StudyData, connect


@dataclass
class ProtocolCoverage:
    protocol: str
    inventory_variant: str
    new_variant: str
    covered: bool          # a variant names the new release, or no variant depends on the release
    detail: str = ""


@dataclass
class UpgradeFinding:
    exam_key: str
    site: str
    device: str
    inventory_software: Optional[str]
    software: list[str]
    exam_date: Optional[str] = None
    coverage: list[ProtocolCoverage] = field(default_factory=list)
    requalify_protocols: list[str] = field(default_factory=list)

    @property
    def covered(self) -> bool:
        return all(c.covered for c in self.coverage)

    def message(self) -> str:
        soft = values_text(self.software)
        bad = [c.protocol for c in self.coverage if not c.covered]
        cov = "covered by the protocol variants" if not bad else "NOT covered by a variant for " + ", ".join(bad)
        tail = f"; re-qualification needed for {', '.join(self.requalify_protocols)}" if self.requalify_protocols else ""
        return (f"{self.site}/{self.device}: software '{soft}' differs from inventory '{self.inventory_software}' "
                f"(exam {self.exam_key}); {cov}{tail}")

    def to_json(self) -> dict:
        d = asdict(self)
        d["covered"] = self.covered
        d["message"] = self.message()
        return d


def _label(v: Optional[dict]) -> str:
    if not v:
        return "base"
    return " ".join([v["vendor"]] + ([f"model {v['model']!r}"] if v.get("model") else [])
                    + ([f"software {v['software']!r}"] if v.get("software") else []))


def check_software(trial: ir.Trial, site: str, device_id: str, versions: list[str] | str,
                   exam_key: str = "", exam_date: Optional[str] = None) -> Optional[UpgradeFinding]:
    """A finding if ``versions`` differ from the inventory release of the device, else None."""
    s = trial.site(site)
    dev = next((d for d in (s.devices if s else []) if d.id == device_id), None)
    if dev is None or not dev.software or not versions:
        return None
    vers = [versions] if isinstance(versions, str) else list(versions)
    # Same notion of "differs" and "covered" as the adherence step, so ops and runner agree.
    from imtrial_dsl.runner.adherence import software_consistent, upgrade_coverage

    if software_consistent(dev.software, vers):
        return None
    f = UpgradeFinding(exam_key, site, device_id, dev.software, vers, exam_date)
    for c in upgrade_coverage(trial, dev, vers):
        f.coverage.append(ProtocolCoverage(c["protocol"], _label(c["variant_before"]), _label(c["variant_now"]),
                                           c["covered"] is not False, c["detail"]))
    q = trial.qualification
    if q and q.requalify_on_upgrade:
        names = [r.name for r in q.protocols] or [p.name for p in trial.protocols]
        f.requalify_protocols = [n for n in names if (trial.protocol(n) and dev.acquires(trial.protocol(n).modality))]
    return f


def scan_upgrades(trial: ir.Trial, data: StudyData) -> list[UpgradeFinding]:
    """Every exam whose software differs from its device's inventory entry (oldest first)."""
    out = []
    for e in sorted(data.exams, key=lambda e: (e.exam_date.isoformat() if e.exam_date else "9999", e.exam_key)):
        if e.site and e.device and e.software:
            f = check_software(trial, e.site, e.device, e.software, e.exam_key,
                               e.exam_date.isoformat() if e.exam_date else None)
            if f:
                out.append(f)
    return out


def record_upgrades(trial: ir.Trial, findings: list[UpgradeFinding], workdir: str | Path) -> int:
    """Store first sightings of each new release and open re-qualification flags. Returns new flags."""
    from .qualify import latest_decision

    code = trial.study.code if trial.study else ""
    con = connect(workdir)
    n = 0
    try:
        with tx(con):
            for f in findings:
                soft = "\\".join(f.software)
                con.execute("INSERT OR IGNORE INTO ops_software_upgrades VALUES (?,?,?,?,?,?,?,?)",
                            (code, f.site, f.device, soft, f.inventory_software, f.exam_key, f.exam_date,
                             json.dumps([asdict(c) for c in f.coverage], sort_keys=True)))
                for proto in f.requalify_protocols:
                    # A qualification already done on this very release settles the flag at once.
                    dec = latest_decision(con, code, f.site, f.device, proto)
                    resolved = dec["id"] if dec and dec["qualified"] and software_matches(dec["software"] or None, f.software) \
                        and dec["software"] else None
                    cur = con.execute("INSERT OR IGNORE INTO ops_requalification VALUES (?,?,?,?,?,?,?,?)",
                                      (code, f.site, f.device, proto, soft, f.exam_key, f.exam_date, resolved))
                    n += cur.rowcount if resolved is None else 0
    finally:
        con.close()
    return n
