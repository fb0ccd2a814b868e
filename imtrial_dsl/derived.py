"""Derived quantities: values the guidelines constrain that no single header attribute holds.

Each has a CamelCase name used like a DICOM keyword in a constraint (``UptakeTime in 55 .. 75 min``),
a dimension and the unit its computed value is in (the checker reads :data:`DERIVED`; adherence calls
:func:`compute`), and is computed from one header. ``TemporalResolution`` is also a DICOM keyword
(0020,0110): the header's value wins; it is derived only where the header lacks it.
"""
from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass
from typing import Any, Callable, Optional


@dataclass(frozen=True)
class Derived:
    name: str
    dimension: str
    unit: str            # the unit :func:`compute` returns, as units.DICOM_UNITS lists it
    description: str
    sources: tuple[str, ...]  # the attributes it reads (also what fingerprints must include)


DERIVED: dict[str, Derived] = {d.name: d for d in (
    Derived("UptakeTime", "time", "min",
            "PET uptake time: the series' acquisition start (SeriesDate/SeriesTime, else AcquisitionDateTime or "
            "AcquisitionDate/AcquisitionTime) minus the injection (RadiopharmaceuticalStartDateTime, else "
            "RadiopharmaceuticalStartTime on the series' date) of the first RadiopharmaceuticalInformationSequence item.",
            ("SeriesDate", "SeriesTime", "AcquisitionDateTime", "AcquisitionDate", "AcquisitionTime",
             "RadiopharmaceuticalInformationSequence")),
    Derived("InjectedActivityPerKg", "activity_per_mass", "MBq/kg",
            "Injected activity per body mass: RadionuclideTotalDose (Bq, first RadiopharmaceuticalInformationSequence "
            "item) / PatientWeight (kg), in MBq/kg.",
            ("RadiopharmaceuticalInformationSequence", "PatientWeight")),
    Derived("TemporalResolution", "time", "ms",
            "Temporal resolution: TemporalResolution (0020,0110) when the header has it; else for MR cine "
            "NominalInterval / CardiacNumberOfImages (the reconstructed phase interval), for CT half the "
            "RevolutionTime (a half-scan reconstruction).",
            ("TemporalResolution", "NominalInterval", "CardiacNumberOfImages", "RevolutionTime", "Modality")),
)}


def _dt_of(date: str, time: str) -> Optional[_dt.datetime]:
    date, time = (date or "").strip(), (time or "").strip()
    if len(date) < 8 or not time:
        return None
    return _datetime(date[:8] + time)


def _datetime(text: str) -> Optional[_dt.datetime]:
    text = (text or "").strip().split("+")[0].split("-")[0]
    if len(text) < 12:
        return None
    whole, _, frac = text.partition(".")
    whole = whole.ljust(14, "0")[:14]
    try:
        base = _dt.datetime.strptime(whole, "%Y%m%d%H%M%S")
    except ValueError:
        return None
    return base + _dt.timedelta(seconds=float("0." + frac) if frac.isdigit() else 0.0)


def _uptake(get: Callable[[str], str], injection: Callable[[str], str]) -> Optional[float]:
    start = (_dt_of(get("SeriesDate"), get("SeriesTime")) or _datetime(get("AcquisitionDateTime"))
             or _dt_of(get("AcquisitionDate"), get("AcquisitionTime")))
    if start is None:
        return None
    inj = _datetime(injection("RadiopharmaceuticalStartDateTime"))
    if inj is None:
        t = injection("RadiopharmaceuticalStartTime")
        inj = _dt_of(start.strftime("%Y%m%d"), t) if t else None
        if inj is not None and inj > start:  # injected before midnight, scanned after
            inj -= _dt.timedelta(days=1)
    if inj is None:
        return None
    return (start - inj).total_seconds() / 60.0


def compute(name: str, ds: Any, frame: Optional[int] = None) -> Any:
    """The derived value for one header (in ``DERIVED[name].unit``), or ``dicomio.MISSING``."""
    from .runner import dicomio

    def get(kw: str) -> str:
        return dicomio.text(dicomio.get_param(ds, kw, frame=frame))

    seq = ds.get("RadiopharmaceuticalInformationSequence")
    item = seq[0] if seq else None

    def injection(kw: str) -> str:
        return dicomio.text(dicomio.plain(item.get(kw))) if item is not None and kw in item else ""

    def num(text: str) -> Optional[float]:
        try:
            return float(text)
        except ValueError:
            return None

    if name == "UptakeTime":
        v = _uptake(get, injection)
    elif name == "InjectedActivityPerKg":
        dose, weight = num(injection("RadionuclideTotalDose")), num(get("PatientWeight"))
        v = dose / 1e6 / weight if dose is not None and weight else None
    elif name == "TemporalResolution":
        v = num(get("TemporalResolution"))
        if v is None:
            modality = get("Modality").upper()
            if modality == "MR":
                interval, phases = num(get("NominalInterval")), num(get("CardiacNumberOfImages"))
                v = interval / phases if interval and phases else None
            elif modality == "CT":
                rev = num(get("RevolutionTime"))
                v = rev * 1000.0 / 2.0 if rev else None
    else:
        raise KeyError(name)
    return dicomio.MISSING if v is None else v
