"""Count bright focal lesions: connected components of hyperintense voxels inside the head.

Usage: python3 -m imtrial_dsl.tools.count_lesions FLAIR_DIR [SWI_DIR] OUT.json

FLAIR: voxels brighter than mean + 4·SD of the head (Otsu mask, eroded by the outer rim) form
candidates; 6-connected components of at least 3 voxels are counted (``value``). With an SWI series the
dark foci (mean − 4·SD) are counted too (``swi_hypointense_foci``). A demo read, not a validated one.
"""
from __future__ import annotations

import sys

import numpy as np

from ._image import label, load_series, otsu, write_result

MIN_VOXELS = 3


def _inner_mask(vol: np.ndarray) -> np.ndarray:
    mask = vol > otsu(vol)
    inner = mask.copy()
    for ax in range(vol.ndim):  # one-voxel erosion keeps the bright skin/edge out of the candidates
        if vol.shape[ax] > 2:
            inner &= np.roll(mask, 1, ax) & np.roll(mask, -1, ax)
    return inner if inner.any() else mask


def count(vol: np.ndarray, bright: bool) -> tuple[int, list[int]]:
    mask = _inner_mask(vol)
    vals = vol[mask]
    mu, sd = float(vals.mean()), float(vals.std())
    cand = mask & ((vol > mu + 4 * sd) if bright else (vol < mu - 4 * sd))
    lab, n = label(cand)
    sizes = np.bincount(lab.ravel())[1:] if n else np.array([], int)
    kept = sorted((int(s) for s in sizes if s >= MIN_VOXELS), reverse=True)
    return len(kept), kept


def main() -> None:
    args = sys.argv[1:]
    if len(args) not in (2, 3) or any(a in ("-h", "--help") for a in args):
        sys.stderr.write(__doc__.strip() + "\n")
        raise SystemExit(2)
    out = args[-1]
    flair, _, _ = load_series(args[0])
    n, sizes = count(flair, bright=True)
    result = {"value": n, "unit": "count", "lesion_voxels": sizes, "method": "components > mean+4SD, >= 3 voxels"}
    if len(args) == 3:
        swi, _, _ = load_series(args[1])
        m, msizes = count(swi, bright=False)
        result["swi_hypointense_foci"] = {"value": m, "unit": "count"}
        result["swi_focus_voxels"] = msizes
    write_result(out, result)


if __name__ == "__main__":
    main()
