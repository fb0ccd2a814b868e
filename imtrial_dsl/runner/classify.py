"""Series classification: which protocol of the study did each series acquire?

A protocol's match rules are ANDed (``ir.MatchRule``: matches / equals /
contains / not_matches) and its modality must equal the series' Modality. A
protocol without match rules matches a series whose SeriesDescription or
ProtocolName equals the protocol's name (case-insensitive). Each series ends up
``matched`` (one protocol), ``unmatched`` or ``ambiguous`` (several candidates,
all listed); unreadable or truncated files are reported, never dropped.
"""
from __future__ import annotations

import gc
import json
import os
import re
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional, Sequence

from pydicom.dataset import Dataset

from .. import ir
from . import dicomio


@lru_cache(maxsize=1024)
def _regex(pattern: str) -> re.Pattern:
    return re.compile(pattern)


def rule_matches(rule: ir.MatchRule, ds: Dataset) -> bool:
    """Does one match rule hold for a header? A missing attribute only satisfies ``not_matches``."""
    value = dicomio.get_param(ds, rule.attribute)
    if value is dicomio.MISSING:
        return rule.op in (ir.MatchOp.NOT_MATCHES, ir.MatchOp.NOT_CONTAINS)
    if rule.op in (ir.MatchOp.CONTAINS, ir.MatchOp.NOT_CONTAINS):
        want = rule.value.strip()
        return any(dicomio.text(v) == want for v in dicomio.as_list(value)) == (rule.op == ir.MatchOp.CONTAINS)
    txt = dicomio.text(value)
    if rule.op == ir.MatchOp.EQUALS:
        return txt == rule.value.strip()
    if rule.op == ir.MatchOp.MATCHES:
        return _regex(rule.value).search(txt) is not None
    if rule.op == ir.MatchOp.NOT_MATCHES:
        return _regex(rule.value).search(txt) is None
    raise ValueError(f"unknown match operator {rule.op!r}")


def protocol_matches(protocol: ir.Protocol, ds: Dataset) -> bool:
    """All of a protocol's rules hold and the modality agrees."""
    modality = dicomio.text(dicomio.get_param(ds, "Modality"))
    if protocol.modality and modality and protocol.modality.upper() != modality.upper():
        return False
    if not protocol.match:
        names = {dicomio.text(dicomio.get_param(ds, k)).lower() for k in ("SeriesDescription", "ProtocolName")}
        return protocol.name.lower() in names
    return all(rule_matches(r, ds) for r in protocol.match)


def classify_header(trial: ir.Trial, ds: Dataset) -> dict[str, Any]:
    """``{"status": matched|unmatched|ambiguous, "protocol": name|None, "candidates": [...]}``."""
    cands = [p.name for p in trial.protocols if protocol_matches(p, ds)]
    if len(cands) == 1:
        return {"status": "matched", "protocol": cands[0], "candidates": cands}
    if not cands:
        return {"status": "unmatched", "protocol": None, "candidates": []}
    return {"status": "ambiguous", "protocol": None, "candidates": cands}


# --------------------------------------------------------------------------- scanning an exam folder

@dataclass
class Instance:
    """One file of a series. ``header`` is None when the scan kept only a fingerprint
    (``keep_headers=False``): then an earlier instance with the same ``fingerprint`` holds it."""

    path: Path
    header: Optional[Dataset]
    instance_number: Optional[int]
    frames: int = 1
    fingerprint: Optional[tuple] = None
    sop_uid: str = ""
    # where and how its pixels lie, for QC (``scan(pixel_refs=True)``): (Pixel Data offset,
    # dicomio.native_layout, qc.frame_facts); None: QC reads the file with pydicom
    pixels: Optional[tuple] = None


@dataclass
class Series:
    uid: str
    instances: list[Instance] = field(default_factory=list)
    _seen: set = field(default_factory=set, repr=False)

    @property
    def header(self) -> Dataset:
        """The representative header (lowest InstanceNumber)."""
        return self.instances[0].header


