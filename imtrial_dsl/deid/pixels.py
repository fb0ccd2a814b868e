"""Pixels and overlays: burned-in annotation (refuse the image, or blank the study's regions in it) and the
Clean Graphics treatment of overlay planes (60xx,3000).

numpy is imported where pixels are touched: most instances never need it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset

from .. import ir
from ..dicom_tables import BURNED_IN_RISK_IF_SECONDARY, BURNED_IN_RISK_MODALITIES
from ..vendors import normalize_vendor
from .elements import raw_text


@dataclass(frozen=True)
class PixelVerdict:
    """What the burned-in screening decided for an image at risk."""

    refused: str = ""                   # quarantine reason ("" = not refused)
    detail: str = ""
    cleaned: bool = False               # the study's regions were blanked
    passed_unchecked: bool = False      # at risk, no region, and the study says quarantine_burned_in no


def burned_in_risk(ds: Dataset) -> Optional[str]:
    """Why this image may carry burned-in annotation, or None (no pixels, flagged NO, or not a risky kind)."""
    d = ds._dict
    if 0x7FE00010 not in d:
        return None
    raw = lambda tag: raw_text(d[tag]).upper() if tag in d else ""   # noqa: E731 - ASCII VRs, no conversion
    flag = raw(0x00280301)                                      # BurnedInAnnotation
    modality = raw(0x00080060)
    if flag == "YES":
        return "BurnedInAnnotation is YES"
    if flag == "NO":
        return None
    if modality in BURNED_IN_RISK_MODALITIES:
        return f"modality {modality} commonly carries burned-in annotation"
    if modality in BURNED_IN_RISK_IF_SECONDARY and "SECONDARY" in raw(0x00080008).split("\\"):
        return f"{modality} SECONDARY image may carry burned-in annotation"
    if raw(0x00080016).startswith("1.2.840.10008.5.1.4.1.1.7"):
        return "Secondary Capture image may carry burned-in annotation"
    return None


def screen(ds: Dataset, deid: ir.Deidentify) -> Optional[PixelVerdict]:
    """Blank the study's matching regions in an image at risk, else refuse it (or pass it, if the study says so).

    None: the image is not at risk."""
    why = burned_in_risk(ds)
    if why is None:
        return None
    regions = regions_for(deid.pixel_regions, ds)
    if regions:
        try:
            blank(ds, regions)
        except Exception as e:                          # undecodable pixels: never pass them through
            return PixelVerdict(refused="pixel_cleaning_failed", detail=f"{why}; {type(e).__name__}")
        return PixelVerdict(cleaned=True)
    if not deid.quarantine_burned_in:
        return PixelVerdict(passed_unchecked=True)
    return PixelVerdict(refused="burned_in_annotation",
                        detail=f"{why}; no pixel region in the study matches this image")


def regions_for(regions: list[ir.PixelRegion], ds: Dataset) -> list[ir.PixelRegion]:
    """The study's pixel regions whose selectors (modality, vendor, model, rows, columns) match this image."""
    modality = raw_text(ds._dict[0x00080060]).upper() if 0x00080060 in ds._dict else ""
    vendor = normalize_vendor(str(ds.get("Manufacturer", "") or ""))
    model = str(ds.get("ManufacturerModelName", "") or "").lower()
    rows, cols = ds.get("Rows"), ds.get("Columns")
    out = []
    for r in regions:
        if r.modality and r.modality.upper() != modality:
            continue
        if r.vendor and normalize_vendor(r.vendor) != vendor:
            continue
        if r.model and r.model.lower() != model:
            continue
        if (r.rows and r.rows != rows) or (r.columns and r.columns != cols):
            continue
        out.append(r)
    return out


def blank(ds: Dataset, regions: list[ir.PixelRegion]) -> None:
    """Zero the regions in every frame (compressed images are decompressed) and set BurnedInAnnotation NO."""
    import numpy as np

    if ds.file_meta.TransferSyntaxUID.is_compressed:
        ds.decompress(generate_instance_uid=False)
    arr = ds.pixel_array.copy()
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    spp = int(ds.get("SamplesPerPixel", 1) or 1)
    view = arr if frames > 1 else arr[np.newaxis, ...]
    for r in regions:
        if spp > 1:
            view[:, r.y0:r.y1, r.x0:r.x1, :] = 0
        else:
            view[:, r.y0:r.y1, r.x0:r.x1] = 0
    ds.PixelData = arr.tobytes()
    ds.BurnedInAnnotation = "NO"


def clean_overlays(ds: Dataset, data_tags: list[int], regions: list[ir.PixelRegion]) -> None:
    """Clean Graphics: keep an overlay only with the study's regions blanked in it; else remove its group."""
    import numpy as np

    regions = regions_for(regions, ds)
    for tag in data_tags:
        group = tag >> 16
        try:
            rows = int(ds[(group << 16) | 0x0010].value)
            cols = int(ds[(group << 16) | 0x0011].value)
            raw = ds[tag].value
            bits = np.unpackbits(np.frombuffer(raw, dtype=np.uint8), bitorder="little")
            n = bits.size // (rows * cols)
            if not regions or n < 1:
                raise ValueError("no region")
            planes = bits[: n * rows * cols].reshape(n, rows, cols)
            for r in regions:
                planes[:, r.y0:r.y1, r.x0:r.x1] = 0
            packed = np.packbits(planes.ravel(), bitorder="little").tobytes()
            if len(packed) % 2:
                packed += b"\x00"
            ds[tag] = DataElement(tag, "OW", packed)
        except Exception:
            for t in [t for t in ds._dict if t >> 16 == group]:
                del ds._dict[t]
