"""A RECIST-1.1-style automatic read: target lesions and the sum of their longest diameters.

Usage: python3 -m imtrial_dsl.tools.recist CAP_DIR LUNG_DIR OUT.json

Lesion candidates are 6-connected components of voxels brighter than the body mean + 3·SD (CAP) or
soft-tissue density inside the aerated lung (LUNG: > −300 HU surrounded by air); measurable lesions
have a longest in-plane diameter ≥ 10 mm. Up to 5 targets (largest first) are summed (``sum_diameters``).
``new_lesions`` compares with the baseline read when the runner provides one (``IMTRIAL_BASELINE_OUTPUT``,
the same analysis' output file of the subject's baseline exam): measurable lesions now minus at baseline,
not below 0; at screening/baseline it is 0 by definition; otherwise it is not reported.
A demo read, not a radiologist's.
"""
from __future__ import annotations

import json
import os

import numpy as np

from ._image import feret_diameter, label, load_series, otsu, usage, write_result

MEASURABLE_MM = 10.0
MAX_TARGETS = 5


def lesions(vol: np.ndarray, spacing, lung: bool) -> list[float]:
    _, dy, dx = spacing
    if lung:
        air = vol < -500
        cand = (vol > -300) & (np.roll(air, 3, 1) | np.roll(air, -3, 1)) & (np.roll(air, 3, 2) | np.roll(air, -3, 2))
    else:
        body = vol > otsu(vol)
        vals = vol[body]
        cand = body & (vol > vals.mean() + 3 * vals.std())
    lab, n = label(cand)
    diams = []
    for i in range(1, n + 1):
        zz, yy, xx = np.nonzero(lab == i)
        best = 0.0
        for z in np.unique(zz):
            sel = zz == z
            pts = np.stack([yy[sel] * dy, xx[sel] * dx], axis=1).astype(float)
            best = max(best, feret_diameter(pts) + min(dy, dx))
        if best >= MEASURABLE_MM:
            diams.append(round(best, 2))
    return sorted(diams, reverse=True)


def main() -> None:
    cap, lung, out = usage(__doc__, 3)
    v1, sp1, _ = load_series(cap)
    v2, sp2, _ = load_series(lung)
    found = lesions(v1, sp1, lung=False) + lesions(v2, sp2, lung=True)
    found.sort(reverse=True)
    targets = found[:MAX_TARGETS]
    result = {"sum_diameters": {"value": round(float(sum(targets)), 2), "unit": "mm"},
              "target_lesions": {"value": len(targets), "unit": "count"},
              "measurable_lesions": len(found), "diameters_mm": targets}
    visit_kind = os.environ.get("IMTRIAL_VISIT_KIND", "")
    prior = os.environ.get("IMTRIAL_BASELINE_OUTPUT")
    if visit_kind in ("baseline", "screening"):  # pre-treatment scans define the baseline burden
        result["new_lesions"] = {"value": 0, "unit": "count", "comparison": f"{visit_kind} visit (no earlier reference)"}
    elif prior and os.path.isfile(prior):
        base = json.load(open(prior))
        result["new_lesions"] = {"value": max(0, len(found) - int(base.get("measurable_lesions", 0))), "unit": "count",
                                 "comparison": "measurable lesions now minus at baseline"}
    write_result(out, result)


if __name__ == "__main__":
    main()
