"""Orchestration: run the per-exam pipeline over every exam of an inbox, resumably.

Phases: ingest (parallel inspection, serial bookkeeping) → identify (serial: the registry hands out
subject IDs) → per-exam steps in a process pool (deidentify, classify, adherence, qc, archive,
analyses) → measurements table → summary.

Resume semantics: every step's completion is committed to ``W/state.sqlite`` right after its outputs
are in place (write-temp-then-rename); a re-run skips what is recorded and redoes the rest, and every
step is idempotent (content-addressed placement, registry lookups before assignment, an archive that
never stores the same bytes twice). So ``kill -9`` at any point followed by a re-run archives every input
exactly once and loses nothing.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Callable, Optional

from ..diagnostics import ImtrialError
from .steps import STEPS, load_all

EXAM_STEPS = ("deidentify", "classify", "adherence", "qc", "archive", "analyses")
BATCH = 64


class RunLocked(ImtrialError):
    """Another ``imtrial run`` holds this workdir."""

    code = "E803"


def _quiet_pydicom() -> None:
    """pydicom warns for every out-of-spec value it reads (e.g. an over-long SH); in a run over thousands of
    files that drowns the summary, and such values are judged by the adherence step, not by the reader."""
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom\.")


def _die_with_parent() -> None:
    """Pool initializer: a worker must not outlive a killed run (it would race the next run)."""
    _quiet_pydicom()
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the per-exam lock still prevents two writers
        pass


def _lock(path: Path, *, wait: bool):
    """An exclusive flock on ``path`` (released when the returned file is closed or the process dies)."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    fh = open(path, "a+")
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        fh.close()
        return None
    return fh


class StepMissing(ImtrialError):
    """A pipeline step no module has registered (yet): the exam fails loudly at that step."""

    code = "E804"


def layout(workdir: Path) -> dict[str, Path]:
    w = Path(workdir)
    return {"workdir": w, "exams": w / "exams", "quarantine": w / "quarantine", "archive": w / "archive",
            "state": w / "state.sqlite", "csv": w / "measurements.csv", "json": w / "measurements.json"}


def _progress(total: int, desc: str, enabled: Optional[bool]):
    from tqdm import tqdm

    if enabled is None:
        enabled = sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit="item", file=sys.stderr, disable=not enabled, leave=False)


# ----------------------------------------------------------------------------- ingest

