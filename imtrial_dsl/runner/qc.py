"""Pixel QC with numpy: built-in metrics over one series' volume.

Metric names and their threshold parameter are those of ``ir.QcCheck.metric``
(documented in docs/language.md and docs/adherence_qc.md):

============== ================ ==========================================================
metric         parameter        measured value
============== ================ ==========================================================
snr            min              mean foreground signal / noise sigma (background corners;
                                 MR magnitude corrected for the Rayleigh bias, 0.655)
ghosting       max              (mean background along phase encoding - mean background
                                 along frequency encoding) / mean signal
clipping       max_fraction     fraction of foreground voxels at the largest (or smallest)
                                 storable value of BitsStored
dynamic_range  min              bits used: log2(p99.5 - p0.5 of stored values + 1)
slice_spacing  tolerance        largest deviation (mm) of a slice step from the median step
missing_slices max              slices missing: gaps in positions along the normal or in
                                 InstanceNumber
noise          max              noise sigma inside the object (rescaled units, e.g. HU): robust
                                 MAD of neighbour differences / sqrt(2), so anatomy does not count
============== ================ ==========================================================

An unknown metric or parameter is an error value in the result, never an exception.
"""
from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Callable, Optional, Sequence

import numpy as np
import pydicom

from .. import ir
from ..diagnostics import ImtrialError, did_you_mean
from ..qc_metrics import QC_METRICS
from . import dicomio


@dataclass
class Volume:
    """One series as a (slices, rows, columns) array, sorted along the slice normal."""

    data: np.ndarray            # rescaled values (float32)
    stored: np.ndarray          # stored integer values (for clipping / dynamic range)
    positions: list[Optional[float]]  # slice position along the normal (mm)
    instance_numbers: list[Optional[int]]
    modality: str
    pe_direction: Optional[str]
    bits_stored: int
    signed: bool
    # (slope, intercept) shared by every slice of an integer volume (data = f(stored)), else None
    rescale: Optional[tuple[float, float]] = None
    # the Otsu foreground, computed once per volume: every metric that needs it shares it (see foreground)
    _foreground: Optional[np.ndarray] = field(default=None, repr=False, compare=False)


def _frames(arr: np.ndarray) -> np.ndarray:
    """(frames, rows, columns) from :func:`dicomio.read_with_pixels`' frames; colour: QC runs on the mean."""
    return arr.mean(axis=-1) if arr.ndim == 4 else arr


def _rescale(ds: pydicom.Dataset, frame: int) -> tuple[float, float]:
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") is not None
    slope = dicomio.get_param(ds, "RescaleSlope", frame=frame if per_frame else None)
    inter = dicomio.get_param(ds, "RescaleIntercept", frame=frame if per_frame else None)
    s = float(slope) if isinstance(slope, (int, float)) else 1.0
    i = float(inter) if isinstance(inter, (int, float)) else 0.0
    return s, i


_NORMALS: dict[tuple, np.ndarray] = {}   # slice normal per orientation: a study has a handful


def frame_facts(ds: pydicom.Dataset, frames: int) -> list[tuple[Optional[float], float, float, Optional[int]]]:
    """Per frame of an instance: (position along the slice normal, rescale slope, intercept, instance number)."""
    geo = dicomio.frame_geometry(ds)
    inum = dicomio.get_param(ds, "InstanceNumber")
    out = []
    for k in range(frames):
        pos, ori = geo[k] if k < len(geo) else (None, None)
        z = None
        if pos is not None and ori is not None:
            key = tuple(ori)
            normal = _NORMALS.get(key)
            if normal is None:
                if len(_NORMALS) > 1024:
                    _NORMALS.clear()
                normal = _NORMALS[key] = np.cross(np.array(ori[:3]), np.array(ori[3:]))
            z = float(np.dot(normal, np.array(pos)))
        slope, inter = _rescale(ds, k)
        n = inum * 1000 + k if isinstance(inum, int) and frames > 1 else (inum if isinstance(inum, int) else None)
        out.append((z, slope, inter, n))
    return out


