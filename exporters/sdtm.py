"""RECIST 1.1 tumour data as SDTM-shaped CSV tables: TU (tumour identification), TR (tumour results), RS (response).

``imtrial export sdtm STUDY -o DIR --workdir W`` reads what ``imtrial run`` recorded in workdir ``W``: every exam's
identity (subject, visit) and the result of the study's RECIST analysis (the one declaring a ``sum_diameters``
measurement, or ``analysis=NAME``). Lesion-level rows come from the analysis output's ``lesions`` list
(documented in ``docs/sdtm.md``); without it, TR holds the sums of diameters of the measurements table and TU
is empty. Responses are derived here, per RECIST 1.1 (Eisenhauer et al. 2009, section 4.3 and table 1), from
the sums: the baseline sum, the nadir, new lesions and the non-target lesions' state.

Variable names follow the SDTMIG oncology domains; result values (TUORRES, RSORRES, TUMETHOD, TULOC, units) are
submission values of CDISC Controlled Terminology (tests check them against the CT release the ``usdm``
package ships). No date leaves the site: ``--DTC`` stays empty (the sponsor's EDC holds the assessment dates).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from imtrial_dsl import ir
from imtrial_dsl.diagnostics import ImtrialError
from imtrial_dsl.files import atomic_write_text

from .inventory import to_csv

RSCAT = "RECIST 1.1"
# SDTM Method (C85492) submission values of the modalities
METHOD = {"CT": "CT SCAN", "MR": "MRI", "PT": "PET SCAN", "US": "ULTRASOUND", "XA": "ANGIOGRAPHY",
          "MG": "MAMMOGRAPHY", "DX": "DIGITAL RADIOGRAPHY", "CR": "COMPUTED RADIOGRAPHY"}
# lesion role in the analysis output -> TUORRES (Tumor Identification Test Results, C123650)
TU_RESULT = {"target": "TARGET", "non_target": "NON-TARGET", "new": "NEW"}
# non-target state in the analysis output -> TRORRES of TUMSTATE
NT_STATE = {"present": "PRESENT", "absent": "ABSENT", "unequivocal_progression": "UNEQUIVOCAL PROGRESSION"}

TU_COLUMNS = ["STUDYID", "DOMAIN", "USUBJID", "TUSEQ", "TULNKID", "TUTESTCD", "TUTEST", "TUORRES", "TUSTRESC",
              "TULOC", "TUMETHOD", "TUEVAL", "VISITNUM", "VISIT", "TUDTC"]
TR_COLUMNS = ["STUDYID", "DOMAIN", "USUBJID", "TRSEQ", "TRGRPID", "TRLNKID", "TRTESTCD", "TRTEST", "TRORRES",
              "TRORRESU", "TRSTRESC", "TRSTRESN", "TRSTRESU", "TRSTAT", "TRMETHOD", "TREVAL", "VISITNUM", "VISIT", "TRDTC"]
RS_COLUMNS = ["STUDYID", "DOMAIN", "USUBJID", "RSSEQ", "RSTESTCD", "RSTEST", "RSCAT", "RSORRES", "RSSTRESC",
              "RSEVAL", "VISITNUM", "VISIT", "RSDTC"]
RS_TESTS = {"TRGRESP": "Target Response", "NTRGRESP": "Non-target Response", "NEWLIND": "New Lesion Indicator",
            "OVRLRESP": "Overall Response"}


class SdtmError(ImtrialError):
    """The SDTM export cannot be made (no RECIST analysis, no workdir)."""

    code = "E630"


@dataclass
class Lesion:
    id: str
    role: str                      # target | non_target | new
    diameter: Optional[float]      # mm (targets: longest diameter, short axis for nodes); None = not measured
    location: str = ""
    nodal: bool = False
    state: str = ""                # non-targets: present | absent | unequivocal_progression


@dataclass
class Assessment:
    """One time point of one subject: what the RECIST analysis reported."""

    subject: str
    visit: str
    visitnum: int
    kind: str                      # the visit's kind (screening, baseline, followup, …)
    sum_diameters: Optional[float]
    new_lesions: Optional[float]
    lesions: list[Lesion] = field(default_factory=list)


@dataclass
class Response:
    visit: str
    target: str                    # CR PR SD PD NE
    non_target: str                # CR NON-CR/NON-PD PD NE, or "" without non-target lesions
    new: Optional[bool]
    overall: str
    sum_diameters: Optional[float]
    baseline_sum: float
    nadir: float


# ---------------------------------------------------------------------------- RECIST 1.1

def target_response(total: Optional[float], baseline: float, nadir: float, lesions: list[Lesion]) -> str:
    """RECIST 1.1 4.3.1: CR (every target gone; nodes < 10 mm short axis), PD (≥ 20 % and ≥ 5 mm over the nadir),
    PR (≥ 30 % below the baseline sum), else SD; NE when the sum (or a target lesion) was not measured."""
    targets = [x for x in lesions if x.role == "target"]
    if total is None or any(x.diameter is None for x in targets):
        return "NE"
    if total - nadir >= 5.0 - 1e-9 and total >= 1.2 * nadir - 1e-9:
        return "PD"
    if (targets and all((x.diameter < 10.0) if x.nodal else (x.diameter == 0) for x in targets)) or (not targets and total == 0):
        return "CR"
    if total <= 0.7 * baseline + 1e-9:
        return "PR"
    return "SD"


def non_target_response(lesions: list[Lesion]) -> str:
    """RECIST 1.1 4.3.2 from each non-target lesion's state; '' when there are none."""
    nts = [x for x in lesions if x.role == "non_target"]
    if not nts:
        return ""
    states = [x.state for x in nts]
    if "unequivocal_progression" in states:
        return "PD"
    if any(s not in NT_STATE for s in states):
        return "NE"
    return "CR" if all(s == "absent" for s in states) else "NON-CR/NON-PD"


