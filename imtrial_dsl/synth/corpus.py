"""The corpus: subjects (with planted PHI), their visits on the schedule, the exams and series to write,
the injected deviations, and the manifest that records every one of them."""
from __future__ import annotations

import datetime as _dt
import json
import os
import random
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from .. import ir, source
from ..files import atomic_write_text
from ..runner.adherence import expected_text
from .scanners import DeviceIdent, header_params, ident_of, param_key, series_identity, software_versions, upgraded_release
from .values import violating_value
from .writer import ExamPlan, SeriesPlan, uid, write_series


DEVIATIONS = ("param_off", "wrong_device", "missing_visit", "ghosting", "corrupt_file", "unknown_device",
              "software_upgrade")

SIZES = {  # in-plane matrix, slices (None: cover 160 mm at the protocol's slice thickness)
    "small": (32, 12),
    "medium": (128, 48),
    "full": (256, None),
}


FIRST = ["ELENA", "JAMES", "AIKO", "MARIE", "OMAR", "LUCIA", "HENRIK", "PRIYA", "TOMAS", "GRACE", "KENJI", "SOFIA",
         "DAVID", "AMARA", "PIERRE", "YUKI", "NORA", "SAMUEL", "LEILA", "VICTOR"]
LAST = ["MARTINEZ", "OKONKWO", "TANAKA", "DUBOIS", "HALVORSEN", "NAKAMURA", "KOWALSKI", "FERREIRA", "LINDQVIST",
        "ABERNATHY", "MORETTI", "SCHNEIDER", "PATEL", "OYELARAN", "ROSSI", "YAMAMOTO"]
STREETS = ["Elm Street", "Rue des Lilas", "Sakura-dori", "Harbor Road", "Maple Avenue", "Via Roma"]


def make_subject(site: ir.Site, n: int, rng: random.Random, phi: bool) -> dict[str, Any]:
    sex = rng.choice(["F", "M"])
    birth = _dt.date(1945, 1, 1) + _dt.timedelta(days=rng.randrange(0, 365 * 30))
    subj = {"site": site.code, "index": n, "sex": sex, "birth_date": birth.isoformat(),
            "issuer": f"{site.code}-MRN"}
    if phi:
        first, last = rng.choice(FIRST), rng.choice(LAST)
        subj.update({
            "patient_id": f"{site.code[:1]}{rng.randrange(1000000, 9999999)}",
            "name": f"{last}^{first}^{rng.choice('ABCDEFGHJKLMNPRS')}",
            "address": f"{rng.randrange(2, 480)} {rng.choice(STREETS)}, {site.name.split()[0]}",
            "phone": f"+1-555-{rng.randrange(100, 999)}-{rng.randrange(1000, 9999)}",
            "other_id": f"INS{rng.randrange(10**8, 10**9)}",
        })
    else:
        subj.update({"patient_id": f"SYN-{site.code}-{n:03d}", "name": f"SYNTH^{site.code}{n:03d}"})
    return subj


def _shape(size: str, protocol: ir.Protocol, params: dict) -> tuple[int, int, int]:
    matrix, slices = SIZES[size]
    if slices is None:
        st = float(params.get("SpacingBetweenSlices", params.get("SliceThickness", 1.0)) or 1.0)
        slices = int(min(192, max(16, round(160 / st))))
    return slices, matrix, matrix


def _visit_date(rng: random.Random, baseline: _dt.date, v: ir.Visit, base_off: float) -> _dt.date:
    lo = -(v.window_before.days if v.window_before else 0)
    hi = v.window_after.days if v.window_after else 0
    jitter = rng.randint(int(lo / 2), int(hi / 2)) if hi > lo else 0
    return baseline + _dt.timedelta(days=int(v.offset.days - base_off + jitter))