def load_volume(paths: Sequence[str | Path], refs: Optional[Sequence[Optional[tuple]]] = None,
                header: Optional[pydicom.Dataset] = None) -> Volume:
    """Read a series' pixel data (classic: one frame per file; Enhanced: all frames of each file).

    ``refs`` (per path, from ``classify.scan(pixel_refs=True)``) say where each file's pixels lie and carry its
    frames' facts, so the file is not parsed again; ``header`` is then the first path's header."""
    slices: list[tuple[tuple, np.ndarray, float, float, Optional[float], Optional[int]]] = []
    first = header
    if first is None and refs is not None and paths and refs[0] is not None:
        first = dicomio.read_header(paths[0])   # the series' values below come from its first file
    for i, p in enumerate(paths):
        ref = refs[i] if refs is not None else None
        arr = None
        if ref is not None:
            with open(p, "rb") as fp:
                arr = dicomio.read_native(fp, ref[0], ref[1])
            facts = ref[2]
        if arr is None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds, arr = dicomio.read_with_pixels(p)  # read only: functional groups indexed once
            if first is None:
                first = ds
            arr = _frames(arr)
            facts = frame_facts(ds, arr.shape[0])
        for k in range(arr.shape[0]):
            z, slope, inter, n = facts[k]
            slices.append(((z is None, z or 0.0, n or 0), arr[k], slope, inter, z, n))
    if first is None:
        raise ValueError("no instances")
    slices.sort(key=lambda s: s[0])
    # filled slice by slice into arrays made once (stacking copies every slice twice more); stored values keep
    # their integer type (every metric's arithmetic on them is exact in it)
    shape = (len(slices), *slices[0][1].shape)
    if any(s[1].shape != shape[1:] for s in slices):
        raise ValueError("the series' frames differ in size: all input arrays must have the same shape")
    kinds = {s[1].dtype for s in slices}
    int_type = np.result_type(*kinds) if all(np.issubdtype(k, np.integer) for k in kinds) else None
    stored = np.empty(shape, int_type if int_type is not None else np.float64)
    data = np.empty(shape, np.float32)
    rescales = {(s[2], s[3]) for s in slices}
    for k, (_, frame, slope, inter, _, _) in enumerate(slices):
        stored[k] = frame
        # x * 1.0 + 0.0 is x: the common case needs no arithmetic
        data[k] = frame if (slope, inter) == (1.0, 0.0) else frame.astype(np.float32) * slope + inter
    pe = dicomio.get_param(first, "InPlanePhaseEncodingDirection")
    return Volume(
        data=data, stored=stored,
        positions=[s[4] for s in slices], instance_numbers=[s[5] for s in slices],
        modality=dicomio.text(dicomio.get_param(first, "Modality")),
        pe_direction=str(pe).upper() if isinstance(pe, str) and pe else None,
        bits_stored=int(first.get("BitsStored", 16) or 16),
        signed=int(first.get("PixelRepresentation", 0) or 0) == 1,
        rescale=next(iter(rescales)) if len(rescales) == 1 and int_type is not None else None,
    )


# --------------------------------------------------------------------------- helpers