def overall_response(target: str, non_target: str, new: Optional[bool]) -> str:
    """RECIST 1.1 table 1 (participants with target disease)."""
    if target == "PD" or non_target == "PD" or new:
        return "PD"
    if target == "CR":
        return "CR" if non_target in ("CR", "") and new is False else ("NE" if new is None else "PR")
    if target == "NE":
        return "NE"
    if target == "PR":
        return "PR" if new is False else "NE"
    return "SD" if new is False else "NE"


def responses(assessments: list[Assessment]) -> list[Response]:
    """The response of every post-baseline time point of one subject (assessments in visit order).

    Baseline: the ``baseline`` visit's assessment, else the last pre-treatment (``screening``) one; the nadir is
    the smallest sum so far, the baseline included."""
    pre = [a for a in assessments if a.kind in ("screening", "baseline") and a.sum_diameters is not None]
    base = next((a for a in pre if a.kind == "baseline"), pre[-1] if pre else None)
    if base is None:
        return []
    nadir = base.sum_diameters
    out = []
    for a in assessments:
        if a.visitnum <= base.visitnum:
            continue
        new = (a.new_lesions > 0) if a.new_lesions is not None else None
        if any(x.role == "new" for x in a.lesions):
            new = True
        t = target_response(a.sum_diameters, base.sum_diameters, nadir, a.lesions)
        nt = non_target_response(a.lesions)
        out.append(Response(a.visit, t, nt, new, overall_response(t, nt, new), a.sum_diameters, base.sum_diameters, nadir))
        if a.sum_diameters is not None:
            nadir = min(nadir, a.sum_diameters)
    return out


# ---------------------------------------------------------------------------- reading the workdir

def recist_analysis(trial: ir.Trial, name: Optional[str] = None) -> ir.Analysis:
    """The analysis the tables come from: ``name``, else the one declaring ``sum_diameters``."""
    if name:
        a = next((a for a in trial.analyses if a.name == name), None)
        if a is None:
            raise SdtmError(f"the study has no analysis {name!r}", hint="analyses: " + ", ".join(x.name for x in trial.analyses))
        return a
    cands = [a for a in trial.analyses if any(m.name == "sum_diameters" for m in a.measurements)]
    if len(cands) != 1:
        raise SdtmError("the SDTM export needs the RECIST analysis: " + (
            "no analysis declares a 'sum_diameters' measurement" if not cands else
            "several analyses declare 'sum_diameters' (" + ", ".join(a.name for a in cands) + ")"),
            hint="name it: imtrial export sdtm STUDY -o DIR --workdir W --analysis NAME")
    return cands[0]


