"""Scanners as vendors build them: identity (manufacturer, model, software), per-contrast parameter
defaults, and series descriptions / image types that classify to the intended protocol. What each
vendor writes, and where, is in ``styles``."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Optional

from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset

from .. import ir
from ..runner import dicomio
from ..runner.adherence import evaluate_value
from ..runner.classify import classify_header
from ..vendors import normalize_vendor, software_values
from . import styles
from .styles import software_versions
from .values import regex_example, satisfying_value


DEFAULT_MODEL = {"Siemens": "MAGNETOM Prisma", "GE": "SIGNA Premier", "Philips": "Ingenia",
                 "Canon": "Vantage Galan 3T", "United Imaging": "uMR 790"}
CT_MODEL = {"Siemens": "SOMATOM Force", "GE": "Revolution CT", "Philips": "IQon Spectral CT", "Canon": "Aquilion ONE"}
PT_MODEL = {"Siemens": "Biograph Vision 600", "GE": "Discovery MI", "Philips": "Vereos PET/CT", "Canon": "Celesteion",
            "United Imaging": "uMI 780"}


def _bump(value: str) -> str:
    m = re.search(r"\d+", value.rsplit(":", 1)[-1])
    if not m:
        return value
    start = len(value) - len(value.rsplit(":", 1)[-1]) + m.start()
    n = int(m.group())
    return value[:start] + str(n + (20 if n >= 10 else 1)) + value[start + len(m.group()):]


def upgraded_release(release: Optional[str]) -> str:
    """A later release than the inventory's: the first number of every value raised (+ 20 for two-digit
    numbers, else + 1), so a multi-valued release changes in each value, as a real upgrade does."""
    values = software_values(release) or ["1.0"]
    bumped = [_bump(v) for v in values]
    if bumped == values:
        return "\\".join(values) + "-upgrade"
    return "\\".join(bumped)


CONTRASTS = (  # protocol name/title/match text -> contrast (first hit); drives defaults, names and pixels
    ("FLAIR", r"flair|dark.?fluid"), ("SWI", r"swi|t2star|t2\*|swan|susc"), ("ASL", r"\basl|pcasl|perfusion"),
    ("FMAP", r"field.?map|fmap|b0.?map"), ("DWI", r"dwi|diffusion|\bdti|dt_"), ("BOLD", r"bold|fmri|func|rest|\bepi"),
    ("T2", r"t2"), ("T1", r"t1|mprage|spgr|bravo|tfe"),
)


def contrast_of(protocol: ir.Protocol) -> str:
    """T1 / FLAIR / SWI / T2 / DWI / BOLD / ASL / FMAP / CT / PT: drives defaults, descriptions and pixels."""
    if protocol.modality in ("CT", "PT"):
        return protocol.modality
    text = " ".join([protocol.name, protocol.title] + [r.value for r in protocol.match]).lower()
    for key, pat in CONTRASTS:
        if re.search(pat, text):
            return key
    return "T1"


def pixel_contrast(contrast: str) -> str:
    """The phantom contrast of a series (the MR contrasts without a tissue table of their own borrow one)."""
    return {"BOLD": "T2", "ASL": "DWI", "FMAP": "T1"}.get(contrast, contrast)


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
                PixelBandwidth=1860.0, NumberOfAverages=1.0, DiffusionBValue=1000.0),
    "BOLD": dict(RepetitionTime=2000.0, EchoTime=30.0, FlipAngle=77.0, EchoTrainLength=64, ScanningSequence="EP",
                 SequenceVariant=["SK", "SS"], ScanOptions=["PFP", "FS"], MRAcquisitionType="2D", SliceThickness=3.0,
                 PixelBandwidth=2298.0, NumberOfAverages=1.0),
    "ASL": dict(RepetitionTime=4800.0, EchoTime=11.0, FlipAngle=90.0, EchoTrainLength=48, ScanningSequence="EP",
                SequenceVariant="SK", ScanOptions=["PFP", "SP", "FS"], MRAcquisitionType="2D", SliceThickness=6.0,
                PixelBandwidth=3005.0, NumberOfAverages=1.0),
    "FMAP": dict(RepetitionTime=600.0, EchoTime=10.0, FlipAngle=90.0, EchoTrainLength=1, ScanningSequence="GR",
                 SequenceVariant="SP", MRAcquisitionType="2D", SliceThickness=3.4, PixelBandwidth=260.0,
                 NumberOfAverages=1.0),
}
# classic values a vendor writes its own way (GE: its _GEMS scan options; Philips: EPI says GR / SE, not EP)
VENDOR_MR_DEFAULTS: dict[tuple[str, str], dict[str, Any]] = {
    ("GE", "T1"): dict(ScanningSequence="GR", SequenceVariant=["SS", "SP", "SK"],
                       ScanOptions=["FAST_GEMS", "EDR_GEMS", "ACC_GEMS"], InversionTime=400.0, RepetitionTime=7.0,
                       EchoTime=2.8, FlipAngle=11.0),
    ("Philips", "BOLD"): dict(ScanningSequence="GR", SequenceVariant="SK", ScanOptions="FS"),
    ("Philips", "DWI"): dict(ScanningSequence="SE", SequenceVariant="SK", ScanOptions="FS"),
}
SEQUENCE_NAME = {
    ("Siemens", "T1"): "*tfl3d1_16ns", ("Siemens", "FLAIR"): "*spcir_278", ("Siemens", "SWI"): "*swi3d1r",
    ("Siemens", "T2"): "*spc_314", ("Siemens", "DWI"): "*ep_b1000t", ("Siemens", "BOLD"): "epfid2d1_64",
    ("Siemens", "ASL"): "*epfid2d1_64", ("Siemens", "FMAP"): "*fm2d2r",
    ("GE", "DWI"): "epi2", ("GE", "BOLD"): "epiRT", ("GE", "ASL"): "3dasl", ("GE", "FMAP"): "fgre",
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
    "BOLD": {"Siemens": ["ep2d_bold_rest"], "GE": ["rsfMRI"], "Philips": ["FE_EPI rest"], "*": ["BOLD rest"]},
    "ASL": {"Siemens": ["asl_2d_tra"], "GE": ["3D ASL"], "Philips": ["pCASL"], "*": ["ASL"]},
    "FMAP": {"Siemens": ["gre_field_mapping"], "GE": ["B0 field map"], "Philips": ["B0_map"], "*": ["field map"]},
    "CT": {"*": ["Head 1.0 Hr40", "HEAD STD 1.0", "Brain 1mm"]},
    "PT": {"Siemens": ["PET AC Brain"], "GE": ["PET Brain 3D MAC"], "Philips": ["PET Brain AC"], "*": ["PET AC"]},
}
IMAGE_TYPE = {"Siemens": ["ORIGINAL", "PRIMARY", "M", "ND", "NORM"], "GE": ["ORIGINAL", "PRIMARY", "OTHER"],
              "Philips": ["ORIGINAL", "PRIMARY", "M_FFE", "M", "FFE"]}


def image_type(vendor: str, modality: str, params: dict[str, Any], enhanced: bool) -> list[str]:
    """ImageType as the vendor writes it: Philips names the echo type (M_FFE\\M\\FFE for gradient echoes,
    M_SE\\M\\SE for spin echoes); Enhanced MR has four values (the third the image flavor)."""
    if modality == "PT":
        return ["ORIGINAL", "PRIMARY"]
    if modality == "CT":
        return ["ORIGINAL", "PRIMARY", "AXIAL"]
    if enhanced:
        return ["ORIGINAL", "PRIMARY", "M", "NONE"]
    if vendor == "Philips":
        scan = params.get("ScanningSequence", "GR")
        spin = "SE" in (scan if isinstance(scan, list) else str(scan).split("\\"))
        return ["ORIGINAL", "PRIMARY", "M_SE", "M", "SE"] if spin else ["ORIGINAL", "PRIMARY", "M_FFE", "M", "FFE"]
    return list(IMAGE_TYPE.get(vendor, ["ORIGINAL", "PRIMARY", "M"]))


# PET (PS3.3 C.8.9): raw values of a static FDG brain acquisition; the radiopharmaceutical's attributes
# live in the Radiopharmaceutical Information Sequence (PET Isotope module), where writer.py puts them
PT_DEFAULTS: dict[str, Any] = dict(
    SliceThickness=2.0, Units="BQML", SeriesType=["STATIC", "IMAGE"], CountsSource="EMISSION",
    CorrectedImage=["DECY", "ATTN", "SCAT", "DTIM", "RAN", "NORM"], DecayCorrection="START",
    RandomsCorrectionMethod="DLYD", AttenuationCorrectionMethod="measured,CT-based",
    ReconstructionMethod="OSEM 3i21s", ActualFrameDuration=600000, PatientWeight=75.0,
    Radiopharmaceutical="Fluorodeoxyglucose", RadionuclideTotalDose=370000000.0, RadionuclideHalfLife=6586.2,
    RadionuclidePositronFraction=0.9673,
)
RADIOPHARMACEUTICAL_ITEM = ("Radiopharmaceutical", "RadiopharmaceuticalStartTime", "RadiopharmaceuticalStartDateTime",
                            "RadionuclideTotalDose", "RadionuclideHalfLife", "RadionuclidePositronFraction",
                            "RadiopharmaceuticalVolume", "RadiopharmaceuticalRoute")


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
    site: Optional[str] = None

    @property
    def style(self) -> styles.Style:
        return styles.style(self.vendor, self.software, self.modality)

    def as_dict(self) -> dict[str, Any]:
        return {"device": self.device_id, "manufacturer": self.manufacturer, "model": self.model,
                "software": self.software, "serial": self.serial, "station": self.station,
                "institution": self.institution}


def ident_of(site: ir.Site, dev: ir.Device, modality: Optional[str] = None) -> DeviceIdent:
    """The identity a device's headers carry; ``modality``: the one a hybrid device (PET/CT) acquires now."""
    modality = modality or dev.modality
    vendor = normalize_vendor(dev.vendor)
    model = dev.model or {"CT": CT_MODEL, "PT": PT_MODEL}.get(modality, DEFAULT_MODEL).get(vendor, "Scanner")
    software = software_versions(vendor, dev.software)
    known = vendor in ("Siemens", "GE", "Philips", "Canon", "Hitachi", "Fujifilm", "United Imaging", "Bruker")
    return DeviceIdent(
        device_id=dev.id, vendor=vendor,
        manufacturer=styles.style(vendor, software, modality).manufacturer if known else (dev.vendor_text or dev.vendor),
        model=model, software=software, serial=dev.serial or "",
        station=dev.station or (dev.id.replace("_", "")[:16] if dev.serial is None else ""),
        institution=dev.institution or site.name,
        field_t=float(dev.field_strength.value) if dev.field_strength else 3.0, modality=modality, site=site.code)


