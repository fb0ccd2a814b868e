"""Part 10 output: a zero preamble and a File Meta Information group rebuilt from scratch, the dataset in its
own transfer syntax, written atomically as ``<SOPInstanceUID>.dcm``. Same input + same key -> same bytes."""
from __future__ import annotations

import struct
from io import BytesIO
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID

from ..files import atomic_write_bytes
from .elements import raw_text
from .writer import dataset_bytes

ENGINE_VERSION = "imtrial-deid 1"
IMPLEMENTATION_CLASS_UID = "2.25.229346958127213146873402376458208370217"  # fixed: output must not vary by host
IMPLEMENTATION_VERSION_NAME = "IMTRIAL_DEID_1"


def to_bytes(ds: Dataset, transfer_syntax) -> bytes:
    """Serialize deterministically: zero preamble, File Meta Information rebuilt from scratch."""
    ts = UID(str(transfer_syntax))
    sop_class = raw_text(ds._dict[0x00080016]) if 0x00080016 in ds._dict else ""
    sop_inst = raw_text(ds._dict[0x00080018]) if 0x00080018 in ds._dict else ""
    if ts.is_deflated or not ts.is_little_endian:
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = sop_inst
        meta.TransferSyntaxUID = ts
        meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
        meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
        ds.file_meta = meta
        ds.preamble = b"\x00" * 128
        buf = BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        return buf.getvalue()
    return _file_meta_bytes(sop_class, sop_inst, str(ts)) + dataset_bytes(ds, ts.is_implicit_VR)


def write_instance(folder: Path, sop_instance_uid: str, data: bytes) -> Path:
    """Write one de-identified instance as ``folder/<SOPInstanceUID>.dcm`` (write-then-rename)."""
    path = Path(folder) / f"{sop_instance_uid}.dcm"
    atomic_write_bytes(path, data)
    return path


def _meta_elem(tag: int, vr: str, value: bytes) -> bytes:
    if len(value) & 1:
        value += b"\x00" if vr in ("UI", "OB") else b" "
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF) + vr.encode()
    if vr == "OB":
        return head + b"\x00\x00" + struct.pack("<I", len(value)) + value
    return head + struct.pack("<H", len(value)) + value


def _file_meta_bytes(sop_class: str, sop_inst: str, ts: str) -> bytes:
    """Preamble (zeros), 'DICM' and a fresh group 0002 in explicit VR little endian (PS3.10 7.1)."""
    body = b"".join([
        _meta_elem(0x00020001, "OB", b"\x00\x01"),
        _meta_elem(0x00020002, "UI", sop_class.encode("ascii")),
        _meta_elem(0x00020003, "UI", sop_inst.encode("ascii")),
        _meta_elem(0x00020010, "UI", ts.encode("ascii")),
        _meta_elem(0x00020012, "UI", IMPLEMENTATION_CLASS_UID.encode("ascii")),
        _meta_elem(0x00020013, "SH", IMPLEMENTATION_VERSION_NAME.encode("ascii")),
    ])
    group_length = _meta_elem(0x00020000, "UL", struct.pack("<I", len(body)))
    return b"\x00" * 128 + b"DICM" + group_length + body
