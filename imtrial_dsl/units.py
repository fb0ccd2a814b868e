"""Typed units. Values are normalized to the unit DICOM stores for the dimension.

A small table instead of a units library: the set is closed (what DICOM headers,
imaging guidelines and visit schedules use), lookups sit on the compile hot path,
and every unit must map onto DICOM's own storage unit for adherence checks to
compare raw header values. pint was measured as the alternative (import plus
registry 1.1 s, 0.2 ms a conversion, against a 0.5 s budget for compiling a
300-device study) and not taken.
"""
from __future__ import annotations

from typing import Optional

# unit spelling -> (dimension, factor to canonical unit)
UNITS: dict[str, tuple[str, float]] = {
    # time (canonical ms, as RepetitionTime/EchoTime/InversionTime are stored)
    "us": ("time", 1e-3), "ms": ("time", 1.0), "s": ("time", 1000.0), "min": ("time", 60000.0),
    "h": ("time", 3.6e6),
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
    "ml": ("volume", 1.0), "mL": ("volume", 1.0), "mm3": ("volume", 1e-3), "cm3": ("volume", 1.0),
    # CT dose-length product (canonical mGy·cm, as dose reports write it)
    "mGy·cm": ("dose_length", 1.0), "mGy*cm": ("dose_length", 1.0), "Gy·cm": ("dose_length", 1000.0),
    # radioactivity (canonical Bq: the PET Isotope Module stores RadionuclideTotalDose in Bq)
    "Bq": ("activity", 1.0), "kBq": ("activity", 1e3), "MBq": ("activity", 1e6), "GBq": ("activity", 1e9),
    "uCi": ("activity", 3.7e4), "µCi": ("activity", 3.7e4), "mCi": ("activity", 3.7e7),
    # activity concentration (canonical Bq/mL, the unit of PET images in BQML)
    "Bq/mL": ("activity_concentration", 1.0), "Bq/ml": ("activity_concentration", 1.0),
    "kBq/mL": ("activity_concentration", 1e3), "kBq/ml": ("activity_concentration", 1e3),
    "MBq/mL": ("activity_concentration", 1e6),
    # injected activity per body mass (canonical MBq/kg, as EANM guidelines write it)
    "MBq/kg": ("activity_per_mass", 1.0), "kBq/kg": ("activity_per_mass", 1e-3), "mCi/kg": ("activity_per_mass", 37.0),
    # body mass (canonical kg, as PatientWeight is stored)
    "kg": ("mass", 1.0), "g": ("mass", 1e-3),
    # diffusion weighting (canonical s/mm², as DiffusionBValue is stored)
    "s/mm2": ("diffusion", 1.0), "s/mm²": ("diffusion", 1.0),
    # heart rate (canonical beats per minute, as HeartRate is stored)
    "bpm": ("heart_rate", 1.0), "beats/min": ("heart_rate", 1.0),
    # contrast agent: dose per body mass, injection rate
    "mmol/kg": ("amount_per_mass", 1.0), "ml/kg": ("volume_per_mass", 1.0), "mL/kg": ("volume_per_mass", 1.0),
    "mL/s": ("flow_rate", 1.0), "ml/s": ("flow_rate", 1.0),
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
    "dose_length": "mGy·cm", "activity": "Bq", "activity_concentration": "Bq/mL", "activity_per_mass": "MBq/kg",
    "mass": "kg", "diffusion": "s/mm2", "heart_rate": "bpm", "amount_per_mass": "mmol/kg",
    "volume_per_mass": "ml/kg", "flow_rate": "mL/s",
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
    # PET and NM (PS3.3 C.8.9.4 PET Isotope Module: Bq; half life in s)
    "RadionuclideTotalDose": ("activity", "Bq"),
    "RadionuclideHalfLife": ("time", "s"),
    "RadiopharmaceuticalVolume": ("volume", "ml"),
    "FrameDuration": ("time", "ms"),
    "ActualFrameDuration": ("time", "ms"),
    "PatientWeight": ("mass", "kg"),
    # diffusion, cardiac, contrast
    "DiffusionBValue": ("diffusion", "s/mm2"),
    "HeartRate": ("heart_rate", "bpm"),
    "NominalInterval": ("time", "ms"),
    "TemporalResolution": ("time", "ms"),
    "CardiacNumberOfImages": ("none", ""),
    "ContrastBolusVolume": ("volume", "ml"),
    "ContrastBolusTotalDose": ("volume", "ml"),
    "ContrastFlowRate": ("flow_rate", "ml/s"),
    "ContrastFlowDuration": ("time", "s"),
    "ContrastBolusIngredientConcentration": ("none", ""),
    # more attributes with a unit (PS3.3 attribute descriptions: "in seconds", "in mm", "in msec")
    "AcquisitionDuration": ("time", "s"),
    "EffectiveDuration": ("time", "s"),
    "ExposureTimeInms": ("time", "ms"),
    "InversionTimes": ("time", "ms"),
    "FrameReferenceTime": ("time", "ms"),
    "NominalCardiacTriggerDelayTime": ("time", "ms"),
    "LowRRValue": ("time", "ms"),
    "HighRRValue": ("time", "ms"),
    "SlabThickness": ("length", "mm"),
    "ReconstructionFieldOfView": ("length", "mm"),
    "DistanceSourceToDetector": ("length", "mm"),
    "DistanceSourceToPatient": ("length", "mm"),
    "TableHeight": ("length", "mm"),
    "FocalSpots": ("length", "mm"),
    "XRayTubeCurrentInmA": ("current", "mA"),
    "ExposureInmAs": ("charge", "mAs"),
    "TriggerWindow": ("percent", "%"),
    "EstimatedDoseSaving": ("percent", "%"),
    # derived quantities (imtrial_dsl/derived.py), in the unit their computation returns
    "UptakeTime": ("time", "min"),
    "InjectedActivityPerKg": ("activity_per_mass", "MBq/kg"),
}


# How a message names a dimension ("an activity", "a diffusion weighting"): the article and the words.
DIMENSION_WORDS: dict[str, str] = {
    "time": "a time", "length": "a length", "field": "a field strength", "angle": "an angle", "percent": "a percentage",
    "frequency": "a frequency", "bandwidth": "a bandwidth", "voltage": "a voltage", "current": "a current",
    "charge": "an exposure (charge)", "dose": "a dose", "sar": "a SAR", "dbdt": "a dB/dt", "volume": "a volume",
    "area": "an area", "count": "a count", "dose_length": "a dose-length product", "activity": "an activity",
    "activity_concentration": "an activity concentration", "activity_per_mass": "an activity per body mass",
    "mass": "a mass", "diffusion": "a diffusion weighting", "heart_rate": "a heart rate",
    "amount_per_mass": "an amount per body mass", "volume_per_mass": "a volume per body mass", "flow_rate": "a flow rate",
}


def dimension_words(dimension: str) -> str:
    """'an activity', 'a heart rate': a dimension as a message names it."""
    return DIMENSION_WORDS.get(dimension, "a " + dimension.replace("_", " "))


def units_of(dimension: str) -> list[str]:
    """The unit spellings of one dimension, in table order (for 'unknown unit' hints)."""
    return [u for u, (dim, _) in UNITS.items() if dim == dimension]


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