def ingest_inbox(trial, inbox: Path, workdir: Path, *, jobs: int = 1, move: bool = False,
                 progress: Optional[bool] = None, pool: Optional[ProcessPoolExecutor] = None) -> dict:
    """Ingest new inbox paths into the workdir; returns counts and the exam keys touched."""
    from .ingest import atomic_write_json, exam_summary, ingest_one, list_inbox, source_attrs_for
    from ..store import Store as State

    L = layout(workdir)
    st = State(workdir)
    inbox = Path(inbox).resolve()
    known = st.known_paths(inbox)
    todo, stats = [], {}
    for p, rel in list_inbox(inbox):
        stt = p.stat()
        stats[rel] = (stt.st_size, stt.st_mtime_ns)
        k = known.get(rel)
        if k is None or (k["size"], k["mtime_ns"]) != stats[rel]:  # new, or changed under the same name
            todo.append((p, rel))
    attrs = source_attrs_for(trial)
    counts = {"seen": len(stats), "new_paths": len(todo), "ingested": 0, "quarantined": 0, "duplicates": 0}
    touched: set[str] = set()
    pending: list[dict] = []
    moved: list[Path] = []

    def flush():
        if not pending:
            return
        now = time.time()
        with st.tx() as db:
            for rec in pending:
                row = db.execute("SELECT status, exam_key FROM files WHERE sha256=?", (rec["sha256"],)).fetchone()
                size, mtime = stats.get(rec["rel_path"], (rec["size"], None))
                db.execute("INSERT OR REPLACE INTO file_sources(inbox, rel_path, sha256, size, mtime_ns, seen) "
                           "VALUES (?, ?, ?, ?, ?, ?)", (str(inbox), rec["rel_path"], rec["sha256"], size, mtime, now))
                if row is not None:
                    counts["duplicates"] += 1
                    continue
                if rec["status"] == "quarantined":
                    counts["quarantined"] += 1
                    db.execute("INSERT INTO files(sha256, size, status, stored_path, reason, first_inbox, first_path, "
                               "first_seen) VALUES (?, ?, 'quarantined', ?, ?, ?, ?, ?)",
                               (rec["sha256"], rec["size"], str(Path(rec["stored_path"]).relative_to(L["workdir"])),
                                json.dumps(rec["reason"]), str(inbox), rec["rel_path"], now))
                    continue
                counts["ingested"] += 1
                key = rec["exam_key"]
                db.execute("INSERT INTO files(sha256, size, status, exam_key, series_uid, sop_uid, stored_path, header, "
                           "first_inbox, first_path, first_seen) VALUES (?, ?, 'ingested', ?, ?, ?, ?, ?, ?, ?, ?)",
                           (rec["sha256"], rec["size"], key, rec["series_uid"], rec["sop_uid"], rec["stored_path"],
                            json.dumps(rec["header"]), str(inbox), rec["rel_path"], now))
                # new content for an exam: everything after ingest must be redone for it
                db.execute("INSERT OR IGNORE INTO exams(exam_key, study_uid, created, updated) VALUES (?, ?, ?, ?)",
                           (key, rec["header"]["study_uid"], now, now))
                db.execute("UPDATE exams SET status='pending', generation=generation+1, updated=? WHERE exam_key=?", (now, key))
                db.execute("DELETE FROM steps WHERE exam_key=? AND step != 'identify'", (key,))
                touched.add(key)
        if move:
            for rec in pending:
                p = Path(inbox) / rec["rel_path"]
                if p.exists():
                    p.unlink()
        pending.clear()

    bar = _progress(len(todo), "ingest", progress)
    args = [(str(p), rel, str(L["exams"]), str(L["quarantine"]), attrs, None, move) for p, rel in todo]
    if pool is not None and len(args) > 1:
        futs = [pool.submit(ingest_one, *a) for a in args]
        for f in as_completed(futs):
            pending.append(f.result())
            bar.update(1)
            if len(pending) >= BATCH:
                flush()
    else:
        for a in args:
            pending.append(ingest_one(*a))
            bar.update(1)
            if len(pending) >= BATCH:
                flush()
    flush()
    bar.close()
    # exam.json for every exam that got files in this run, and for any left without one by a killed run
    for row in st.db.execute("SELECT exam_key FROM exams").fetchall():
        key = row["exam_key"]
        if key in touched or not (L["exams"] / key / "exam.json").exists():
            recs = [{"sha256": r["sha256"], "stored_path": r["stored_path"], "header": json.loads(r["header"])}
                    for r in st.db.execute("SELECT sha256, stored_path, header FROM files WHERE exam_key=? AND "
                                           "status='ingested'", (key,))]
            if recs:
                summary = exam_summary(key, recs)
                atomic_write_json(L["exams"] / key / "exam.json", summary)
                st.upsert_exam(key, n_series=len(summary["series"]), n_instances=summary["n_instances"])
                with st.tx() as db:
                    db.execute("DELETE FROM series WHERE exam_key=?", (key,))
                    for s in summary["series"]:
                        db.execute("INSERT INTO series(exam_key, series_uid, series_number, description, modality, "
                                   "n_instances) VALUES (?, ?, ?, ?, ?, ?)",
                                   (key, s["series_uid"], s["series_number"], s["description"], s["modality"], s["n_instances"]))
                st.set_step(key, "ingest", "done", {"instances": summary["n_instances"], "series": len(summary["series"])})
    counts["exams_touched"] = sorted(touched)
    st.close()
    return counts


