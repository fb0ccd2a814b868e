"""Enhanced MR against classic MR per frame: the header work of classify, adherence and QC (run on demand).

    .venv/bin/python benchmarks/bench_enhanced.py [--rounds 3]

On the real files in tests/data/real/ (Siemens XA30 Enhanced MR; GE Signa HDxt classic MR), per file: a
header read, the distinct values over every frame of 19 protocol parameters (as adherence asks), each
frame's geometry and rescale slope (as QC asks). Three contenders, interleaved round by round, best round
reported: classic, Enhanced searched (a data set read with plain pydicom: every keyword and frame searched
through the functional groups) and Enhanced indexed (read by the runner's readers: groups indexed once).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import pydicom  # noqa: E402

from imtrial_dsl.runner import dicomio  # noqa: E402

REAL = ROOT / "tests" / "data" / "real"
KEYWORDS = ["RepetitionTime", "EchoTime", "FlipAngle", "SliceThickness", "PixelSpacing", "InversionTime",
            "EchoTrainLength", "ScanningSequence", "SequenceVariant", "AcquisitionMatrix", "MagneticFieldStrength",
            "ImagingFrequency", "PixelBandwidth", "SpacingBetweenSlices", "NumberOfAverages",
            "ParallelReductionFactorInPlane", "ImageOrientationPatient", "Rows", "Columns"]


def images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.dcm") if "PixelData" in pydicom.dcmread(p, stop_before_pixels=True)
                  or pydicom.dcmread(p, stop_before_pixels=True).get("Rows"))


def one_pass(files: list[Path], indexed: bool) -> tuple[float, int]:
    frames = 0
    t = time.perf_counter()
    for f in files:
        ds = dicomio.read_header(f) if indexed else pydicom.dcmread(f, stop_before_pixels=True, force=True)
        n = dicomio.number_of_frames(ds)
        frames += n
        for kw in KEYWORDS:
            dicomio.get_param_values(ds, kw)
        dicomio.frame_geometry(ds)
        for k in range(n):
            dicomio.get_param(ds, "RescaleSlope", frame=k if n > 1 else None)
    return time.perf_counter() - t, frames


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args(argv)
    contenders = {"classic (GE)": (images(REAL / "ge_signa_hdxt"), True),
                  "Enhanced (XA30), searched": (images(REAL / "siemens_xa30"), False),
                  "Enhanced (XA30), indexed": (images(REAL / "siemens_xa30"), True)}
    best: dict[str, float] = {}
    count: dict[str, tuple[int, int]] = {}
    for _ in range(a.rounds):
        for name, (files, indexed) in contenders.items():
            secs, frames = one_pass(files, indexed)
            best[name] = min(best.get(name, float("inf")), 1000 * secs / frames)
            count[name] = (len(files), frames)
    base = best["classic (GE)"]
    print(f"{'contender':28s} {'files':>5s} {'frames':>6s} {'ms/frame':>9s} {'x classic':>9s}")
    for name, ms in best.items():
        print(f"{name:28s} {count[name][0]:5d} {count[name][1]:6d} {ms:9.2f} {ms / base:9.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
