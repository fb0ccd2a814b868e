"""Step 1, ingest: verify each inbox file is usable DICOM, group by study/series, quarantine the rest.

Nothing is lost and nothing is skipped silently: every inbox file ends up either under
``<out>/<exam_key>/original/`` or under ``<quarantine>/<sha256>/`` with a machine-readable
``reason.json``. Stored names are content-addressed (sha256), so placing a file twice
is harmless — the property the runner's kill-and-resume guarantee rests on.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any, Iterable, Optional

from .steps import Param, step

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
NATIVE_SYNTAXES = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"}


def exam_key_for(study_uid: str) -> str:
    """Stable exam key: first 16 hex of sha256 of the original StudyInstanceUID."""
    return hashlib.sha256(study_uid.encode()).hexdigest()[:16]


def series_dir_for(series_uid: str) -> str:
    return hashlib.sha256(series_uid.encode()).hexdigest()[:16]


def atomic_write_bytes(path: Path, data: bytes, *, durable: bool = False) -> None:
    """Write-temp-then-rename, so a reader (or a re-run after kill -9) never sees half a file.

    ``durable`` also fsyncs (survives power loss, not only a killed process); the runner asks for it
    when the inbox copy is about to be deleted (``--move``).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        if durable:
            fh.flush()
            os.fsync(fh.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


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
        "study_date": str(ds.get("StudyDate", "") or ds.get("SeriesDate", "") or ds.get("AcquisitionDate", "")
                          or ds.get("ContentDate", "") or ""),
        "device": {k: _text(ds.get(v)) for k, v in DEVICE_ATTRS.items()},
        "patient": {a: _text(ds.get(a)) for a in source_attrs if a},
    }
    return {"ok": True, "header": header}


def _int(v: Any) -> Optional[int]:
    try:
        return int(v)
    except (TypeError, ValueError):
        return None


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def ingest_one(src: str | Path, rel: str, out: str | Path, quarantine: str | Path,
               source_attrs: Iterable[str] = ("PatientID", "IssuerOfPatientID"),
               known: Optional[dict] = None, durable: bool = False) -> dict:
    """Inspect one inbox file and place it (idempotently); returns a record for the state DB.

    ``known`` maps sha256 -> an earlier record: content already placed is not copied again.
    """
    src = Path(src)
    data = src.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
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
    devices = {json.dumps(r["header"]["device"], sort_keys=True) for r in recs}
    return {
        "exam_key": exam_key, "study_uid": first["study_uid"], "study_date": first.get("study_date", ""),
        "patient": first.get("patient", {}), "device": first["device"],
        "devices_differ": len(devices) > 1,
        "series": list(series.values()), "n_instances": sum(s["n_instances"] for s in series.values()),
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


@step("ingest",
      inputs=[Param("inbox", "directory", "Folder of incoming files (left untouched unless move)"),
              Param("move", "bool", "Delete inbox files once placed", optional=True)],
      outputs=[Param("out", "directory", "Exams: <exam_key>/original/… and exam.json"),
               Param("quarantine", "directory", "Rejected files: <sha256>/{file,reason.json}")])
def ingest(trial, inbox, out, quarantine, move: bool = False) -> dict:
    """Verify inbox files are DICOM, group them by study into exams, quarantine the rest."""
    out, quarantine = Path(out), Path(quarantine)
    out.mkdir(parents=True, exist_ok=True)
    quarantine.mkdir(parents=True, exist_ok=True)
    attrs = source_attrs_for(trial)
    seen: dict[str, str] = {}
    by_exam: dict[str, list[dict]] = {}
    quarantined, duplicates = [], []
    for path, rel in list_inbox(inbox):
        rec = ingest_one(path, rel, out, quarantine, attrs, known=seen, durable=move)
        if rec["status"] == "duplicate":
            duplicates.append({"path": rel, "of": rec["of"]})
            continue
        seen[rec["sha256"]] = rel
        if rec["status"] == "quarantined":
            quarantined.append({"path": rel, "sha256": rec["sha256"], "reason": rec["reason"]["reason"]})
        else:
            by_exam.setdefault(rec["exam_key"], []).append(rec)
    for key, recs in by_exam.items():
        existing = out / key / "exam.json"
        merged = list(recs)
        if existing.exists():  # another ingest batch already placed files of this study: keep them listed
            merged += _records_from_exam_json(json.loads(existing.read_text()), {r["sha256"] for r in recs})
        atomic_write_json(existing, exam_summary(key, merged))
    if move:
        for path, _rel in list_inbox(inbox):
            path.unlink()
    return {"exams": sorted(by_exam), "instances": sum(len(v) for v in by_exam.values()),
            "quarantined": quarantined, "duplicates": duplicates}


def _records_from_exam_json(exam: dict, skip: set[str]) -> list[dict]:
    """Minimal records for files an earlier batch placed, from its exam.json."""
    recs = []
    for s in exam.get("series", []):
        for f in s["files"]:
            sha = Path(f).stem
            if sha in skip:
                continue
            recs.append({"sha256": sha, "stored_path": f, "header": {
                "series_uid": s["series_uid"], "series_number": s.get("series_number"),
                "series_description": s.get("description", ""), "modality": s["modality"], "instance_number": None,
                "study_uid": exam["study_uid"], "study_date": exam.get("study_date", ""),
                "device": exam.get("device", {}), "patient": exam.get("patient", {})}})
    return recs