# ----------------------------------------------------------------------------- identify

def identify_pending(trial, workdir: Path) -> dict:
    """Identify every exam that is not identified yet (serial: one registry, one sequence per site)."""
    from .identify import IdentifyError, identify_exam, later_exam_dates, unmatched_identity
    from .ingest import atomic_write_json
    from ..store import Store as State

    L = layout(workdir)
    st = State(workdir)
    out = {"identified": 0, "unmatched": [], "errors": []}
    rows = st.db.execute("SELECT e.exam_key FROM exams e LEFT JOIN steps s ON s.exam_key=e.exam_key AND s.step='identify' "
                         "WHERE s.status IS NULL OR s.status != 'done'").fetchall()
    exams = []
    for r in rows:
        p = L["exams"] / r["exam_key"] / "exam.json"
        if p.exists():
            exams.append(json.loads(p.read_text()))
    exams.sort(key=lambda e: (e.get("study_date") or "", e["exam_key"]))  # baselines before follow-ups
    later = later_exam_dates(trial, exams)
    for exam in exams:
        key = exam["exam_key"]
        ident_path = L["exams"] / key / "results" / "identity.json"
        t0 = time.time()
        try:
            res = identify_exam(trial, exam, st.db, exam_key=key, later=later.get(key))
        except IdentifyError as err:
            atomic_write_json(ident_path, unmatched_identity(trial, exam, err))
            status = "unmatched" if err.reason in ("unmatched", "no_source_identifier") else "failed"
            st.upsert_exam(key, status=status, warnings=[{"code": err.reason, "detail": err.detail}])
            st.set_step(key, "identify", "failed", {"error": err.reason, "detail": err.detail}, started=t0)
            (out["unmatched"] if status == "unmatched" else out["errors"]).append({"exam_key": key, "error": err.reason,
                                                                                   "detail": err.detail})
            continue
        atomic_write_json(ident_path, res["identity"])
        st.upsert_exam(key, shifted_date=res["identity"].get("shifted_date"))
        st.set_step(key, "identify", "done", {k: res["identity"][k] for k in ("subject_id", "site", "visit", "in_window")},
                    started=t0)
        out["identified"] += 1
    st.close()
    return out


# ----------------------------------------------------------------------------- per-exam steps

def call_step(name: str, trial, available: dict[str, Any]) -> dict:
    """Call a registered step with the parameters it declares, taken from ``available``."""
    spec = STEPS.get(name)
    if spec is None:
        raise StepMissing(f"step {name!r} is not registered (no module provides it yet)")
    kwargs = {}
    for p in spec.inputs + spec.outputs:
        if p.name in available and available[p.name] is not None:
            kwargs[p.name] = available[p.name]
        elif not p.optional:
            raise StepMissing(f"step {name!r} needs parameter {p.name!r} that the runner cannot provide")
    return spec.func(trial, **kwargs)


def _short(detail: Any) -> Any:
    """Keep step details small in the state DB (full outputs live in results/)."""
    if isinstance(detail, dict):
        return {k: (v if not isinstance(v, (list, dict)) or len(json.dumps(v, default=str)) < 2000 else f"<{len(v)} items>")
                for k, v in detail.items()}
    return detail


def process_subject(trial, workdir: str, exams: list[tuple[str, list[str], list[str]]]) -> list[dict]:
    """One subject's pending exams, in date order (each item: exam key, steps done, prior device ids)."""
    return [process_exam(trial, workdir, k, d, p) for k, d, p in exams]