def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold on a 1-D array of intensities."""
    v = values.ravel()
    if not np.isfinite(v).all():  # rescaled integers always are: skip the copy then
        v = v[np.isfinite(v)]
    lo, hi = float(v.min()), float(v.max())
    if hi <= lo:
        return lo
    hist, edges = np.histogram(v, bins=bins, range=(lo, hi))
    return _otsu_from_hist(hist, edges)


def _otsu_from_hist(hist: np.ndarray, edges: np.ndarray) -> float:
    centers = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centers)
    mu0 = np.divide(m0, w0, out=np.zeros_like(m0, dtype=float), where=w0 > 0)
    mu1 = np.divide(m0[-1] - m0, w1, out=np.zeros_like(m0, dtype=float), where=w1 > 0)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float(centers[int(np.argmax(between))])


_MAX_SPAN = 1 << 20   # distinct stored values counted with bincount (16-bit data: 65,536)
_CHUNK = 1 << 16


def volume_otsu(vol: Volume, bins: int = 256) -> float:
    """:func:`otsu_threshold` of ``vol.data``, the same value, from a count of the distinct stored values when
    the data are one rescale of them: np.histogram then bins the few distinct values (weighted by their counts)
    instead of every voxel — each value falls in the bin it falls in either way."""
    s = vol.stored
    if vol.rescale is None or s.size == 0 or s.dtype.kind not in "iu":
        return otsu_threshold(vol.data, bins)
    flat = s.ravel()
    mn, mx = int(flat.min()), int(flat.max())
    if mx - mn >= _MAX_SPAN:
        return otsu_threshold(vol.data, bins)
    # stored value v is counted at index v - mn (at v itself when that array stays small)
    direct = 0 <= mn and mx < _MAX_SPAN
    offset = 0 if direct else mn
    counts = np.zeros((mx if direct else mx - mn) + 1, np.int64)
    for i in range(0, flat.size, _CHUNK):  # in chunks: bincount's index copy of each stays in the cache
        part = flat[i:i + _CHUNK]
        c = np.bincount(part if direct else part.astype(np.int64) - mn)
        counts[:c.size] += c
    vals = np.flatnonzero(counts)
    weights = counts[vals]
    vals = vals + offset
    slope, inter = vol.rescale
    # the float32 values load_volume computed for these stored values (same arithmetic, element by element)
    vals = vals.astype(s.dtype)
    data = vals.astype(np.float32) if (slope, inter) == (1.0, 0.0) else vals.astype(np.float32) * slope + inter
    lo, hi = float(data.min()), float(data.max())
    if hi <= lo:
        return lo
    hist, edges = np.histogram(data, bins=bins, range=(lo, hi), weights=weights)
    return _otsu_from_hist(hist.astype(np.int64), edges)


def foreground(vol: Volume) -> np.ndarray:
    """Voxels above the Otsu threshold; made once per volume (the QC checks of a series share the volume)."""
    if vol._foreground is None:
        vol._foreground = vol.data > volume_otsu(vol)
    return vol._foreground


def _central_slices(vol: Volume) -> slice:
    n = vol.data.shape[0]
    if n < 3:
        return slice(0, n)
    return slice(n // 3, n - n // 3)


def _corners(shape: tuple[int, int]) -> list[tuple[slice, slice]]:
    r, c = shape
    h, w = max(2, r // 8), max(2, c // 8)
    return [(slice(0, h), slice(0, w)), (slice(0, h), slice(c - w, c)),
            (slice(r - h, r), slice(0, w)), (slice(r - h, r), slice(c - w, c))]


def noise_sigma(vol: Volume, mask: np.ndarray) -> Optional[float]:
    """Noise sigma from background corners (outside the object); MR magnitude corrected for Rayleigh bias."""
    sl = _central_slices(vol)
    d, m = vol.data[sl], mask[sl]
    vals = []
    for rs, cs in _corners(d.shape[1:]):
        block, bm = d[:, rs, cs], m[:, rs, cs]
        vals.append(block[~bm])
    bg = np.concatenate([v.ravel() for v in vals]) if vals else np.array([])
    if bg.size < 8:
        return None
    sd = float(bg.std())
    if vol.modality == "MR":
        sd /= 0.655  # std of a Rayleigh background is 0.655 sigma (Henkelman 1985)
    return sd


def _bbox(mask2d: np.ndarray) -> Optional[tuple[int, int, int, int]]:
    rows = np.where(mask2d.any(axis=1))[0]
    cols = np.where(mask2d.any(axis=0))[0]
    if rows.size == 0 or cols.size == 0:
        return None
    return int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])


# --------------------------------------------------------------------------- metrics
# Each returns (measured value, detail dict); raise MetricError for a value that cannot be measured.

class MetricError(ImtrialError):
    """A metric that cannot be measured on this volume: the check's verdict is ``error``, with this message."""

    code = "E821"


def m_snr(vol: Volume) -> tuple[float, dict]:
    mask = foreground(vol)
    sl = _central_slices(vol)
    sig = vol.data[sl][mask[sl]]
    if sig.size == 0:
        raise MetricError("no foreground signal")
    sigma = noise_sigma(vol, mask)
    if not sigma:
        raise MetricError("no background noise region (object fills the field of view, or noise-free data)")
    signal = float(sig.mean())
    return signal / sigma, {"signal": signal, "noise_sigma": sigma}


