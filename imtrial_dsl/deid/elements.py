"""DICOM elements as de-identification reads them: tags, VRs and text values, straight from raw bytes
where that is safe (untouched elements stay pydicom raw elements and are written back byte for byte)."""
from __future__ import annotations

import re

from pydicom.datadict import DicomDictionary, dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset

from .vr import SINGLE_VALUED_TEXT_VRS

SQ_TAGS = frozenset(t for t, e in DicomDictionary.items() if e[0] == "SQ")
_TAG = re.compile(r"\(?([0-9A-Fa-f]{4}),?([0-9A-Fa-f]{4})\)?")


def parse_tag(text: str) -> int:
    """'(gggg,eeee)' or a DICOM keyword -> int tag (raises KeyError)."""
    t = text.strip()
    m = _TAG.fullmatch(t)
    if m:
        return int(m.group(1) + m.group(2), 16)
    tag = tag_for_keyword(t)
    if tag is None:
        raise KeyError(t)
    return tag


def vr_of(tag: int) -> str:
    """The dictionary VR of a tag ('UN' if unknown; the first of 'US or SS')."""
    try:
        vr = dictionary_VR(tag)
    except KeyError:
        return "UN"
    return vr.split(" or ")[0]


def elem_vr(elem, tag: int) -> str:
    vr = getattr(elem, "VR", None)
    if vr is None or vr in ("UN",) and tag in DicomDictionary:
        return vr_of(tag)
    return vr


def raw_text(elem) -> str:
    """The value of a raw/converted element with an ASCII-only VR (UI, DA, DT, TM, AE, CS...)."""
    v = elem.value
    if v is None:
        return ""
    if isinstance(v, (bytes, bytearray)):
        return bytes(v).decode("ascii", "replace").rstrip("\x00 ").strip()
    if isinstance(v, (list, tuple)) or type(v).__name__ == "MultiValue":
        return "\\".join(str(x) for x in v)
    return str(v).strip()


def text_values(ds: Dataset, tag: int, vr: str) -> list[str]:
    """A text element's values as str; ASCII raw bytes are decoded directly, anything else via pydicom."""
    elem = ds._dict[tag]
    v = elem.value
    if isinstance(v, (bytes, bytearray)) and bytes(v).isascii():
        text = bytes(v).decode("ascii").rstrip("\x00 ")
        return [text] if vr in SINGLE_VALUED_TEXT_VRS else [x.strip() for x in text.split("\\")]
    val = ds[tag].value
    if val is None:
        return [""]
    if isinstance(val, (list, tuple)) or type(val).__name__ == "MultiValue":
        return [str(x) for x in val]
    return [str(val)]
