"""Leak test: every concrete attribute of PS3.15 Table E.1-1 carries a unique marker (valid for its VR) in a
corpus built from real pydicom files (+ private tags, nested sequences, overlay and curve groups, file meta and
preamble); after de-identification no marker may remain anywhere in the output bytes except those the chosen
options keep. Also: UID references resolve inside the output set; dates shift consistently per subject.

Expected fates are derived from the table (the profile's rules) and the options, not from the engine.
"""
from __future__ import annotations

import datetime as dt
import re
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from imtrial_dsl.dicom_tables import SAFE_PRIVATE
from imtrial_dsl import deid as D
from test_deid import KEY_ENV, make_trial

BINARY_VRS = {"US", "SS", "UL", "SL", "FL", "FD", "AT", "SV", "UV"}
BYTES_VRS = {"OB", "OW", "UN", "OD", "OF", "OL", "OV"}
# Attributes the engine writes itself (research identifiers / de-identification method): markers there are replaced.
RESEARCH = {0x00100010, 0x00100020, 0x00120040, 0x00120010, 0x00120020, 0x00120021, 0x00120030, 0x00120050,
            0x00120051, 0x00120062, 0x00120063, 0x00120064, 0x00280303}
BASE_DATE = dt.date(1400, 1, 1)   # marker dates are 367 days apart: a shift of <= 365 days never lands on another

OPTION_SETS = {
    "basic": "deidentify using ps315_basic { key env KEYENV }",
    "example": ("deidentify using ps315_basic with retain_longitudinal_modified_dates, retain_patient_characteristics,"
                " clean_descriptors {\n keep PatientSex, PatientAge\n replace InstitutionName with \"AMY01 site\"\n"
                " empty ReferringPhysicianName\n key env KEYENV\n date_shift -365 .. -1 d\n}"),
    "retain_most": ("deidentify using ps315_basic with retain_longitudinal_full_dates, retain_device_identity,"
                    " retain_institution_identity, retain_uids, retain_safe_private, clean_structured_content,"
                    " clean_graphics { key env KEYENV }"),
}


def _vr(tag: int) -> str:
    return dictionary_VR(tag).split(" or ")[0]


def marker_for(i: int, vr: str):
    """(value to write, bytes to search for or None for binary VRs)."""
    m = f"ZQ{i:04d}QZ"
    if vr in ("LO", "SH", "ST", "LT", "UT", "UC", "CS", "AE"):
        return m, m.encode()
    if vr == "PN":
        return f"{m}^Jane", m.encode()
    if vr == "UR":
        return f"http://{m.lower()}.example", m.lower().encode()
    if vr == "UI":
        u = f"1.2.826.0.1.3680043.10.999.{100000 + i}"
        return u, u.encode()
    if vr == "DA":
        s = (BASE_DATE + dt.timedelta(days=367 * i)).strftime("%Y%m%d")
        return s, s.encode()
    if vr == "DT":
        s = (BASE_DATE + dt.timedelta(days=367 * i)).strftime("%Y%m%d") + "121314"
        return s, s.encode()
    if vr == "TM":
        s = f"1213{i % 60:02d}.{i:06d}"
        return s, s.encode()
    if vr == "DS":
        s = f"9{i:04d}.7182"
        return s, s.encode()
    if vr == "IS":
        s = f"8{i:05d}7"
        return s, s.encode()
    if vr == "AS":
        s = f"{100 + i % 800:03d}Y"
        return s, s.encode()
    if vr in BYTES_VRS:
        b = f"OBZQ{i:04d}QZ".encode()
        return b, b
    if vr in ("FL", "FD"):
        return 1000.0 + i, None
    if vr in BINARY_VRS:
        return 1000 + i, None
    raise ValueError(vr)


def concrete_rules(profile):
    for r in profile.rules:
        if re.fullmatch(r"\([0-9A-F]{4},[0-9A-F]{4}\)", r.tag):
            tag = D.parse_tag(r.tag)
            if tag >> 16 in (0x0000, 0x0002):
                continue   # command group: pydicom cannot write it in a file; file meta is tested separately
            yield tag, r


