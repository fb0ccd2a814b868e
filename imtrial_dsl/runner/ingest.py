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
    "truncated_header": "the file ends inside its header (File Meta Information or a data element before Pixel Data)",
    "corrupt_header": "the bytes after the DICM prefix are not a DICOM File Meta Information group",
    "undecodable": "the pixel data's transfer syntax cannot be decoded (no decoder, or the encoded stream is damaged)",
    "missing_essentials": "a required identifying attribute is missing or empty",
    "dicomdir": "a DICOMDIR media directory, not an instance",
}
# Inbox entries that are not files with content: never read, each listed in the run summary with one of these.
SKIP_REASONS = {
    "fifo": "a named pipe (FIFO): reading it would block, so it is not read",
    "socket": "a socket, not a file",
    "device": "a device node, not a file",
    "dangling_symlink": "a symbolic link whose target does not exist",
    "symlink_loop": "a symbolic link that resolves to itself (too many levels of links)",
    "directory_loop": "a link to a folder that contains it: the folder is listed once, not again through the link",
    "directory_seen": "a link to a folder already listed under another path: listed once",
    "unreadable": "the entry could not be read (permissions or an I/O error)",
}
BATCH = 64  # records per state-DB transaction
NATIVE_SYNTAXES = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"}


def exam_key_for(study_uid: str, patient: Optional[dict] = None) -> str:
    """Stable exam key: first 16 hex of sha256 of the original StudyInstanceUID and the instance's patient
    identifiers (the study's source attributes and issuer). One study = one patient: instances of one study that
    name different patients (or none) become separate exams, each identified on its own."""
    who = "\x00".join(f"{k}={v}" for k, v in sorted((patient or {}).items()) if v not in (None, "", []))
    return hashlib.sha256(f"{study_uid}\x00{who}".encode()).hexdigest()[:16]


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


