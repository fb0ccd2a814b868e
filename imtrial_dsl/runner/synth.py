"""A synthetic, realistic DICOM corpus generated from a trial description.

For every site device, subject and scheduled visit, each protocol the visit
acquires becomes a series whose header parameters satisfy the device's effective
constraints (``ir.effective_constraints``) and whose SeriesDescription/ImageType
classify to that protocol; pixel data is a 3-D head phantom (scalp, skull, CSF,
grey and white matter, ventricles; tissue contrast by protocol type) with Rician
noise (CT: a head in Hounsfield units with Gaussian noise). Named deviations are
injected at seeded places and every one is recorded in the manifest, so tests
can assert that classification, adherence and QC report exactly those.

Deterministic: the same trial, options and seed give byte-identical files.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import uuid
import json
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DSequence
from pydicom.uid import (PYDICOM_IMPLEMENTATION_UID, CTImageStorage, EnhancedMRImageStorage, ExplicitVRLittleEndian,
                         MRImageStorage)

from .. import ir, units
from ..vendors import normalize_vendor
from . import dicomio

DEVIATIONS = ("param_off", "wrong_device", "missing_visit", "ghosting", "corrupt_file", "unknown_device",
              "software_upgrade")

SIZES = {  # in-plane matrix, slices (None: cover 160 mm at the protocol's slice thickness)
    "small": (32, 12),
    "medium": (128, 48),
    "full": (256, None),
}

# --------------------------------------------------------------------------- vendors as scanners write them

MANUFACTURER = {
    "Siemens": "SIEMENS", "GE": "GE MEDICAL SYSTEMS", "Philips": "Philips Medical Systems",
    "Canon": "CANON_MEC", "Hitachi": "Hitachi Medical Corporation", "Fujifilm": "FUJIFILM Healthcare",
    "United Imaging": "UIH", "Bruker": "Bruker BioSpin MRI GmbH",
}

DEFAULT_MODEL = {"Siemens": "MAGNETOM Prisma", "GE": "SIGNA Premier", "Philips": "Ingenia",
                 "Canon": "Vantage Galan 3T", "United Imaging": "uMR 790"}
CT_MODEL = {"Siemens": "SOMATOM Force", "GE": "Revolution CT", "Philips": "IQon Spectral CT", "Canon": "Aquilion ONE"}


def software_versions(vendor: str, release: Optional[str]) -> list[str]:
    """SoftwareVersions as the vendor writes it (multi-valued where the vendor does)."""
    rel = release or {"Siemens": "XA30", "GE": "MR30.1", "Philips": "R5.7"}.get(vendor, "1.0")
    if vendor == "Siemens":
        return [f"syngo MR {rel}"] if not rel.lower().startswith("syngo") else [rel]
    if vendor == "GE":
        return [f"{rel}_R01_2133.a", "LX"]
    if vendor == "Philips":
        return [f"{rel}.1", f"{rel}.1.2"]
    return [rel]


def upgraded_release(release: Optional[str]) -> str:
    """A later release than the inventory's (first number + 20 for two-digit releases, else + 1)."""
    rel = release or "1.0"
    m = re.search(r"\d+", rel)
    if not m:
        return rel + "-upgrade"
    n = int(m.group())
    return rel[: m.start()] + str(n + (20 if n >= 10 else 1)) + rel[m.end():]


# --------------------------------------------------------------------------- protocol flavours

def contrast_of(protocol: ir.Protocol) -> str:
    """T1 / FLAIR / SWI / T2 / DWI / CT: drives defaults, descriptions and tissue contrast."""
    if protocol.modality == "CT":
        return "CT"
    text = " ".join([protocol.name, protocol.title] + [r.value for r in protocol.match]).lower()
    for key, pat in (("FLAIR", r"flair|dark.?fluid"), ("SWI", r"swi|t2star|t2\*|swan|susc"),
                     ("DWI", r"dwi|diff|dti"), ("T2", r"t2"), ("T1", r"t1|mprage|spgr|bravo|tfe")):
        if re.search(pat, text):
            return key
    return "T1"


# raw DICOM values (storage units) for parameters a protocol leaves free
MR_DEFAULTS: dict[str, dict[str, Any]] = {
    "T1": dict(RepetitionTime=2300.0, EchoTime=2.98, InversionTime=900.0, FlipAngle=9.0, EchoTrainLength=1,
               ScanningSequence=["GR", "IR"], SequenceVariant=["SK", "SP", "MP"], ScanOptions="IR",
               MRAcquisitionType="3D", SliceThickness=1.0, PixelBandwidth=240.0, NumberOfAverages=1.0),
    "FLAIR": dict(RepetitionTime=5000.0, EchoTime=393.0, InversionTime=1800.0, FlipAngle=120.0, EchoTrainLength=278,
                  ScanningSequence=["SE", "IR"], SequenceVariant=["SK", "SP", "MP"], ScanOptions=["IR", "PFP"],
                  MRAcquisitionType="3D", SliceThickness=1.0, PixelBandwidth=751.0, NumberOfAverages=1.0),
    "SWI": dict(RepetitionTime=28.0, EchoTime=20.0, FlipAngle=15.0, EchoTrainLength=1, ScanningSequence="GR",
                SequenceVariant=["SP", "OSP"], ScanOptions="FC", MRAcquisitionType="3D", SliceThickness=1.5,
                PixelBandwidth=120.0, NumberOfAverages=1.0),
    "T2": dict(RepetitionTime=3200.0, EchoTime=408.0, FlipAngle=120.0, EchoTrainLength=314, ScanningSequence="SE",
               SequenceVariant=["SK", "SP"], ScanOptions="PFP", MRAcquisitionType="3D", SliceThickness=1.0,
               PixelBandwidth=781.0, NumberOfAverages=1.0),
    "DWI": dict(RepetitionTime=3400.0, EchoTime=71.0, FlipAngle=90.0, EchoTrainLength=1, ScanningSequence="EP",
                SequenceVariant=["SK", "SP"], ScanOptions=["PFP", "FS"], MRAcquisitionType="2D", SliceThickness=2.0,
                PixelBandwidth=1860.0, NumberOfAverages=1.0),
}
SEQUENCE_NAME = {
    ("Siemens", "T1"): "*tfl3d1_16ns", ("Siemens", "FLAIR"): "*spcir_278", ("Siemens", "SWI"): "*swi3d1r",
    ("Siemens", "T2"): "*spc_314", ("Siemens", "DWI"): "*ep_b1000t",
    ("GE", "T1"): "efgre3d", ("GE", "FLAIR"): "Cube", ("GE", "SWI"): "swan", ("GE", "T2"): "Cube",
    ("Philips", "T1"): "T1TFE", ("Philips", "FLAIR"): "T2TSE", ("Philips", "SWI"): "FFE", ("Philips", "T2"): "T2TSE",
}
DESCRIPTIONS = {
    "T1": {"Siemens": ["t1_mprage_sag_p2_iso"], "GE": ["Sag T1 3D MPRAGE", "Accelerated Sag IR-FSPGR"],
           "Philips": ["T1W_3D_TFE", "sT1W_3D_TFE"], "*": ["T1w 3D", "t1_3d"]},
    "FLAIR": {"Siemens": ["t2_space_flair_sag_p2_iso", "t2_space_dark-fluid_sag_p2_iso"], "GE": ["Sag 3D FLAIR"],
              "Philips": ["3D_Brain_VIEW_FLAIR_SAG"], "*": ["3D FLAIR"]},
    "SWI": {"Siemens": ["t2_swi_tra_p2_1.5mm_SWI"], "GE": ["Ax SWAN"], "Philips": ["SWIp"], "*": ["SWI"]},
    "T2": {"Siemens": ["t2_space_sag_p2_iso"], "GE": ["Sag CUBE T2"], "Philips": ["3D_T2W_TSE"], "*": ["T2w 3D"]},
    "DWI": {"Siemens": ["ep2d_diff_3scan_trace_p2"], "GE": ["Ax DWI"], "Philips": ["DWI_SENSE"], "*": ["DWI"]},
    "CT": {"*": ["Head 1.0 Hr40", "HEAD STD 1.0", "Brain 1mm"]},
}
IMAGE_TYPE = {"Siemens": ["ORIGINAL", "PRIMARY", "M", "ND", "NORM"], "GE": ["ORIGINAL", "PRIMARY", "OTHER"],
              "Philips": ["ORIGINAL", "PRIMARY", "M_FFE", "M", "FFE"]}

