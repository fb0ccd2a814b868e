"""A RECIST-1.1-style automatic read: target lesions and the sum of their longest diameters.

Usage: python3 -m imtrial_dsl.tools.recist CAP_DIR LUNG_DIR OUT.json

Lesion candidates are 6-connected components of voxels brighter than the body mean + 3·SD (CAP) or
soft-tissue density inside the aerated lung (LUNG: > −300 HU surrounded by air); measurable lesions
have a longest in-plane diameter ≥ 10 mm. Up to 5 targets (largest first) are summed (``sum_diameters``).
``new_lesions`` compares with the baseline read when the runner provides one (``IMTRIAL_BASELINE_OUTPUT``,
the same analysis' output file of the subject's baseline exam): measurable lesions now minus at baseline,
not below 0; at screening/baseline it is 0 by definition; otherwise it is not reported.

``lesions`` (what ``imtrial export sdtm`` turns into TU/TR rows): at baseline the targets ``T01``… (largest
first) and the other measurable lesions as non-targets ``NT01``…, each with its centroid (mm, from the
series' first ImagePositionPatient); at a follow-up each baseline lesion is found again as the nearest
lesion within ``TRACK_MM`` of its centroid (a target not found: diameter 0, disappeared; a non-target:
absent), and a lesion matching none is new (``NEW01``…). With a baseline, ``sum_diameters`` is the sum of
the baseline targets' diameters now (RECIST follows the same lesions), not of the largest lesions now.
A demo read, not a radiologist's.
"""
from __future__ import annotations

import json
import os

import numpy as np

from ._image import feret_diameter, label, load_series, otsu, usage, write_result

MEASURABLE_MM = 10.0
MAX_TARGETS = 5
TRACK_MM = 15.0


def lesions(vol: np.ndarray, spacing, lung: bool, origin=(0.0, 0.0, 0.0)) -> list[dict]:
    """Measurable lesions, largest first: {"diameter", "centroid" (x, y, z mm), "location"}."""
    dz, dy, dx = spacing
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
            c = [round(float(origin[0] + xx.mean() * dx), 1), round(float(origin[1] + yy.mean() * dy), 1),
                 round(float(origin[2] + zz.mean() * dz), 1)]
            diams.append({"diameter": round(best, 2), "centroid": c, "location": "LUNG" if lung else ""})
    return sorted(diams, key=lambda d: -d["diameter"])


def _origin(header) -> tuple[float, float, float]:
    ipp = header.get("ImagePositionPatient") if header is not None else None
    return tuple(float(v) for v in ipp) if ipp is not None and len(ipp) == 3 else (0.0, 0.0, 0.0)


def track(found: list[dict], base: list[dict]) -> list[dict]:
    """This time point's lesion records, following the baseline's lesions (nearest centroid within TRACK_MM)."""
    pairs = sorted((float(np.linalg.norm(np.subtract(f["centroid"], b["centroid"]))), i, j)
                   for i, b in enumerate(base) for j, f in enumerate(found) if b.get("centroid"))
    match, used = {}, set()
    for dist, i, j in pairs:
        if dist <= TRACK_MM and i not in match and j not in used:
            match[i] = j
            used.add(j)
    out = []
    for i, b in enumerate(base):
        f = found[match[i]] if i in match else None
        rec = {"id": b["id"], "role": b["role"], "location": b.get("location", ""),
               "centroid": f["centroid"] if f else b.get("centroid")}
        if b["role"] == "target":
            rec["diameter"] = f["diameter"] if f else 0.0
        else:
            rec["state"] = "present" if f else "absent"
        out.append(rec)
    new = [f for j, f in enumerate(found) if j not in used]
    out += [{"id": f"NEW{k + 1:02d}", "role": "new", "diameter": f["diameter"], "location": f["location"],
             "centroid": f["centroid"]} for k, f in enumerate(new)]
    return out


def main() -> None:
    cap, lung, out = usage(__doc__, 3)
    v1, sp1, h1 = load_series(cap)
    v2, sp2, h2 = load_series(lung)
    found = lesions(v1, sp1, False, _origin(h1)) + lesions(v2, sp2, True, _origin(h2))
    found.sort(key=lambda d: -d["diameter"])
    targets = [d["diameter"] for d in found[:MAX_TARGETS]]
    result = {"sum_diameters": {"value": round(float(sum(targets)), 2), "unit": "mm"},
              "target_lesions": {"value": len(targets), "unit": "count"},
              "measurable_lesions": len(found), "diameters_mm": targets,
              "lesions": [{"id": f"T{i + 1:02d}" if i < MAX_TARGETS else f"NT{i - MAX_TARGETS + 1:02d}",
                           "role": "target" if i < MAX_TARGETS else "non_target", **d,
                           **({} if i < MAX_TARGETS else {"state": "present"})} for i, d in enumerate(found)]}
    for rec in result["lesions"]:
        if rec["role"] == "non_target":
            rec.pop("diameter")
    visit_kind = os.environ.get("IMTRIAL_VISIT_KIND", "")
    prior = os.environ.get("IMTRIAL_BASELINE_OUTPUT")
    if visit_kind in ("baseline", "screening"):  # pre-treatment scans define the baseline burden
        result["new_lesions"] = {"value": 0, "unit": "count", "comparison": f"{visit_kind} visit (no earlier reference)"}
    elif prior and os.path.isfile(prior):
        base = json.load(open(prior))
        if isinstance(base.get("lesions"), list):      # follow the baseline's lesions
            result["lesions"] = track(found, base["lesions"])
            tracked = [r["diameter"] for r in result["lesions"] if r["role"] == "target"]
            result["sum_diameters"]["value"] = round(float(sum(tracked)), 2)
            result["target_lesions"]["value"] = len(tracked)
            result["new_lesions"] = {"value": sum(r["role"] == "new" for r in result["lesions"]), "unit": "count",
                                     "comparison": "lesions matching no baseline lesion"}
        else:
            result["new_lesions"] = {"value": max(0, len(found) - int(base.get("measurable_lesions", 0))), "unit": "count",
                                     "comparison": "measurable lesions now minus at baseline"}
    write_result(out, result)


if __name__ == "__main__":
    main()
