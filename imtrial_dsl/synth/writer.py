"""Planned exams written as DICOM: classic images (one file per slice) or Enhanced MR (one multi-frame
file), with the vendor's header parameters and, when asked, planted PHI."""
from __future__ import annotations

import datetime as _dt
import hashlib
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
from pydicom.datadict import dictionary_VR, private_dictionary_VR, tag_for_keyword
from pydicom.tag import Tag
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DSequence
from pydicom.uid import (PYDICOM_IMPLEMENTATION_UID, CTImageStorage, EnhancedMRImageStorage, ExplicitVRLittleEndian,
                         MRImageStorage)

from .. import ir
from ..derived import DERIVED
from ..runner import dicomio
from ..dicom_tables import FLOAT_VRS, INTEGER_VRS
from ..files import atomic_write_bytes, atomic_write_dataset
from .pixels import add_ghosts, add_noise, head_phantom, to_stored
from .scanners import DeviceIdent, contrast_of


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
    hidden: dict[str, Any] = field(default_factory=dict)  # values the vendor keeps out of public attributes


@dataclass
class ExamPlan:
    subject: dict[str, Any]
    visit: ir.Visit
    date: _dt.date
    device: DeviceIdent
    series: list[SeriesPlan] = field(default_factory=list)
    study_uid: str = ""
    dir: str = ""


