"""Pixel data: a 3-D head phantom per contrast (Hounsfield units for CT, FDG uptake for PET), noise, motion ghosts."""
from __future__ import annotations

import numpy as np


# tissue -> relative MR signal per contrast, or HU for CT
TISSUES = ("scalp", "skull", "csf", "gm", "wm", "ventricle")
CONTRAST_TABLE = {
    "T1": dict(scalp=0.95, skull=0.06, csf=0.18, gm=0.52, wm=0.78, ventricle=0.15),
    "FLAIR": dict(scalp=0.60, skull=0.05, csf=0.06, gm=0.66, wm=0.50, ventricle=0.05),
    "SWI": dict(scalp=0.55, skull=0.05, csf=0.80, gm=0.52, wm=0.62, ventricle=0.82),
    "T2": dict(scalp=0.45, skull=0.05, csf=0.95, gm=0.58, wm=0.42, ventricle=0.95),
    "DWI": dict(scalp=0.15, skull=0.03, csf=0.20, gm=0.62, wm=0.55, ventricle=0.18),
    "CT": dict(scalp=-60.0, skull=1200.0, csf=8.0, gm=38.0, wm=28.0, ventricle=6.0),
    # FDG: grey matter takes up about 2.5x white matter; CSF, bone and scalp little
    "PT": dict(scalp=0.12, skull=0.05, csf=0.06, gm=0.85, wm=0.34, ventricle=0.05),
}
MR_SCALE = 1600.0   # stored value of relative signal 1.0
MR_SIGMA = 18.0     # Rician noise sigma (stored units)
CT_SIGMA = 4.0      # HU


def head_phantom(shape: tuple[int, int, int], contrast: str) -> np.ndarray:
    """Noise-free (slices, rows, cols) head: nested ellipsoids of tissue classes, smooth coil bias for MR."""
    nz, ny, nx = shape
    z = np.linspace(-1, 1, nz)[:, None, None]
    y = np.linspace(-1, 1, ny)[None, :, None]
    x = np.linspace(-1, 1, nx)[None, None, :]
    r = lambda ax, ay, az, cx=0.0, cy=0.0, cz=0.0: ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 + ((z - cz) / az) ** 2
    head = r(0.62, 0.74, 1.25)
    skull = r(0.57, 0.69, 1.18)
    brain = r(0.52, 0.64, 1.12)
    wm = r(0.40, 0.50, 0.95)
    vent = np.minimum(r(0.07, 0.20, 0.35, cx=-0.09), r(0.07, 0.20, 0.35, cx=0.09))
    sulci = 0.06 * np.sin(9 * np.arctan2(y, x)) * np.cos(5 * z)  # folded cortex: WM/GM boundary undulates
    t = CONTRAST_TABLE[contrast]
    bg = -1000.0 if contrast == "CT" else 0.0
    vol = np.full(shape, bg, dtype=np.float64)
    vol[head <= 1] = t["scalp"]
    vol[skull <= 1] = t["skull"]
    vol[brain <= 1] = t["csf"]
    vol[brain <= 0.85] = t["gm"]
    vol[wm + sulci <= 1] = t["wm"]
    vol[vent <= 1] = t["ventricle"]
    if contrast == "CT":
        return vol
    bias = 1.0 + 0.08 * x - 0.05 * y  # receive-coil sensitivity
    return np.clip(vol * bias, 0, None) * MR_SCALE


def add_ghosts(clean: np.ndarray, pe_axis: int, amplitude: float) -> np.ndarray:
    """Motion-like ghosts: attenuated replicas of the object displaced along phase encoding."""
    n = clean.shape[pe_axis]
    out = clean.copy()
    for k, a in ((n // 2, amplitude), (n // 4, amplitude * 0.6), (3 * n // 4, amplitude * 0.6)):
        out += a * np.roll(clean, k, axis=pe_axis)
    return out


def add_noise(clean: np.ndarray, rng: np.random.Generator, contrast: str) -> np.ndarray:
    if contrast == "CT":
        return clean + rng.normal(0.0, CT_SIGMA, clean.shape)
    n1 = rng.normal(0.0, MR_SIGMA, clean.shape)
    n2 = rng.normal(0.0, MR_SIGMA, clean.shape)
    return np.sqrt((clean + n1) ** 2 + n2 ** 2)  # Rician magnitude


def to_stored(vol: np.ndarray, contrast: str) -> np.ndarray:
    if contrast == "CT":
        vol = vol + 1024.0
    return np.clip(np.rint(vol), 0, 4095).astype(np.uint16)
