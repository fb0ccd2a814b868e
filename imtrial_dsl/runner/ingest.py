"""Step 1, ingest: verify each inbox file is usable DICOM, group by study/series, quarantine the rest.

Nothing is lost and nothing is skipped silently: every inbox file ends up either under
``<out>/<exam_key>/original/`` or under ``<quarantine>/<sha256>/`` with a machine-readable
``reason.json``. Stored names are content-addressed (sha256), so placing a file twice
is harmless — the property the runner's kill-and-resume guarantee rests on.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import os
import time
from pathlib import Path
from typing import Any, Iterable, Optional

from ..files import atomic_write_bytes, atomic_write_json, sha256_bytes

ESSENTIALS = ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Modality", "SOPClassUID")
DEVICE_ATTRS = {
    "manufacturer": "Manufacturer", "model": "ManufacturerModelName", "serial": "DeviceSerialNumber",
    "station": "StationName", "software": "SoftwareVersions", "institution": "InstitutionName", "modality": "Modality",
}
# Quarantine reason codes (documented in docs/runner.md)
REASONS = {
    "empty": "the file is empty",
    "not_dicom": "not a DICOM file (no Part-10 preamble and no readable dataset)",
    "unreadable": "DICOM parsing failed",
    "truncated": "pixel data shorter than the image attributes declare (or missing)",
    "missing_essentials": "a required identifying attribute is missing or empty",
    "dicomdir": "a DICOMDIR media directory, not an instance",
}
BATCH = 64  # records per state-DB transaction
NATIVE_SYNTAXES = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"}


def exam_key_for(study_uid: str) -> str:
    """Stable exam key: first 16 hex of sha256 of the original StudyInstanceUID."""
    return hashlib.sha256(study_uid.encode()).hexdigest()[:16]


def series_dir_for(series_uid: str) -> str:
    return hashlib.sha256(series_uid.encode()).hexdigest()[:16]


def _text(value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return [str(v) for v in value]
    return str(value)


def _expected_pixel_bytes(ds) -> Optional[int]:
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        bits = int(ds.BitsAllocated)
        spp = int(ds.get("SamplesPerPixel", 1) or 1)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (AttributeError, TypeError, ValueError):
        return None
    if bits == 1:
        return (rows * cols * frames * spp + 7) // 8
    return rows * cols * spp * frames * (bits // 8)


WORKLIST_ATTRS = ("AccessionNumber", "ClinicalTrialProtocolID", "ClinicalTrialSiteID", "ClinicalTrialSubjectID",
                  "ClinicalTrialTimePointID")


def check_dataset(data: bytes, source_attrs: Iterable[str] = ("PatientID", "IssuerOfPatientID")) -> dict:
    """Inspect one file's bytes: ``{"ok": True, "header": {...}}`` or ``{"ok": False, "reason", "detail"}``."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    if not data:
        return {"ok": False, "reason": "empty", "detail": REASONS["empty"]}
    has_preamble = len(data) >= 132 and data[128:132] == b"DICM"
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=not has_preamble)
    except InvalidDicomError as exc:
        return {"ok": False, "reason": "not_dicom", "detail": str(exc)}
    except Exception as exc:  # pydicom raises many types for damaged input; each one is a quarantine reason
        return {"ok": False, "reason": "unreadable" if has_preamble else "not_dicom", "detail": f"{type(exc).__name__}: {exc}"}
    try:
        if str(getattr(ds.file_meta, "MediaStorageSOPClassUID", "")) == "1.2.840.10008.1.3.10":
            return {"ok": False, "reason": "dicomdir", "detail": REASONS["dicomdir"]}
    except AttributeError:
        pass
    try:
        missing = [k for k in ESSENTIALS if not str(ds.get(k, "") or "").strip()]
    except Exception as exc:
        return {"ok": False, "reason": "unreadable" if has_preamble else "not_dicom", "detail": f"{type(exc).__name__}: {exc}"}
    if missing:
        if not has_preamble and len(missing) == len(ESSENTIALS):
            return {"ok": False, "reason": "not_dicom", "detail": REASONS["not_dicom"]}
        return {"ok": False, "reason": "missing_essentials", "detail": f"missing or empty: {', '.join(missing)}",
                "missing": missing}
    if "Rows" in ds and "Columns" in ds and ("BitsAllocated" in ds):
        try:
            pixel = ds.get("PixelData", None) if "PixelData" in ds else None
        except Exception as exc:
            return {"ok": False, "reason": "truncated", "detail": f"pixel data unreadable: {exc}"}
        if pixel is None and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
            return {"ok": False, "reason": "truncated", "detail": "image attributes present but no pixel data"}
        ts = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "1.2.840.10008.1.2") or "1.2.840.10008.1.2")
        expected = _expected_pixel_bytes(ds)
        if pixel is not None and ts in NATIVE_SYNTAXES and expected is not None and len(pixel) < expected:
            return {"ok": False, "reason": "truncated",
                    "detail": f"pixel data has {len(pixel)} bytes, the image attributes declare {expected}"}
    header = {
        "sop_uid": str(ds.SOPInstanceUID), "sop_class": str(ds.SOPClassUID),
        "study_uid": str(ds.StudyInstanceUID), "series_uid": str(ds.SeriesInstanceUID),
        "modality": str(ds.Modality), "series_number": _int(ds.get("SeriesNumber")),
        "instance_number": _int(ds.get("InstanceNumber")), "series_description": str(ds.get("SeriesDescription", "") or ""),
        "study_date": _exam_date(ds),
        "device": {k: _text(ds.get(v)) for k, v in DEVICE_ATTRS.items()},
        "patient": {a: _text(ds.get(a)) for a in source_attrs if a},
    }
    # what a Modality Worklist gave the scanner (identify checks it against the registry)
    worklist = {a: _text(ds.get(a)) for a in WORKLIST_ATTRS if str(ds.get(a, "") or "").strip()}
    if worklist:
        header["worklist"] = worklist
    return {"ok": True, "header": header}


