"""Scanners as vendors build them: identity (manufacturer, model, software), per-contrast parameter
defaults, and series descriptions / image types that classify to the intended protocol."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Optional

from pydicom.dataset import Dataset

from .. import ir
from ..runner import dicomio
from ..runner.adherence import evaluate_value
from ..runner.classify import classify_header
from ..vendors import normalize_vendor
from .values import regex_example, satisfying_value


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


def header_params(protocol: ir.Protocol, dev: DeviceIdent) -> tuple[dict[str, Any], list[str]]:
    """Raw header values for a protocol on a device: vendor defaults, then every effective constraint satisfied."""
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
                ex = regex_example(r.value)
                if ex:
                    out.append(ex)
    out += [protocol.name, protocol.title or protocol.name]
    return out


def _probe(trial: ir.Trial, protocol: ir.Protocol, description: str, image_type: list[str], params: dict) -> bool:
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