def param_key(c: ir.Constraint) -> Any:
    """Where a constraint's value lives in a series' ``params``: its keyword (a derived quantity's name,
    which the writer turns into its source attributes), or ``("private", creator, "(gggg,xxee)")`` for
    a private element by creator (written into that creator's block)."""
    step = next((s for s in c.path if s.creator), None)
    return ("private", step.creator, step.tag) if step is not None else c.keyword


def header_params(protocol: ir.Protocol, dev: DeviceIdent, enhanced: bool = False
                  ) -> tuple[dict[str, Any], list[str], dict[str, Any]]:
    """Raw header values for a protocol on a device: vendor defaults, then every effective constraint satisfied.

    Attributes the vendor's headers leave out (``styles``) are left out here too, constrained or not, so a
    synthetic exam fails where the scanner's would; the second value lists every constraint the series
    does not satisfy, with why; the third holds the values left out (a vendor's private group may carry
    them, e.g. GE's b-value)."""
    contrast = contrast_of(protocol)
    params: dict[str, Any] = {}
    if protocol.modality == "PT":
        params.update(PT_DEFAULTS)
    elif protocol.modality == "MR":
        params.update(MR_DEFAULTS.get(contrast, MR_DEFAULTS["T1"]))
        params.update(VENDOR_MR_DEFAULTS.get((dev.vendor, contrast), {}))
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
    params["PixelSpacing"] = [1.0, 1.0] if protocol.modality != "PT" else [2.0, 2.0]
    params["ImageType"] = image_type(dev.vendor, protocol.modality, params, enhanced)
    constraints, _ = ir.effective_constraints(protocol, dev.vendor, dev.software, dev.model,
                                              site=dev.site, device=dev.device_id)
    unsatisfied = []
    hidden: dict[str, Any] = {}
    for c in constraints:
        key = param_key(c)
        params[key] = satisfying_value(c, params.get(key, dicomio.MISSING))
        if not evaluate_value(c, params[key])[0]:
            unsatisfied.append(c.keyword)
    if protocol.modality == "MR" and "SliceThickness" in params and params.get("MRAcquisitionType") != "3D":
        params.setdefault("SpacingBetweenSlices", params["SliceThickness"])
    if protocol.modality == "MR":
        st = dev.style
        if st.vendor == "Philips" and st.diffusion_public:
            params.setdefault("DiffusionBValue", 0.0)
        hidden = {kw: params[kw] for kw in params}
        dropped = _drop_unwritten(params, st, contrast)
        hidden = {kw: v for kw, v in hidden.items() if kw in dropped}
        unsatisfied += [f"{c.keyword} ({dropped[c.keyword]})" for c in constraints if c.keyword in dropped]
    return params, unsatisfied, hidden