# tissue -> relative MR signal per contrast, or HU for CT
TISSUES = ("scalp", "skull", "csf", "gm", "wm", "ventricle")
CONTRAST_TABLE = {
    "T1": dict(scalp=0.95, skull=0.06, csf=0.18, gm=0.52, wm=0.78, ventricle=0.15),
    "FLAIR": dict(scalp=0.60, skull=0.05, csf=0.06, gm=0.66, wm=0.50, ventricle=0.05),
    "SWI": dict(scalp=0.55, skull=0.05, csf=0.80, gm=0.52, wm=0.62, ventricle=0.82),
    "T2": dict(scalp=0.45, skull=0.05, csf=0.95, gm=0.58, wm=0.42, ventricle=0.95),
    "DWI": dict(scalp=0.15, skull=0.03, csf=0.20, gm=0.62, wm=0.55, ventricle=0.18),
    "CT": dict(scalp=-60.0, skull=1200.0, csf=8.0, gm=38.0, wm=28.0, ventricle=6.0),
}
MR_SCALE = 1600.0   # stored value of relative signal 1.0
MR_SIGMA = 18.0     # Rician noise sigma (stored units)
CT_SIGMA = 4.0      # HU


# --------------------------------------------------------------------------- phantom

def head_phantom(shape: tuple[int, int, int], contrast: str) -> np.ndarray:
    """Noise-free (slices, rows, cols) head: nested ellipsoids of tissue classes, smooth coil bias for MR."""
    nz, ny, nx = shape
    z = np.linspace(-1, 1, nz)[:, None, None]
    y = np.linspace(-1, 1, ny)[None, :, None]
    x = np.linspace(-1, 1, nx)[None, None, :]
    r = lambda ax, ay, az, cx=0.0, cy=0.0, cz=0.0: ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 + ((z - cz) / az) ** 2
    head = r(0.62, 0.74, 1.25)
    skull = r(0.57, 0.69, 1.18)
    brain = r(0.52, 0.64, 1.12)
    wm = r(0.40, 0.50, 0.95)
    vent = np.minimum(r(0.07, 0.20, 0.35, cx=-0.09), r(0.07, 0.20, 0.35, cx=0.09))
    sulci = 0.06 * np.sin(9 * np.arctan2(y, x)) * np.cos(5 * z)  # folded cortex: WM/GM boundary undulates
    t = CONTRAST_TABLE[contrast]
    bg = -1000.0 if contrast == "CT" else 0.0
    vol = np.full(shape, bg, dtype=np.float64)
    vol[head <= 1] = t["scalp"]
    vol[skull <= 1] = t["skull"]
    vol[brain <= 1] = t["csf"]
    vol[brain <= 0.85] = t["gm"]
    vol[wm + sulci <= 1] = t["wm"]
    vol[vent <= 1] = t["ventricle"]
    if contrast == "CT":
        return vol
    bias = 1.0 + 0.08 * x - 0.05 * y  # receive-coil sensitivity
    return np.clip(vol * bias, 0, None) * MR_SCALE


