"""ACR-style CT phantom metrics: mean CT number of water and noise in the uniformity module.

Usage: python3 -m imtrial_dsl.tools.acr_ct CT_DIR OUT.json

The uniformity slice is the most homogeneous slice of the series (lowest SD in a central ROI of
≈ 40 % of the phantom diameter); ``water_hu`` is its mean (HU, after RescaleSlope/Intercept) and
``noise_hu`` its SD.
"""
from __future__ import annotations

import numpy as np

from ._image import load_series, otsu, usage, write_result


def main() -> None:
    src, out = usage(__doc__, 2)
    vol, (_, dy, dx), _ = load_series(src)
    best = None
    for z in range(vol.shape[0]):
        img = vol[z]
        mask = img > otsu(img)
        if not mask.any():
            continue
        ys, xs = np.nonzero(mask)
        cy, cx = ys.mean(), xs.mean()
        r = 0.2 * np.sqrt(mask.sum() / np.pi) * 2
        yy, xx = np.mgrid[: img.shape[0], : img.shape[1]]
        roi = (yy - cy) ** 2 + (xx - cx) ** 2 <= r ** 2
        vals = img[roi]
        if vals.size and (best is None or vals.std() < best[2]):
            best = (z, float(vals.mean()), float(vals.std()), int(vals.size))
    if best is None:
        raise SystemExit("no phantom found")
    z, mean, sd, n = best
    write_result(out, {"water_hu": {"value": round(mean, 3), "unit": "HU"}, "noise_hu": {"value": round(sd, 3), "unit": "HU"},
                       "slice_index": z, "roi_pixels": n})


if __name__ == "__main__":
    main()
