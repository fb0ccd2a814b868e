"""The runner's fast paths give exactly what the general code gives, on real and independently made files.

* :func:`dicomio.native_pixels` (Pixel Data bytes read at their offset) equals pydicom's ``pixel_array`` —
  on every real scanner file of ``tests/data/real`` and every pydicom test file it accepts;
* :func:`qc.volume_otsu` (a count of distinct stored values) equals :func:`qc.otsu_threshold` over the voxels,
  and QC's clipping count equals the count over the foreground's copied values;
* :func:`deid.writer.dataset_bytes` equals pydicom's ``write_dataset`` byte for byte, before and after
  de-identification, in explicit and implicit VR.
"""
from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset

from imtrial_dsl.deid.writer import dataset_bytes
from imtrial_dsl.runner import dicomio, qc

HERE = Path(__file__).resolve().parent
REAL = sorted(p for p in (HERE / "data" / "real").rglob("*") if p.is_file() and p.suffix not in (".md", ".json", ".imtrial")
              and not p.name.startswith("LICENSE"))
PYDICOM = sorted(Path(get_testdata_file("CT_small.dcm")).parent.glob("*.dcm"))


def _read(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return pydicom.dcmread(path, force=True)
        except Exception:
            return None


def _pydicom_frames(ds):
    arr = ds.pixel_array
    return arr[None, ...] if dicomio.number_of_frames(ds) == 1 else arr


def test_there_are_real_files():
    assert len(REAL) >= 100 and len(PYDICOM) >= 50


@pytest.mark.parametrize("group", ["real", "pydicom"])
def test_native_pixels_equal_pixel_array(group):
    files = REAL if group == "real" else PYDICOM
    fast = 0
    for path in files:
        ds = _read(path)
        if ds is None or "PixelData" not in ds:
            continue
        with open(path, "rb") as fp, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            head = pydicom.dcmread(fp, stop_before_pixels=True, force=True)
            arr = dicomio.native_pixels(head, fp, fp.tell())
        if arr is None:
            continue
        fast += 1
        try:
            want = _pydicom_frames(ds)
        except Exception:  # pydicom refuses the file: the fast path must not hand out pixels either
            pytest.fail(f"{path.name}: native_pixels read what pydicom cannot")
        assert arr.dtype == want.dtype and arr.shape == want.shape, path.name
        assert np.array_equal(arr, want), path.name
    assert fast >= (100 if group == "real" else 5)   # the fast path is the one taken for classic files


def test_native_pixels_refuse_what_they_do_not_handle():
    for name in ("JPEG2000.dcm", "MR_small_bigendian.dcm", "SC_rgb.dcm", "emri_small_RLE.dcm"):
        path = get_testdata_file(name)
        with open(path, "rb") as fp:
            head = pydicom.dcmread(fp, stop_before_pixels=True, force=True)
            assert dicomio.native_pixels(head, fp, fp.tell()) is None, name


def _volumes():
    rng = np.random.default_rng(7)
    base = rng.rayleigh(20.0, (6, 24, 24))
    base[:, 6:18, 6:18] += 700
    for dtype, shift, rescale in ((np.uint16, 0, (1.0, 0.0)), (np.uint16, 900, (1.0, 0.0)), (np.int16, -1100, (1.0, -1024.0)),
                                  (np.int16, -300, (0.5, 3.0)), (np.uint8, 0, (2.0, -1.0)), (np.int32, -70000, (1.0, 0.0))):
        stored = np.clip(np.rint(base + shift), np.iinfo(dtype).min, np.iinfo(dtype).max).astype(dtype)
        s, i = rescale
        data = stored.astype(np.float32) if rescale == (1.0, 0.0) else stored.astype(np.float32) * s + i
        yield qc.Volume(data=data, stored=stored, positions=list(range(6)), instance_numbers=list(range(1, 7)),
                        modality="MR", pe_direction="ROW", bits_stored=8 * stored.itemsize, signed=np.issubdtype(dtype, np.signedinteger),
                        rescale=rescale)


def test_volume_otsu_equals_otsu_over_voxels():
    n = 0
    for vol in _volumes():
        assert qc.volume_otsu(vol) == qc.otsu_threshold(vol.data)
        n += 1
    series = {}
    for path in REAL:
        ds = _read(path)
        if ds is not None and "PixelData" in ds:
            series.setdefault((path.parent, str(ds.get("SeriesInstanceUID"))), []).append(path)
    for paths in series.values():
        try:
            vol = qc.load_volume(sorted(paths))
        except ValueError:
            continue
        assert qc.volume_otsu(vol) == qc.otsu_threshold(vol.data)
        n += 1
    assert n >= 15


def test_clipping_counts_the_foreground_in_place():
    for vol in _volumes():
        hi = (1 << (vol.bits_stored - 1)) - 1 if vol.signed else (1 << vol.bits_stored) - 1
        vol.stored.flat[::7] = hi
        s, i = vol.rescale
        vol.data = vol.stored.astype(np.float32) * s + i
        vol._foreground = None
        mask = qc.foreground(vol)
        assert mask.any()
        st = vol.stored[mask].astype(np.int64)
        lo = -(1 << (vol.bits_stored - 1)) if vol.signed else None
        want = int((st >= hi).sum()) + (int((st <= lo).sum()) if lo is not None else 0)
        value, detail = qc.m_clipping(vol)
        assert detail["clipped_voxels"] == want and detail["voxels"] == st.size and value == want / st.size


def _pydicom_bytes(ds, implicit):
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, implicit
    write_dataset(fp, ds)
    return fp.getvalue()


@pytest.fixture(scope="module")
def engine():
    os.environ.setdefault("IMTRIAL_KEY", "fast-path-test-key-not-for-real-data")
    from imtrial_dsl.deid import Deidentifier, resolve_key
    from imtrial_dsl.loader import load

    trial = load(str(HERE.parent / "examples" / "cardiac_sarcoid_mr_petct.imtrial"))[0]
    return Deidentifier(trial, resolve_key(trial))


def test_writer_bytes_equal_pydicom(engine):
    n = 0
    for path in REAL + PYDICOM:
        ds0 = _read(path)
        if ds0 is None or ds0.original_encoding[1] is not True:
            continue
        implicit = bool(ds0.original_encoding[0])
        for deidentify in (False, True):
            ds = copy.deepcopy(ds0)
            if deidentify:
                try:
                    ok = engine.deidentify(ds, {"subject_id": "CSAR03-S-0001", "site": "S", "visit": "baseline"}).ok
                except Exception:
                    continue
                if not ok:
                    continue
            try:
                want = _pydicom_bytes(copy.deepcopy(ds), implicit)
            except Exception:
                continue
            assert dataset_bytes(ds, implicit) == want, (path.name, deidentify)
            n += 1
    assert n >= 200


def test_qc_volume_from_the_scan_equals_reading_the_files(tmp_path):
    """QC reads pixels where the classification scan found them (no second header parse): the same volume."""
    from imtrial_dsl.runner.classify import scan

    n = 0
    for folder in sorted({p.parent for p in REAL}):
        scanned = scan(folder, keep_headers=False, pixel_refs=True)
        for s in scanned.series.values():
            paths = [i.path for i in s.instances]
            try:
                want = qc.load_volume(paths)
            except Exception as exc:   # no pixels, frames of other sizes: the same error either way
                with pytest.raises(type(exc)):
                    qc.load_volume(paths, [i.pixels for i in s.instances], s.header)
                continue
            got = qc.load_volume(paths, [i.pixels for i in s.instances], s.header)
            n += sum(i.pixels is not None for i in s.instances)
            assert np.array_equal(got.data, want.data) and np.array_equal(got.stored, want.stored)
            assert (got.positions, got.instance_numbers, got.modality, got.pe_direction, got.bits_stored, got.signed,
                    got.rescale) == (want.positions, want.instance_numbers, want.modality, want.pe_direction,
                                     want.bits_stored, want.signed, want.rescale)
    assert n >= 100