def _drop_unwritten(params: dict[str, Any], st: styles.Style, contrast: str) -> dict[str, str]:
    """Remove what the scanner would not write; returns keyword -> why, for each value removed."""
    why = {kw: st.notes.get(kw, f"{st.vendor} headers leave it out") for kw in st.omits}
    if not ("InversionTime" in MR_DEFAULTS.get(contrast, {}) or {"IR"} & set(dicomio.as_list(params.get("ScanningSequence")))
            or {"MP"} & set(dicomio.as_list(params.get("SequenceVariant")))):
        why.setdefault("InversionTime", "written only for inversion-prepared sequences")
    if not st.diffusion_public:
        why.setdefault("DiffusionBValue", f"{st.vendor} writes b-values in its private group")
    elif contrast != "DWI" and st.vendor != "Philips":  # Philips writes b = 0 on every MR image
        why.setdefault("DiffusionBValue", "written only for diffusion series")
    if st.enhanced_mr and params.get("MRAcquisitionType") == "3D":
        why["SpacingBetweenSlices"] = "not written for 3D acquisitions"
    dropped = {kw: why[kw] for kw in params if kw in why}
    for kw in dropped:
        del params[kw]
    return dropped


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
        if not isinstance(k, str) or tag_for_keyword(k) is None:
            continue  # a private element by creator or a derived quantity: not an attribute of its own
        try:
            setattr(ds, k, v)
        except (TypeError, ValueError):
            pass
    res = classify_header(trial, ds)
    return res["status"] == "matched" and res["protocol"] == protocol.name