def _exam_date(ds) -> str:
    """The first usable of StudyDate, SeriesDate, AcquisitionDate, ContentDate (YYYYMMDD); when none is
    usable, the first one written (e.g. United Imaging's '***'), so identify can say what it found."""
    written = [str(ds.get(k, "") or "").strip() for k in ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate")]
    for d in written:
        if len(d) == 8 and d.isdigit():
            try:
                _dt.date(int(d[:4]), int(d[4:6]), int(d[6:]))
                return d
            except ValueError:
                continue
    return next((d for d in written if d), "")


def _int(v: Any) -> Optional[int]:
    try:
        return int(v)
    except (TypeError, ValueError):
        return None


def ingest_one(src: str | Path, rel: str, out: str | Path, quarantine: str | Path,
               source_attrs: Iterable[str] = ("PatientID", "IssuerOfPatientID"),
               known: Optional[dict] = None, durable: bool = False) -> dict:
    """Inspect one inbox file and place it (idempotently); returns a record for the state DB.

    ``known`` maps sha256 -> an earlier record: content already placed is not copied again.
    """
    src = Path(src)
    data = src.read_bytes()
    sha = sha256_bytes(data)
    rec: dict[str, Any] = {"sha256": sha, "rel_path": rel, "size": len(data)}
    if known is not None and sha in known:
        return {**rec, "status": "duplicate", "of": known[sha]}
    res = check_dataset(data, source_attrs)
    if not res["ok"]:
        qdir = Path(quarantine) / sha
        reason = {"reason": res["reason"], "detail": res["detail"], "original_path": rel, "size": len(data),
                  "sha256": sha}
        if "missing" in res:
            reason["missing"] = res["missing"]
        atomic_write_bytes(qdir / "file", data, durable=durable)
        atomic_write_json(qdir / "reason.json", reason)
        return {**rec, "status": "quarantined", "reason": reason, "stored_path": str(qdir / "file")}
    h = res["header"]
    key = exam_key_for(h["study_uid"])
    rel_store = f"original/{series_dir_for(h['series_uid'])}/{sha}.dcm"
    dest = Path(out) / key / rel_store
    if not (dest.exists() and dest.stat().st_size == len(data)):
        atomic_write_bytes(dest, data, durable=durable)
    return {**rec, "status": "ingested", "exam_key": key, "series_uid": h["series_uid"], "sop_uid": h["sop_uid"],
            "stored_path": rel_store, "header": h}


def exam_summary(exam_key: str, records: list[dict]) -> dict:
    """exam.json content from the ingested records of one study (site-side: holds source identifiers)."""
    recs = sorted(records, key=lambda r: ((r["header"].get("series_number") or 0), r["header"]["series_uid"],
                                          (r["header"].get("instance_number") or 0), r["sha256"]))
    first = recs[0]["header"]
    series: dict[str, dict] = {}
    for r in recs:
        h = r["header"]
        s = series.setdefault(h["series_uid"], {
            "series_uid": h["series_uid"], "series_number": h.get("series_number"), "description": h.get("series_description", ""),
            "modality": h["modality"], "dir": f"original/{series_dir_for(h['series_uid'])}", "files": []})
        if r["stored_path"] not in s["files"]:
            s["files"].append(r["stored_path"])
    for s in series.values():
        s["n_instances"] = len(s["files"])
    # a non-image instance (a scanner's protocol report, an SR) often names only the manufacturer: a
    # missing field agrees with every value; two different values of one field are two devices (the
    # modality is not the device's: one scanner writes MR images and an SR report, a PET/CT writes both)
    device: dict[str, Any] = {}
    differ = False
    for r in recs:
        for k, v in r["header"]["device"].items():
            if k == "modality":
                device.setdefault(k, v)
            elif v in (None, "", []):
                device.setdefault(k, v)
            elif device.get(k) in (None, "", []):
                device[k] = v
            elif device[k] != v:
                differ = True
    return {
        "exam_key": exam_key, "study_uid": first["study_uid"], "study_date": first.get("study_date", ""),
        "patient": first.get("patient", {}), "device": device,
        "devices_differ": differ,
        "series": list(series.values()), "n_instances": sum(s["n_instances"] for s in series.values()),
        **({"worklist": first["worklist"]} if first.get("worklist") else {}),
    }


def list_inbox(inbox: str | Path) -> list[tuple[Path, str]]:
    """Every regular file under the inbox (hidden files too: nothing is skipped), sorted by relative path."""
    inbox = Path(inbox)
    out = []
    for root, dirs, files in os.walk(inbox, followlinks=True):
        dirs.sort()
        for name in sorted(files):
            p = Path(root) / name
            if p.is_file():
                out.append((p, p.relative_to(inbox).as_posix()))
    return out


def source_attrs_for(trial) -> list[str]:
    ids = getattr(trial, "identifiers", None) if trial is not None else None
    attrs = list(ids.source) if ids and ids.source else ["PatientID"]
    issuer = ids.issuer if ids else "IssuerOfPatientID"
    if issuer and issuer not in attrs:
        attrs.append(issuer)
    return attrs


def ingest_inbox(trial, inbox: str | Path, workdir: str | Path, *, move: bool = False, pool=None,
                 progress=None, store=None) -> dict:
    """Ingest the inbox paths not seen before into the workdir; returns what happened to each.

    Every inbox path is recorded (``file_sources``), every distinct content once (``files``): placed under
    its exam, or quarantined with a reason. A path whose size and mtime are unchanged since it was last
    seen is not read again. New content for an exam rewrites its ``exam.json`` (the runner then redoes
    the exam's steps whose inputs changed). With ``move``, an inbox file is deleted only after its record
    is committed and its copy is durable.
    """
    from ..store import Store
    from ..workdir import Workdir

    W = Workdir(workdir).create()
    st = store or Store(W.root)
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
    out: dict[str, Any] = {"seen": len(stats), "new_paths": len(todo), "ingested": 0, "quarantined": 0,
                           "duplicates": 0, "quarantined_files": [], "duplicate_files": []}
    touched: set[str] = set()
    pending: list[dict] = []

    def flush() -> None:
        if not pending:
            return
        now = time.time()
        with st.tx() as db:
            for rec in pending:
                row = db.execute("SELECT first_path FROM files WHERE sha256=?", (rec["sha256"],)).fetchone()
                size, mtime = stats.get(rec["rel_path"], (rec["size"], None))
                db.execute("INSERT OR REPLACE INTO file_sources(inbox, rel_path, sha256, size, mtime_ns, seen) "
                           "VALUES (?, ?, ?, ?, ?, ?)", (str(inbox), rec["rel_path"], rec["sha256"], size, mtime, now))
                if row is not None:
                    out["duplicates"] += 1
                    out["duplicate_files"].append({"path": rec["rel_path"], "of": row["first_path"]})
                    continue
                if rec["status"] == "quarantined":
                    out["quarantined"] += 1
                    out["quarantined_files"].append({"path": rec["rel_path"], "sha256": rec["sha256"],
                                                     "reason": rec["reason"]["reason"]})
                    db.execute("INSERT INTO files(sha256, size, status, stored_path, reason, first_inbox, first_path, "
                               "first_seen) VALUES (?, ?, 'quarantined', ?, ?, ?, ?, ?)",
                               (rec["sha256"], rec["size"], str(Path(rec["stored_path"]).relative_to(W.root)),
                                json.dumps(rec["reason"]), str(inbox), rec["rel_path"], now))
                    continue
                out["ingested"] += 1
                key = rec["exam_key"]
                db.execute("INSERT INTO files(sha256, size, status, exam_key, series_uid, sop_uid, stored_path, header, "
                           "first_inbox, first_path, first_seen) VALUES (?, ?, 'ingested', ?, ?, ?, ?, ?, ?, ?, ?)",
                           (rec["sha256"], rec["size"], key, rec["series_uid"], rec["sop_uid"], rec["stored_path"],
                            json.dumps(rec["header"]), str(inbox), rec["rel_path"], now))
                db.execute("INSERT OR IGNORE INTO exams(exam_key, study_uid, created, updated) VALUES (?, ?, ?, ?)",
                           (key, rec["header"]["study_uid"], now, now))
                db.execute("UPDATE exams SET status='pending', generation=generation+1, updated=? WHERE exam_key=?",
                           (now, key))
                touched.add(key)
        if move:
            for rec in pending:
                p = inbox / rec["rel_path"]
                if p.exists():
                    p.unlink()
        pending.clear()

    bar = progress("ingest", len(todo)) if progress else None
    args = [(str(p), rel, str(W.exams), str(W.quarantine), attrs, None, move) for p, rel in todo]
    results = (pool.map(ingest_one, *zip(*args), chunksize=16) if pool is not None and len(args) > 1
               else (ingest_one(*a) for a in args))
    for rec in results:
        pending.append(rec)
        if bar:
            bar.update(1)
        if len(pending) >= BATCH:
            flush()
    flush()
    if bar:
        bar.close()
    # exam.json for every exam that got files now, and for any a killed run left without one
    for row in st.db.execute("SELECT exam_key FROM exams").fetchall():
        key = row["exam_key"]
        exam_json = W.exam(key).exam_json
        if key in touched or not exam_json.exists():
            recs = [{"sha256": r["sha256"], "stored_path": r["stored_path"], "header": json.loads(r["header"])}
                    for r in st.db.execute("SELECT sha256, stored_path, header FROM files WHERE exam_key=? AND "
                                           "status='ingested'", (key,))]
            if not recs:
                continue
            summary = exam_summary(key, recs)
            atomic_write_json(exam_json, summary)
            with st.tx() as db:
                db.execute("UPDATE exams SET n_series=?, n_instances=?, exam_date=COALESCE(exam_date, ?), updated=? "
                           "WHERE exam_key=?", (len(summary["series"]), summary["n_instances"],
                                                summary["study_date"] or None, time.time(), key))
                db.execute("DELETE FROM series WHERE exam_key=?", (key,))
                for s in summary["series"]:
                    db.execute("INSERT INTO series(exam_key, series_uid, series_number, description, modality, "
                               "n_instances) VALUES (?, ?, ?, ?, ?, ?)",
                               (key, s["series_uid"], s["series_number"], s["description"], s["modality"], s["n_instances"]))
    out["exams_touched"] = sorted(touched)
    if store is None:
        st.close()
    return out


def exam_content_hash(store, exam_key: str) -> str:
    """What an exam's ingested content is: one hash over its instances' sha256s (the root of its fingerprints)."""
    rows = store.db.execute("SELECT sha256 FROM files WHERE exam_key=? AND status='ingested' ORDER BY sha256",
                            (exam_key,)).fetchall()
    return sha256_bytes("\n".join(r["sha256"] for r in rows).encode())


def ingest_step(ctx) -> dict:
    """The ``ingest`` study step: the inbox into the workdir (``ctx.inbox``; ``--move`` deletes what is safe)."""
    return ingest_inbox(ctx.trial, ctx.inbox, ctx.workdir.root, move=ctx.move, pool=ctx.pool,
                        progress=ctx.progress, store=ctx.store)