def synthesize(trial: ir.Trial, out_dir: str | os.PathLike, *, subjects_per_site: int = 2, seed: int = 0,
               deviations: Sequence[str] = (), phi: bool = True, size: str = "medium", small: bool = False,
               enhanced: Optional[bool | Sequence[str]] = None, visits: Optional[Sequence[str]] = None,
               start_date: str = "2026-03-02", progress: Optional[Callable[[str, int], Any]] = None) -> dict[str, Any]:
    """Generate a multi-site, multi-subject, multi-visit DICOM corpus; returns (and writes) the manifest.

    ``deviations``: names from :data:`DEVIATIONS`, each injected once at a seeded place.
    ``size``: "small" (32x32x12, for tests), "medium" (128x128x48) or "full" (256x256, slices covering
    160 mm); ``small=True`` is ``size="small"``. ``enhanced``: None (default) writes what each device writes
    (Enhanced MR for Siemens syngo MR XA, classic MR Image Storage elsewhere); True every MR series as
    Enhanced MR (multi-frame, functional groups), False every one as classic; a list of protocol names
    writes those protocols as Enhanced MR and the others as classic MR.
    ``visits``: restrict to these schedule visits. Writes ``out_dir/manifest.json``.
    ``progress(desc, total)``: a progress display with ``update(n)``/``close()``, advanced per exam written.
    """
    size = "small" if small else size
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}")
    unknown = [d for d in deviations if d not in DEVIATIONS]
    if unknown:
        raise ValueError(f"unknown deviation(s) {unknown}; known: {', '.join(DEVIATIONS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    # an event-driven visit happens when its event does: only when asked for by name
    sched = [v for v in (trial.schedule.visits if trial.schedule else [])
             if (v.scheduled() if visits is None else v.name in visits)]
    if not sched:
        sched = [ir.Visit(name="baseline", kind="baseline", offset=ir.Days(days=0, source_value=0),
                          acquire=[ir.Ref(name=p.name) for p in trial.protocols])]
    base_off = next((v.offset.days for v in sched if v.kind == "baseline"), 0.0)
    start = _dt.date.fromisoformat(start_date)
    enh = set(p.name for p in trial.protocols if p.modality == "MR") if enhanced is True else \
        set(enhanced) if isinstance(enhanced, (list, tuple, set, frozenset)) else set()

    exams: list[ExamPlan] = []
    subjects: list[dict[str, Any]] = []
    for si, site in enumerate(trial.sites):
        if not site.devices:
            continue
        for n in range(1, subjects_per_site + 1):
            subj = make_subject(site, n, rng, phi)
            baseline = start + _dt.timedelta(days=si * 3 + (n - 1) * 11)
            subj["baseline"] = baseline.isoformat()
            subjects.append(subj)
            # windows count from the baseline exam actually done, so place it first
            base_visit = next((v for v in sched if v.kind == "baseline"), None)
            actual_base = _visit_date(rng, baseline, base_visit, base_off) if base_visit else baseline
            subj["baseline"] = actual_base.isoformat()
            for v in sched:
                # one exam per device: a hybrid PET/CT acquires its PT and CT series in one study;
                # 'acquire X at least N' is N series of X
                by_dev: dict[str, tuple[ir.Device, list[ir.Protocol]]] = {}
                for r in v.acquire:
                    p = trial.protocol(r.name)
                    dev = next((d for d in site.devices if d.acquires(p.modality)), None) if p is not None else None
                    if dev is not None:
                        by_dev.setdefault(dev.id, (dev, []))[1].extend([p] * max(r.at_least, 1))
                date = actual_base if v is base_visit else _visit_date(rng, actual_base, v, base_off)
                for dev, protos in by_dev.values():
                    exams.append(ExamPlan(subject=subj, visit=v, date=date, device=ident_of(site, dev, protos[0].modality),
                                          series=[SeriesPlan(protocol=p, number=0, params={}, description="",
                                                             image_type=[]) for p in protos]))
    manifest_devs: list[dict[str, Any]] = []
    followups = [e for e in exams if e.visit.kind == "followup"]
    used: set[int] = set()

    def pick(cands: list[ExamPlan]) -> Optional[ExamPlan]:
        free = [e for e in cands if id(e) not in used]
        if not free:
            return None
        e = rng.choice(free)
        used.add(id(e))
        return e

    def where(e: ExamPlan) -> dict[str, Any]:
        return {"site": e.subject["site"], "patient_id": e.subject["patient_id"], "subject_index": e.subject["index"],
                "visit": e.visit.name, "date": e.date.isoformat()}

    planned: dict[str, Any] = {}
    for dev_name in deviations:
        if dev_name == "missing_visit":
            # a follow-up that is not the subject's last visit, so its window has surely closed
            last = {}
            for e in exams:
                key = e.subject["patient_id"]
                last[key] = max(last.get(key, e.date), e.date)
            cands = [e for e in followups if e.date < last[e.subject["patient_id"]]] or followups
            e = pick(cands)
            if e is None:
                continue
            drop = [x for x in exams if x.subject is e.subject and x.visit is e.visit]
            for x in drop:
                used.add(id(x))
            planned.setdefault("missing", []).extend(drop)
            manifest_devs.append({"type": "missing_visit", **where(e), "detect": "schedule"})
        elif dev_name == "wrong_device":
            cands = [e for e in followups if any(d.acquires(e.device.modality) and d.id != e.device.device_id
                                                 for _, d in trial.devices())]
            e = pick(cands)
            if e is None:
                continue
            home = e.device.device_id
            same_site = [(s, d) for s, d in trial.devices() if d.acquires(e.device.modality) and d.id != home
                         and s.code == e.subject["site"]]
            others = same_site or [(s, d) for s, d in trial.devices() if d.acquires(e.device.modality) and d.id != home]
            s2, d2 = others[rng.randrange(len(others))]
            e.device = ident_of(s2, d2, e.device.modality)
            manifest_devs.append({"type": "wrong_device", **where(e), "device_used": d2.id, "home_device": home,
                                  "detect": "adherence:same_device"})
        elif dev_name == "unknown_device":
            e = pick(followups or exams)
            if e is None:
                continue
            d = e.device
            e.device = DeviceIdent(device_id=None, vendor=d.vendor, manufacturer=d.manufacturer,
                                   model={"Siemens": "MAGNETOM Skyra", "GE": "Discovery MR750",
                                          "Philips": "Achieva dStream"}.get(d.vendor, "Unlisted Scanner"),
                                   software=d.software, serial=f"X{rng.randrange(10**5, 10**6)}", station="LOANERMR",
                                   institution=d.institution, field_t=d.field_t, modality=d.modality)
            manifest_devs.append({"type": "unknown_device", **where(e), "model": e.device.model,
                                  "serial": e.device.serial, "station": e.device.station,
                                  "detect": "adherence:unknown_device"})
        elif dev_name == "software_upgrade":
            e = pick(followups or exams)
            if e is None:
                continue
            site = trial.site(e.subject["site"])
            inv = next(d for d in site.devices if d.id == e.device.device_id)
            new_rel = upgraded_release(inv.software)
            e.device = DeviceIdent(**{**e.device.__dict__, "software": software_versions(e.device.vendor, new_rel)})
            manifest_devs.append({"type": "software_upgrade", **where(e), "device": inv.id,
                                  "inventory": inv.software, "reported": e.device.software,
                                  "detect": "adherence:software_upgrade"})
        elif dev_name in ("param_off", "ghosting", "corrupt_file"):
            planned.setdefault(dev_name, 0)
            planned[dev_name] += 1

    missing = {id(x) for x in planned.get("missing", [])}
    exams = [e for e in exams if id(e) not in missing]

    # header values and identities, now that every exam has its device
    # a visit acquired on two modalities (e.g. MR and CT phantoms) is two studies in two folders
    n_mod: dict[tuple[str, str], int] = {}
    for e in exams:
        k = (e.subject["patient_id"], e.visit.name)
        n_mod[k] = n_mod.get(k, 0) + 1
    for e in exams:
        multi = n_mod[(e.subject["patient_id"], e.visit.name)] > 1
        tag = (e.device.modality,) if multi else ()
        e.study_uid = uid(seed, "study", e.subject["site"], e.subject["patient_id"], e.visit.name, *tag)
        e.dir = (f"{e.subject['site']}/{e.subject['patient_id']}/{e.date.strftime('%Y%m%d')}_{e.visit.name}"
                 + (f"_{e.device.modality}" if multi else ""))
        for i, sp in enumerate(e.series, start=1):
            sp.number = i * 100 + 1 if e.device.vendor == "Philips" else i + 1
            sp.enhanced = sp.protocol.modality == "MR" and (
                e.device.style.enhanced_mr if enhanced is None else sp.protocol.name in enh)
            sp.params, unsat, sp.hidden = header_params(sp.protocol, e.device, sp.enhanced)
            sp.description, sp.image_type = series_identity(trial, sp.protocol, e.device, sp.params, sp.enhanced)
            repeat = sum(x.protocol is sp.protocol for x in e.series[:i - 1])  # the 2nd, 3rd … series of 'at least N'
            sp.uid = uid(seed, "series", e.study_uid, sp.protocol.name, *([repeat] if repeat else []))
            if unsat:
                manifest_devs.append({"type": "note", **where(e), "protocol": sp.protocol.name,
                                      "detail": f"could not satisfy {unsat}"})

    clean = [e for e in exams if id(e) not in used]
    for _ in range(planned.get("param_off", 0)):
        cands = []
        for e in clean:
            for sp in e.series:
                cons, _ = ir.effective_constraints(sp.protocol, e.device.vendor, e.device.software, e.device.model,
                                                   site=e.device.site, device=e.device.device_id)
                ok = [c for c in cons if c.significance == ir.Significance.ERROR
                      and c.keyword not in {r.attribute for r in sp.protocol.match}
                      and violating_value(c, sp.params.get(param_key(c))) is not None]
                if ok:
                    cands.append((e, sp, ok))
        if not cands:
            break
        e, sp, ok = cands[rng.randrange(len(cands))]
        used.add(id(e))
        clean.remove(e)
        c = ok[rng.randrange(len(ok))]
        before = sp.params.get(param_key(c))
        sp.params[param_key(c)] = violating_value(c, before)
        manifest_devs.append({"type": "param_off", **where(e), "protocol": sp.protocol.name, "series_uid": sp.uid,
                              "parameter": source.parameter(c),
                              "value": sp.params[param_key(c)], "expected": expected_text(c),
                              "detect": "adherence:parameter"})
    ghost_checks = {t.name for q in trial.qc if q.metric == "ghosting" for t in q.targets}
    for _ in range(planned.get("ghosting", 0)):
        cands = [(e, sp) for e in clean for sp in e.series if sp.protocol.modality == "MR"]
        pref = [(e, sp) for e, sp in cands if sp.protocol.name in ghost_checks] or cands
        if not pref:
            break
        e, sp = pref[rng.randrange(len(pref))]
        used.add(id(e))
        clean.remove(e)
        sp.ghost = 0.25
        manifest_devs.append({"type": "ghosting", **where(e), "protocol": sp.protocol.name, "series_uid": sp.uid,
                              "amplitude": sp.ghost, "detect": "qc:ghosting"})
    for _ in range(planned.get("corrupt_file", 0)):
        cands = [(e, sp) for e in clean for sp in e.series if not sp.enhanced]
        if not cands:
            break
        e, sp = cands[rng.randrange(len(cands))]
        used.add(id(e))
        clean.remove(e)
        sp.corrupt = True
        manifest_devs.append({"type": "corrupt_file", **where(e), "protocol": sp.protocol.name, "series_uid": sp.uid,
                              "detect": "ingest/classify:truncated"})

    n_files = 0
    exam_entries = []
    phi_values: set[str] = set()
    bar = progress("synth", len(exams)) if progress else None
    for e in exams:
        entry = {**where(e), "study_uid": e.study_uid, "device": e.device.device_id, "device_identity": e.device.as_dict(),
                 "dir": e.dir, "series": []}
        for sp in e.series:
            shape = _shape(size, sp.protocol, sp.params)
            paths = write_series(e, sp, out, shape, phi, seed)
            n_files += len(paths)
            sp.files = [str(p.relative_to(out)) for p in paths]
            entry["series"].append({"protocol": sp.protocol.name, "series_uid": sp.uid, "series_number": sp.number,
                                    "description": sp.description, "enhanced": sp.enhanced, "files": sp.files,
                                    "shape": list(shape)})
            if sp.corrupt:
                for d in manifest_devs:
                    if d["type"] == "corrupt_file" and d["series_uid"] == sp.uid:
                        d["file"] = sp.files[len(sp.files) // 2]
        exam_entries.append(entry)
        if bar is not None:
            bar.update(1)
        if phi:
            s = e.subject
            phi_values.update([s["name"], s["patient_id"], s["address"], s["phone"], s["other_id"],
                               s["birth_date"].replace("-", "")])
    if bar is not None:
        bar.close()
    last_date = max(e.date for e in exams) if exams else start
    manifest = {
        "generator": "imtrial synth",
        "study": trial.study.code if trial.study else None,
        "source_sha256": trial.source_sha256,
        "seed": seed, "size": size, "phi": phi,
        "enhanced": sorted({sp.protocol.name for e in exams for sp in e.series if sp.enhanced}),
        "subjects_per_site": subjects_per_site,
        "as_of": (last_date + _dt.timedelta(days=60)).isoformat(),
        "subjects": [{k: v for k, v in s.items() if k in ("site", "index", "patient_id", "issuer", "baseline")}
                     for s in subjects],
        "exams": exam_entries,
        "deviations": [d for d in manifest_devs if d["type"] != "note"],
        "notes": [d for d in manifest_devs if d["type"] == "note"],
        "phi_values": sorted(phi_values),
        "files": n_files,
    }
    atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=2, sort_keys=True))
    return manifest