@dataclass
class ExamScan:
    root: Path
    series: "OrderedDict[str, Series]"
    problems: list[dict[str, Any]]


def scan(folder: str | os.PathLike, *, check_pixels: bool = True, keep_headers: bool = True,
         fingerprint_tags: Optional[Sequence[int]] = None, pixel_refs: bool = False) -> ExamScan:
    """Read every file's header under ``folder`` and group instances by series.

    Files that are not readable DICOM, lack a SeriesInstanceUID, or whose Pixel
    Data is shorter than declared (``check_pixels``) are listed in ``problems``
    with a machine-readable ``reason``. With ``keep_headers=False`` only the first
    header of each series and of each distinct ``fingerprint_tags`` value set is kept
    (the others get ``header=None``): retaining thousands of datasets costs more than
    reading them, and adherence needs one header per distinct parameter set. ``pixel_refs`` keeps, per
    instance, what QC needs to read its pixels without parsing the header again (:attr:`Instance.pixels`).
    """
    # Thousands of retained headers make every cyclic-GC pass walk them all (quadratic time);
    # headers hold no reference cycles that need collecting while we read, so pause the collector.
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        return _scan(Path(folder), check_pixels, keep_headers, tuple(fingerprint_tags or ()), pixel_refs)
    finally:
        if was_enabled:
            gc.enable()


def _scan(root: Path, check_pixels: bool, keep_headers: bool, fp_tags: tuple[int, ...],
          pixel_refs: bool = False) -> "ExamScan":
    series: OrderedDict[str, Series] = OrderedDict()
    problems: list[dict[str, Any]] = []
    base = root if root.is_dir() else root.parent
    prefix = len(str(base).rstrip(os.sep)) + 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for path in dicomio.iter_dicom_files(root):
            _scan_one(path, str(path)[prefix:], series, problems, check_pixels, keep_headers, fp_tags, pixel_refs)
    for s in series.values():
        s.instances.sort(key=lambda i: (i.instance_number is None, i.instance_number or 0, str(i.path)))
        head = s.instances[0]
        if head.header is None:  # after sorting, the series' representative must carry a header
            holder = next(i for i in s.instances if i.header is not None and i.fingerprint == head.fingerprint)
            head.header, holder.header = holder.header, None
    return ExamScan(root=base, series=series, problems=problems)


def _scan_one(path: Path, rel: str, series: "OrderedDict[str, Series]", problems: list, check_pixels: bool,
              keep_headers: bool, fp_tags: tuple[int, ...], pixel_refs: bool = False) -> None:
    start = None
    try:
        if check_pixels:
            ds, complete, detail, start = dicomio.read_header_located(path)
        else:
            ds, complete, detail = dicomio.read_header(path), True, "not checked"
    except Exception as exc:  # pydicom raises many types on garbage input
        problems.append({"file": rel, "reason": "unreadable", "detail": f"{type(exc).__name__}: {exc}"})
        return
    # raw accessors: this loop runs once per file, so it avoids pydicom's value conversion
    uid = dicomio.raw_text(ds, 0x0020000E)
    if dicomio.raw_bytes(ds, 0x00080016) is None and dicomio.raw_bytes(ds, 0x00080060) is None:
        problems.append({"file": rel, "reason": "not_dicom", "detail": "no SOP Class UID or Modality"})
        return
    if not uid:
        problems.append({"file": rel, "reason": "missing_series_uid", "detail": "no SeriesInstanceUID"})
        return
    if not complete:
        problems.append({"file": rel, "reason": "truncated", "detail": detail, "series_uid": uid})
        return
    inum = dicomio.raw_uint(ds, 0x00200013, -1)
    frames = max(1, dicomio.raw_uint(ds, 0x00280008, 1))
    sop = dicomio.raw_text(ds, 0x00080018)
    ser = series.get(uid)
    if ser is None:
        ser = series[uid] = Series(uid)
    pixels = None
    if pixel_refs and start is not None:
        layout = dicomio.native_layout(ds)
        if layout is not None:
            from .qc import frame_facts

            pixels = (start, layout, frame_facts(ds, layout[2]))
    fp = None
    if not keep_headers:
        fp = dicomio.fingerprint(ds, fp_tags)
        if ser.instances and fp is not None and fp in ser._seen:
            ds = None
        elif fp is not None:
            ser._seen.add(fp)
    ser.instances.append(Instance(path, ds, inum if inum >= 0 else None, frames, fp, sop, pixels))