# VRs whose explicit-VR element header has a 4-byte length (PS3.5 7.1.2)
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
_VRS = _LONG_VRS | {b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FD", b"FL", b"IS", b"LO", b"LT", b"PN",
                    b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US"}


def _meta_problem(data: bytes) -> Optional[tuple[str, str]]:
    """Walk the File Meta Information after ``DICM`` (always explicit VR little endian, group 0002):
    ``(reason, detail)`` when it is cut short or is not DICOM at all, else None."""
    import struct

    off, n, has_ts = 132, 0, False
    while True:
        if off == len(data):
            return ("truncated_header", f"the file ends after the File Meta Information, at byte {off}: no data set")\
                if n else ("truncated_header", "the file ends right after the DICM prefix")
        if off + 8 > len(data):
            return "truncated_header", f"the file ends inside an element header at byte {off} ({len(data) - off} byte(s) left)"
        group, elem = struct.unpack_from("<HH", data, off)
        if group != 0x0002:
            if n == 0:
                return "corrupt_header", (f"the bytes after DICM are not File Meta Information: first tag "
                                          f"({group:04X},{elem:04X}) at byte 132 is not in group 0002")
            if not has_ts:
                return "corrupt_header", "the File Meta Information has no Transfer Syntax UID (0002,0010)"
            return None
        vr = data[off + 4:off + 6]
        if vr not in _VRS:
            return "corrupt_header", (f"File Meta element ({group:04X},{elem:04X}) at byte {off} has no valid VR "
                                      f"(bytes {vr.hex()})")
        if vr in _LONG_VRS:
            if off + 12 > len(data):
                return "truncated_header", f"the file ends inside the header of element ({group:04X},{elem:04X}) at byte {off}"
            length, head = struct.unpack_from("<I", data, off + 8)[0], 12
        else:
            length, head = struct.unpack_from("<H", data, off + 6)[0], 8
        if off + head + length > len(data):
            return "truncated_header", (f"the file ends inside File Meta element ({group:04X},{elem:04X}) at byte {off}: "
                                        f"it declares {length} byte(s), {len(data) - off - head} present")
        off += head + length
        n += 1
        has_ts = has_ts or elem == 0x0010


def _dataset_cut(ds, size: int) -> Optional[tuple[str, str]]:
    """The file ends inside the data set's last element (pydicom reads a cut file without complaint):
    ``("truncated_header" | "truncated", detail)``, else None. Offsets are in the file's own bytes,
    so a deflated data set (inflated while read) is not checked here."""
    from pydicom.dataelem import RawDataElement

    if not len(ds):
        return None
    tag = max(ds.keys())
    raw = ds._dict.get(tag)
    if not isinstance(raw, RawDataElement) or raw.length == 0xFFFFFFFF or raw.value_tell is None:
        return None
    present = len(raw.value or b"")
    if present >= raw.length and raw.value_tell + raw.length <= size:
        return None
    from pydicom.datadict import keyword_for_tag

    name = keyword_for_tag(tag) or "private element"
    if raw.length > size and not keyword_for_tag(tag):  # a cut file ends in an element it knows, noise does not
        return "corrupt_header", (f"element {tag} {name} declares {raw.length} byte(s), more than the whole file "
                                  f"({size}): the bytes are not a DICOM data set")
    what = f"element {tag} {name} declares {raw.length} byte(s), {min(present, max(size - raw.value_tell, 0))} present"
    if int(tag) == 0x7FE00010:
        return "truncated", f"the file ends inside Pixel Data: {what}"
    return "truncated_header", f"the file ends inside {what}"


def _undecodable(ds, ts: str) -> Optional[str]:
    """Why encapsulated (compressed) pixel data cannot be decoded, or None: every frame is decoded once, so
    a file that passes here is one the QC step and the analyses can read."""
    import sys

    from pydicom.pixels import iter_pixels
    from pydicom.uid import UID

    # Pillow (one of pydicom's decoders) fills a cut-short image with grey when LOAD_TRUNCATED_IMAGES is set,
    # which some libraries set process-wide on import (WeasyPrint does): a damaged stream must not pass here.
    image_file = sys.modules.get("PIL.ImageFile")  # only when something imported Pillow
    lenient = image_file.LOAD_TRUNCATED_IMAGES if image_file is not None else False
    if image_file is not None:
        image_file.LOAD_TRUNCATED_IMAGES = False
    try:
        for _ in iter_pixels(ds, raw=True):
            pass
    except Exception as exc:  # no plugin for the syntax, or a damaged stream: the decoders raise many types
        first = str(exc).strip().splitlines()
        why = " ".join(x.strip() for x in first[:3])[:400]
        return f"pixel data in {UID(ts).name or ts} ({ts}) cannot be decoded: {why or type(exc).__name__}"
    finally:
        if image_file is not None:
            image_file.LOAD_TRUNCATED_IMAGES = lenient
    return None


_TAGS: dict[str, int] = {}


def _value(ds, keyword: str, default: Any = None) -> Any:
    """``ds.get(keyword, default)`` by tag (this runs ~40 times per inbox file: the keyword lookup and
    pydicom's attribute machinery cost more than the dictionary probe)."""
    tag = _TAGS.get(keyword)
    if tag is None:
        from pydicom.datadict import tag_for_keyword

        tag = tag_for_keyword(keyword)
        if tag is None:
            return ds.get(keyword, default)
        _TAGS[keyword] = tag
    if tag not in ds._dict:
        return default
    return ds[tag].value


def check_dataset(data: bytes, source_attrs: Iterable[str] = ("PatientID", "IssuerOfPatientID")) -> dict:
    """Inspect one file's bytes: ``{"ok": True, "header": {...}}`` or ``{"ok": False, "reason", "detail"}``."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    if not data:
        return {"ok": False, "reason": "empty", "detail": REASONS["empty"]}
    has_preamble = len(data) >= 132 and data[128:132] == b"DICM"
    if has_preamble:
        problem = _meta_problem(data)
        if problem:
            return {"ok": False, "reason": problem[0], "detail": problem[1]}
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
    ts = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "1.2.840.10008.1.2") or "1.2.840.10008.1.2")
    if ts != "1.2.840.10008.1.2.1.99" and (has_preamble or len(ds)):
        cut = _dataset_cut(ds, len(data))
        if cut and (has_preamble or cut[0] == "truncated"):
            return {"ok": False, "reason": cut[0], "detail": cut[1]}
    try:
        missing = [k for k in ESSENTIALS if not str(_value(ds, k, "") or "").strip()]
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
        expected = _expected_pixel_bytes(ds)
        if pixel is not None and ts in NATIVE_SYNTAXES and expected is not None and len(pixel) < expected:
            return {"ok": False, "reason": "truncated",
                    "detail": f"pixel data has {len(pixel)} bytes, the image attributes declare {expected}"}
        if pixel is not None and ts not in NATIVE_SYNTAXES:
            why = _undecodable(ds, ts)
            if why:
                return {"ok": False, "reason": "undecodable", "detail": why}
    header = {
        "sop_uid": str(_value(ds, "SOPInstanceUID")), "sop_class": str(_value(ds, "SOPClassUID")),
        "study_uid": str(_value(ds, "StudyInstanceUID")), "series_uid": str(_value(ds, "SeriesInstanceUID")),
        "modality": str(_value(ds, "Modality")), "series_number": _int(_value(ds, "SeriesNumber")),
        "instance_number": _int(_value(ds, "InstanceNumber")),
        "series_description": str(_value(ds, "SeriesDescription", "") or ""),
        "study_date": _exam_date(ds),
        "transfer_syntax": ts,
        "device": {k: _text(_value(ds, v)) for k, v in DEVICE_ATTRS.items()},
        "patient": {a: _text(_value(ds, a)) for a in source_attrs if a},
    }
    # what a Modality Worklist gave the scanner (identify checks it against the registry)
    worklist = {a: _text(_value(ds, a)) for a in WORKLIST_ATTRS if str(_value(ds, a, "") or "").strip()}
    if worklist:
        header["worklist"] = worklist
    return {"ok": True, "header": header}


def _exam_date(ds) -> str:
    """The first usable of StudyDate, SeriesDate, AcquisitionDate, ContentDate (YYYYMMDD); when none is
    usable, the first one written (e.g. United Imaging's '***'), so identify can say what it found."""
    written = [str(_value(ds, k, "") or "").strip() for k in ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate")]
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
    try:
        data = src.read_bytes()
    except OSError as exc:  # the inbox entry, not the workdir: recorded as not read, the run goes on
        return {"rel_path": rel, "status": "unreadable", "detail": f"cannot be read: {exc.strerror or exc}"}
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
    key = exam_key_for(h["study_uid"], h["patient"])
    rel_store = f"original/{series_dir_for(h['series_uid'])}/{sha}.dcm"
    dest = Path(out) / key / rel_store
    if not (dest.exists() and dest.stat().st_size == len(data)):
        atomic_write_bytes(dest, data, durable=durable)
    return {**rec, "status": "ingested", "exam_key": key, "series_uid": h["series_uid"], "sop_uid": h["sop_uid"],
            "stored_path": rel_store, "header": h}


def current_versions(records: list[dict]) -> tuple[list[dict], list[dict]]:
    """``(current, superseded)`` of an exam's ingested records in arrival order: a later file with the same
    SOPInstanceUID and other content is a corrected version and supersedes the earlier ones."""
    latest: dict[str, dict] = {}
    for r in records:
        latest[r["header"]["sop_uid"]] = r
    keep = {id(r) for r in latest.values()}
    return [r for r in records if id(r) in keep], [r for r in records if id(r) not in keep]


def exam_summary(exam_key: str, records: list[dict]) -> dict:
    """exam.json content from the ingested records of one study (site-side: holds source identifiers).

    ``records`` in arrival order; of several versions of one SOP instance only the newest is listed."""
    records = current_versions(records)[0]
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


def path_text(raw: bytes) -> str:
    """A path's bytes as text, losslessly (the state DB, reports and JSON hold text): UTF-8 as it is, a
    backslash doubled, every byte that is not part of valid UTF-8 as ``\\xHH``. :func:`path_bytes` inverts it."""
    out = []
    for ch in raw.decode("utf-8", "surrogateescape"):
        o = ord(ch)
        if 0xDC80 <= o <= 0xDCFF:
            out.append(f"\\x{o - 0xDC00:02x}")
        elif ch == "\\":
            out.append("\\\\")
        else:
            out.append(ch)
    return "".join(out)


def path_bytes(text: str) -> bytes:
    """The path bytes that :func:`path_text` wrote as ``text``."""
    out, i = bytearray(), 0
    while i < len(text):
        if text.startswith("\\\\", i):
            out += b"\\"
            i += 2
        elif text.startswith("\\x", i):
            out.append(int(text[i + 2:i + 4], 16))
            i += 4
        else:
            out += text[i].encode("utf-8")
            i += 1
    return bytes(out)


def scan_inbox(inbox: str | Path) -> tuple[list[tuple[Path, str]], list[dict]]:
    """``(files, skipped)``: every regular file under the inbox (hidden ones too; symbolic links followed, each
    folder listed once), sorted by relative path, and every entry that is not read, with a reason from
    :data:`SKIP_REASONS`. Relative paths are :func:`path_text` of the path bytes."""
    import errno
    import stat as st_

    inbox = Path(inbox)
    files: list[tuple[Path, str]] = []
    skipped: list[dict] = []
    listed: dict[tuple[int, int], str] = {}

    def skip(rel: str, reason: str, detail: str = "") -> None:
        skipped.append({"path": rel, "reason": reason, "detail": detail or SKIP_REASONS[reason]})

    def walk(folder: Path, rel: str, ancestors: tuple[tuple[int, int], ...]) -> None:
        trel = path_text(os.fsencode(rel))
        try:
            st = os.stat(folder)
        except OSError as exc:
            skip(trel or ".", "unreadable", f"folder cannot be read: {exc.strerror}")
            return
        key = (st.st_dev, st.st_ino)
        if key in listed:
            where = listed[key] or "the inbox itself"
            if key in ancestors:
                skip(trel, "directory_loop", f"links back to {where}, which contains it: listed once")
            else:
                skip(trel, "directory_seen", f"the same folder as {where}: listed once")
            return
        listed[key] = trel
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: os.fsencode(e.name))
        except OSError as exc:
            skip(trel or ".", "unreadable", f"folder cannot be listed: {exc.strerror}")
            return
        for e in entries:
            erel = path_text(os.fsencode(rel + "/" + e.name if rel else e.name))
            path = folder / e.name
            try:
                est = os.stat(path)  # follows symbolic links
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    skip(erel, "symlink_loop")
                elif exc.errno == errno.ENOENT and e.is_symlink():
                    skip(erel, "dangling_symlink", f"a symbolic link to {path_text(os.fsencode(os.readlink(path)))}, "
                                                   "which does not exist")
                elif exc.errno != errno.ENOENT:  # a file that vanished while listing was never there for us
                    skip(erel, "unreadable", exc.strerror or str(exc))
                continue
            if st_.S_ISDIR(est.st_mode):
                walk(path, rel + "/" + e.name if rel else e.name, ancestors + (key,))
            elif st_.S_ISREG(est.st_mode):
                files.append((path, erel))
            elif st_.S_ISFIFO(est.st_mode):
                skip(erel, "fifo")
            elif st_.S_ISSOCK(est.st_mode):
                skip(erel, "socket")
            else:
                skip(erel, "device")

    walk(inbox, "", ())
    files.sort(key=lambda f: path_bytes(f[1]))
    return files, skipped


def list_inbox(inbox: str | Path) -> list[tuple[Path, str]]:
    """Every regular file under the inbox (see :func:`scan_inbox`), sorted by relative path."""
    return scan_inbox(inbox)[0]


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
    its exam, or quarantined with a reason; every entry that is not a readable file (a FIFO, a dangling
    link, a loop) is recorded with a reason in ``inbox_skipped``. A path whose size, mtime and ctime are
    unchanged since it was last seen is not read again. New content for an exam rewrites its ``exam.json``
    (the runner then redoes the exam's steps whose inputs changed); a new file with the SOPInstanceUID of
    an earlier one is a corrected version: the earlier file moves to the exam's ``superseded/``. With
    ``move``, an inbox file is deleted only after its record is committed and its copy is durable; a file
    that cannot be deleted (read-only inbox) is listed in ``not_removed`` and stays.
    """
    from ..store import Store
    from ..workdir import Workdir

    W = Workdir(workdir).create()
    st = store or Store(W.root)
    inbox = Path(inbox).resolve()
    known = st.known_paths(inbox)
    listed, skipped = scan_inbox(inbox)
    todo, stats, where = [], {}, {}
    for p, rel in listed:
        try:
            stt = p.stat()
        except OSError:  # vanished since it was listed
            continue
        stats[rel] = (stt.st_size, stt.st_mtime_ns, stt.st_ctime_ns)
        where[rel] = p
        k = known.get(rel)
        # new, or changed under the same name (ctime too: a copy that keeps size and mtime still changes it)
        if (k is None or (k["size"], k["mtime_ns"]) != stats[rel][:2]
                or (k.get("ctime_ns") is not None and k["ctime_ns"] != stats[rel][2])):
            todo.append((p, rel))
    if move:  # recorded before, but not removed then (a read-only inbox, or a run without --move)
        left = [rel for rel in stats if rel in known and rel not in {r for _, r in todo}]
        if left:
            os.sync()  # their copies were written by an earlier run, perhaps without fsync
    attrs = source_attrs_for(trial)
    out: dict[str, Any] = {"seen": len(stats), "new_paths": len(todo), "ingested": 0, "quarantined": 0,
                           "duplicates": 0, "skipped": 0, "quarantined_files": [], "duplicate_files": [],
                           "skipped_entries": skipped, "not_removed": []}
    touched: set[str] = set()
    pending: list[dict] = []

    def flush() -> None:
        if not pending:
            return
        now = time.time()
        with st.tx() as db:
            for rec in pending:
                if rec["status"] == "unreadable":
                    skipped.append({"path": rec["rel_path"], "reason": "unreadable", "detail": rec["detail"]})
                    continue
                row = db.execute("SELECT first_inbox, first_path FROM files WHERE sha256=?", (rec["sha256"],)).fetchone()
                size, mtime, ctime = stats.get(rec["rel_path"], (rec["size"], None, None))
                db.execute("INSERT OR REPLACE INTO file_sources(inbox, rel_path, sha256, size, mtime_ns, ctime_ns, seen) "
                           "VALUES (?, ?, ?, ?, ?, ?, ?)", (str(inbox), rec["rel_path"], rec["sha256"], size, mtime, ctime, now))
                if row is not None:
                    if (row["first_inbox"], row["first_path"]) != (str(inbox), rec["rel_path"]):  # not the same path re-read
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
                if rec["status"] == "unreadable":
                    continue
                p = where.get(rec["rel_path"], inbox / rec["rel_path"])
                try:
                    p.unlink()
                except FileNotFoundError:
                    pass
                except OSError as exc:  # e.g. a read-only inbox: the file is recorded and copied, it just stays
                    out["not_removed"].append({"path": rec["rel_path"], "reason": exc.strerror or str(exc)})
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
    if move:
        for rel in left:
            try:
                where[rel].unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                out["not_removed"].append({"path": rel, "reason": exc.strerror or str(exc)})
    if bar:
        bar.close()
    out["skipped"] = len(skipped)
    st.record_skipped(inbox, skipped)
    # exam.json for every exam that got files now, and for any a killed run left without one
    for row in st.db.execute("SELECT exam_key FROM exams").fetchall():
        key = row["exam_key"]
        exam_json = W.exam(key).exam_json
        if key in touched or not exam_json.exists():
            recs = [{"sha256": r["sha256"], "stored_path": r["stored_path"], "header": json.loads(r["header"])}
                    for r in st.db.execute("SELECT sha256, stored_path, header FROM files WHERE exam_key=? AND "
                                           "status='ingested' ORDER BY rowid", (key,))]
            if not recs:
                continue
            _supersede(st, W.exam(key), current_versions(recs)[1])
            summary = exam_summary(key, recs)
            shared = st.db.execute("SELECT count(*) FROM exams WHERE study_uid=? AND exam_key != ?",
                                   (summary["study_uid"], key)).fetchone()[0]
            if shared:   # the study's instances name more than one patient: split by patient, and said so
                summary["study_split"] = shared + 1
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


def _supersede(st, exam, old: list[dict]) -> None:
    """Move earlier versions of corrected instances out of ``original/`` (which the later steps read) into
    ``superseded/``, and mark them ``superseded`` in ``files``. Safe to redo after a kill at any point."""
    from ..workdir import ORIGINAL, SUPERSEDED

    for r in old:
        rel = r["stored_path"]
        new_rel = SUPERSEDED + rel[len(ORIGINAL):] if rel.startswith(ORIGINAL) else rel
        src, dst = exam.path(rel), exam.path(new_rel)
        if src.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dst)
        with st.tx() as db:
            db.execute("UPDATE files SET status='superseded', stored_path=? WHERE sha256=?", (new_rel, r["sha256"]))


def exam_content_hash(store, exam_key: str) -> str:
    """What an exam's ingested content is: one hash over its current instances' sha256s (the root of its
    fingerprints; a corrected instance replaces its earlier version here)."""
    rows = store.db.execute("SELECT sha256 FROM files WHERE exam_key=? AND status='ingested' ORDER BY sha256",
                            (exam_key,)).fetchall()
    return sha256_bytes("\n".join(r["sha256"] for r in rows).encode())


def ingest_step(ctx) -> dict:
    """The ``ingest`` study step: the inbox into the workdir (``ctx.inbox``; ``--move`` deletes what is safe)."""
    return ingest_inbox(ctx.trial, ctx.inbox, ctx.workdir.root, move=ctx.move, pool=ctx.pool,
                        progress=ctx.progress, store=ctx.store)
