"""Siemens CSA headers: the private elements (0029,xx10) "CSA Image Header Info" and (0029,xx20) "CSA Series
Header Info" of creator ``SIEMENS CSA HEADER``, and the ASCCONV protocol text one of their elements holds.

The format (as documented by nibabel's ``nicom.csareader`` and dcm2niix; written here from that description so
that reading a header imports nothing heavy): CSA2 starts with ``SV10`` and four unused bytes, CSA1 starts
directly; then ``n_tags`` and a check word (uint32, little endian). Each element is a 64-byte name, VM (int32),
a 4-byte VR, the syngo data type, ``n_items`` and a check word (int32 each), then its items: four int32 (the
item's length is the second for CSA2, the first minus the second element's ``n_items`` for CSA1 — CSA1, syngo
VA, is untested here on real files) and the value
bytes, padded to four bytes. Values are text; numeric VRs are converted. The first VM items hold values (all
of them when VM is 0).

A protocol names a field as ``private "SIEMENS CSA HEADER" (0029,xx10) "B_value"``; a field
``"MrPhoenixProtocol.sSliceAcceleration.lMultiBandFactor"`` is one key of the ASCCONV block
(``### ASCCONV BEGIN ### … ### ASCCONV END ###``) of the Series Header's ``MrPhoenixProtocol`` element.
"""
from __future__ import annotations

import re
import struct
from functools import lru_cache
from typing import Any, Optional

CREATOR = "SIEMENS CSA HEADER"
#: the low bytes of the two CSA elements of a ``SIEMENS CSA HEADER`` block (PS3.5 7.8.1: (0029,xx10), (0029,xx20))
ELEMENTS = {0x10: "CSA Image Header Info", 0x20: "CSA Series Header Info"}
#: elements of the Series Header whose text holds the ASCCONV protocol (VB/VD/VE: MrPhoenixProtocol; VA: MrProtocol)
PROTOCOL_TEXT = ("MrPhoenixProtocol", "MrProtocol")

_INTS = {"IS", "SL", "SS", "UL", "US"}
_FLOATS = {"FL", "FD", "DS"}


def parse(raw: bytes) -> dict[str, list[Any]]:
    """Element name -> its values (numbers for numeric VRs, else text), in header order. ValueError for bytes
    that are not a CSA header."""
    if not isinstance(raw, (bytes, bytearray)) or len(raw) < 8:
        raise ValueError("too short for a CSA header")
    csa2 = raw[:4] == b"SV10"
    pos = 8 if csa2 else 0
    try:
        n_tags, check = struct.unpack_from("<2I", raw, pos)
        if not 0 < n_tags <= 1024 or check != 77:
            raise ValueError(f"not a CSA header (n_tags {n_tags}, check {check})")
        pos += 8
        out: dict[str, list[Any]] = {}
        csa1_offset = 0
        for no in range(n_tags):
            name_b, vm, vr_b, _syngodt, n_items, _check = struct.unpack_from("<64si4s3i", raw, pos)
            pos += 84
            name = name_b.split(b"\0", 1)[0].decode("latin-1")
            vr = vr_b.split(b"\0", 1)[0].decode("latin-1")
            if no <= 1:
                csa1_offset = n_items   # CSA1 item lengths count from the second element's n_items
            wanted = vm if vm > 0 else n_items
            values: list[Any] = []
            for k in range(n_items):
                x0, x1, _x2, _x3 = struct.unpack_from("<4i", raw, pos)
                pos += 16
                length = x1 if csa2 else x0 - csa1_offset
                if length < 0 or pos + length > len(raw):
                    if csa2:
                        raise ValueError(f"element {name}: an item runs past the header")
                    break   # CSA1 headers end their last items early
                if k < wanted and length:
                    text = raw[pos:pos + length].split(b"\0", 1)[0].decode("latin-1").strip()
                    if text:
                        values.append(_convert(vr, text))
                pos += (length + 3) // 4 * 4
            out[name] = values
        return out
    except struct.error as exc:
        raise ValueError(f"truncated CSA header ({exc})") from None


def _convert(vr: str, text: str) -> Any:
    try:
        if vr in _INTS:
            return int(float(text))
        if vr in _FLOATS:
            return float(text)
    except ValueError:
        pass
    return text


_ASCCONV = re.compile(r"### ASCCONV BEGIN[^\n]*###\s*\n(.*?)\n### ASCCONV END ###", re.S)


def ascconv(text: str) -> dict[str, Any]:
    """The ``key = value`` lines of an ASCCONV block: numbers (``0x`` hex too) or text (quotes removed)."""
    m = _ASCCONV.search(text)
    out: dict[str, Any] = {}
    if not m:
        return out
    for line in m.group(1).splitlines():
        if "=" not in line or line.lstrip().startswith("#"):
            continue
        key, _, val = line.partition("=")
        val = val.split("#", 1)[0].strip() if not val.strip().startswith('"') else val.strip()
        if val.startswith('"'):
            out[key.strip()] = val.strip('"').replace('""', '"')
            continue
        try:
            out[key.strip()] = int(val, 0)
        except ValueError:
            try:
                out[key.strip()] = float(val)
            except ValueError:
                out[key.strip()] = val
    return out


def field_values(raw: bytes, field: str) -> Optional[list[Any]]:
    """The values of ``field`` in a CSA header's bytes (None when the header or the field is absent):
    an element name, or ``ELEMENT.KEY`` for a key of the ASCCONV text an element holds."""
    return _field(bytes(raw), field)


# The instances of a series share their Series Header byte for byte, and a protocol reads several fields of one
# header: parse each header once (an 80 kB Series Header with its ASCCONV text costs ~18 ms).
@lru_cache(maxsize=32)
def _field(raw: bytes, field: str) -> Optional[list[Any]]:
    elements = _parsed(raw)
    if field in elements:
        return list(elements[field]) or None
    head, _, key = field.partition(".")
    if key and head in elements and elements[head]:
        value = _ascconv_cached(str(elements[head][0])).get(key)
        return None if value is None else [value]
    return None


@lru_cache(maxsize=8)
def _parsed(raw: bytes) -> dict[str, list[Any]]:
    return parse(raw)


@lru_cache(maxsize=8)
def _ascconv_cached(text: str) -> dict[str, Any]:
    return ascconv(text)