def _num(v: Any) -> Optional[float]:
    if isinstance(v, dict):
        v = v.get("value")
    if v is None or isinstance(v, bool):
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def parse_lesions(doc: Any) -> list[Lesion]:
    """The ``lesions`` list of an analysis output (entries without an id or with an unknown role are skipped)."""
    out = []
    for x in (doc.get("lesions") if isinstance(doc, dict) else None) or []:
        if not isinstance(x, dict) or not x.get("id") or x.get("role") not in TU_RESULT:
            continue
        out.append(Lesion(id=str(x["id"]), role=x["role"], diameter=_num(x.get("diameter")),
                          location=str(x.get("location") or ""), nodal=bool(x.get("nodal")), state=str(x.get("state") or "")))
    return out


def assessments(trial: ir.Trial, workdir: Path | str, analysis: ir.Analysis) -> dict[str, list[Assessment]]:
    """Per subject, the RECIST analysis' time points in schedule order: sums and new lesions from the workdir's
    measurements table, lesions from the analysis output of the same exam."""
    from imtrial_dsl.store import Store, StoreError
    from imtrial_dsl.workdir import Workdir, analysis_dir

    w = Workdir(workdir)
    if not w.state_db.is_file():
        raise SdtmError(f"{workdir}: not an imtrial workdir (no state.sqlite)", hint="pass the workdir of 'imtrial run'")
    try:
        with Store(workdir, create=False) as st:
            rows = [r for r in st.measurements() if r["analysis"] == analysis.name]
    except StoreError as exc:
        raise SdtmError(f"{workdir}: cannot read the measurements table: {exc}") from None
    visits = trial.schedule.visits if trial.schedule else []
    order = {v.name: i + 1 for i, v in enumerate(visits)}
    kinds = {v.name: v.kind for v in visits}
    exams: dict[str, dict] = {}
    for r in rows:
        e = exams.setdefault(r["exam_key"], {"subject": r["subject"], "visit": r["visit"], "m": {}})
        e["m"][r["measurement"]] = r["value"]
    per: dict[str, list[Assessment]] = {}
    for key, e in exams.items():
        if not e["subject"] or not e["visit"]:
            continue
        adir = w.exam(key).path(analysis_dir(analysis.name))
        res = _load(adir / "result.json") or {}
        first = next(iter((res.get("outputs") or {}).values()), None)
        lesions = parse_lesions(_load(adir / first)) if first else []
        per.setdefault(e["subject"], []).append(Assessment(e["subject"], e["visit"], order.get(e["visit"], 0),
                                                           kinds.get(e["visit"], ""), _num(e["m"].get("sum_diameters")),
                                                           _num(e["m"].get("new_lesions")), lesions))
    return {s: sorted(a, key=lambda x: (x.visitnum, x.visit)) for s, a in sorted(per.items())}