def series_identity(trial: ir.Trial, protocol: ir.Protocol, dev: DeviceIdent, params: dict,
                    enhanced: bool = False) -> tuple[str, list[str]]:
    """A vendor-style SeriesDescription and ImageType that classify uniquely to ``protocol`` (the ImageType
    is also set in ``params``): the vendor's ImageType, else its image flavor (value 3) as a phase or other
    image of the same acquisition writes it, else with the values a ``has`` rule asks for."""
    base = list(dicomio.as_list(params.get("ImageType"))) or image_type(dev.vendor, protocol.modality, params, enhanced)
    candidates = [base]
    if len(base) >= 3:
        candidates += [base[:2] + [flavor] + base[3:] for flavor in ("P", "PHASE", "R", "I", "MAGNITUDE")]
    wanted = [r.value for r in protocol.match if r.attribute == "ImageType" and r.op == ir.MatchOp.CONTAINS]
    candidates += [c + [w for w in wanted if w not in c] for c in candidates if any(w not in c for w in wanted)]
    for itype in candidates:
        for d in _descriptions(protocol, dev.vendor):
            if _probe(trial, protocol, d, itype, {**params, "ImageType": itype}):
                params["ImageType"] = itype
                return d, itype
    params["ImageType"] = candidates[-1]
    return protocol.name, candidates[-1]
