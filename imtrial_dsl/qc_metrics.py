"""The built-in QC metrics the language may name: one table for the checker and the QC step.

The checker validates ``qc … uses METRIC(PARAM = value)`` against it before anything
runs; the runner's QC step implements exactly these metrics (a test holds them equal).
"""
from __future__ import annotations

from typing import Literal, NamedTuple


class MetricSpec(NamedTuple):
    param: str                              # the threshold parameter
    direction: Literal["min", "max"]        # measured value must be >= ('min') or <= ('max') the threshold
    dimensions: frozenset[str]              # allowed dimensions of the threshold (units.py)
    doc: str


QC_METRICS: dict[str, MetricSpec] = {
    "snr": MetricSpec("min", "min", frozenset({"none"}), "mean foreground signal / background noise sigma"),
    "ghosting": MetricSpec("max", "max", frozenset({"none", "percent"}), "background signal along phase encoding / signal"),
    "clipping": MetricSpec("max_fraction", "max", frozenset({"none", "percent"}), "fraction of voxels at the value limits"),
    "dynamic_range": MetricSpec("min", "min", frozenset({"none"}), "used grey levels (robust range)"),
    "slice_spacing": MetricSpec("tolerance", "max", frozenset({"length", "none"}), "deviation of slice spacing from its median"),
    "missing_slices": MetricSpec("max", "max", frozenset({"none", "count"}), "gaps in slice positions"),
    "noise": MetricSpec("max", "max", frozenset({"none"}), "noise sigma in a uniform region"),
}