def _object_run(profile: np.ndarray, frac: float = 0.5) -> tuple[int, int]:
    """Indices [lo, hi] of the contiguous run around the profile's peak that stays above frac * peak."""
    if profile.size == 0 or not np.isfinite(profile).all() or profile.max() <= 0:
        return 0, -1
    peak = int(np.argmax(profile))
    thr = frac * float(profile[peak])
    lo = peak
    while lo > 0 and profile[lo - 1] > thr:
        lo -= 1
    hi = peak
    while hi < profile.size - 1 and profile[hi + 1] > thr:
        hi += 1
    # the run covers the object's core (chord above half its maximum); extend it to the object's edge
    grow = max(1, (hi - lo + 1) // 10)
    return max(0, lo - grow), min(profile.size - 1, hi + grow)


def m_ghosting(vol: Volume) -> tuple[float, dict]:
    mask = foreground(vol)
    sl = _central_slices(vol)
    d, m = vol.data[sl], mask[sl]
    # the object's extent per axis: the run around the peak of the mean-intensity profile, widened
    # by a margin; dimmer ghost replicas beside the object do not join it
    img = d.mean(axis=0)
    r0, r1 = _object_run(img.mean(axis=1))
    c0, c1 = _object_run(img.mean(axis=0))
    if r1 < r0 or c1 < c0:
        raise MetricError("no foreground signal")
    proj = img
    R, C = proj.shape
    margin_r, margin_c = max(1, (r1 - r0) // 16), max(1, (c1 - c0) // 16)
    # ROW: phase encoded along the row direction, ghosts displaced across columns
    pe = vol.pe_direction or "COL"
    left = d[:, r0:r1 + 1, 0:max(0, c0 - margin_c)]
    right = d[:, r0:r1 + 1, min(C, c1 + 1 + margin_c):C]
    top = d[:, 0:max(0, r0 - margin_r), c0:c1 + 1]
    bottom = d[:, min(R, r1 + 1 + margin_r):R, c0:c1 + 1]
    horiz = np.concatenate([left.ravel(), right.ravel()])
    vert = np.concatenate([top.ravel(), bottom.ravel()])
    pe_bg, fe_bg = (horiz, vert) if pe == "ROW" else (vert, horiz)
    if pe_bg.size == 0 or fe_bg.size == 0:
        raise MetricError("no background on both sides of the object along phase and frequency encoding")
    signal = float(d[m].mean())
    ratio = (float(pe_bg.mean()) - float(fe_bg.mean())) / signal
    return max(0.0, ratio), {"phase_encoding": pe, "assumed_phase_encoding": vol.pe_direction is None,
                             "pe_background": float(pe_bg.mean()), "fe_background": float(fe_bg.mean()), "signal": signal}


def m_clipping(vol: Volume) -> tuple[float, dict]:
    bits = vol.bits_stored
    hi = (1 << (bits - 1)) - 1 if vol.signed else (1 << bits) - 1
    lo = -(1 << (bits - 1)) if vol.signed else None
    mask = foreground(vol)
    n = int(np.count_nonzero(mask))
    st = vol.stored
    # counted in place (no copy of the foreground's values): at or beyond the storable extremes
    over = st >= hi
    if lo is not None:
        over |= st <= lo
    if n:
        over &= mask
    else:
        n = st.size
    clipped = int(np.count_nonzero(over))
    return clipped / max(1, n), {"clipped_voxels": clipped, "voxels": n, "max_storable": hi}


def m_dynamic_range(vol: Volume) -> tuple[float, dict]:
    p_lo, p_hi = np.percentile(vol.stored, [0.5, 99.5])
    return float(math.log2(max(0.0, float(p_hi - p_lo)) + 1.0)), {"p0_5": float(p_lo), "p99_5": float(p_hi)}


def _steps(vol: Volume) -> tuple[np.ndarray, float]:
    z = [p for p in vol.positions if p is not None]
    if len(z) < 2:
        return np.array([]), 0.0
    diffs = np.diff(np.array(sorted(z)))
    nominal = float(np.median(diffs))
    return diffs, nominal


def m_slice_spacing(vol: Volume) -> tuple[float, dict]:
    if any(p is None for p in vol.positions):
        raise MetricError("slices lack ImagePositionPatient/ImageOrientationPatient")
    diffs, nominal = _steps(vol)
    if diffs.size == 0:
        return 0.0, {"slices": len(vol.positions), "nominal": None}
    dev = float(np.abs(diffs - nominal).max())
    return dev, {"nominal_step_mm": nominal, "min_step_mm": float(diffs.min()), "max_step_mm": float(diffs.max())}


def m_missing_slices(vol: Volume) -> tuple[float, dict]:
    by_pos = 0
    diffs, nominal = _steps(vol)
    if diffs.size and nominal > 0:
        by_pos = int(sum(max(0, round(d / nominal) - 1) for d in diffs if d > 1.5 * nominal))
    nums = sorted({n for n in vol.instance_numbers if n is not None and n < 1000})
    by_num = int(sum(b - a - 1 for a, b in zip(nums, nums[1:]) if b - a > 1))
    return float(max(by_pos, by_num)), {"gaps_by_position": by_pos, "gaps_by_instance_number": by_num}


def m_noise(vol: Volume) -> tuple[float, dict]:
    mask = foreground(vol)
    both = mask[..., 1:] & mask[..., :-1]
    if both.sum() < 16:
        raise MetricError("too little foreground to measure noise")
    # robust to anatomy: MAD of neighbour differences inside the object (tissue edges are outliers), /sqrt(2)
    diffs = np.diff(vol.data.astype(np.float64), axis=-1)[both]
    sigma = 1.4826 * float(np.median(np.abs(diffs - np.median(diffs)))) / np.sqrt(2.0)
    return sigma, {"voxel_pairs": int(both.sum())}


# metric -> its implementation; names, thresholds and directions are the core's table (qc_metrics).
FUNCS: dict[str, Callable[[Volume], tuple[float, dict]]] = {
    "snr": m_snr, "ghosting": m_ghosting, "clipping": m_clipping, "dynamic_range": m_dynamic_range,
    "slice_spacing": m_slice_spacing, "missing_slices": m_missing_slices, "noise": m_noise,
}
METRICS: dict[str, tuple[Callable[[Volume], tuple[float, dict]], str, str]] = {
    name: (FUNCS[name], spec.param, spec.direction) for name, spec in QC_METRICS.items()
}


def _threshold(metric: str, v: ir.Value) -> float:
    if isinstance(v, ir.Quantity):
        if metric == "clipping" and v.unit == "%":
            return v.value / 100.0
        return float(v.value)
    if isinstance(v, bool):
        raise ValueError("a threshold is a number")
    return float(v)


def validate_check(check: ir.QcCheck) -> Optional[dict[str, Any]]:
    """An error value when the check names an unknown metric/parameter or lacks its threshold."""
    if check.metric not in METRICS:
        return {"error": f"unknown QC metric '{check.metric}'", "hint": did_you_mean(check.metric, METRICS),
                "known_metrics": sorted(METRICS)}
    _, pname, _ = METRICS[check.metric]
    extra = [p for p in check.params if p != pname]
    if extra:
        return {"error": f"metric '{check.metric}' has no parameter '{extra[0]}'", "hint": did_you_mean(extra[0], [pname])}
    if pname not in check.params:
        return {"error": f"metric '{check.metric}' needs its threshold '{pname}'"}
    try:
        _threshold(check.metric, check.params[pname])
    except (TypeError, ValueError):
        return {"error": f"threshold '{pname}' of '{check.name}' is not a number"}
    return None


def run_check(check: ir.QcCheck, vol: Volume) -> dict[str, Any]:
    """One QC check on one volume: measured value, threshold, ok and verdict (or an error value)."""
    out: dict[str, Any] = {"check": check.name, "metric": check.metric, "severity": check.severity.value}
    bad = validate_check(check)
    if bad:
        return {**out, "verdict": "error", "ok": False, **bad}
    func, pname, direction = METRICS[check.metric]
    thr = _threshold(check.metric, check.params[pname])
    try:
        value, detail = func(vol)
    except MetricError as exc:
        return {**out, "verdict": "error", "ok": False, "error": exc.diagnostic.message, "threshold": thr, "parameter": pname}
    ok = value >= thr if direction == "min" else value <= thr
    verdict = "pass" if ok else ("fail" if check.severity == ir.Significance.ERROR else "warn" if check.severity == ir.Significance.WARNING else "pass")
    return {**out, "parameter": pname, "threshold": thr, "direction": direction,
            "measured": round(float(value), 6), "ok": bool(ok), "verdict": verdict, "detail": detail}


def series_verdict(results: Sequence[dict[str, Any]]) -> str:
    """fail > error (could not measure) > warn > pass."""
    vs = {r["verdict"] for r in results}
    for v in ("fail", "error", "warn"):
        if v in vs:
            return v
    return "pass"


def qc_series(checks: Sequence[ir.QcCheck], paths: Sequence[str | Path], load=load_volume) -> dict[str, Any]:
    """Run checks on one series (pixel data read once; ``load`` may hand out a volume already read)."""
    try:
        vol = load(paths)
    except Exception as exc:  # undecodable pixel data is a QC result, not a crash
        res = [{"check": c.name, "metric": c.metric, "severity": c.severity.value, "verdict": "error", "ok": False,
                "error": f"pixel data unreadable: {type(exc).__name__}: {exc}"} for c in checks]
        return {"checks": res, "verdict": series_verdict(res) if res else "error"}
    res = [run_check(c, vol) for c in checks]
    return {"checks": res, "verdict": series_verdict(res), "shape": list(vol.data.shape)}


def qc_check_exam(trial: ir.Trial, check: ir.QcCheck, classification: dict[str, Any], root: Path,
                  load=load_volume) -> dict[str, Any]:
    """One QC check on every matched series of an exam whose protocol it applies to."""
    series_out = []
    for entry in classification.get("series", []):
        if entry.get("status") != "matched":
            continue
        proto = trial.protocol(entry["protocol"])
        if proto is None or check not in trial.qc_for(proto):
            continue
        r = qc_series([check], [root / f for f in entry.get("files", [])], load)
        r.update({"series_uid": entry["series_uid"], "protocol": proto.name,
                  "series_description": entry.get("series_description"), "series_number": entry.get("series_number")})
        series_out.append(r)
    verdict = series_verdict([{"verdict": s["verdict"]} for s in series_out])
    return {"check": check.name, "metric": check.metric, "series": series_out, "verdict": verdict,
            "summary": {"series": len(series_out), **{v: sum(s["verdict"] == v for s in series_out)
                                                      for v in ("pass", "warn", "fail", "error")}}}


def qc_exam(trial: ir.Trial, classification: dict[str, Any], root: Path, *, only: Optional[str] = None) -> dict[str, Any]:
    """Every QC check of the study (or check ``only``) on an exam, one view per series (what the
    per-check nodes add up to)."""
    cache: dict[tuple, Volume] = {}

    def load(paths):
        key = tuple(str(p) for p in paths)
        if key not in cache:
            cache[key] = load_volume(paths)
        return cache[key]

    return merge_by_series(qc_check_exam(trial, q, classification, root, load) for q in trial.qc
                           if only is None or q.name == only)


def merge_by_series(docs: Iterable[dict]) -> dict[str, Any]:
    """The per-check QC results of an exam (``results/qc/*.json``) as one view per series:
    ``{"series": [{series_uid, protocol, verdict, checks: [...]}, ...], "verdict": ...}``."""
    by: dict[str, dict] = {}
    for doc in docs:
        if not isinstance(doc, dict):
            continue
        for s in doc.get("series", []):
            e = by.setdefault(s["series_uid"], {k: s.get(k) for k in ("series_uid", "protocol", "series_description",
                                                                       "series_number")} | {"checks": []})
            e["checks"].extend(s.get("checks", []))
            if s.get("shape"):
                e["shape"] = s["shape"]
    series = sorted(by.values(), key=lambda e: (e.get("series_number") or 0, e["series_uid"]))
    for e in series:
        e["checks"].sort(key=lambda c: c.get("check") or "")
        e["verdict"] = series_verdict(e["checks"]) if e["checks"] else "pass"
    return {"series": series, "verdict": series_verdict([{"verdict": e["verdict"]} for e in series])}


def qc_step(ctx) -> dict:
    """One pixel QC check (snr, ghosting, clipping, dynamic range, slice spacing, missing slices, noise) on the
    exam's series of the protocols it applies to; writes ``results/qc/<check>.json``."""
    from ..workdir import CLASSIFICATION, qc_result
    from .classify import original_series

    check = next(q for q in ctx.trial.qc if q.name == ctx.ref)

    # the original pixels at the site: each series' files from its de-identified UID
    cls = ctx.read_json(CLASSIFICATION, {})
    originals = original_series(ctx)
    by_path = {str(i.path): (i, s) for s in originals.values() for i in s.instances}

    def load(paths):  # the exam's QC nodes share each series' pixels: one decode per series
        def make():
            found = [by_path.get(str(p)) for p in paths]
            if not found or any(f is None for f in found):
                return load_volume(paths)
            # the scan read every header: QC reads only the pixels (the first path is the series' header)
            head = found[0][0].header if found[0][0] is found[0][1].instances[0] else None
            return load_volume(paths, [f[0].pixels for f in found], head)
        return ctx.cache.get(("volume", tuple(str(p) for p in paths)), make)

    cls = {**cls, "series": [{**e, "files": [str(i.path) for i in originals[e["series_uid"]].instances]}
                             if e.get("series_uid") in originals else e for e in cls.get("series", [])]}
    from ..deid.results import scrub_device_identity

    result = scrub_device_identity(qc_check_exam(ctx.trial, check, cls, Path("/"), load), ctx.exam_info)
    ctx.write_json(qc_result(check.name), result)
    return {"verdict": result["verdict"], **result["summary"]}