def process_exam(trial, workdir: str, exam_key: str, done: list[str], prior_devices: list[str]) -> dict:
    """Run the remaining per-exam steps of one exam (in a worker process); records each step as it ends."""
    from ..store import Store as State

    load_all()
    L = layout(Path(workdir))
    E = L["exams"] / exam_key
    R = E / "results"
    lock = _lock(E / ".lock", wait=False)
    if lock is None:
        return {"exam_key": exam_key, "steps": {}, "status": "busy"}
    st = State(workdir)
    result = {"exam_key": exam_key, "steps": {}, "status": "done"}
    try:
        for name in EXAM_STEPS:
            if name in done:
                continue
            t0 = time.time()
            try:
                detail = _run_exam_step(name, trial, L, E, R, prior_devices, st)
            except Exception as exc:
                msg = f"{type(exc).__name__}: {exc}"
                st.set_step(exam_key, name, "failed", {"error": msg, "trace": traceback.format_exc(limit=3)}, started=t0)
                result["steps"][name] = "failed"
                result.update(status="failed", failed_step=name, error=msg)
                break
            st.set_step(exam_key, name, "done", _short(detail), started=t0)
            result["steps"][name] = "done"
        _record_exam(st, exam_key, R, result, trial)
    finally:
        st.close()
        lock.close()
    return result


def _run_exam_step(name: str, trial, L: dict, E: Path, R: Path, prior_devices: list[str], st) -> dict:
    if name == "deidentify":
        part = E / "deid.partial"
        if part.exists():
            shutil.rmtree(part)
        det = call_step("deidentify", trial, {"exam": str(E), "identity": str(R / "identity.json"), "out": str(part),
                                              "registry": str(L["state"]), "quarantine": str(L["quarantine"])})
        if (E / "deid").exists():
            shutil.rmtree(E / "deid")
        os.replace(part, E / "deid")
        _record_deid_quarantine(st, L, det)
        return det
    if name == "classify":
        return call_step("classify", trial, {"exam": str(E), "out": str(R / "classification.json")})
    if name == "adherence":
        return call_step("adherence", trial, {"exam": str(E), "classification": str(R / "classification.json"),
                                              "out": str(R / "adherence.json"), "prior_devices": ",".join(prior_devices)})
    if name == "qc":
        return call_step("qc", trial, {"exam": str(E), "classification": str(R / "classification.json"),
                                       "out": str(R / "qc.json")})
    if name == "archive":
        return call_step("archive", trial, {"exam": str(E), "results": str(R), "archive": str(L["archive"])})
    if name == "analyses":
        if not trial.analyses:
            return {"analyses": [], "done": [], "failed": []}
        det = call_step("analysis", trial, {"exam": str(E), "results": str(R), "out": str(E / "analyses")})
        _record_measurements(st, E.name, det)
        if det.get("failed"):
            reasons = "; ".join(f"{r['analysis']}: {r.get('reason')}" for r in det["analyses"] if r["status"] == "failed")
            raise RuntimeError(f"analysis failed: {reasons}")
        return det
    raise StepMissing(name)


def _record_deid_quarantine(st, L: dict, det: dict) -> None:
    """Files the de-identification refused (e.g. burned-in annotation) are quarantined, not lost."""
    now = time.time()
    with st.tx() as db:
        for q in (det or {}).get("quarantined", []) or []:
            sha = q.get("sha256")
            if not sha:
                continue
            reason = {"reason": q.get("reason"), "detail": q.get("detail"), "step": "deidentify"}
            db.execute("UPDATE files SET status='quarantined', reason=?, stored_path=? WHERE sha256=?",
                       (json.dumps(reason), f"quarantine/{sha}/file", sha))
            db.execute("UPDATE files SET first_seen=COALESCE(first_seen, ?) WHERE sha256=?", (now, sha))


def _record_measurements(st, exam_key: str, det: dict) -> None:
    from .analyses import measurement_rows

    now = time.time()
    with st.tx() as db:
        db.execute("DELETE FROM measurements WHERE exam_key=?", (exam_key,))
        for r in measurement_rows(det):
            db.execute("INSERT OR REPLACE INTO measurements(exam_key, subject, visit, site, protocol, analysis, measurement, "
                       "value, unit, series_uid, recorded) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (exam_key, r["subject"], r["visit"], r["site"], r["protocol"], r["analysis"], r["measurement"],
                        r["value"], r["unit"], r["series_uid"], now))