class DeidView:
    """What the de-identified exam will say about the originals being classified: series and study UIDs,
    file names (``<SOPInstanceUID>.dcm`` in ``deid/``) and descriptions, from the study's de-identification
    plan and key (deterministic: the same values the deidentify step writes). Classification reads the
    original headers at the site; its result names only these."""

    def __init__(self, trial: ir.Trial, identity: dict):
        from ..deid import Deidentifier, resolve_key

        self.engine = Deidentifier(trial, resolve_key(trial))
        self.identity = identity
        self._headers: dict[int, Optional[Dataset]] = {}

    def uid(self, keyword_tag: int, value: str) -> str:
        return self.engine.output_uid(keyword_tag, value) if value else value

    def series_uid(self, original: str) -> str:
        return self.uid(0x0020000E, original)

    def file_name(self, inst: Instance) -> str:
        return f"{self.uid(0x00080018, inst.sop_uid)}.dcm"

    def header(self, ds: Dataset) -> Optional[Dataset]:
        """The de-identified copy of a representative header (None: de-identification would refuse it)."""
        if id(ds) not in self._headers:
            self._headers[id(ds)] = self.engine.preview(ds, self.identity)
        return self._headers[id(ds)]


# Device identity a result may carry (serial, station and institution stay in the site-side exam.json).
RESULT_DEVICE_KEYS = ("manufacturer", "model", "software", "modality")


def series_summary(s: Series, root: Path, view: Optional[DeidView] = None) -> dict[str, Any]:
    ds = s.header
    num = dicomio.get_param(ds, "SeriesNumber")
    out = view.header(ds) if view is not None else ds
    return {
        "series_uid": view.series_uid(s.uid) if view is not None else s.uid,
        "series_number": num if isinstance(num, int) else None,
        "series_description": dicomio.text(dicomio.get_param(out, "SeriesDescription")) if out is not None else "",
        "modality": dicomio.text(dicomio.get_param(ds, "Modality")),
        "sop_class_uid": dicomio.text(dicomio.get_param(ds, "SOPClassUID")),
        "n_instances": len(s.instances),
        "n_frames": sum(i.frames for i in s.instances),
        "files": [view.file_name(i) if view is not None else str(i.path.relative_to(root)) for i in s.instances],
    }