def fate(rule, options: set[str], overrides: dict[int, str], tag: int) -> str:
    """'gone', 'kept' (K: must survive), 'maybe' (C: cleaned text may survive), 'shift' (dates moved)."""
    if tag in RESEARCH:
        return "gone"
    if tag in overrides:
        return {"keep": "kept"}.get(overrides[tag], "gone")
    codes = {o: c for o, c in rule.options.items() if o in options}
    if not codes:
        return "gone" if rule.action != "K" else "kept"
    if codes.get("retain_longitudinal_full_dates") == "K":
        return "kept"
    if "K" in codes.values() and "C" not in codes.values():
        return "kept"
    if codes.get("retain_longitudinal_modified_dates") == "C":
        vr = _vr(tag)
        return "shift" if vr in ("DA", "DT") else "maybe"
    return "maybe"


class Corpus:
    """Marker'd files: subject S1 visit 1 (A: MR_small, B: CT_small referencing A, E: Enhanced MR multi-frame),
    S1 visit 2 (C: MR_small, another study and date), subject S2 (F: MR_small_implicit)."""

    def __init__(self, profile, root: Path):
        self.root = root
        self.markers: dict[int, tuple] = {}          # tag -> (value, search bytes, vr, index)
        self.nested: list[bytes] = []                 # markers inside sequence items (always gone)
        self.extra: list[bytes] = []                  # private / overlay / curve / file-meta / preamble markers
        self.safe_private_marker = b"7777"
        idx = 0
        for tag, rule in concrete_rules(profile):
            idx += 1
            try:
                vr = _vr(tag)
            except KeyError:
                continue
            if vr == "SQ":
                self.markers[tag] = (None, None, vr, idx)
                continue
            val, search = marker_for(idx, vr)
            self.markers[tag] = (val, search, vr, idx)
        self.files: dict[str, tuple[Path, str]] = {}

    def _item(self, n: int) -> Dataset:
        it = Dataset()
        it.PersonName = f"ZQ{n:04d}QN^Nested"                       # (0040,A123) D
        it.UID = f"1.2.826.0.1.3680043.10.998.{100000 + n}"         # (0040,A124) U
        self.nested += [f"ZQ{n:04d}QN".encode(), it.UID.encode()]
        return it

    def decorate(self, ds: Dataset, seq_base: int) -> Dataset:
        for tag, (val, _search, vr, idx) in self.markers.items():
            if vr == "SQ":
                ds.add_new(tag, "SQ", Sequence([self._item(seq_base + idx)]))
            else:
                ds.add_new(tag, vr, val)
        # private elements, including a private sequence and a safe-private one
        blk = ds.private_block(0x0019, "SIEMENS MR HEADER", create=True)
        blk.add_new(0x0C, "IS", "7777")                              # B_value: safe under retain_safe_private
        blk.add_new(0x20, "LO", "ZQPRIV1QZ")
        acme = ds.private_block(0x0029, "ZQPRIVCREATORQZ", create=True)
        inner = Dataset()
        inner.add_new(0x00100010, "PN", "ZQPRIV2QZ")
        acme.add_new(0x01, "SQ", Sequence([inner]))
        acme.add_new(0x02, "OB", b"ZQPRIV3QZ\x00")
        # overlay (60xx) and curve (50xx) groups
        for g in (0x6000, 0x6002):
            ds.add_new((g << 16) | 0x0010, "US", 4)
            ds.add_new((g << 16) | 0x0011, "US", 8)
            ds.add_new((g << 16) | 0x0022, "LO", f"ZQOVLD{g:04X}QZ")
            ds.add_new((g << 16) | 0x1500, "LO", f"ZQOVLL{g:04X}QZ")
            ds.add_new((g << 16) | 0x3000, "OW", b"ZQ" + b"\x00" * 2)
            ds.add_new((g << 16) | 0x4000, "LT", f"ZQOVLC{g:04X}QZ")
        ds.add_new(0x50002500, "LO", "ZQCURVEQZ")
        ds.add_new(0x50003000, "OB", b"ZQCURVDQZ\x00")
        self.extra = [b"ZQPRIV1QZ", b"ZQPRIVCREATORQZ", b"ZQPRIV2QZ", b"ZQPRIV3QZ", b"ZQOVLD6000QZ", b"ZQOVLL6002QZ",
                      b"ZQOVLC6000QZ", b"ZQCURVEQZ", b"ZQCURVDQZ", b"ZQMETAQZ", b"ZQPREAMBLEQZ"]
        return ds

    def write(self, name: str, source: str, subject: str, study_uid: str, sop_uid: str, study_date: str,
              seq_base: int, refs: tuple[str, str] | None = None) -> Path:
        ds = pydicom.dcmread(get_testdata_file(source))
        self.decorate(ds, seq_base)
        ds.StudyInstanceUID = study_uid
        ds.SOPInstanceUID = sop_uid
        ds.SeriesInstanceUID = f"{study_uid}.1.{ord(name)}"
        ds.FrameOfReferenceUID = study_uid + ".9"
        ds.StudyDate = study_date
        ds.SeriesDate = study_date
        if refs:
            item = Dataset()
            item.ReferencedSOPClassUID = refs[0]
            item.ReferencedSOPInstanceUID = refs[1]
            ds.ReferencedImageSequence = Sequence([item])
            item2 = Dataset()
            item2.ReferencedSOPClassUID = refs[0]
            item2.ReferencedSOPInstanceUID = refs[1]
            ds.SourceImageSequence = Sequence([item2])
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        ds.file_meta.SourceApplicationEntityTitle = "ZQMETAQZ"
        ds.preamble = b"ZQPREAMBLEQZ".ljust(128, b"\x00")
        path = self.root / f"{name}.dcm"
        ds.save_as(path, enforce_file_format=True)
        self.files[name] = (path, subject)
        return path


