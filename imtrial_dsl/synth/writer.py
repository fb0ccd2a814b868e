"""Planned exams written as DICOM: classic images (one file per slice) or Enhanced MR (one multi-frame
file), with the vendor's header parameters and, when asked, planted PHI."""
from __future__ import annotations

import datetime as _dt
import hashlib
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DSequence
from pydicom.uid import (PYDICOM_IMPLEMENTATION_UID, CTImageStorage, EnhancedMRImageStorage, ExplicitVRLittleEndian,
                         MRImageStorage)

from .. import ir
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


@dataclass
class ExamPlan:
    subject: dict[str, Any]
    visit: ir.Visit
    date: _dt.date
    device: DeviceIdent
    series: list[SeriesPlan] = field(default_factory=list)
    study_uid: str = ""
    dir: str = ""


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


def write_series(exam: ExamPlan, sp: SeriesPlan, out_dir: Path, shape: tuple[int, int, int], phi: bool,
                 seed: int) -> list[Path]:
    """Write one series (classic: one file per slice; Enhanced MR: one multi-frame file)."""
    contrast = contrast_of(sp.protocol)
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
    if sp.enhanced:
        path = series_dir / "EMR0001.dcm"
        ds = _enhanced(exam, sp, pixels, ps, step_mm, (x0, y0, z0), phi, seed)
        atomic_write_dataset(path, ds)
        written.append(path)
    else:
        sop_class = MRImageStorage if sp.protocol.modality == "MR" else CTImageStorage
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
            atomic_write_dataset(path, ds)
            written.append(path)
    if sp.corrupt:
        victim = written[len(written) // 2]
        data = victim.read_bytes()
        atomic_write_bytes(victim, data[: len(data) - (ny * nx)])  # drop half of a slice's pixel bytes
    return written


def _enhanced(exam: ExamPlan, sp: SeriesPlan, pixels: np.ndarray, ps: list[float], step_mm: float,
              origin: tuple[float, float, float], phi: bool, seed: int) -> Dataset:
    nz, ny, nx = pixels.shape
    ds = Dataset()
    sop_uid = uid(seed, "sop", sp.uid, "enhanced")
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