def classify_scan(trial: ir.Trial, exam_scan: ExamScan, *, expected: Optional[list[str]] = None,
                  view: Optional[DeidView] = None) -> dict[str, Any]:
    """Classification of a scanned exam (the content of classification.json).

    Series are matched on their headers as scanned (the originals, in the pipeline); with ``view`` the result
    names them as de-identification will (series and study UIDs, files in ``deid/``, cleaned descriptions).
    ``expected``: protocols the exam's visit should acquire (from identity.json);
    those without a matching series are listed under ``missing_protocols``.
    """
    out_series = []
    for s in exam_scan.series.values():
        entry = series_summary(s, exam_scan.root, view)
        entry.update(classify_header(trial, s.header))
        out_series.append(entry)
    matched = {e["protocol"] for e in out_series if e["status"] == "matched"}
    device = dicomio.device_identity(next(iter(exam_scan.series.values())).header) if exam_scan.series else {}
    device = {k: v for k, v in device.items() if k in RESULT_DEVICE_KEYS}
    study_uid = ""
    if exam_scan.series:
        study_uid = dicomio.text(dicomio.get_param(next(iter(exam_scan.series.values())).header, "StudyInstanceUID"))
        study_uid = view.uid(0x0020000D, study_uid) if view is not None else study_uid
    problems = [dict(p, series_uid=view.series_uid(p["series_uid"])) if view is not None and p.get("series_uid") else p
                for p in exam_scan.problems]
    result = {
        "study_instance_uid": study_uid,
        "device": device,
        "series": out_series,
        "problems": problems,
        "summary": {
            "series": len(out_series),
            "matched": sum(e["status"] == "matched" for e in out_series),
            "unmatched": sum(e["status"] == "unmatched" for e in out_series),
            "ambiguous": sum(e["status"] == "ambiguous" for e in out_series),
            "problems": len(exam_scan.problems),
        },
    }
    if expected is not None:
        result["expected_protocols"] = list(expected)
        # an exam is one device's study: a same-day MR and PET/CT of one visit are two exams, each
        # missing only the protocols of its own modalities
        modalities = {e.get("modality") for e in out_series}
        result["missing_protocols"] = [p for p in expected if p not in matched
                                       and (trial.protocol(p) is None or trial.protocol(p).modality in modalities)]
    return result


def classify_folder(trial: ir.Trial, folder: str | os.PathLike, *, expected: Optional[list[str]] = None) -> dict[str, Any]:
    return classify_scan(trial, scan(folder), expected=expected)


def expected_protocols(trial: ir.Trial, visit_name: Optional[str]) -> Optional[list[str]]:
    """Protocols a visit of the schedule must acquire, optional ones left out (None when the visit is unknown)."""
    if not visit_name or not trial.schedule:
        return None
    visit = next((v for v in trial.schedule.visits if v.name == visit_name), None)
    return [r.name for r in visit.acquire if not r.optional] if visit else None


def exam_scan(ctx, root: Path) -> ExamScan:
    """The headers of the exam's instances under ``root``, read once per process and shared by the
    exam's nodes (classification and adherence read the same headers)."""
    from .adherence import study_tags

    return ctx.cache.get(("scan", str(root)),
                         lambda: scan(root, keep_headers=False, fingerprint_tags=study_tags(ctx.trial),
                                      pixel_refs=bool(ctx.trial.qc)))


def deid_view(ctx) -> Optional[DeidView]:
    """The exam's :class:`DeidView` (made once per exam and process; None when the study does not de-identify)."""
    if ctx.trial.deidentify is None:
        return None
    return ctx.cache.get("deid_view", lambda: DeidView(ctx.trial, ctx.identity))


def original_series(ctx) -> dict[str, Series]:
    """The exam's original series (its ``original/`` headers), keyed by their de-identified series UID: how
    the site-side steps find the series a result speaks of."""
    from ..workdir import ORIGINAL

    view = deid_view(ctx)
    scanned = exam_scan(ctx, ctx.path(ORIGINAL))
    return {(view.series_uid(uid) if view is not None else uid): s for uid, s in scanned.series.items()}


def classify_step(ctx) -> dict:
    """Match every series of an exam to a protocol of the study (matched / unmatched / ambiguous), on the
    original headers at the site; the result names the de-identified series and files and carries no PHI."""
    from ..workdir import CLASSIFICATION, ORIGINAL

    visit = ctx.identity.get("visit")
    result = classify_scan(ctx.trial, exam_scan(ctx, ctx.path(ORIGINAL)), expected=expected_protocols(ctx.trial, visit),
                           view=deid_view(ctx))
    result["exam"] = ctx.key
    if visit:
        result["visit"] = visit
    from ..deid.results import scrub_device_identity

    result = scrub_device_identity(result, ctx.exam_info)
    ctx.write_json(CLASSIFICATION, result)
    # the run and status summaries name the visits that lack a protocol
    return dict(result["summary"], **{k: result[k] for k in ("missing_protocols",) if result.get(k)})