OVERWRITTEN = {0x0020000D, 0x00080018, 0x0020000E, 0x00200052, 0x00080020, 0x00080021, 0x00081140, 0x00082112}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("leak_corpus")
    prof = make_trial(OPTION_SETS["basic"]).profile("ps315_basic")
    c = Corpus(prof, root)
    a_uid = "1.2.826.0.1.3680043.10.997.1"
    mr_class = pydicom.dcmread(get_testdata_file("MR_small.dcm")).SOPClassUID
    c.write("A", "MR_small.dcm", "S1", "1.2.826.0.1.3680043.10.997.100", a_uid, "20260310", 100000)
    c.write("B", "CT_small.dcm", "S1", "1.2.826.0.1.3680043.10.997.100", "1.2.826.0.1.3680043.10.997.2", "20260310",
            200000, refs=(mr_class, a_uid))
    c.write("E", "emri_small.dcm", "S1", "1.2.826.0.1.3680043.10.997.100", "1.2.826.0.1.3680043.10.997.3",
            "20260310", 300000)
    c.write("C", "MR_small.dcm", "S1", "1.2.826.0.1.3680043.10.997.200", "1.2.826.0.1.3680043.10.997.4", "20270402",
            400000)
    c.write("F", "MR_small_implicit.dcm", "S2", "1.2.826.0.1.3680043.10.997.300", "1.2.826.0.1.3680043.10.997.5",
            "20260501", 500000)
    return c


def _all_elements(ds: Dataset):
    for elem in ds:
        yield elem
        if elem.VR == "SQ":
            for item in elem.value:
                yield from _all_elements(item)


