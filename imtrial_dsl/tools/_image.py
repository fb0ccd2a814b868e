"""Shared helpers of the demo analysis programs: load a DICOM series as a 3D volume, simple
segmentation (Otsu), connected components and JSON output — numpy only (no scipy)."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np


def _files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))


def load_series(path: str | os.PathLike) -> tuple[np.ndarray, tuple[float, float, float], Any]:
    """(volume[z, y, x] in real-world units after rescale, voxel size (dz, dy, dx) in mm, first header).

    Classic single-frame series are sorted along the slice normal; Enhanced multi-frame objects
    take their spacing from the functional groups.
    """
    import pydicom

    slices = []
    for f in _files(Path(path)):
        try:
            ds = pydicom.dcmread(f)
        except Exception:
            continue
        if "PixelData" in ds:
            slices.append(ds)
    if not slices:
        raise SystemExit(f"{path}: no DICOM images")
    first = slices[0]
    if int(first.get("NumberOfFrames", 1) or 1) > 1:
        vol = first.pixel_array.astype(np.float32)
        shared = first.get("SharedFunctionalGroupsSequence", [None])[0]
        pm = shared.get("PixelMeasuresSequence", [None])[0] if shared is not None else None
        ps = [float(v) for v in pm.PixelSpacing] if pm is not None and "PixelSpacing" in pm else [1.0, 1.0]
        dz = float(pm.get("SpacingBetweenSlices", 0) or pm.get("SliceThickness", 1) or 1) if pm is not None else 1.0
        slope = float(first.get("RescaleSlope", 1) or 1)
        inter = float(first.get("RescaleIntercept", 0) or 0)
        return vol * slope + inter, (dz, ps[0], ps[1]), first

    def pos(ds):
        ipp = ds.get("ImagePositionPatient")
        iop = ds.get("ImageOrientationPatient")
        if ipp is None or iop is None:
            return float(ds.get("InstanceNumber", 0) or 0)
        n = np.cross(np.array(iop[:3], float), np.array(iop[3:], float))
        return float(np.dot(n, np.array(ipp, float)))

    slices.sort(key=pos)
    planes = []
    for ds in slices:
        arr = ds.pixel_array.astype(np.float32)
        planes.append(arr * float(ds.get("RescaleSlope", 1) or 1) + float(ds.get("RescaleIntercept", 0) or 0))
    shape = planes[0].shape
    planes = [p for p in planes if p.shape == shape]
    vol = np.stack(planes)
    ps = [float(v) for v in first.get("PixelSpacing", [1.0, 1.0])]
    if len(slices) > 1:
        gaps = np.diff([pos(s) for s in slices])
        dz = float(np.median(np.abs(gaps))) or float(first.get("SliceThickness", 1) or 1)
    else:
        dz = float(first.get("SpacingBetweenSlices", 0) or first.get("SliceThickness", 1) or 1)
    return vol, (dz, ps[0], ps[1]), first


def otsu(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold (maximum between-class variance) of a sample of intensities."""
    v = values[np.isfinite(values)].ravel()
    if v.size == 0 or v.min() == v.max():
        return float(v.min()) if v.size else 0.0
    hist, edges = np.histogram(v, bins=bins)
    centers = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centers)
    mu0 = m0 / np.maximum(w0, 1)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float(centers[int(np.argmax(between[:-1]))])


def label(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """6-connected components of a boolean volume: (labels, count), label 0 = background.

    Min-label propagation along each axis until stable; vectorized, fine for sparse masks.
    """
    mask = np.asarray(mask, bool)
    big = np.iinfo(np.int64).max
    lab = np.where(mask, np.arange(mask.size, dtype=np.int64).reshape(mask.shape), big)
    while True:
        before = lab.copy()
        for ax in range(mask.ndim):
            for shift in (1, -1):
                rolled = np.roll(lab, shift, axis=ax)
                edge = [slice(None)] * mask.ndim
                edge[ax] = slice(0, 1) if shift == 1 else slice(-1, None)
                rolled[tuple(edge)] = big  # no wrap-around
                lab = np.where(mask, np.minimum(lab, rolled), big)
        if np.array_equal(lab, before):
            break
    roots = np.unique(lab[mask])
    out = np.zeros(mask.shape, np.int32)
    if roots.size:
        out[mask] = np.searchsorted(roots, lab[mask]) + 1
    return out, int(roots.size)


def feret_diameter(points_mm: np.ndarray) -> float:
    """Longest distance between two points of a 2D set (mm); exact for the small sets used here."""
    if len(points_mm) < 2:
        return 0.0
    pts = points_mm
    if len(pts) > 400:  # the diameter is attained on the convex hull; sampling extreme points is enough
        angles = np.linspace(0, np.pi, 64, endpoint=False)
        proj = pts @ np.stack([np.cos(angles), np.sin(angles)])
        idx = np.unique(np.concatenate([proj.argmin(0), proj.argmax(0)]))
        pts = pts[idx]
    d = pts[:, None, :] - pts[None, :, :]
    return float(np.sqrt((d ** 2).sum(-1)).max())


def write_result(path: str | os.PathLike, result: dict) -> None:
    """Write the measurements JSON (temp then rename); named measurements requested by the runner are
    filled from ``result['value']`` when the program has one primary result."""
    wanted = [m for m in os.environ.get("IMTRIAL_MEASUREMENTS", "").split(",") if m]
    if len(wanted) == 1 and "value" in result and wanted[0] not in result:
        result[wanted[0]] = {"value": result["value"], "unit": result.get("unit", "")}
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp")
    tmp.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, p)


def usage(doc: str, n: int) -> list[str]:
    args = sys.argv[1:]
    if len(args) != n or any(a in ("-h", "--help") for a in args):
        sys.stderr.write(doc.strip() + "\n")
        raise SystemExit(2)
    return args
