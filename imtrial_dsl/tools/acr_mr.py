"""ACR-style MRI phantom metrics on the central slice: SNR, percent integral uniformity, diameter error.

Usage: python3 -m imtrial_dsl.tools.acr_mr T1_DIR T2_DIR OUT.json

* ``snr``: mean in a central ROI (≈ 75 % of the phantom area) / (SD of the background corners / 0.655),
  the Rayleigh-corrected single-image method (NEMA MS 1);
* ``piu``: 100·(1 − (max − min)/(max + min)) of ≈ 1 cm² local means inside the central ROI (ACR);
* ``diameter_error``: largest |measured − 190 mm| of the phantom's horizontal and vertical diameters.
T2 is used for a second SNR/PIU (``t2_snr``, ``t2_piu``).
"""
from __future__ import annotations

import numpy as np

from ._image import load_series, otsu, usage, write_result

NOMINAL_DIAMETER_MM = 190.0


def _box_mean(img: np.ndarray, k: int) -> np.ndarray:
    c = np.pad(img, ((1, 0), (1, 0))).cumsum(0).cumsum(1)
    return (c[k:, k:] - c[:-k, k:] - c[k:, :-k] + c[:-k, :-k]) / (k * k)


def slice_metrics(img: np.ndarray, spacing: tuple[float, float]) -> dict:
    dy, dx = spacing
    mask = img > otsu(img)
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        raise SystemExit("no phantom signal found")
    cy, cx = ys.mean(), xs.mean()
    area = mask.sum()
    r = np.sqrt(0.75 * area / np.pi)
    yy, xx = np.mgrid[: img.shape[0], : img.shape[1]]
    roi = (yy - cy) ** 2 + (xx - cx) ** 2 <= r ** 2
    h, w = img.shape
    q = max(2, min(h, w) // 8)
    corners = np.concatenate([img[:q, :q].ravel(), img[:q, -q:].ravel(), img[-q:, :q].ravel(), img[-q:, -q:].ravel()])
    noise = float(corners.std()) / 0.655 if corners.std() > 0 else float("nan")
    snr = float(img[roi].mean()) / noise if noise and np.isfinite(noise) else float("nan")
    k = max(1, int(round(np.sqrt(100.0 / (dy * dx)))))  # ~1 cm^2 window
    local = _box_mean(img.astype(np.float64), k)
    inner = roi[k // 2: k // 2 + local.shape[0], k // 2: k // 2 + local.shape[1]]
    vals = local[inner] if inner.any() else local.ravel()
    hi, lo = float(vals.max()), float(vals.min())
    piu = 100.0 * (1 - (hi - lo) / (hi + lo)) if hi + lo else float("nan")
    row = mask[int(round(cy))]
    col = mask[:, int(round(cx))]
    d_h = (np.ptp(np.nonzero(row)[0]) + 1) * dx if row.any() else 0.0
    d_v = (np.ptp(np.nonzero(col)[0]) + 1) * dy if col.any() else 0.0
    return {"snr": snr, "piu": piu, "diameter_h_mm": float(d_h), "diameter_v_mm": float(d_v)}


def main() -> None:
    t1, t2, out = usage(__doc__, 3)
    v1, (_, dy, dx), _ = load_series(t1)
    m1 = slice_metrics(v1[v1.shape[0] // 2], (dy, dx))
    v2, (_, dy2, dx2), _ = load_series(t2)
    m2 = slice_metrics(v2[v2.shape[0] // 2], (dy2, dx2))
    err = max(abs(m1["diameter_h_mm"] - NOMINAL_DIAMETER_MM), abs(m1["diameter_v_mm"] - NOMINAL_DIAMETER_MM))
    write_result(out, {
        "snr": {"value": round(m1["snr"], 3), "unit": "count"}, "piu": {"value": round(m1["piu"], 3), "unit": "percent"},
        "diameter_error": {"value": round(err, 3), "unit": "mm"},
        "t2_snr": round(m2["snr"], 3), "t2_piu": round(m2["piu"], 3),
        "diameters_mm": [m1["diameter_h_mm"], m1["diameter_v_mm"]]})


if __name__ == "__main__":
    main()