def add_ghosts(clean: np.ndarray, pe_axis: int, amplitude: float) -> np.ndarray:
    """Motion-like ghosts: attenuated replicas of the object displaced along phase encoding."""
    n = clean.shape[pe_axis]
    out = clean.copy()
    for k, a in ((n // 2, amplitude), (n // 4, amplitude * 0.6), (3 * n // 4, amplitude * 0.6)):
        out += a * np.roll(clean, k, axis=pe_axis)
    return out


def add_noise(clean: np.ndarray, rng: np.random.Generator, contrast: str) -> np.ndarray:
    if contrast == "CT":
        return clean + rng.normal(0.0, CT_SIGMA, clean.shape)
    n1 = rng.normal(0.0, MR_SIGMA, clean.shape)
    n2 = rng.normal(0.0, MR_SIGMA, clean.shape)
    return np.sqrt((clean + n1) ** 2 + n2 ** 2)  # Rician magnitude


# --------------------------------------------------------------------------- choosing header values

def _regex_example(pattern: str) -> Optional[str]:
    """A string that ``re.search``-matches a simple pattern (first alternative, literals kept)."""
    p = re.sub(r"^\(\?[a-zA-Z]+\)", "", pattern)
    # innermost groups first: each becomes its first alternative
    inner = re.compile(r"(?<!\\)\((?:\?:)?([^()]*)(?<!\\)\)")
    while inner.search(p):
        p = inner.sub(lambda m: m.group(1).split("|")[0], p)
    depth, cut = 0, len(p)
    for i, ch in enumerate(p):
        if ch == "(" and (i == 0 or p[i - 1] != "\\"):
            depth += 1
        elif ch == ")" and (i == 0 or p[i - 1] != "\\"):
            depth -= 1
        elif ch == "|" and depth == 0:
            cut = i
            break
    p = p[:cut].strip("^$")
    p = re.sub(r"\[([^\]\\])[^\]]*\]", r"\1", p)
    p = p.replace("\\d", "1").replace("\\s", " ").replace("\\w", "a").replace(".*", "").replace(".+", "x")
    p = re.sub(r"\{\d+(,\d*)?\}", "", p)
    p = re.sub(r"(?<!\\)[()?*+]", "", p).replace("|", "")
    p = re.sub(r"(?<!\\)\.", "x", p)
    p = re.sub(r"\\(.)", r"\1", p)
    try:
        return p if re.search(pattern, p) else None
    except re.error:
        return None


def _dicom(c: ir.Constraint, canonical: float) -> float:
    return round(units.to_dicom(canonical, c.keyword), 6)


def _num(v: ir.Value) -> float:
    return float(v.value) if isinstance(v, ir.Quantity) else float(v)


_INTEGER_VRS = {"IS", "US", "SS", "UL", "SL", "UV", "SV"}


def _integral(c: ir.Constraint, raw: Any) -> Any:
    """Integer-valued attributes (IS, US, …) get the nearest integer that still satisfies ``c``."""
    from pydicom.datadict import dictionary_VR
    from .adherence import evaluate_value

    try:
        vr = dictionary_VR(c.keyword)
    except KeyError:
        return raw
    if vr not in _INTEGER_VRS or not isinstance(raw, (int, float)):
        return raw
    import math

    for cand in (round(raw), math.floor(raw), math.ceil(raw)):
        if evaluate_value(c, int(cand))[0]:
            return int(cand)
    return int(round(raw))


def satisfying_value(c: ir.Constraint, default: Any = dicomio.MISSING) -> Any:
    """A raw header value that satisfies ``c`` (the default when it already does)."""
    from .adherence import evaluate_value

    if default is not dicomio.MISSING and evaluate_value(c, default)[0]:
        return default
    k, vals = c.kind, c.values
    if k == ir.ConstraintKind.MATCHES:
        return _regex_example(str(vals[0])) or str(vals[0])
    if any(isinstance(v, str) for v in vals):
        if k == ir.ConstraintKind.NOT_EQUAL:
            return "OTHER"
        first = str(vals[0])
        return first.split("\\") if "\\" in first else first
    if any(isinstance(v, bool) for v in vals):
        return "YES" if vals[0] else "NO"
    n = [_num(v) for v in vals]
    if k == ir.ConstraintKind.EQUAL or k == ir.ConstraintKind.SET_OF:
        x = n[0]
    elif k in (ir.ConstraintKind.RANGE_INCL, ir.ConstraintKind.RANGE_EXCL):
        x = (n[0] + n[1]) / 2
    elif k in (ir.ConstraintKind.GREATER_OR_EQUAL, ir.ConstraintKind.GREATER_THAN):
        x = n[0] * 1.1 if n[0] > 0 else n[0] + 1
    elif k in (ir.ConstraintKind.LESS_OR_EQUAL, ir.ConstraintKind.LESS_THAN):
        x = n[0] * 0.85 if n[0] > 0 else n[0] - 1
    elif k == ir.ConstraintKind.NOT_EQUAL:
        x = n[0] * 1.2 + 1
    else:
        x = n[0]
    raw = _integral(c, _dicom(c, x))
    if c.index is not None or isinstance(default, list):
        base = list(default) if isinstance(default, list) else [raw] * (c.index + 1)
        if c.index is None:
            return [raw] * len(base)
        base = base + [raw] * (c.index + 1 - len(base))
        if c.keyword == "PixelSpacing":  # square pixels
            return [raw] * len(base)
        base[c.index] = raw
        return base
    return raw


def violating_value(c: ir.Constraint, current: Any) -> Optional[Any]:
    """A raw value clearly outside a numeric constraint (for the ``param_off`` deviation)."""
    if not all(isinstance(v, ir.Quantity) for v in c.values):
        return None
    n = [_num(v) for v in c.values]
    k = c.kind
    if k == ir.ConstraintKind.EQUAL:
        tol = 0.0
        if c.tolerance:
            tol = abs(n[0]) * c.tolerance.value / 100 if c.tolerance.relative else c.tolerance.value
        x = n[0] + max(3 * tol, 0.25 * abs(n[0]), 1.0)
    elif k in (ir.ConstraintKind.RANGE_INCL, ir.ConstraintKind.RANGE_EXCL):
        x = n[1] + max(0.5 * (n[1] - n[0]), 0.1 * abs(n[1]), 0.5)
    elif k in (ir.ConstraintKind.GREATER_OR_EQUAL, ir.ConstraintKind.GREATER_THAN):
        x = n[0] * 0.5 if n[0] > 0 else n[0] - 10
    elif k in (ir.ConstraintKind.LESS_OR_EQUAL, ir.ConstraintKind.LESS_THAN):
        x = n[0] * 1.5 + 1
    elif k == ir.ConstraintKind.SET_OF:
        x = max(n) + 1
    else:
        return None
    raw = _dicom(c, x)
    if c.index is not None:
        base = list(current) if isinstance(current, list) else [raw] * (c.index + 1)
        base[c.index] = raw
        return base
    return [raw] * len(current) if isinstance(current, list) else raw


# --------------------------------------------------------------------------- plan

@dataclass
class DeviceIdent:
    device_id: Optional[str]
    vendor: str
    manufacturer: str
    model: str
    software: list[str]
    serial: str
    station: str
    institution: str
    field_t: float
    modality: str

    def as_dict(self) -> dict[str, Any]:
        return {"device": self.device_id, "manufacturer": self.manufacturer, "model": self.model,
                "software": self.software, "serial": self.serial, "station": self.station,
                "institution": self.institution}


def ident_of(site: ir.Site, dev: ir.Device) -> DeviceIdent:
    vendor = normalize_vendor(dev.vendor)
    model = dev.model or (CT_MODEL if dev.modality == "CT" else DEFAULT_MODEL).get(vendor, "Scanner")
    return DeviceIdent(
        device_id=dev.id, vendor=vendor, manufacturer=MANUFACTURER.get(vendor, dev.vendor_text or dev.vendor),
        model=model, software=software_versions(vendor, dev.software), serial=dev.serial or "",
        station=dev.station or (dev.id.replace("_", "")[:16] if dev.serial is None else ""),
        institution=dev.institution or site.name,
        field_t=float(dev.field_strength.value) if dev.field_strength else 3.0, modality=dev.modality)


@dataclass
class SeriesPlan:
    protocol: ir.Protocol
    number: int
    params: dict[str, Any]
    description: str
    image_type: list[str]
    enhanced: bool = False
    ghost: float = 0.0
    corrupt: bool = False
    uid: str = ""
    files: list[str] = field(default_factory=list)


@dataclass
class ExamPlan:
    subject: dict[str, Any]
    visit: ir.Visit
    date: _dt.date
    device: DeviceIdent
    series: list[SeriesPlan] = field(default_factory=list)
    study_uid: str = ""
    dir: str = ""


def header_params(protocol: ir.Protocol, dev: DeviceIdent) -> tuple[dict[str, Any], list[str]]:
    """Raw header values for a protocol on a device: vendor defaults, then every effective constraint satisfied."""
    from .adherence import evaluate_value

    contrast = contrast_of(protocol)
    params: dict[str, Any] = {}
    if protocol.modality == "MR":
        params.update(MR_DEFAULTS.get(contrast, MR_DEFAULTS["T1"]))
        params["MagneticFieldStrength"] = dev.field_t
        params["ImagingFrequency"] = round(42.577478 * dev.field_t, 6)
        params["SequenceName"] = SEQUENCE_NAME.get((dev.vendor, contrast), f"{contrast.lower()}3d")
        params["InPlanePhaseEncodingDirection"] = "ROW"
        params["PercentPhaseFieldOfView"] = 100.0
        params["PercentSampling"] = 100.0
        params["EchoNumbers"] = 1
        params["ReceiveCoilName"] = "Head_32" if dev.vendor == "Siemens" else "HEAD"
        params["dBdt"] = 0.0
    else:
        params.update(dict(KVP=120.0, XRayTubeCurrent=300, Exposure=300, ExposureTime=1000,
                           SliceThickness=1.0, ConvolutionKernel="STANDARD", CTDIvol=45.0, SpiralPitchFactor=0.55,
                           GantryDetectorTilt=0.0, SingleCollimationWidth=0.625, TotalCollimationWidth=40.0,
                           TableFeedPerRotation=22.0, RevolutionTime=0.5, DataCollectionDiameter=500.0))
    params["PixelSpacing"] = [1.0, 1.0]
    constraints, _ = ir.effective_constraints(protocol, dev.vendor, dev.software, dev.model)
    unsatisfied = []
    for c in constraints:
        params[c.keyword] = satisfying_value(c, params.get(c.keyword, dicomio.MISSING))
        if not evaluate_value(c, params[c.keyword])[0]:
            unsatisfied.append(c.keyword)
    if protocol.modality == "MR" and "SliceThickness" in params:
        params.setdefault("SpacingBetweenSlices", params["SliceThickness"])
    return params, unsatisfied


def _descriptions(protocol: ir.Protocol, vendor: str) -> list[str]:
    table = DESCRIPTIONS.get(contrast_of(protocol), {})
    out = list(table.get(vendor, [])) + [d for v, ds in table.items() if v != vendor for d in ds]
    for r in protocol.match:
        if r.attribute in ("SeriesDescription", "ProtocolName"):
            if r.op == ir.MatchOp.EQUALS:
                out.insert(0, r.value)
            elif r.op == ir.MatchOp.MATCHES:
                ex = _regex_example(r.value)
                if ex:
                    out.append(ex)
    out += [protocol.name, protocol.title or protocol.name]
    return out


def _probe(trial: ir.Trial, protocol: ir.Protocol, description: str, image_type: list[str], params: dict) -> bool:
    from .classify import classify_header

    ds = Dataset()
    ds.Modality = protocol.modality
    ds.SeriesDescription = description
    ds.ProtocolName = description
    ds.ImageType = image_type
    for k, v in params.items():
        try:
            setattr(ds, k, v)
        except (TypeError, ValueError):
            pass
    res = classify_header(trial, ds)
    return res["status"] == "matched" and res["protocol"] == protocol.name


def series_identity(trial: ir.Trial, protocol: ir.Protocol, dev: DeviceIdent, params: dict) -> tuple[str, list[str]]:
    """A vendor-style SeriesDescription and ImageType that classify uniquely to ``protocol``."""
    itype = list(IMAGE_TYPE.get(dev.vendor, ["ORIGINAL", "PRIMARY", "AXIAL"] if protocol.modality == "CT" else ["ORIGINAL", "PRIMARY", "M"]))
    for r in protocol.match:
        if r.attribute == "ImageType" and r.op == ir.MatchOp.CONTAINS and r.value not in itype:
            itype.append(r.value)
    for d in _descriptions(protocol, dev.vendor):
        if _probe(trial, protocol, d, itype, params):
            return d, itype
    return protocol.name, itype


# --------------------------------------------------------------------------- people (planted PHI)

FIRST = ["ELENA", "JAMES", "AIKO", "MARIE", "OMAR", "LUCIA", "HENRIK", "PRIYA", "TOMAS", "GRACE", "KENJI", "SOFIA",
         "DAVID", "AMARA", "PIERRE", "YUKI", "NORA", "SAMUEL", "LEILA", "VICTOR"]
LAST = ["MARTINEZ", "OKONKWO", "TANAKA", "DUBOIS", "HALVORSEN", "NAKAMURA", "KOWALSKI", "FERREIRA", "LINDQVIST",
        "ABERNATHY", "MORETTI", "SCHNEIDER", "PATEL", "OYELARAN", "ROSSI", "YAMAMOTO"]
STREETS = ["Elm Street", "Rue des Lilas", "Sakura-dori", "Harbor Road", "Maple Avenue", "Via Roma"]


def make_subject(site: ir.Site, n: int, rng: random.Random, phi: bool) -> dict[str, Any]:
    sex = rng.choice(["F", "M"])
    birth = _dt.date(1945, 1, 1) + _dt.timedelta(days=rng.randrange(0, 365 * 30))
    subj = {"site": site.code, "index": n, "sex": sex, "birth_date": birth.isoformat(),
            "issuer": f"{site.code}-MRN"}
    if phi:
        first, last = rng.choice(FIRST), rng.choice(LAST)
        subj.update({
            "patient_id": f"{site.code[:1]}{rng.randrange(1000000, 9999999)}",
            "name": f"{last}^{first}^{rng.choice('ABCDEFGHJKLMNPRS')}",
            "address": f"{rng.randrange(2, 480)} {rng.choice(STREETS)}, {site.name.split()[0]}",
            "phone": f"+1-555-{rng.randrange(100, 999)}-{rng.randrange(1000, 9999)}",
            "other_id": f"INS{rng.randrange(10**8, 10**9)}",
        })
    else:
        subj.update({"patient_id": f"SYN-{site.code}-{n:03d}", "name": f"SYNTH^{site.code}{n:03d}"})
    return subj


# --------------------------------------------------------------------------- writing

ENHANCED_SHARED = {  # classic keyword -> (functional group sequence, keyword inside it)
    "RepetitionTime": ("MRTimingAndRelatedParametersSequence", "RepetitionTime"),
    "FlipAngle": ("MRTimingAndRelatedParametersSequence", "FlipAngle"),
    "EchoTrainLength": ("MRTimingAndRelatedParametersSequence", "EchoTrainLength"),
    "EchoTime": ("MREchoSequence", "EffectiveEchoTime"),
    "InversionTime": ("MRModifierSequence", "InversionTimes"),
    "SliceThickness": ("PixelMeasuresSequence", "SliceThickness"),
    "PixelSpacing": ("PixelMeasuresSequence", "PixelSpacing"),
    "SpacingBetweenSlices": ("PixelMeasuresSequence", "SpacingBetweenSlices"),
    "PixelBandwidth": ("MRImagingModifierSequence", "PixelBandwidth"),
    "InPlanePhaseEncodingDirection": ("MRFOVGeometrySequence", "InPlanePhaseEncodingDirection"),
    "PercentPhaseFieldOfView": ("MRFOVGeometrySequence", "PercentPhaseFieldOfView"),
    "PercentSampling": ("MRFOVGeometrySequence", "PercentSampling"),
    "ReceiveCoilName": ("MRReceiveCoilSequence", "ReceiveCoilName"),
    "NumberOfAverages": ("MRAveragesSequence", "NumberOfAverages"),
}
ENHANCED_SKIP = {"ScanningSequence", "SequenceVariant", "ScanOptions", "SequenceName", "EchoNumbers", "ImagingFrequency"}


def _seed_int(*parts: Any) -> int:
    """A process-independent integer from parts (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.sha256("|".join(map(str, parts)).encode()).digest()[:8], "big")


_UID_NAMESPACE = uuid.UUID("6f1c8d4e-0a57-5b7e-9d0e-1a2b3c4d5e6f")


def _uid(*parts: Any) -> str:
    """A deterministic UUID-derived UID (2.25.<uuid5>, ISO/IEC 9834-8); same parts, same UID."""
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, '|'.join(map(str, parts))).int}"


def _set(ds: Dataset, keyword: str, value: Any) -> None:
    try:
        setattr(ds, keyword, value)
    except (TypeError, ValueError, AttributeError):
        pass


def _fmt_ds(v: Any) -> Any:
    return [_fmt_ds(x) for x in v] if isinstance(v, list) else (f"{v:.6g}" if isinstance(v, float) else v)


def _typed(keyword: str, v: Any) -> Any:
    """A value in the Python type its VR wants (DS as short decimal text, FD/FL float, integers int)."""
    try:
        vr = dictionary_VR(tag_for_keyword(keyword))
    except (KeyError, TypeError):
        return v
    if isinstance(v, list):
        return [_typed(keyword, x) for x in v]
    if vr == "DS":
        return _fmt_ds(float(v)) if isinstance(v, (int, float)) else v
    if vr in ("FD", "FL"):
        return float(v)
    if vr in ("US", "UL", "SS", "SL", "IS", "UV", "SV"):
        return int(round(float(v)))
    return v


def _common(ds: Dataset, exam: ExamPlan, sp: SeriesPlan, phi: bool, seed: int) -> None:
    subj, dev = exam.subject, exam.device
    d = exam.date.strftime("%Y%m%d")
    t = f"{8 + (subj['index'] % 9):02d}{(sp.number * 7) % 60:02d}00"
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = d
    ds.StudyTime = f"{8 + (subj['index'] % 9):02d}0000"
    ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = t
    ds.AccessionNumber = f"A{_seed_int(seed, exam.study_uid) % 10**8:08d}" if phi else ""
    ds.Modality = sp.protocol.modality
    ds.Manufacturer = dev.manufacturer
    ds.ManufacturerModelName = dev.model
    ds.SoftwareVersions = dev.software if len(dev.software) > 1 else dev.software[0]
    ds.DeviceSerialNumber = dev.serial
    ds.StationName = dev.station
    ds.InstitutionName = dev.institution
    ds.PatientName = subj["name"]
    ds.PatientID = subj["patient_id"]
    ds.IssuerOfPatientID = subj["issuer"]
    ds.PatientSex = subj["sex"]
    birth = _dt.date.fromisoformat(subj["birth_date"])
    ds.PatientAge = f"{(exam.date - birth).days // 365:03d}Y"
    ds.BodyPartExamined = sp.protocol.body_part or ("HEAD" if sp.protocol.modality == "CT" else "BRAIN")
    ds.PatientPosition = "HFS"
    ds.StudyDescription = "BRAIN research"
    ds.ReferringPhysicianName = ""
    if phi:
        ds.PatientBirthDate = birth.strftime("%Y%m%d")
        ds.PatientAddress = subj["address"]
        ds.PatientTelephoneNumbers = subj["phone"]
        ds.OtherPatientIDs = subj["other_id"]
        ds.InstitutionAddress = f"1 Hospital Plaza, {dev.institution}"
        ds.ReferringPhysicianName = "HOUSE^GREGORY^^DR"
        ds.PerformingPhysicianName = "RIVERA^ANA"
        ds.OperatorsName = "CHEN^JUN"
        ds.StudyDescription = f"BRAIN^{subj['name'].split('^')[0]} research MRI"
        ds.ImageComments = (f"Pt {subj['name'].replace('^', ' ').title()} DOB {subj['birth_date']} "
                            f"MRN {subj['patient_id']}, claustrophobic")
        ds.AdditionalPatientHistory = f"Referred by Dr House; lives at {subj['address']}"
        block = ds.private_block(0x0029, "IMTRIAL SYNTH PHI", create=True)
        block.add_new(0x10, "LO", subj["name"])
        block.add_new(0x11, "LO", subj["patient_id"])
    ds.StudyInstanceUID = exam.study_uid
    ds.SeriesInstanceUID = sp.uid
    ds.FrameOfReferenceUID = _uid(seed, "for", exam.study_uid)
    ds.StudyID = f"{subj['index'] + 1}"
    ds.SeriesNumber = sp.number
    ds.AcquisitionNumber = 1
    ds.SeriesDescription = sp.description
    ds.ProtocolName = sp.description
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.BurnedInAnnotation = "NO"


def _file_meta(sop_class: str, sop_uid: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "IMTRIAL_SYNTH"
    return meta


def _to_stored(vol: np.ndarray, contrast: str) -> np.ndarray:
    if contrast == "CT":
        vol = vol + 1024.0
    return np.clip(np.rint(vol), 0, 4095).astype(np.uint16)


def write_series(exam: ExamPlan, sp: SeriesPlan, out_dir: Path, shape: tuple[int, int, int], phi: bool,
                 seed: int) -> list[Path]:
    """Write one series (classic: one file per slice; Enhanced MR: one multi-frame file)."""
    contrast = contrast_of(sp.protocol)
    rng = np.random.default_rng(_seed_int(seed, sp.uid))
    clean = head_phantom(shape, contrast)
    if sp.ghost:
        pe = str(sp.params.get("InPlanePhaseEncodingDirection", "ROW"))
        clean = add_ghosts(clean, 2 if pe == "ROW" else 1, sp.ghost)
    pixels = _to_stored(add_noise(clean, rng, contrast), contrast)
    nz, ny, nx = shape
    ps = sp.params.get("PixelSpacing", [1.0, 1.0])
    ps = [float(v) for v in (ps if isinstance(ps, list) else [ps, ps])]
    step_mm = float(sp.params.get("SpacingBetweenSlices", sp.params.get("SliceThickness", 1.0)))
    x0, y0, z0 = -nx * ps[1] / 2, -ny * ps[0] / 2, -nz * step_mm / 2
    series_dir = out_dir / exam.dir / f"S{sp.number:03d}"
    series_dir.mkdir(parents=True, exist_ok=True)
    written = []
    if sp.enhanced:
        path = series_dir / "EMR0001.dcm"
        ds = _enhanced(exam, sp, pixels, ps, step_mm, (x0, y0, z0), phi, seed)
        ds.save_as(path, enforce_file_format=True)
        written.append(path)
    else:
        sop_class = MRImageStorage if sp.protocol.modality == "MR" else CTImageStorage
        for k in range(nz):
            ds = Dataset()
            sop_uid = _uid(seed, "sop", sp.uid, k)
            ds.file_meta = _file_meta(sop_class, sop_uid)
            ds.preamble = b"\0" * 128
            ds.SOPClassUID = sop_class
            ds.SOPInstanceUID = sop_uid
            ds.ImageType = sp.image_type
            _common(ds, exam, sp, phi, seed)
            for kw, v in sp.params.items():
                _set(ds, kw, _typed(kw, v))
            ds.InstanceNumber = k + 1
            ds.ImagePositionPatient = _fmt_ds([x0, y0, z0 + k * step_mm])
            ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
            ds.SliceLocation = _fmt_ds(z0 + k * step_mm)
            ds.Rows, ds.Columns = ny, nx
            ds.PixelSpacing = _fmt_ds(ps)
            if sp.protocol.modality == "CT":
                ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
                ds.WindowCenter, ds.WindowWidth = 40, 80
            ds.PixelData = pixels[k].tobytes()
            path = series_dir / f"IM{k + 1:04d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            written.append(path)
    if sp.corrupt:
        victim = written[len(written) // 2]
        data = victim.read_bytes()
        victim.write_bytes(data[: len(data) - (ny * nx)])  # drop half of a slice's pixel bytes
    return written


def _enhanced(exam: ExamPlan, sp: SeriesPlan, pixels: np.ndarray, ps: list[float], step_mm: float,
              origin: tuple[float, float, float], phi: bool, seed: int) -> Dataset:
    nz, ny, nx = pixels.shape
    ds = Dataset()
    sop_uid = _uid(seed, "sop", sp.uid, "enhanced")
    ds.file_meta = _file_meta(EnhancedMRImageStorage, sop_uid)
    ds.preamble = b"\0" * 128
    ds.SOPClassUID = EnhancedMRImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.ImageType = ["ORIGINAL", "PRIMARY", {"SWI": "T2_STAR"}.get(contrast_of(sp.protocol), contrast_of(sp.protocol)), "NONE"]
    for r in sp.protocol.match:  # keep the classification's ImageType rule true on the Enhanced object
        if r.attribute == "ImageType" and r.op == ir.MatchOp.CONTAINS and r.value not in ds.ImageType:
            ds.ImageType = list(ds.ImageType) + [r.value]
    _common(ds, exam, sp, phi, seed)
    ds.InstanceNumber = 1
    ds.ContentQualification = "PRODUCT"
    ds.PixelPresentation = "MONOCHROME"
    ds.VolumetricProperties = "VOLUME"
    ds.VolumeBasedCalculationTechnique = "NONE"
    ds.ComplexImageComponent = "MAGNITUDE"
    ds.AcquisitionContrast = {"T1": "T1", "FLAIR": "FLUID_ATTENUATED", "SWI": "T2_STAR", "T2": "T2", "DWI": "DIFFUSION"}.get(
        contrast_of(sp.protocol), "UNKNOWN")
    p = sp.params
    scan = p.get("ScanningSequence", "GR")
    scan_l = scan if isinstance(scan, list) else str(scan).split("\\")
    ds.EchoPulseSequence = "BOTH" if {"SE", "GR"} <= set(scan_l) else ("SPIN" if "SE" in scan_l else "GRADIENT")
    ds.PulseSequenceName = str(p.get("SequenceName", "synth"))
    ds.MRAcquisitionType = p.get("MRAcquisitionType", "3D")
    groups: dict[str, Dataset] = {}
    for kw, v in p.items():
        if kw in ENHANCED_SKIP or kw == "MRAcquisitionType":
            continue
        if kw in ENHANCED_SHARED:
            seq, inner = ENHANCED_SHARED[kw]
            item = groups.setdefault(seq, Dataset())
            val = _typed(inner, v)
            if inner == "InversionTimes" and not isinstance(val, list):
                val = [val]
            _set(item, inner, val)
        else:
            _set(ds, kw, _typed(kw, v))
    mod = groups.setdefault("MRModifierSequence", Dataset())
    mod.InversionRecovery = "YES" if "IR" in scan_l else "NO"
    mod.FlowCompensation = "NONE"
    mod.Spoiling = "RF" if "GR" in scan_l else "NONE"
    mod.T2Preparation = "NO"
    mod.SpectrallySelectedExcitation = "NONE"
    mod.SpatialPresaturation = "NONE"
    mod.PartialFourier = "NO"
    mod.ParallelAcquisition = "NO"
    groups.setdefault("PixelMeasuresSequence", Dataset()).PixelSpacing = _fmt_ds(ps)
    po = Dataset()
    po.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    groups["PlaneOrientationSequence"] = po
    pvt = Dataset()
    pvt.RescaleIntercept, pvt.RescaleSlope, pvt.RescaleType = 0, 1, "US"
    groups["PixelValueTransformationSequence"] = pvt
    shared = Dataset()
    for seq, item in sorted(groups.items()):
        setattr(shared, seq, DSequence([item]))
    ds.SharedFunctionalGroupsSequence = DSequence([shared])
    frames = []
    for k in range(nz):
        f = Dataset()
        fc = Dataset()
        fc.StackID = "1"
        fc.InStackPositionNumber = k + 1
        fc.DimensionIndexValues = [1, k + 1]
        f.FrameContentSequence = DSequence([fc])
        pp = Dataset()
        pp.ImagePositionPatient = _fmt_ds([origin[0], origin[1], origin[2] + k * step_mm])
        f.PlanePositionSequence = DSequence([pp])
        frames.append(f)
    ds.PerFrameFunctionalGroupsSequence = DSequence(frames)
    dim_uid = _uid(seed, "dim", sp.uid)
    d1, d2 = Dataset(), Dataset()
    d1.DimensionOrganizationUID = d2.DimensionOrganizationUID = dim_uid
    d1.DimensionIndexPointer, d1.FunctionalGroupPointer = 0x00209056, 0x00209111
    d2.DimensionIndexPointer, d2.FunctionalGroupPointer = 0x00209057, 0x00209111
    ds.DimensionIndexSequence = DSequence([d1, d2])
    org = Dataset()
    org.DimensionOrganizationUID = dim_uid
    ds.DimensionOrganizationSequence = DSequence([org])
    ds.NumberOfFrames = nz
    ds.Rows, ds.Columns = ny, nx
    ds.PixelData = pixels.tobytes()
    return ds


# --------------------------------------------------------------------------- the corpus

def _shape(size: str, protocol: ir.Protocol, params: dict) -> tuple[int, int, int]:
    matrix, slices = SIZES[size]
    if slices is None:
        st = float(params.get("SpacingBetweenSlices", params.get("SliceThickness", 1.0)) or 1.0)
        slices = int(min(192, max(16, round(160 / st))))
    return slices, matrix, matrix


def _visit_date(rng: random.Random, baseline: _dt.date, v: ir.Visit, base_off: float) -> _dt.date:
    lo = -(v.window_before.days if v.window_before else 0)
    hi = v.window_after.days if v.window_after else 0
    jitter = rng.randint(int(lo / 2), int(hi / 2)) if hi > lo else 0
    return baseline + _dt.timedelta(days=int(v.offset.days - base_off + jitter))


def synthesize(trial: ir.Trial, out_dir: str | os.PathLike, *, subjects_per_site: int = 2, seed: int = 0,
               deviations: Sequence[str] = (), phi: bool = True, size: str = "medium", small: bool = False,
               enhanced: bool | Sequence[str] = False, visits: Optional[Sequence[str]] = None,
               start_date: str = "2026-03-02") -> dict[str, Any]:
    """Generate a multi-site, multi-subject, multi-visit DICOM corpus; returns (and writes) the manifest.

    ``deviations``: names from :data:`DEVIATIONS`, each injected once at a seeded place.
    ``size``: "small" (32x32x12, for tests), "medium" (128x128x48) or "full" (256x256, slices covering
    160 mm); ``small=True`` is ``size="small"``. ``enhanced``: True writes every MR series as Enhanced MR
    (multi-frame, functional groups); a list of protocol names does so for those protocols only.
    ``visits``: restrict to these schedule visits. Writes ``out_dir/manifest.json``.
    """
    size = "small" if small else size
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}")
    unknown = [d for d in deviations if d not in DEVIATIONS]
    if unknown:
        raise ValueError(f"unknown deviation(s) {unknown}; known: {', '.join(DEVIATIONS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    sched = [v for v in (trial.schedule.visits if trial.schedule else []) if visits is None or v.name in visits]
    if not sched:
        sched = [ir.Visit(name="baseline", kind="baseline", offset=ir.Days(days=0, source_value=0),
                          acquire=[ir.Ref(name=p.name) for p in trial.protocols])]
    base_off = next((v.offset.days for v in sched if v.kind == "baseline"), 0.0)
    start = _dt.date.fromisoformat(start_date)
    enh = set(p.name for p in trial.protocols if p.modality == "MR") if enhanced is True else set(enhanced or [])

    exams: list[ExamPlan] = []
    subjects: list[dict[str, Any]] = []
    for si, site in enumerate(trial.sites):
        if not site.devices:
            continue
        for n in range(1, subjects_per_site + 1):
            subj = make_subject(site, n, rng, phi)
            baseline = start + _dt.timedelta(days=si * 3 + (n - 1) * 11)
            subj["baseline"] = baseline.isoformat()
            subjects.append(subj)
            # windows count from the baseline exam actually done, so place it first
            base_visit = next((v for v in sched if v.kind == "baseline"), None)
            actual_base = _visit_date(rng, baseline, base_visit, base_off) if base_visit else baseline
            subj["baseline"] = actual_base.isoformat()
            for v in sched:
                by_mod = {}
                for r in v.acquire:
                    p = trial.protocol(r.name)
                    if p is not None:
                        by_mod.setdefault(p.modality, []).append(p)
                date = actual_base if v is base_visit else _visit_date(rng, actual_base, v, base_off)
                for modality, protos in by_mod.items():
                    dev = next((d for d in site.devices if d.modality == modality), None)
                    if dev is None:
                        continue
                    exams.append(ExamPlan(subject=subj, visit=v, date=date, device=ident_of(site, dev),
                                          series=[SeriesPlan(protocol=p, number=0, params={}, description="",
                                                             image_type=[]) for p in protos]))
    manifest_devs: list[dict[str, Any]] = []
    followups = [e for e in exams if e.visit.kind == "followup"]
    used: set[int] = set()

    def pick(cands: list[ExamPlan]) -> Optional[ExamPlan]:
        free = [e for e in cands if id(e) not in used]
        if not free:
            return None
        e = rng.choice(free)
        used.add(id(e))
        return e

    def where(e: ExamPlan) -> dict[str, Any]:
        return {"site": e.subject["site"], "patient_id": e.subject["patient_id"], "subject_index": e.subject["index"],
                "visit": e.visit.name, "date": e.date.isoformat()}

    planned: dict[str, Any] = {}
    for dev_name in deviations:
        if dev_name == "missing_visit":
            # a follow-up that is not the subject's last visit, so its window has surely closed
            last = {}
            for e in exams:
                key = e.subject["patient_id"]
                last[key] = max(last.get(key, e.date), e.date)
            cands = [e for e in followups if e.date < last[e.subject["patient_id"]]] or followups
            e = pick(cands)
            if e is None:
                continue
            drop = [x for x in exams if x.subject is e.subject and x.visit is e.visit]
            for x in drop:
                used.add(id(x))
            planned.setdefault("missing", []).extend(drop)
            manifest_devs.append({"type": "missing_visit", **where(e), "detect": "schedule"})
        elif dev_name == "wrong_device":
            cands = [e for e in followups if any(d.modality == e.device.modality and d.id != e.device.device_id
                                                 for _, d in trial.devices())]
            e = pick(cands)
            if e is None:
                continue
            home = e.device.device_id
            same_site = [(s, d) for s, d in trial.devices() if d.modality == e.device.modality and d.id != home
                         and s.code == e.subject["site"]]
            others = same_site or [(s, d) for s, d in trial.devices() if d.modality == e.device.modality and d.id != home]
            s2, d2 = others[rng.randrange(len(others))]
            e.device = ident_of(s2, d2)
            manifest_devs.append({"type": "wrong_device", **where(e), "device_used": d2.id, "home_device": home,
                                  "detect": "adherence:same_device"})
        elif dev_name == "unknown_device":
            e = pick(followups or exams)
            if e is None:
                continue
            d = e.device
            e.device = DeviceIdent(device_id=None, vendor=d.vendor, manufacturer=d.manufacturer,
                                   model={"Siemens": "MAGNETOM Skyra", "GE": "Discovery MR750",
                                          "Philips": "Achieva dStream"}.get(d.vendor, "Unlisted Scanner"),
                                   software=d.software, serial=f"X{rng.randrange(10**5, 10**6)}", station="LOANERMR",
                                   institution=d.institution, field_t=d.field_t, modality=d.modality)
            manifest_devs.append({"type": "unknown_device", **where(e), "model": e.device.model,
                                  "serial": e.device.serial, "station": e.device.station,
                                  "detect": "adherence:unknown_device"})
        elif dev_name == "software_upgrade":
            e = pick(followups or exams)
            if e is None:
                continue
            site = trial.site(e.subject["site"])
            inv = next(d for d in site.devices if d.id == e.device.device_id)
            new_rel = upgraded_release(inv.software)
            e.device = DeviceIdent(**{**e.device.__dict__, "software": software_versions(e.device.vendor, new_rel)})
            manifest_devs.append({"type": "software_upgrade", **where(e), "device": inv.id,
                                  "inventory": inv.software, "reported": e.device.software,
                                  "detect": "adherence:software_upgrade"})
        elif dev_name in ("param_off", "ghosting", "corrupt_file"):
            planned.setdefault(dev_name, 0)
            planned[dev_name] += 1

    missing = {id(x) for x in planned.get("missing", [])}
    exams = [e for e in exams if id(e) not in missing]

    # header values and identities, now that every exam has its device
    # a visit acquired on two modalities (e.g. MR and CT phantoms) is two studies in two folders
    n_mod: dict[tuple[str, str], int] = {}
    for e in exams:
        k = (e.subject["patient_id"], e.visit.name)
        n_mod[k] = n_mod.get(k, 0) + 1
    for e in exams:
        multi = n_mod[(e.subject["patient_id"], e.visit.name)] > 1
        tag = (e.device.modality,) if multi else ()
        e.study_uid = _uid(seed, "study", e.subject["site"], e.subject["patient_id"], e.visit.name, *tag)
        e.dir = (f"{e.subject['site']}/{e.subject['patient_id']}/{e.date.strftime('%Y%m%d')}_{e.visit.name}"
                 + (f"_{e.device.modality}" if multi else ""))
        for i, sp in enumerate(e.series, start=1):
            sp.number = i * 100 + 1 if e.device.vendor == "Philips" else i + 1
            sp.params, unsat = header_params(sp.protocol, e.device)
            sp.description, sp.image_type = series_identity(trial, sp.protocol, e.device, sp.params)
            sp.enhanced = sp.protocol.name in enh and sp.protocol.modality == "MR"
            sp.uid = _uid(seed, "series", e.study_uid, sp.protocol.name)
            if unsat:
                manifest_devs.append({"type": "note", **where(e), "protocol": sp.protocol.name,
                                      "detail": f"could not satisfy {unsat}"})

    clean = [e for e in exams if id(e) not in used]
    for _ in range(planned.get("param_off", 0)):
        cands = []
        for e in clean:
            for sp in e.series:
                cons, _ = ir.effective_constraints(sp.protocol, e.device.vendor, e.device.software, e.device.model)
                ok = [c for c in cons if c.significance == ir.Significance.ERROR
                      and c.keyword not in {r.attribute for r in sp.protocol.match}
                      and violating_value(c, sp.params.get(c.keyword)) is not None]
                if ok:
                    cands.append((e, sp, ok))
        if not cands:
            break
        e, sp, ok = cands[rng.randrange(len(cands))]
        used.add(id(e))
        clean.remove(e)
        c = ok[rng.randrange(len(ok))]
        before = sp.params.get(c.keyword)
        sp.params[c.keyword] = violating_value(c, before)
        from .adherence import expected_text
        manifest_devs.append({"type": "param_off", **where(e), "protocol": sp.protocol.name, "series_uid": sp.uid,
                              "parameter": c.keyword + (f"[{c.index}]" if c.index is not None else ""),
                              "value": sp.params[c.keyword], "expected": expected_text(c),
                              "detect": "adherence:parameter"})
    ghost_checks = {t.name for q in trial.qc if q.metric == "ghosting" for t in q.targets}
    for _ in range(planned.get("ghosting", 0)):
        cands = [(e, sp) for e in clean for sp in e.series if sp.protocol.modality == "MR"]
        pref = [(e, sp) for e, sp in cands if sp.protocol.name in ghost_checks] or cands
        if not pref:
            break
        e, sp = pref[rng.randrange(len(pref))]
        used.add(id(e))
        clean.remove(e)
        sp.ghost = 0.25
        manifest_devs.append({"type": "ghosting", **where(e), "protocol": sp.protocol.name, "series_uid": sp.uid,
                              "amplitude": sp.ghost, "detect": "qc:ghosting"})
    for _ in range(planned.get("corrupt_file", 0)):
        cands = [(e, sp) for e in clean for sp in e.series if not sp.enhanced]
        if not cands:
            break
        e, sp = cands[rng.randrange(len(cands))]
        used.add(id(e))
        clean.remove(e)
        sp.corrupt = True
        manifest_devs.append({"type": "corrupt_file", **where(e), "protocol": sp.protocol.name, "series_uid": sp.uid,
                              "detect": "ingest/classify:truncated"})

    n_files = 0
    exam_entries = []
    phi_values: set[str] = set()
    for e in exams:
        entry = {**where(e), "study_uid": e.study_uid, "device": e.device.device_id, "device_identity": e.device.as_dict(),
                 "dir": e.dir, "series": []}
        for sp in e.series:
            shape = _shape(size, sp.protocol, sp.params)
            paths = write_series(e, sp, out, shape, phi, seed)
            n_files += len(paths)
            sp.files = [str(p.relative_to(out)) for p in paths]
            entry["series"].append({"protocol": sp.protocol.name, "series_uid": sp.uid, "series_number": sp.number,
                                    "description": sp.description, "enhanced": sp.enhanced, "files": sp.files,
                                    "shape": list(shape)})
            if sp.corrupt:
                for d in manifest_devs:
                    if d["type"] == "corrupt_file" and d["series_uid"] == sp.uid:
                        d["file"] = sp.files[len(sp.files) // 2]
        exam_entries.append(entry)
        if phi:
            s = e.subject
            phi_values.update([s["name"], s["patient_id"], s["address"], s["phone"], s["other_id"],
                               s["birth_date"].replace("-", "")])
    last_date = max(e.date for e in exams) if exams else start
    manifest = {
        "generator": "imtrial synth",
        "study": trial.study.code if trial.study else None,
        "source_sha256": trial.source_sha256,
        "seed": seed, "size": size, "phi": phi, "enhanced": sorted(enh),
        "subjects_per_site": subjects_per_site,
        "as_of": (last_date + _dt.timedelta(days=60)).isoformat(),
        "subjects": [{k: v for k, v in s.items() if k in ("site", "index", "patient_id", "issuer", "baseline")}
                     for s in subjects],
        "exams": exam_entries,
        "deviations": [d for d in manifest_devs if d["type"] != "note"],
        "notes": [d for d in manifest_devs if d["type"] == "note"],
        "phi_values": sorted(phi_values),
        "files": n_files,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return manifest
