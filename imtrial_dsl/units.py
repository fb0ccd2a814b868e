"""Typed units. Values are normalized to the unit DICOM stores for the dimension.

A small table instead of a units library: the set is closed (what DICOM headers
and visit schedules use), lookups sit on the compile hot path, and every unit
must map onto DICOM's own storage unit for adherence checks to compare raw
header values.
"""
from __future__ import annotations

from typing import Optional

# unit spelling -> (dimension, factor to canonical unit)
UNITS: dict[str, tuple[str, float]] = {
    # time (canonical ms, as RepetitionTime/EchoTime/InversionTime are stored)
    "us": ("time", 1e-3), "ms": ("time", 1.0), "s": ("time", 1000.0), "min": ("time", 60000.0),
    # length (canonical mm)
    "um": ("length", 1e-3), "mm": ("length", 1.0), "cm": ("length", 10.0), "m": ("length", 1000.0),
    # magnetic field (canonical T)
    "mT": ("field", 1e-3), "T": ("field", 1.0),
    # angle (canonical deg)
    "deg": ("angle", 1.0), "rad": ("angle", 57.29577951308232),
    # ratio (canonical %)
    "%": ("percent", 1.0),
    # frequency (canonical Hz; ImagingFrequency is MHz in DICOM, see DICOM_UNITS)
    "Hz": ("frequency", 1.0), "kHz": ("frequency", 1e3), "MHz": ("frequency", 1e6),
    "Hz/px": ("bandwidth", 1.0),
    # X-ray technique
    "kV": ("voltage", 1.0), "mA": ("current", 1.0), "mAs": ("charge", 1.0),
    "mGy": ("dose", 1.0), "Gy": ("dose", 1000.0),
    "W/kg": ("sar", 1.0), "T/s": ("dbdt", 1.0),
    "ml": ("volume", 1.0), "mm3": ("volume", 1e-3), "cm3": ("volume", 1.0),
    "mm2": ("area", 1.0),
    "count": ("count", 1.0),
}

# Calendar units for schedules: canonical days. A month is 30 days and a year
# 365 days, the usual convention of trial schedules-of-activities.
CALENDAR: dict[str, float] = {
    "d": 1, "day": 1, "days": 1,
    "w": 7, "wk": 7, "week": 7, "weeks": 7,
    "mo": 30, "month": 30, "months": 30,
    "y": 365, "year": 365, "years": 365,
}

CANONICAL: dict[str, str] = {
    "time": "ms", "length": "mm", "field": "T", "angle": "deg", "percent": "%",
    "frequency": "Hz", "bandwidth": "Hz/px", "voltage": "kV", "current": "mA", "charge": "mAs",
    "dose": "mGy", "sar": "W/kg", "dbdt": "T/s", "volume": "ml", "area": "mm2", "count": "count",
    "none": "",
}

# DICOM keyword -> (dimension, unit the header stores the value in).
DICOM_UNITS: dict[str, tuple[str, str]] = {
    "RepetitionTime": ("time", "ms"),
    "EchoTime": ("time", "ms"),
    "InversionTime": ("time", "ms"),
    "EffectiveEchoTime": ("time", "ms"),
    "TriggerTime": ("time", "ms"),
    "ExposureTime": ("time", "ms"),
    "RevolutionTime": ("time", "s"),
    "FlipAngle": ("angle", "deg"),
    "GantryDetectorTilt": ("angle", "deg"),
    "SliceThickness": ("length", "mm"),
    "SpacingBetweenSlices": ("length", "mm"),
    "PixelSpacing": ("length", "mm"),
    "ReconstructionDiameter": ("length", "mm"),
    "DataCollectionDiameter": ("length", "mm"),
    "TableFeedPerRotation": ("length", "mm"),
    "SingleCollimationWidth": ("length", "mm"),
    "TotalCollimationWidth": ("length", "mm"),
    "MagneticFieldStrength": ("field", "T"),
    "ImagingFrequency": ("frequency", "MHz"),
    "PixelBandwidth": ("bandwidth", "Hz/px"),
    "PercentSampling": ("percent", "%"),
    "PercentPhaseFieldOfView": ("percent", "%"),
    "KVP": ("voltage", "kV"),
    "XRayTubeCurrent": ("current", "mA"),
    "Exposure": ("charge", "mAs"),
    "CTDIvol": ("dose", "mGy"),
    "SAR": ("sar", "W/kg"),
    "dBdt": ("dbdt", "T/s"),
    "EchoTrainLength": ("none", ""),
    "NumberOfAverages": ("none", ""),
    "NumberOfPhaseEncodingSteps": ("none", ""),
    "AcquisitionMatrix": ("none", ""),
    "Rows": ("none", ""),
    "Columns": ("none", ""),
    "SpiralPitchFactor": ("none", ""),
    "EchoNumbers": ("none", ""),
    "NumberOfFrames": ("none", ""),
    "ImagesInAcquisition": ("none", ""),
    "ParallelReductionFactorInPlane": ("none", ""),
}


def dimension_of(unit: str) -> Optional[str]:
    if unit == "":
        return "none"
    hit = UNITS.get(unit)
    return hit[0] if hit else None


def to_canonical(value: float, unit: str) -> tuple[float, str, str]:
    """(value in canonical unit, canonical unit, dimension). KeyError for unknown units."""
    if unit == "":
        return value, "", "none"
    dim, factor = UNITS[unit]
    return value * factor, CANONICAL[dim], dim


def to_dicom(value_canonical: float, keyword: str) -> float:
    """Convert a canonical value into the unit the DICOM header stores for ``keyword``."""
    dim_unit = DICOM_UNITS.get(keyword)
    if not dim_unit or dim_unit[1] in ("", CANONICAL.get(dim_unit[0])):
        return value_canonical
    return value_canonical / UNITS[dim_unit[1]][1]


def from_dicom(value: float, keyword: str) -> float:
    """Convert a raw header value of ``keyword`` into the canonical unit of its dimension."""
    dim_unit = DICOM_UNITS.get(keyword)
    if not dim_unit or dim_unit[1] in ("", CANONICAL.get(dim_unit[0])):
        return value
    return value * UNITS[dim_unit[1]][1]
