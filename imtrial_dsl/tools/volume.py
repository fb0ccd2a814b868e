"""Tissue volume of a 3D series: voxels above Otsu's threshold × voxel volume (mm³).

Usage: python3 -m imtrial_dsl.tools.volume SERIES_DIR OUT.json

A small, real demo measurement for the example studies (not a validated hippocampal segmentation):
the segmentation is the bright class of a two-class Otsu split of the volume.
"""
from __future__ import annotations

from ._image import load_series, otsu, usage, write_result


def measure(path) -> dict:
    vol, (dz, dy, dx), _ = load_series(path)
    t = otsu(vol)
    n = int((vol > t).sum())
    voxel = dz * dy * dx
    return {"value": round(n * voxel, 3), "unit": "mm3", "voxels": n, "voxel_mm3": voxel, "threshold": t,
            "shape": list(vol.shape), "method": "voxels above Otsu threshold x voxel volume"}


def main() -> None:
    src, out = usage(__doc__, 2)
    write_result(out, measure(src))


if __name__ == "__main__":
    main()