def _load(p: Path) -> Any:
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def _qualification_warning(trial, st, exam: dict, cls: Any) -> Optional[dict]:
    """Exams whose device is not qualified for a protocol that needs qualification (decisions of imtrial qualify)."""
    q = getattr(trial, "qualification", None)
    ident = _load(st.workdir / "exams" / exam["exam_key"] / "results" / "identity.json") or {}
    site, device = ident.get("exam_site") or exam.get("site"), exam.get("device")
    if not q or not q.protocols or not device or not isinstance(cls, dict):
        return None
    from .qualification import is_qualified
    needed = {r.name for r in q.protocols}
    present = sorted({s.get("protocol") for s in cls.get("series", []) if s.get("protocol") in needed})
    code = trial.study.code if trial.study else None
    missing = [p for p in present if not is_qualified(st.workdir, site, device, p, trial=code)]
    if not missing:
        return None
    return {"code": "unqualified_device", "detail": f"{device} is not qualified for {', '.join(missing)}",
            "source": "qualification"}


def _record_exam(st, exam_key: str, R: Path, result: dict, trial=None) -> None:
    """Copy per-series verdicts into the state DB and set the exam's status."""
    from .archive import _series_entry

    cls, adh, qc = (_load(R / f"{n}.json") for n in ("classification", "adherence", "qc"))
    exam = st.exam(exam_key) or {}
    findings = [{"code": f.get("code"), "detail": f.get("message") or f.get("detail") or "", "source": "adherence",
                 "severity": f.get("severity")} for f in ((adh or {}).get("findings", []) if isinstance(adh, dict) else [])]
    codes = {f["code"] for f in findings}
    # identify's own warnings, minus those the adherence step reports in more detail (e.g. unknown_device)
    warnings = [w for w in exam.get("warnings", []) if w.get("source") not in ("adherence", "qualification")
                and w.get("code") not in codes]
    warnings += findings
    qual = _qualification_warning(trial, st, exam, cls) if trial is not None and exam else None
    if qual:
        warnings.append(qual)
    has_audit = st.db.execute("SELECT 1 FROM sqlite_master WHERE name='deid_audit'").fetchone() is not None
    with st.tx() as db:
        cls_series = (cls or {}).get("series", []) if isinstance(cls, dict) else []
        if cls_series:  # from now on the series are the de-identified ones the results speak of
            db.execute("DELETE FROM series WHERE exam_key=?", (exam_key,))
        for s in cls_series:
            uid = s.get("series_uid")
            a, q = _series_entry(adh, uid), _series_entry(qc, uid)
            orig = db.execute("SELECT original FROM deid_audit WHERE kind='uid' AND pseudonym=?", (uid,)).fetchone() \
                if has_audit else None
            db.execute("INSERT OR IGNORE INTO series(exam_key, series_uid, original_series_uid) VALUES (?, ?, ?)",
                       (exam_key, uid, orig[0] if orig else None))
            db.execute("UPDATE series SET series_number=?, description=?, modality=?, n_instances=?, protocol=?, "
                       "classification=?, adherence=?, qc=? WHERE exam_key=? AND series_uid=?",
                       (s.get("series_number"), s.get("series_description"), s.get("modality"), s.get("n_instances"),
                        s.get("protocol"), json.dumps({k: s.get(k) for k in ("status", "protocol", "candidates")}),
                        json.dumps({"verdict": a.get("verdict"), "failed": [r.get("keyword") for r in a.get("parameters", [])
                                                                     if isinstance(r, dict) and r.get("ok") is False]}) if a else None,
                        json.dumps({"verdict": q.get("verdict"), "checks": [{"check": c.get("check"), "verdict": c.get("verdict"), "measured": c.get("measured")} for c in q.get("checks", [])]}) if q else None,
                        exam_key, uid))
        db.execute("UPDATE exams SET status=?, warnings=?, updated=? WHERE exam_key=?",
                   (result["status"], json.dumps(warnings), time.time(), exam_key))