@pytest.mark.parametrize("option_set", sorted(OPTION_SETS))
def test_no_marker_survives(corpus, option_set, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "leak-test-key-0123456789")
    trial = make_trial(OPTION_SETS[option_set])
    eng = D.Deidentifier(trial, D.resolve_key(trial))
    options = {o.value for o in trial.deidentify.options}
    overrides = {D.parse_tag(o.attribute): o.action for o in trial.deidentify.overrides}
    rules = {tag: r for tag, r in concrete_rules(trial.profile("ps315_basic"))}
    fates = {tag: fate(rules[tag], options, overrides, tag) for tag in corpus.markers}
    assert {"gone", "kept" if option_set != "basic" else "gone"} <= set(fates.values())

    outputs: dict[str, tuple[bytes, Dataset]] = {}
    for name, (path, subject) in sorted(corpus.files.items()):
        data_in = path.read_bytes()
        res, data = eng.deidentify_file(path, {"subject_id": subject, "site": "BOS", "timepoint": "v"})
        assert res.ok, res.reason
        outputs[name] = (data, pydicom.dcmread(BytesIO(data)))
        low_in, low_out = data_in.lower(), data.lower()
        ds_out = outputs[name][1]
        checked = 0
        for tag, (val, search, vr, _idx) in corpus.markers.items():
            if tag in OVERWRITTEN or search is None:
                continue
            assert search.lower() in low_in, f"corpus lacks the marker for {tag:08X}"
            present = search.lower() in low_out
            f = fates[tag]
            if f in ("gone", "shift"):
                assert not present, f"{option_set}: marker of {tag:08X} ({rules[tag].name}, {f}) leaked in {name}"
            elif f == "kept":
                assert present, f"{option_set}: {rules[tag].name} should be retained in {name}"
            checked += 1
        assert checked > 400
        for m in corpus.nested:
            if m in data_in:
                assert m.lower() not in low_out, f"{option_set}: nested marker {m!r} leaked in {name}"
        for m in corpus.extra:
            assert m.lower() in low_in
            assert m.lower() not in low_out, f"{option_set}: {m!r} leaked in {name}"
        # binary-VR markers: parse and compare values
        top = {e.tag: e for e in ds_out}
        for tag, (val, search, vr, _idx) in corpus.markers.items():
            if search is None and vr != "SQ" and fates[tag] in ("gone", "shift") and tag in top:
                assert top[tag].value != val, f"{option_set}: binary marker of {tag:08X} kept"
        # safe private value only under retain_safe_private
        priv = [e for e in _all_elements(ds_out) if e.tag.is_private]
        if "retain_safe_private" in options:
            safe = {(c, g, e) for (c, g, e) in SAFE_PRIVATE}
            for el in priv:
                if el.tag.element <= 0xFF:
                    assert any(c == el.value and g == el.tag.group for c, g, _ in safe), el
                else:
                    assert (el.private_creator, el.tag.group, el.tag.element & 0xFF) in safe, el
            assert (0x0019, "7777") in {(el.tag.group, str(el.value)) for el in priv}
        else:
            assert not priv
        assert ds_out.PatientIdentityRemoved == "YES"

    # UID references resolve within the output set; studies/frames of reference stay consistent
    a, b, e, c = (outputs[k][1] for k in "ABEC")
    if "retain_uids" not in options:
        assert a.SOPInstanceUID.startswith("2.25.") and a.SOPInstanceUID != "1.2.826.0.1.3680043.10.997.1"
    assert b.ReferencedImageSequence[0].ReferencedSOPInstanceUID == a.SOPInstanceUID
    assert b.SourceImageSequence[0].ReferencedSOPInstanceUID == a.SOPInstanceUID
    assert a.StudyInstanceUID == b.StudyInstanceUID == e.StudyInstanceUID != c.StudyInstanceUID
    sops = {o[1].SOPInstanceUID for o in outputs.values()}
    assert len(sops) == len(outputs)
    for name, (_, ds) in outputs.items():
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID

    # dates: shifted by one offset per subject across both visits
    if eng.plan.shift_dates:
        def off(ds, orig):
            d0 = dt.date(int(orig[:4]), int(orig[4:6]), int(orig[6:8]))
            d1 = dt.date(int(ds.StudyDate[:4]), int(ds.StudyDate[4:6]), int(ds.StudyDate[6:8]))
            return (d1 - d0).days
        s1 = {off(a, "20260310"), off(b, "20260310"), off(e, "20260310"), off(c, "20270402")}
        assert len(s1) == 1 and -365 <= next(iter(s1)) <= -1
        assert off(outputs["F"][1], "20260501") == D.subject_date_shift(trial, "S2")
        # every shifted DA marker moved by the subject's offset
        days = next(iter(s1))
        for tag, (val, search, vr, _idx) in corpus.markers.items():
            if fates[tag] == "shift" and vr == "DA" and tag not in OVERWRITTEN and tag in a:
                want = (dt.date(int(val[:4]), int(val[4:6]), int(val[6:8])) + dt.timedelta(days=days)).strftime("%Y%m%d")
                assert a[tag].value == want
    elif "retain_longitudinal_full_dates" in options:
        assert a.StudyDate == "20260310" and c.StudyDate == "20270402"
    else:
        assert a.StudyDate == ""
