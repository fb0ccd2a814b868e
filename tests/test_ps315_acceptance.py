"""Acceptance test generated from DICOM PS3.15 Table E.1-1 (issue 9).

For every concrete row of the table (the package's generated copy, ``stdlib/deid/ps315.imtrial``, itself checked
against the standard's table as JSON in ``tests/data``) and each option set — none, each option alone, all
compatible options together (once with full dates, once with modified dates) — one dataset holds the attribute at
top level and inside an item of a sequence the table does not name. It is de-identified, written as Part 10,
re-read, and what became of the attribute must be what the table's action says, at both places: zero mismatches.

What an action means is written here from the standard (PS3.15 E.1.1, Table E.1-1a), not taken from the engine;
where the standard leaves a choice (X/Z, X/D, X/Z/D, Z/D; two options on one row; C on values that are not text)
the expectation is the choice ``docs/deidentification.md`` documents, and it must also be one the standard allows.
Overlays, curves and private groups have their own tests below.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import re
import sys
from functools import lru_cache
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.datadict import DicomDictionary, dictionary_VR
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian

from imtrial_dsl import deid as D
from imtrial_dsl.deid import part10
from imtrial_dsl.loader import load_text

ROOT = Path(__file__).resolve().parent.parent
KEY = b"acceptance-key-0123456789abcdef"
KEY_ENV = "IMTRIAL_PS315_ACCEPTANCE_KEY"
TRIAL = "PS315"
SUBJECT = {"subject_id": "PS315-X-0001", "site": "X", "visit": "baseline", "timepoint": "baseline"}
OPTIONS = ["retain_longitudinal_full_dates", "retain_longitudinal_modified_dates", "retain_patient_characteristics",
           "retain_device_identity", "retain_institution_identity", "retain_uids", "retain_safe_private",
           "clean_descriptors", "clean_structured_content", "clean_graphics"]
OPTION_SETS = ([()] + [(o,) for o in OPTIONS]
               + [tuple(o for o in OPTIONS if o != "retain_longitudinal_modified_dates"),
                  tuple(o for o in OPTIONS if o != "retain_longitudinal_full_dates")])
# The engine writes these itself at top level (research identifiers, the method): checked in test_deid.py.
RESEARCH = {0x00100010, 0x00100020, 0x00120040, 0x00120010, 0x00120020, 0x00120021, 0x00120030, 0x00120050,
            0x00120051, 0x00120062, 0x00120063, 0x00120064, 0x00280303}
TEXT = {"LO", "SH", "ST", "LT", "UT", "UC", "PN"}
NUM = {"US", "SS", "UL", "SL", "FL", "FD", "SV", "UV", "AT"}
BYTES = {"OB", "OW", "OD", "OF", "OL", "OV", "UN"}
DATE = {"DA", "DT", "TM"}
PATIENT_NAME = "Doe^Jane"
# a text value that is partly identifying: cleaning keeps "ZQ…QZ scan", drops the name and the date
IDENT = " Doe 2024-01-05 scan"
DICOM_ROOT = "1.2.840.10008."
# what the standard allows for each code (E.1.1), and the choice docs/deidentification.md documents
ALLOWED = {"X": {"X"}, "Z": {"Z"}, "D": {"D"}, "K": {"K"}, "C": {"C"}, "U": {"U"}, "X/Z": {"X", "Z"},
           "X/D": {"X", "D"}, "X/Z/D": {"X", "Z", "D"}, "Z/D": {"Z", "D"}, "X/Z/U*": {"X", "Z", "U*"}}
CHOSEN = {"X/Z": "Z", "X/D": "D", "X/Z/D": "Z", "Z/D": "D", "X/Z/U*": "U*"}
RANK = {"X": 5, "Z": 4, "D": 3, "U": 2, "U*": 2, "C": 1, "K": 0}
CONTAINER = 0x00189006            # MR Imaging Modifier Sequence: not in Table E.1-1, kept, profile applied inside
# the rows of group 0000 are written into a dataset body on purpose (point 5): pydicom expects implicit VR there
pytestmark = pytest.mark.filterwarnings("ignore:Expected implicit VR:UserWarning")


@lru_cache(maxsize=1)
def profile():
    trial, diags, _ = load_text('import "stdlib/deid/ps315.imtrial"\n', str(ROOT / "p.imtrial"))
    return trial.profile("ps315_basic")


def rows():
    for r in profile().rules:
        if re.fullmatch(r"\([0-9A-F]{4},[0-9A-F]{4}\)", r.tag):
            yield int(r.tag[1:5] + r.tag[6:10], 16), r


def vr_of(tag: int) -> str:
    try:
        return dictionary_VR(tag).split(" or ")[0]
    except KeyError:
        return "UN"


def expected(rule, options: tuple[str, ...]) -> tuple[str, str]:
    """(table code under the options, applied action). Options' codes replace the basic one; two options on one row:
    the more protective (docs: Choices where the standard leaves room); alternatives resolve as documented."""
    hits = [rule.options[o] for o in rule.options if o in options]
    code = max(hits, key=lambda c: RANK[CHOSEN.get(c, c)]) if hits else rule.action
    applied = CHOSEN.get(code, code)
    assert applied in ALLOWED[code]
    return code, applied


# ----------------------------------------------------------------------------- values

def value_for(tag: int, vr: str, n: int):
    if vr in TEXT:
        text = f"ZQ{n:04d}QZ" + IDENT
        return {"SH": text[:16], "PN": f"Roe{n:04d}^Richard"}.get(vr, text)
    if vr == "CS":
        return f"ZQ{n:04d}"
    if vr == "AE":
        return f"AEZQ{n:04d}"
    if vr == "UI":
        return f"1.2.826.0.1.3680043.10.777.{100000 + n}"
    if vr == "DA":
        return "20240105"
    if vr == "DT":
        return "20240105101500"
    if vr == "TM":
        return "101500"
    if vr == "DS":
        return f"9{n:04d}.5"
    if vr == "IS":
        return f"8{n:04d}"
    if vr == "AS":
        return "042Y"
    if vr == "UR":
        return f"http://zq{n:04d}.example"
    if vr in ("FL", "FD"):
        return 1000.0 + n
    if vr in NUM:
        return 1000 + n
    if vr in BYTES:
        return f"OBZQ{n:04d}QZ".encode()
    raise ValueError(vr)


def seq_item(n: int) -> Dataset:
    """The content of a sequence attribute under test: a person name (D in the table), a code the table does not
    name, a reference (U), a DICOM-defined class UID, a number."""
    it = Dataset()
    it.PersonName = f"Nested{n:04d}^Person"                      # (0040,A123) D
    it.CodeValue = f"CV{n:04d}"                                  # (0008,0100) not in the table
    it.CodeMeaning = f"meaning {n:04d} for Doe"                  # (0008,0104) not in the table
    it.ReferencedSOPInstanceUID = f"1.2.826.0.1.3680043.10.778.{100000 + n}"   # U
    it.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"       # a DICOM class: identifies nobody
    return it


def dataset(tag: int, vr: str, n: int) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    ds.SOPInstanceUID = f"1.2.826.0.1.3680043.10.779.{100000 + n}"
    ds.PatientName = PATIENT_NAME
    ds.PatientID = "PID7741209"
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.10.780.1"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.10.781.1"
    ds.Modality = "MR"
    inner = Dataset()
    if vr == "SQ":
        if tag not in RESEARCH:
            ds.add_new(tag, "SQ", Sequence([seq_item(n)]))
        inner.add_new(tag, "SQ", Sequence([seq_item(n + 50000)]))
    else:
        v = value_for(tag, vr, n)
        if tag not in RESEARCH and tag not in ds:
            ds.add(DataElement(tag, vr, v))
        inner.add(DataElement(tag, vr, v))
    ds.add_new(CONTAINER, "SQ", Sequence([inner]))
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def written(ds: Dataset) -> Dataset:
    """``ds`` as a Part 10 file, read back (write_dataset: pydicom's dcmwrite refuses group 0000 in a body)."""
    fp = DicomBytesIO()
    fp.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(fp, ds.file_meta, enforce_standard=True)
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    return pydicom.dcmread(BytesIO(fp.getvalue()))


# ----------------------------------------------------------------------------- what happened

def uid_remap(old: str) -> str:
    """PS3.15 U: a new UID; here the documented keyed derivation (2.25 form, HMAC under the key, trial-scoped)."""
    mac = hmac.new(KEY, b"uid\x00" + TRIAL.encode() + b"\x00" + old.encode(), hashlib.sha256).digest()
    n = int.from_bytes(mac[:16], "big")
    n = (n & ~(0xF << 76)) | (0x8 << 76)
    n = (n & ~(0x3 << 62)) | (0x2 << 62)
    return f"2.25.{n}"


def leaves(ds: Dataset):
    for e in ds:
        if e.VR == "SQ":
            for it in e.value:
                yield from leaves(it)
        else:
            yield e


def outcome_problems(applied: str, vr: str, tag: int, before, after: Dataset, options, where: str) -> list[str]:
    """Why the element ``tag`` of ``after`` does not show the action ``applied`` (an empty list: it does)."""
    present = tag in after
    elem = after[tag] if present else None
    empty = present and (elem.value in (None, "", b"") or (vr == "SQ" and len(elem.value) == 0))
    if applied == "X":
        return [] if not present else [f"{where}: present, expected removed"]
    if not present:
        if applied == "C" and (vr in BYTES or vr in NUM or vr in ("IS", "DS", "AS", "UR")):
            return []                    # documented: what cannot be cleaned is removed
        if applied == "C" and vr in DATE and "retain_longitudinal_modified_dates" not in options:
            return []                    # documented: a date that cannot be shifted is not kept
        return [f"{where}: removed, expected {applied}"]
    if applied == "Z":
        return [] if empty else [f"{where}: {elem.value!r}, expected zero length"]
    if vr == "SQ":
        items = list(elem.value)
        if applied == "D":               # nothing of the original may survive anywhere inside
            orig = {str(x.value) for b in before for x in leaves(b)} - {"1.2.840.10008.5.1.4.1.1.4"}
            left = [str(x.value) for it in items for x in leaves(it) if str(x.value) in orig]
            return [f"{where}: D sequence keeps {left}"] if left or not items else []
        it = items[0] if items else None
        if it is None:
            return [f"{where}: sequence emptied, expected {applied}"]
        probs = []
        if it.get("PersonName") in (before[0].PersonName, None):
            probs.append(f"{where}: nested PersonName (D) kept")
        if it.get("ReferencedSOPInstanceUID") != (before[0].ReferencedSOPInstanceUID if "retain_uids" in options
                                                   else uid_remap(before[0].ReferencedSOPInstanceUID)):
            probs.append(f"{where}: nested ReferencedSOPInstanceUID not remapped")
        if it.get("ReferencedSOPClassUID") != "1.2.840.10008.5.1.4.1.1.4":
            probs.append(f"{where}: nested SOP class UID changed")
        if applied == "C" and "Doe" in str(it.get("CodeMeaning", "")):
            probs.append(f"{where}: cleaned sequence keeps the patient's name")
        return probs
    val = elem.value
    text = val.decode("latin-1") if isinstance(val, bytes) else str(val)
    orig = before.decode("latin-1") if isinstance(before, bytes) else str(before)
    if applied == "K":
        return [] if text == orig else [f"{where}: {text!r}, expected kept {orig!r}"]
    if applied in ("U", "U*") or (vr == "UI" and applied in ("D", "C")):
        want = uid_remap(orig)
        return [] if text == want else [f"{where}: UID {text!r}, expected {want!r}"]
    if applied == "D":
        return [] if not empty and text != orig else [f"{where}: {text!r}, expected a dummy"]
    if applied == "C":
        if vr in ("DA", "DT"):
            shift = (dt.date(int(text[:4]), int(text[4:6]), int(text[6:8])) - dt.date(2024, 1, 5)).days if text else 0
            ok = -365 <= shift <= -1 and text[8:] == orig[8:]
            return [] if ok else [f"{where}: date {text!r} not shifted from {orig!r} within -365..-1 d"]
        if vr == "TM":
            return [] if text == orig else [f"{where}: time {text!r} changed (documented: times of day kept)"]
        if vr == "AE":
            return [] if re.fullmatch(r"AE[0-9A-F]{14}", text) else [f"{where}: AE {text!r} not a keyed pseudonym"]
        if vr == "CS":
            return [] if text == "ANONYMIZED" else [f"{where}: CS {text!r}, expected a dummy"]
        if tag == 0x00080201:
            return [] if text == "+0000" else [f"{where}: time zone {text!r}, expected +0000"]
        if vr in TEXT:
            if "Doe" in text or "2024-01-05" in text or "Roe" in text:
                return [f"{where}: cleaned text still identifies: {text!r}"]
            marker = orig.split(" ")[0]
            return [] if (vr == "PN" or marker in text) else [f"{where}: cleaning lost the non-identifying text: {text!r}"]
        return [f"{where}: {vr} {text!r} kept under C"]
    return [f"{where}: unknown action {applied}"]


def deidentify(engine, ds: Dataset) -> Dataset:
    res = engine.deidentify(ds, SUBJECT)
    assert res.ok, (res.reason, res.detail)
    return pydicom.dcmread(BytesIO(part10.to_bytes(ds, ExplicitVRLittleEndian)))


def engine_for(options: tuple[str, ...], monkeypatch) -> D.Deidentifier:
    monkeypatch.setenv(KEY_ENV, KEY.decode())
    with_ = f" with {', '.join(options)}" if options else ""
    text = (f'import "stdlib/deid/ps315.imtrial"\nstudy {TRIAL} "Acceptance" {{ sponsor "S" }}\n'
            f'deidentify using ps315_basic{with_} {{ key env {KEY_ENV} }}\n')
    trial, diags, _ = load_text(text, str(ROOT / "acceptance.imtrial"))
    assert not [d for d in diags if d.severity.value == "error"], diags
    return D.Deidentifier(trial, D.resolve_key(trial))


@pytest.mark.parametrize("options", OPTION_SETS, ids=lambda o: "+".join(o) if len(o) < 3 else f"all({len(o)})")
def test_every_row_of_table_E1_1_does_what_the_table_says(options, monkeypatch):
    eng = engine_for(options, monkeypatch)
    mismatches, checked = [], 0
    for n, (tag, rule) in enumerate(rows(), start=1):
        vr = vr_of(tag)
        code, applied = expected(rule, options)
        group = tag >> 16
        if group in (0x0000, 0x0002):
            applied = "X"               # command / file-meta groups never belong in a dataset body (point 5)
        ds = dataset(tag, vr, n)
        before_top = ds[tag].value if tag in ds else None
        before_nested = ds[CONTAINER][0][tag].value
        out = deidentify(eng, written(ds))
        if tag not in RESEARCH:
            mismatches += [(rule.tag, rule.keyword, code, p)
                           for p in outcome_problems(applied, vr, tag, before_top, out, options, "top level")]
        nested = out[CONTAINER][0] if CONTAINER in out and len(out[CONTAINER].value) else Dataset()
        mismatches += [(rule.tag, rule.keyword, code, p)
                       for p in outcome_problems(applied, vr, tag, before_nested, nested, options, "in a sequence")]
        checked += 1
    assert checked >= 600
    assert not mismatches, f"{len(mismatches)} mismatches, e.g. " + "\n".join(map(str, mismatches[:40]))


def test_the_shipped_profile_is_the_standards_table():
    """stdlib/deid/ps315.imtrial is exactly what scripts/gen_ps315.py makes of Table E.1-1 (tests/data copy)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import gen_ps315
    finally:
        sys.path.pop(0)
    table = json.loads((ROOT / "tests" / "data" / "confidentiality_profile_attributes.json").read_text())
    assert len(table) == 621
    assert gen_ps315.render(table) == (ROOT / "stdlib" / "deid" / "ps315.imtrial").read_text()


# ----------------------------------------------------------------------------- groups the table names by pattern

def _image(n: int) -> Dataset:
    ds = dataset(0x00080070, "LO", n)                     # any concrete row: the groups below are what matters
    ds.Rows, ds.Columns = 8, 8
    ds.add_new(0x60000010, "US", 8)
    ds.add_new(0x60000011, "US", 8)
    ds.add_new(0x60000040, "CS", "G")
    ds.add_new(0x60000100, "US", 1)
    ds.add_new(0x60000022, "LO", "overlay of Doe")        # Overlay Description
    ds.add_new(0x60004000, "LT", "Doe 2024-01-05")        # Overlay Comments (60xx,4000)
    ds.add_new(0x60003000, "OW", b"\xff" * 8)
    ds.add_new(0x50000005, "US", 1)                       # Curve Dimensions (retired)
    ds.add_new(0x50003000, "OW", b"ZQCURVE1")
    ds.add_new(0x00190010, "LO", "SIEMENS MR HEADER")     # private creator + a safe and an unsafe element
    ds.add_new(0x0019100C, "IS", "1000")
    ds.add_new(0x00191099, "LO", "ZQPRIVATE Doe")
    ds.add_new(0x00090010, "LO", "SOME VENDOR")
    ds.add_new(0x00091001, "LO", "ZQPRIVATE2")
    return ds


@pytest.mark.parametrize("options", [(), ("clean_graphics",), ("retain_safe_private",)], ids=lambda o: "+".join(o) or "basic")
def test_overlay_curve_and_private_groups(options, monkeypatch):
    """(60xx,3000)/(60xx,4000) X, clean_graphics C; (50xx,xxxx) X, clean_graphics C (removed: retired, nothing to
    vouch for); (gggg,eeee) X, retain_safe_private C (only the verified safe list is kept)."""
    eng = engine_for(options, monkeypatch)
    out = deidentify(eng, written(_image(1)))
    assert not any(t >> 16 == 0x5000 for t in out.keys()), "curve group kept"
    if "clean_graphics" in options:
        # no blank region for this image: an overlay that cannot be cleaned is removed with its group
        assert not any(t >> 16 == 0x6000 for t in out.keys())
    else:
        assert not any(t >> 16 == 0x6000 for t in out.keys()), "overlay group kept without clean_graphics"
    private = {t for t in out.keys() if (t >> 16) & 1}
    if "retain_safe_private" in options:
        assert private == {0x00190010, 0x0019100C}
        assert out[0x0019100C].value == 1000
    else:
        assert private == set()


def test_overlay_kept_with_clean_graphics_only_when_blanked(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY.decode())
    text = (f'import "stdlib/deid/ps315.imtrial"\nstudy {TRIAL} "Acceptance" {{ sponsor "S" }}\n'
            f'deidentify using ps315_basic with clean_graphics {{\n key env {KEY_ENV}\n blank 0, 0, 4, 8 modality MR\n}}\n')
    trial, _, _ = load_text(text, str(ROOT / "acceptance.imtrial"))
    eng = D.Deidentifier(trial, D.resolve_key(trial))
    out = deidentify(eng, written(_image(2)))
    bits = out[0x60003000].value
    assert bits != b"\xff" * 8                             # the region is blanked in the overlay plane too
    assert "Doe" not in str(out.get(0x60004000, "")) and "2024" not in str(out.get(0x60004000, ""))
    assert "Doe" not in str(out.get(0x60000022, ""))


def test_group_0000_elements_in_the_body_are_removed(monkeypatch):
    """Point 5: (0000,1001) Requested SOP Instance UID has a row (U) but a command element has no place in a
    stored dataset: removed, at every level."""
    eng = engine_for((), monkeypatch)
    ds = dataset(0x00080070, "LO", 3)
    ds.add_new(0x00001001, "UI", "1.2.826.0.1.3680043.10.782.1")
    ds.add_new(0x00000000, "UL", 4)
    ds[CONTAINER][0].add_new(0x00001000, "UI", "1.2.826.0.1.3680043.10.782.2")
    out = deidentify(eng, written(ds))
    assert not [t for t in out.keys() if t >> 16 == 0]
    assert not [t for t in out[CONTAINER][0].keys() if t >> 16 == 0]