# ----------------------------------------------------------------------------- the whole run

def preflight(trial) -> list[str]:
    """Problems that would fail every exam (e.g. a key the study names but the environment lacks)."""
    from .identify import IdentifyError, load_key

    problems = []
    for what, src in (("identifiers", trial.identifiers.key if trial.identifiers else None),
                      ("deidentify", trial.deidentify.key if trial.deidentify else None)):
        try:
            load_key(src)
        except IdentifyError as err:
            problems.append(f"{what}: {err.detail}")
    return sorted(set(problems))


def run_study(trial, *, inbox: str | Path, workdir: str | Path, jobs: int = 1, move: bool = False,
              progress: Optional[bool] = None, log: Callable[[str], None] = lambda s: None) -> dict:
    """Run everything that is not done yet; returns the summary (also stored in the ``runs`` table)."""
    load_all()
    _quiet_pydicom()
    workdir = Path(workdir).resolve()  # analyses run in their own cwd: every path they get is absolute
    inbox = Path(inbox).resolve()
    L = layout(workdir)
    for k in ("exams", "quarantine", "archive"):
        L[k].mkdir(parents=True, exist_ok=True)
    started = time.time()
    run_lock = _lock(workdir / ".run.lock", wait=False)
    if run_lock is None:
        raise RunLocked(f"another 'imtrial run' is using {workdir}")
    try:
        return _run_locked(trial, inbox, workdir, L, jobs, move, progress, log, started)
    finally:
        run_lock.close()


def _sweep_temp(workdir: Path) -> int:
    """Remove half-written temp files a killed run left behind (safe: we hold the workdir's run lock)."""
    n = 0
    for sub in ("exams", "quarantine", "archive"):
        for p in (workdir / sub).rglob(".*.tmp"):
            if p.is_file():
                p.unlink()
                n += 1
    for p in (workdir / "exams").glob("*/deid.partial"):
        shutil.rmtree(p, ignore_errors=True)
        n += 1
    return n


def _run_locked(trial, inbox, workdir: Path, L: dict, jobs: int, move: bool, progress, log, started: float) -> dict:
    from .analyses import write_table
    from ..store import Store as State

    swept = _sweep_temp(workdir)
    if swept:
        log(f"removed {swept} temporary file(s) left by an interrupted run")

    st = State(workdir)
    with st.tx() as db:
        cur = db.execute("INSERT INTO runs(started, study, study_sha256, inbox) VALUES (?, ?, ?, ?)",
                         (started, trial.source_file, trial.source_sha256, str(inbox)))
        run_id = cur.lastrowid
    st.close()
    # spawn, not fork: a forked worker inherits the parent's open SQLite file descriptors, and closing
    # them in the child drops the parent's POSIX locks, which corrupts the state database.
    pool = (ProcessPoolExecutor(max_workers=jobs, initializer=_die_with_parent,
                                mp_context=multiprocessing.get_context("spawn")) if jobs > 1 else None)
    try:
        ing = ingest_inbox(trial, Path(inbox), workdir, jobs=jobs, move=move, progress=progress, pool=pool)
        log(f"ingest: {ing['ingested']} new instance(s), {ing['quarantined']} quarantined, {ing['duplicates']} duplicate(s)")
        idn = identify_pending(trial, workdir)
        st = State(workdir)
        # one task per subject, its exams in date order: a follow-up's analyses may read the baseline's
        # outputs; different subjects are independent and run in parallel
        by_subject: dict[tuple, list] = {}
        for e in st.exams():
            if e["status"] in ("done", "unmatched") or e["steps"].get("identify", {}).get("status") != "done":
                continue
            done = [s for s, v in e["steps"].items() if v["status"] == "done"]
            prior = sorted({p["device"] for p in st.subject_exams(e["trial"], e["subject_id"])
                            if p["exam_key"] != e["exam_key"] and p["device"] and (p["exam_date"] or "") <= (e["exam_date"] or "")})
            by_subject.setdefault((e["trial"], e["subject_id"]), []).append((e["exam_key"], done, prior))
        st.close()
        tasks = list(by_subject.values())
        results: list[dict] = []
        bar = _progress(sum(len(t) for t in tasks), "exams", progress)
        if pool is not None and len(tasks) > 1:
            futs = [pool.submit(process_subject, trial, str(workdir), t) for t in tasks]
            for f in as_completed(futs):
                res = f.result()
                results.extend(res)
                bar.update(len(res))
        else:
            for t in tasks:
                res = process_subject(trial, str(workdir), t)
                results.extend(res)
                bar.update(len(res))
        bar.close()
    finally:
        if pool is not None:
            pool.shutdown()
    st = State(workdir)
    write_table(st.measurements(), L["csv"], L["json"])
    summary = summarize(st, ingest=ing, identify=idn, processed=results, started=started)
    with st.tx() as db:
        db.execute("UPDATE runs SET finished=?, summary=? WHERE id=?", (time.time(), json.dumps(summary, default=str), run_id))
    st.close()
    return summary