def seed_int(*parts: Any) -> int:
    """A process-independent integer from parts (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.sha256("|".join(map(str, parts)).encode()).digest()[:8], "big")


_UID_NAMESPACE = uuid.UUID("6f1c8d4e-0a57-5b7e-9d0e-1a2b3c4d5e6f")


def uid(*parts: Any) -> str:
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
    if vr in FLOAT_VRS:
        return float(v)
    if vr in INTEGER_VRS:
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
    ds.AccessionNumber = f"A{seed_int(seed, exam.study_uid) % 10**8:08d}" if phi else ""
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
    if "BodyPartExamined" not in dev.style.omits:
        ds.BodyPartExamined = sp.protocol.body_part or ("HEAD" if sp.protocol.modality == "CT" else "BRAIN")
    if sp.protocol.modality != "PT":  # PET gives the position as codes (NM/PET Patient Orientation module)
        ds.PatientPosition = "HFS"
    ds.StudyDescription = "BRAIN research"
    ds.ReferringPhysicianName = ""
    ds.PatientBirthDate = ""   # Type 2: present, empty unless PHI is planted
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
    ds.FrameOfReferenceUID = uid(seed, "for", exam.study_uid)
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


PET_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.128"
SOP_CLASS = {"MR": MRImageStorage, "CT": CTImageStorage, "PT": PET_IMAGE_STORAGE}


def _private(ds: Dataset, exam: ExamPlan, sp: SeriesPlan, where: str = "classic") -> None:
    """The vendor's private blocks (``styles.Private``), filled from the series' values; ``where`` is
    ``classic`` (the instance) or ``shared`` (the Enhanced MR shared functional-group item)."""
    values = {**sp.params, **sp.hidden}
    b = float(values.get("DiffusionBValue", 0.0) or 0.0)
    fill = {"bvalue": b, "bvalue_dwi": int(b) if b else None, "bvalue4": [int(b), 0, 0, 0], "asset": [1.0, 1.0],
            "direction": "I" if b else "", "diffusion_flag": "Y" if b else "N",
            "sequence": str(values.get("SequenceName", "")) or None}
    for blk in exam.device.style.private:
        if blk.shared_item != (where == "shared"):
            continue
        target = Dataset() if blk.shared_item else ds
        block = target.private_block(blk.group, blk.creator, create=True)
        for off, vr, key in blk.elements:
            v = fill[key] if key in fill else values.get(key)
            if v is None:
                continue
            block.add_new(off, vr, float(v) if vr in ("FL", "FD") else _fmt_ds(v) if vr == "DS" else v)
        if blk.shared_item:  # Siemens XA keeps its classic values in a private item of the shared group
            ds.private_block(blk.group, blk.creator, create=True).add_new(0xFE, "SQ", DSequence([target]))


def _writable(kw: Any) -> bool:
    """A params entry written as the attribute it names (not a private element by creator, not a derived
    quantity the writer turns into its sources)."""
    return isinstance(kw, str) and (kw not in DERIVED or tag_for_keyword(kw) is not None)


def _constrained_private(ds: Dataset, sp: SeriesPlan) -> None:
    """Private elements a protocol constrains by creator (``private "GEMS_ACQU_01" (0019,xx9c)``), in that
    creator's block of the instance, with the VR pydicom's private dictionary gives (else LO / DS)."""
    for key, v in sp.params.items():
        if not (isinstance(key, tuple) and key[0] == "private"):
            continue
        _, creator, tag = key
        group, offset = int(tag[1:5], 16), int(tag[-3:-1], 16)
        try:
            vr = private_dictionary_VR(Tag(group, 0x1000 | offset), creator)
        except KeyError:
            vr = "DS" if isinstance(v, (int, float)) or (isinstance(v, list) and all(isinstance(x, (int, float)) for x in v)) else "LO"
        vr = vr.split(" or ")[0]
        block = ds.private_block(group, creator, create=True)
        block.add_new(offset, vr, float(v) if vr in ("FL", "FD") and not isinstance(v, list)
                      else _fmt_ds(v) if vr == "DS" else _typed_private(vr, v))


def _typed_private(vr: str, v: Any) -> Any:
    if vr in INTEGER_VRS:
        return [int(round(float(x))) for x in v] if isinstance(v, list) else int(round(float(v)))
    if vr in FLOAT_VRS:
        return [float(x) for x in v] if isinstance(v, list) else float(v)
    return v


def _pet(ds: Dataset, exam: ExamPlan, sp: SeriesPlan, k: int, nz: int) -> None:
    """PET Series / Isotope / Image modules (PS3.3 C.8.9): the radiopharmaceutical inside its sequence."""
    from .scanners import RADIOPHARMACEUTICAL_ITEM

    item = Dataset()
    for kw in RADIOPHARMACEUTICAL_ITEM:
        if kw in sp.params:
            _set(item, kw, _typed(kw, sp.params[kw]))
    # the injection: UptakeTime before the series start (60 min unless constrained), the dose from the
    # activity per kg when that is what the protocol constrains
    series_start = _dt.datetime.strptime(exam.date.strftime("%Y%m%d") + str(ds.SeriesTime), "%Y%m%d%H%M%S")
    start = series_start - _dt.timedelta(minutes=float(sp.params.get("UptakeTime", 60.0)))
    if "InjectedActivityPerKg" in sp.params and "PatientWeight" in ds:
        item.RadionuclideTotalDose = _fmt_ds(float(sp.params["InjectedActivityPerKg"]) * float(ds.PatientWeight) * 1e6)
    item.RadiopharmaceuticalStartTime = start.strftime("%H%M%S")
    item.RadiopharmaceuticalStartDateTime = start.strftime("%Y%m%d%H%M%S")
    item.RadionuclideCodeSequence = DSequence([_code("77004003", "SCT", "^18^Fluorine")])            # CID 4020
    item.RadiopharmaceuticalCodeSequence = DSequence([_code("35321007", "SCT", "Fluorodeoxyglucose F^18^")])  # CID 4021
    ds.RadiopharmaceuticalInformationSequence = DSequence([item])
    orientation = _code("102538003", "SCT", "recumbent")                                        # CID 19
    orientation.PatientOrientationModifierCodeSequence = DSequence([_code("40199007", "SCT", "supine")])  # CID 20
    ds.PatientOrientationCodeSequence = DSequence([orientation])
    ds.PatientGantryRelationshipCodeSequence = DSequence([_code("102540008", "SCT", "headfirst")])   # CID 21
    ds.CollimatorType = "NONE"   # 3D acquisition, no septa
    ds.NumberOfSlices = nz
    ds.ImageIndex = k + 1
    ds.FrameReferenceTime = 0
    ds.DecayFactor = "1.0"
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 15, 0   # the PET Image module: Bits Stored = 16


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def write_series(exam: ExamPlan, sp: SeriesPlan, out_dir: Path, shape: tuple[int, int, int], phi: bool,
                 seed: int) -> list[Path]:
    """Write one series (classic: one file per slice; Enhanced MR: one multi-frame file)."""
    from .scanners import RADIOPHARMACEUTICAL_ITEM, pixel_contrast

    contrast = pixel_contrast(contrast_of(sp.protocol))
    rng = np.random.default_rng(seed_int(seed, sp.uid))
    clean = head_phantom(shape, contrast)
    if sp.ghost:
        pe = str(sp.params.get("InPlanePhaseEncodingDirection", "ROW"))
        clean = add_ghosts(clean, 2 if pe == "ROW" else 1, sp.ghost)
    pixels = to_stored(add_noise(clean, rng, contrast), contrast)
    nz, ny, nx = shape
    ps = sp.params.get("PixelSpacing", [1.0, 1.0])
    ps = [float(v) for v in (ps if isinstance(ps, list) else [ps, ps])]
    step_mm = float(sp.params.get("SpacingBetweenSlices", sp.params.get("SliceThickness", 1.0)))
    x0, y0, z0 = -nx * ps[1] / 2, -ny * ps[0] / 2, -nz * step_mm / 2
    series_dir = out_dir / exam.dir / f"S{sp.number:03d}"
    written = []
    modality = sp.protocol.modality
    if sp.enhanced:
        path = series_dir / "EMR0001.dcm"
        ds = _enhanced(exam, sp, pixels, ps, step_mm, (x0, y0, z0), phi, seed)
        atomic_write_dataset(path, ds)
        written.append(path)
    else:
        sop_class = SOP_CLASS.get(modality, MRImageStorage)
        for k in range(nz):
            ds = Dataset()
            sop_uid = uid(seed, "sop", sp.uid, k)
            ds.file_meta = _file_meta(sop_class, sop_uid)
            ds.preamble = b"\0" * 128
            ds.SOPClassUID = sop_class
            ds.SOPInstanceUID = sop_uid
            ds.ImageType = sp.image_type
            _common(ds, exam, sp, phi, seed)
            for kw, v in sp.params.items():
                if modality == "PT" and kw in RADIOPHARMACEUTICAL_ITEM or not _writable(kw):
                    continue  # the PET Isotope module keeps them inside its sequence
                _set(ds, kw, _typed(kw, v))
            ds.InstanceNumber = k + 1
            ds.ImagePositionPatient = _fmt_ds([x0, y0, z0 + k * step_mm])
            ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
            ds.SliceLocation = _fmt_ds(z0 + k * step_mm)
            ds.Rows, ds.Columns = ny, nx
            ds.PixelSpacing = _fmt_ds(ps)
            if modality == "CT":
                ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
                ds.WindowCenter, ds.WindowWidth = 40, 80
            elif modality == "PT":
                _pet(ds, exam, sp, k, nz)
                ds.RescaleIntercept, ds.RescaleSlope = 0, "12.5"
            _private(ds, exam, sp)
            _constrained_private(ds, sp)
            ds.PixelData = pixels[k].tobytes()
            path = series_dir / f"IM{k + 1:04d}.dcm"
            atomic_write_dataset(path, ds)
            written.append(path)
    if sp.corrupt:
        victim = written[len(written) // 2]
        data = victim.read_bytes()
        atomic_write_bytes(victim, data[: len(data) - (ny * nx)])  # drop half of a slice's pixel bytes
    return written


# Enhanced MR: the classic keyword -> (functional group, keyword inside it, per-frame?), placed as
# syngo MR XA places them (real XA30 objects: echo, averages, pixel measures and frame type per frame;
# timing, modifiers, geometry and coils shared)
ENHANCED_GROUPS = {
    "RepetitionTime": ("MRTimingAndRelatedParametersSequence", "RepetitionTime", False),
    "FlipAngle": ("MRTimingAndRelatedParametersSequence", "FlipAngle", False),
    "EchoTrainLength": ("MRTimingAndRelatedParametersSequence", "EchoTrainLength", False),
    "EchoTime": ("MREchoSequence", "EffectiveEchoTime", True),
    "NumberOfAverages": ("MRAveragesSequence", "NumberOfAverages", True),
    "SliceThickness": ("PixelMeasuresSequence", "SliceThickness", True),
    "PixelSpacing": ("PixelMeasuresSequence", "PixelSpacing", True),
    "SpacingBetweenSlices": ("PixelMeasuresSequence", "SpacingBetweenSlices", True),
    "DiffusionBValue": ("MRDiffusionSequence", "DiffusionBValue", True),
    "InversionTime": ("MRModifierSequence", "InversionTimes", False),
    "PixelBandwidth": ("MRImagingModifierSequence", "PixelBandwidth", False),
    "ImagingFrequency": ("MRImagingModifierSequence", "TransmitterFrequency", False),
    "InPlanePhaseEncodingDirection": ("MRFOVGeometrySequence", "InPlanePhaseEncodingDirection", False),
    "PercentPhaseFieldOfView": ("MRFOVGeometrySequence", "PercentPhaseFieldOfView", False),
    "PercentSampling": ("MRFOVGeometrySequence", "PercentSampling", False),
    "ReceiveCoilName": ("MRReceiveCoilSequence", "ReceiveCoilName", False),
    "TransmitCoilName": ("MRTransmitCoilSequence", "TransmitCoilName", False),
}
ENHANCED_TOP = {"SequenceName": "PulseSequenceName", "ImagedNucleus": "ResonantNucleus"}
# classic attributes Enhanced MR has no place for (they are derived from the pulse-sequence attributes)
ENHANCED_SKIP = {"ScanningSequence", "SequenceVariant", "ScanOptions", "EchoNumbers", "AcquisitionMatrix",
                 "NumberOfPhaseEncodingSteps", "SAR", "dBdt", "TriggerTime"}


def enhanced_pulse_attributes(params: dict[str, Any], vendor_fill: Optional[dict[str, str]] = None) -> dict[str, dict[str, str]]:
    """The Enhanced MR attributes (MR Pulse Sequence module, MR Modifier and MR Imaging Modifier macros)
    that say what the classic ScanningSequence / SequenceVariant / ScanOptions say: the inverse of
    ``dicomio.DERIVED``. ``vendor_fill`` overrides values the way a vendor fills them (``styles``).
    Returns {"top": {...}, "MRModifierSequence": {...}, "MRImagingModifierSequence": {...}}."""
    scan = set(dicomio.as_list(params.get("ScanningSequence", "GR")))
    variant = set(dicomio.as_list(params.get("SequenceVariant", "")))
    options = set(dicomio.as_list(params.get("ScanOptions", "")))
    echo = "BOTH" if {"SE", "GR"} <= scan else "SPIN" if "SE" in scan else "GRADIENT"
    fill = dict(vendor_fill or {})
    if "EP" in scan and "EchoPulseSequence:EP" in fill:
        echo = fill["EchoPulseSequence:EP"]
    pf = [d for o, d in (("PFF", "FREQUENCY"), ("PFP", "PHASE")) if o in options]
    top = {"EchoPulseSequence": echo, "EchoPlanarPulseSequence": "YES" if "EP" in scan else "NO",
           "SteadyStatePulseSequence": "TIME_REVERSED" if "TRSS" in variant else "FREE_PRECESSION" if "SS" in variant else "NONE",
           "SegmentedKSpaceTraversal": "PARTIAL" if "SK" in variant else "SINGLE",
           "OversamplingPhase": "2D" if "OSP" in variant else "NONE",
           "SpectrallySelectedSuppression": "FAT" if "FS" in options else "NONE",
           "RectilinearPhaseEncodeReordering": "CENTRIC" if "PER" in options else "LINEAR",
           "SaturationRecovery": "NO", "MultiPlanarExcitation": "NO", "PhaseContrast": "NO",
           "TimeOfFlightContrast": "NO", "GeometryOfKSpaceTraversal": "RECTILINEAR"}
    modifier = {"InversionRecovery": "YES" if "IR" in scan else "NO",
                "FlowCompensation": "VELOCITY" if "FC" in options else "NONE",
                "Spoiling": "RF" if "SP" in variant else "NONE", "T2Preparation": "NO",
                "SpectrallySelectedExcitation": "NONE", "SpatialPresaturation": "SLAB" if "SP" in options else "NONE",
                "PartialFourier": "YES" if pf else "NO", "ParallelAcquisition": "NO"}
    if pf:
        modifier["PartialFourierDirection"] = "COMBINATION" if len(pf) == 2 else pf[0]
    imaging = {"MagnetizationTransfer": "OFF_RESONANCE" if "MTC" in variant else "NONE", "BloodSignalNulling": "NO",
               "Tagging": "NONE"}
    for kw, v in fill.items():
        for part in (top, modifier, imaging):
            if kw in part:
                part[kw] = v
    return {"top": top, "MRModifierSequence": modifier, "MRImagingModifierSequence": imaging}


def _enhanced(exam: ExamPlan, sp: SeriesPlan, pixels: np.ndarray, ps: list[float], step_mm: float,
              origin: tuple[float, float, float], phi: bool, seed: int) -> Dataset:
    nz, ny, nx = pixels.shape
    ds = Dataset()
    sop_uid = uid(seed, "sop", sp.uid, "enhanced")
    ds.file_meta = _file_meta(EnhancedMRImageStorage, sop_uid)
    ds.preamble = b"\0" * 128
    ds.SOPClassUID = EnhancedMRImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.ImageType = list(sp.image_type)
    _common(ds, exam, sp, phi, seed)
    del ds.AcquisitionDate, ds.AcquisitionTime   # Enhanced MR: AcquisitionDateTime (and per frame)
    acquired = f"{ds.ContentDate}{ds.ContentTime}.000000"
    ds.AcquisitionDateTime = acquired
    ds.AcquisitionDuration = 120.0
    ds.InstanceNumber = 1
    ds.ContentQualification = "PRODUCT"
    ds.PresentationLUTShape = "IDENTITY"
    ds.LossyImageCompression = "00"
    ds.ApplicableSafetyStandardAgency = "IEC"
    ds.ResonantNucleus = "1H"
    ds.KSpaceFiltering = "NONE"
    ds.NumberOfKSpaceTrajectories = 1
    if sp.params.get("MRAcquisitionType", "3D") == "3D":
        ds.CoverageOfKSpace = "FULL"
    ds.AcquisitionContextSequence = DSequence([])
    image_desc = {"PixelPresentation": "MONOCHROME", "VolumetricProperties": "VOLUME",
                  "VolumeBasedCalculationTechnique": "NONE", "ComplexImageComponent": "MAGNITUDE",
                  "AcquisitionContrast": {"T1": "T1", "FLAIR": "FLUID_ATTENUATED", "SWI": "T2_STAR", "T2": "T2",
                                          "DWI": "DIFFUSION", "ASL": "PERFUSION"}.get(contrast_of(sp.protocol), "UNKNOWN")}
    for kw, v in image_desc.items():
        setattr(ds, kw, v)
    p = sp.params
    pulse = enhanced_pulse_attributes(p, exam.device.style.enhanced_pulse)
    for kw, v in pulse["top"].items():
        setattr(ds, kw, v)
    ds.MRAcquisitionType = p.get("MRAcquisitionType", "3D")
    shared: dict[str, Dataset] = {}
    frame: dict[str, Dataset] = {}
    for kw, v in p.items():
        if kw in ENHANCED_SKIP or kw == "MRAcquisitionType" or not _writable(kw):
            continue
        if kw in ENHANCED_GROUPS and kw not in exam.device.style.enhanced_top:
            seq, inner, per_frame = ENHANCED_GROUPS[kw]
            item = (frame if per_frame else shared).setdefault(seq, Dataset())
            if seq == "MRDiffusionSequence":
                item.DiffusionDirectionality = "ISOTROPIC" if v else "NONE"
            val = _typed(inner, v)
            if inner == "InversionTimes" and not isinstance(val, list):
                val = [val]
            _set(item, inner, val)
        else:
            _set(ds, ENHANCED_TOP.get(kw, kw), _typed(ENHANCED_TOP.get(kw, kw), v))
    for seq in ("MRModifierSequence", "MRImagingModifierSequence"):
        item = shared.setdefault(seq, Dataset())
        for kw, v in pulse[seq].items():
            setattr(item, kw, v)
    timing = shared.setdefault("MRTimingAndRelatedParametersSequence", Dataset())
    timing.GradientOutputType, timing.GradientOutput = "PER_NERVE_STIM", 0.74
    etl = int(p.get("EchoTrainLength", 1) or 1)
    timing.RFEchoTrainLength = etl if "SE" in dicomio.as_list(p.get("ScanningSequence")) else 0
    timing.GradientEchoTrainLength = 0 if timing.RFEchoTrainLength else etl
    modes = []
    for kind in ("STATIC FIELD", "RF", "GRADIENT"):
        m = Dataset()
        m.OperatingModeType, m.OperatingMode = kind, "IEC_NORMAL"
        modes.append(m)
    timing.OperatingModeSequence = DSequence(modes)
    sar = Dataset()
    sar.SpecificAbsorptionRateDefinition, sar.SpecificAbsorptionRateValue = "IEC_WHOLE_BODY", float(p.get("SAR", 0.4))
    timing.SpecificAbsorptionRateSequence = DSequence([sar])
    receive = shared.setdefault("MRReceiveCoilSequence", Dataset())
    receive.ReceiveCoilManufacturerName = exam.device.manufacturer
    receive.ReceiveCoilType, receive.QuadratureReceiveCoil = "MULTICOIL", "NO"
    element = Dataset()
    element.MultiCoilElementName, element.MultiCoilElementUsed = "HC1-7", "YES"
    receive.MultiCoilDefinitionSequence = DSequence([element])
    transmit = shared.setdefault("MRTransmitCoilSequence", Dataset())
    transmit.TransmitCoilName = str(p.get("TransmitCoilName", "Body"))
    transmit.TransmitCoilManufacturerName, transmit.TransmitCoilType = exam.device.manufacturer, "BODY"
    anatomy = Dataset()
    anatomy.AnatomicRegionSequence = DSequence([_code("12738006", "SCT", "Brain")])
    anatomy.FrameLaterality = "U"
    shared["FrameAnatomySequence"] = anatomy
    fov = shared.setdefault("MRFOVGeometrySequence", Dataset())
    fov.MRAcquisitionFrequencyEncodingSteps, fov.MRAcquisitionPhaseEncodingStepsInPlane = nx, ny
    if fov.get("InPlanePhaseEncodingDirection") == "COL":
        fov.InPlanePhaseEncodingDirection = "COLUMN"   # the Enhanced MR term
    frame.setdefault("PixelMeasuresSequence", Dataset()).PixelSpacing = _fmt_ds(ps)
    frame_type = Dataset()
    frame_type.FrameType = list(sp.image_type)
    for kw, v in image_desc.items():
        setattr(frame_type, kw, v)
    frame["MRImageFrameTypeSequence"] = frame_type
    pvt = Dataset()
    pvt.RescaleIntercept, pvt.RescaleSlope, pvt.RescaleType = 0, 1, "US"
    frame["PixelValueTransformationSequence"] = pvt
    po = Dataset()
    po.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    frame["PlaneOrientationSequence"] = po
    shared_item = Dataset()
    for seq, item in sorted(shared.items()):
        setattr(shared_item, seq, DSequence([item]))
    _private(shared_item, exam, sp, where="shared")
    _constrained_private(ds, sp)
    ds.SharedFunctionalGroupsSequence = DSequence([shared_item])
    frames = []
    for k in range(nz):
        f = Dataset()
        fc = Dataset()
        fc.FrameAcquisitionDateTime = fc.FrameReferenceDateTime = acquired
        fc.FrameAcquisitionDuration = 120000.0 / nz
        fc.StackID = "1"
        fc.InStackPositionNumber = k + 1
        fc.DimensionIndexValues = [1, k + 1]
        f.FrameContentSequence = DSequence([fc])
        pp = Dataset()
        pp.ImagePositionPatient = _fmt_ds([origin[0], origin[1], origin[2] + k * step_mm])
        f.PlanePositionSequence = DSequence([pp])
        for seq, item in sorted(frame.items()):
            setattr(f, seq, DSequence([item]))
        frames.append(f)
    ds.PerFrameFunctionalGroupsSequence = DSequence(frames)
    dim_uid = uid(seed, "dim", sp.uid)
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