def _load(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------------- the tables

def _fmt(v: Optional[float]) -> str:
    return "" if v is None else f"{v:.6g}"


def tables(trial: ir.Trial, per_subject: dict[str, list[Assessment]], analysis: ir.Analysis) -> dict[str, list[dict]]:
    """TU, TR and RS rows (dicts keyed by the SDTM variable names)."""
    study = trial.study.code if trial.study else "STUDY"
    mods = sorted({i.protocol.name for i in analysis.inputs if i.protocol is not None})
    modalities = sorted({p.modality for p in trial.protocols if p.name in mods})
    method = " / ".join(METHOD.get(m, m) for m in modalities)
    tu, tr, rs = [], [], []
    for sid, items in per_subject.items():
        seq = {"TU": 0, "TR": 0, "RS": 0}

        def add(rows, dom, **kv):
            seq[dom] += 1
            rows.append({"STUDYID": study, "DOMAIN": dom, "USUBJID": sid, f"{dom}SEQ": seq[dom], **kv})

        identified = set()
        for a in items:
            at = {"VISITNUM": a.visitnum, "VISIT": a.visit}
            for x in a.lesions:
                if x.id not in identified:
                    identified.add(x.id)
                    add(tu, "TU", TULNKID=x.id, TUTESTCD="TUMIDENT", TUTEST="Tumor Identification",
                        TUORRES=TU_RESULT[x.role], TUSTRESC=TU_RESULT[x.role], TULOC=x.location, TUMETHOD=method,
                        TUEVAL="", TUDTC="", **at)
            for x in a.lesions:
                if x.role == "target" or (x.role == "new" and x.diameter is not None):
                    add(tr, "TR", TRGRPID=x.role.upper(), TRLNKID=x.id, TRTESTCD="LDIAM", TRTEST="Longest Diameter",
                        TRORRES=_fmt(x.diameter), TRORRESU="mm" if x.diameter is not None else "",
                        TRSTRESC=_fmt(x.diameter), TRSTRESN=_fmt(x.diameter), TRSTRESU="mm" if x.diameter is not None else "",
                        TRSTAT="" if x.diameter is not None else "NOT DONE", TRMETHOD=method, TREVAL="", TRDTC="", **at)
                elif x.role == "non_target":
                    st = NT_STATE.get(x.state, "")
                    add(tr, "TR", TRGRPID="NON-TARGET", TRLNKID=x.id, TRTESTCD="TUMSTATE", TRTEST="Tumor State",
                        TRORRES=st, TRORRESU="", TRSTRESC=st, TRSTRESN="", TRSTRESU="", TRSTAT="" if st else "NOT DONE",
                        TRMETHOD=method, TREVAL="", TRDTC="", **at)
            add(tr, "TR", TRGRPID="TARGET", TRLNKID="", TRTESTCD="SUMDIAM", TRTEST="Sum of Diameter",
                TRORRES=_fmt(a.sum_diameters), TRORRESU="mm" if a.sum_diameters is not None else "",
                TRSTRESC=_fmt(a.sum_diameters), TRSTRESN=_fmt(a.sum_diameters),
                TRSTRESU="mm" if a.sum_diameters is not None else "", TRSTAT="" if a.sum_diameters is not None else "NOT DONE",
                TRMETHOD=method, TREVAL="", TRDTC="", **at)
        num = {a.visit: a.visitnum for a in items}
        for r in responses(items):
            values = {"TRGRESP": r.target, "NTRGRESP": r.non_target,
                      "NEWLIND": "" if r.new is None else ("Y" if r.new else "N"), "OVRLRESP": r.overall}
            for code, value in values.items():
                if code == "NTRGRESP" and not value:
                    continue
                add(rs, "RS", RSTESTCD=code, RSTEST=RS_TESTS[code], RSCAT=RSCAT, RSORRES=value, RSSTRESC=value,
                    RSEVAL="", VISITNUM=num[r.visit], VISIT=r.visit, RSDTC="")
    return {"TU": tu, "TR": tr, "RS": rs}


def export(trial: ir.Trial, graph: Any = None, out_dir: Path | str = ".", *, workdir: Path | str | None = None,
           analysis: Optional[str] = None) -> list[Path]:
    """Write ``<STUDY>_tu.csv``, ``_tr.csv`` and ``_rs.csv`` from workdir ``workdir``; ``graph`` is not used."""
    if workdir is None:
        raise SdtmError("the SDTM export reads what 'imtrial run' recorded: give the workdir",
                        hint="imtrial export sdtm STUDY -o DIR --workdir W")
    a = recist_analysis(trial, analysis)
    data = tables(trial, assessments(trial, workdir, a), a)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    code = trial.study.code if trial.study else "STUDY"
    written = []
    for dom, cols in (("TU", TU_COLUMNS), ("TR", TR_COLUMNS), ("RS", RS_COLUMNS)):
        p = out / f"{code}_{dom.lower()}.csv"
        atomic_write_text(p, to_csv(data[dom], cols))
        written.append(p)
    return written