def summarize(st, *, ingest: Optional[dict] = None, identify: Optional[dict] = None, processed: Optional[list] = None,
              started: Optional[float] = None) -> dict:
    """Counts over the whole workdir (not only this run), plus what this run did."""
    exams = st.exams()
    series = [s for e in exams for s in e["series"]]

    def verdicts(kind: str) -> dict:
        out: dict[str, int] = {}
        for s in series:
            v = (s.get(kind) or {}).get("verdict") if s.get(kind) else None
            if v:
                out[v] = out.get(v, 0) + 1
        return out

    warn_counts: dict[str, int] = {}
    warn_list = []
    for e in exams:
        for w in e["warnings"]:
            code = w.get("code") or "warning"
            warn_counts[code] = warn_counts.get(code, 0) + 1
            warn_list.append({"exam_key": e["exam_key"], "subject": e["subject_id"], "visit": e["visit"], **w})
    failed = [{"exam_key": e["exam_key"], "subject": e["subject_id"],
               "step": next((n for n, v in e["steps"].items() if v["status"] == "failed"), None),
               "error": next((v["detail"].get("error") for v in e["steps"].values() if v["status"] == "failed"), None)}
              for e in exams if e["status"] == "failed"]
    cls: dict[str, int] = {}
    for s in series:
        c = (s.get("classification") or {}).get("status")
        if c:
            cls[c] = cls.get(c, 0) + 1
    quarantined = st.quarantined()
    q_reasons: dict[str, int] = {}
    for q in quarantined:
        r = (q["reason"] or {}).get("reason", "unknown")
        q_reasons[r] = q_reasons.get(r, 0) + 1
    return {
        "exams": len(exams), "subjects": len({(e["trial"], e["subject_id"]) for e in exams if e["subject_id"]}),
        "series": len(series), "instances": sum(e["n_instances"] or 0 for e in exams),
        "exam_status": {s: sum(e["status"] == s for e in exams) for s in sorted({e["status"] for e in exams})},
        "classification": cls, "adherence": verdicts("adherence"), "qc": verdicts("qc"),
        "quarantined": len(quarantined), "quarantine_reasons": q_reasons, "duplicates": len(st.duplicates()),
        "unmatched": [e["exam_key"] for e in exams if e["status"] == "unmatched"],
        "failed": failed, "warnings": warn_counts, "warning_list": warn_list,
        "measurements": len(st.measurements()),
        "this_run": {"ingest": {k: v for k, v in (ingest or {}).items() if k != "exams_touched"},
                     "identified": (identify or {}).get("identified", 0),
                     "exams_processed": len(processed or []),
                     "seconds": round(time.time() - started, 2) if started else None},
    }

