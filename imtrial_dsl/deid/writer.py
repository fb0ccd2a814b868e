"""Serialize a data set in little-endian explicit or implicit VR: the bytes pydicom's ``write_dataset`` writes,
at a fraction of its cost.

A de-identified instance is mostly elements the engine kept untouched, still as pydicom read them (raw
bytes). pydicom's writer copies each through a fresh buffer object and several checks (about 25 µs an
element, more than half of de-identifying a file). Here a raw element is its header and its bytes; a sequence
is written item by item the same way; every other element (one the engine replaced or converted) and every
data set pydicom would re-encode (another encoding or character set than it was read in: it converts all
of it then, and corrects ambiguous VRs) goes through pydicom's own functions. So the output is pydicom's,
byte for byte (``tests/test_deid_writer.py`` compares both on real and synthetic files).
Mirrors ``pydicom.filewriter.write_dataset`` / ``write_data_element`` / ``write_sequence_item`` of pydicom 3.0.
"""
from __future__ import annotations

import struct
from typing import Any

from pydicom.charset import default_encoding
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element, write_dataset
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32

_L32 = frozenset(str(v) for v in EXPLICIT_VR_LENGTH_32)
_ITEM = struct.pack("<HH", 0xFFFE, 0xE000)
_ITEM_END = struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
_SEQ_END = struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
_pack_tag = struct.Struct("<HH").pack
_pack_us = struct.Struct("<H").pack
_pack_ul = struct.Struct("<I").pack


def _buffer(implicit: bool) -> DicomBytesIO:
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = implicit
    return fp


def dataset_bytes(ds: Any, implicit: bool, parent_encoding: Any = default_encoding) -> bytes:
    """What ``write_dataset`` writes for ``ds`` to a little-endian buffer (``implicit``: implicit VR)."""
    out: list[bytes] = []
    _dataset(out, ds, implicit, parent_encoding)
    return b"".join(out)


def _dataset(out: list[bytes], ds: Any, implicit: bool, parent_encoding: Any) -> None:
    if (implicit, True) != ds.original_encoding or ds.original_character_set != ds._character_set:
        fp = _buffer(implicit)      # pydicom re-encodes such a data set as a whole: let it
        write_dataset(fp, ds, parent_encoding)
        out.append(fp.getvalue())
        return
    encoding = ds.get("SpecificCharacterSet", parent_encoding)
    d = ds._dict
    for tag in sorted(d):
        if not tag & 0xFFFF and tag >> 16 > 6:   # retired group lengths are not written (PS3.5 7.2)
            continue
        elem = d[tag]
        if elem.is_raw and _raw(out, tag, elem, implicit):
            continue
        if not elem.is_raw and elem.VR == "SQ" and _sequence(out, tag, elem, implicit, encoding):
            continue
        fp = _buffer(implicit)
        write_data_element(fp, ds.get_item(tag), encoding)
        out.append(fp.getvalue())


def _raw(out: list[bytes], tag: int, elem: Any, implicit: bool) -> bool:
    """A raw element as read: header and bytes. False for the cases pydicom treats specially."""
    value, vr = elem.value, elem.VR
    if not isinstance(value, bytes) or elem.length == 0xFFFFFFFF:
        return False
    n = len(value)
    if implicit:
        out.append(_pack_tag(tag >> 16, tag & 0xFFFF) + _pack_ul(n))
    else:
        if not vr or len(vr) != 2:
            return False
        if vr in _L32:
            out.append(_pack_tag(tag >> 16, tag & 0xFFFF) + vr.encode() + b"\0\0" + _pack_ul(n))
        elif n > 0xFFFF:
            return False           # pydicom writes it as UN, with a warning
        else:
            out.append(_pack_tag(tag >> 16, tag & 0xFFFF) + vr.encode() + _pack_us(n))
    out.append(value)
    return True


def _sequence(out: list[bytes], tag: int, elem: Any, implicit: bool, encodings: Any) -> bool:
    from pydicom.charset import convert_encodings

    encodings = convert_encodings(encodings or [default_encoding])
    body: list[bytes] = []
    if not elem.is_empty:
        for item in elem.value:
            inner = _item_bytes(item, implicit, encodings)
            if getattr(item, "is_undefined_length_sequence_item", False):
                body += [_ITEM, _pack_ul(0xFFFFFFFF), inner, _ITEM_END]
            else:
                body += [_ITEM, _pack_ul(len(inner)), inner]
    value = b"".join(body)
    undefined = elem.is_undefined_length
    head = _pack_tag(tag >> 16, tag & 0xFFFF) + (b"" if implicit else b"SQ\0\0")
    out.append(head + _pack_ul(0xFFFFFFFF if undefined else len(value)))
    out.append(value)
    if undefined:
        out.append(_SEQ_END)
    return True


_MEMO: dict[tuple, bytes] = {}
_PLAIN = (str, int, float, bytes)


def _item_bytes(item: Any, implicit: bool, encodings: Any) -> bytes:
    """An item's bytes. Items the engine makes afresh (the method-code items every instance gets) are
    encoded once per content: their elements are plain values, so equal content gives equal bytes."""
    if item.original_encoding != (None, None) or len(item._dict) > 8:
        return dataset_bytes(item, implicit, encodings)
    key = [implicit, tuple(encodings) if isinstance(encodings, list) else encodings]
    for tag, elem in item._dict.items():
        v = elem.value
        if type(v) not in _PLAIN:
            return dataset_bytes(item, implicit, encodings)
        key.append((int(tag), elem.VR, elem.is_raw, type(v), v))
    k = tuple(key)
    hit = _MEMO.get(k)
    if hit is None:
        if len(_MEMO) > 4096:
            _MEMO.clear()
        hit = _MEMO[k] = dataset_bytes(item, implicit, encodings)
    return hit
