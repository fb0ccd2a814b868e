"""The runner's speed work, checked by counting work (never by timing: timings live in benchmarks/).

* Enhanced MR: a data set the runner reads has its functional groups indexed once; every keyword of every
  frame then resolves from the index (no recursive search), to the same value the search finds — on the
  real Siemens XA30 Enhanced MR files.
* A value the nodes of an exam share (a series' decoded pixels) is made once even when two nodes ask at
  the same time.
* The QC checks of one series share one Otsu foreground.
"""
from __future__ import annotations

import copy
import threading
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest

from imtrial_dsl.runner import dicomio, qc
from imtrial_dsl.runner.context import ExamCache

REAL = Path(__file__).resolve().parent / "data" / "real" / "siemens_xa30"
ENHANCED = sorted(p for p in REAL.rglob("*.dcm")
                  if dicomio.has_functional_groups(pydicom.dcmread(p, stop_before_pixels=True)))
ACROSS_FRAMES = ("EffectiveEchoTime", "ImagePositionPatient", "RepetitionTime", "FlipAngle", "SliceThickness",
                 "DiffusionBValue", "RescaleSlope", "WindowCenter", "InStackPositionNumber")
DERIVED = ("ScanningSequence", "SequenceVariant", "ScanOptions", "AcquisitionMatrix", "SAR", "dBdt")


def _keywords(ds: pydicom.Dataset) -> list[str]:
    """Every keyword in the object, its first frame's groups and its shared groups, plus derived ones."""
    places = [ds, *ds.get("SharedFunctionalGroupsSequence", [])[:1], *ds.get("PerFrameFunctionalGroupsSequence", [])[:1]]
    return sorted({e.keyword for it in places for e in it.iterall() if e.keyword}) + list(DERIVED)


def test_real_enhanced_files_are_there():
    assert len(ENHANCED) >= 8


@pytest.mark.parametrize("path", [p for p in ENHANCED if p.parent.name in ("12_DWI_dir80_PA", "5_anat-T1w_acq-tfl")]
                         + ENHANCED[-1:], ids=lambda p: p.parent.name)
def test_indexed_functional_groups_give_what_the_search_gives_without_searching(path, monkeypatch):
    plain = pydicom.dcmread(path, stop_before_pixels=True)
    n = dicomio.number_of_frames(plain)
    frames = sorted({*range(0, n, max(1, n // 5)), n - 1})   # first, last and some between (kept quick)
    keywords = _keywords(plain)
    expected = {(k, f): dicomio.get_param(plain, k, frame=f) for k in keywords for f in frames}
    across = [k for k in keywords if k in ACROSS_FRAMES] + list(DERIVED)   # every frame: a few keywords
    expected_values = {k: dicomio.get_param_values(plain, k) for k in across}

    searches = []
    real_find = dicomio._find_in_item
    monkeypatch.setattr(dicomio, "_find_in_item", lambda *a: searches.append(a[1]) or real_find(*a))
    ds = dicomio.read_header(path)
    got = {(k, f): dicomio.get_param(ds, k, frame=f) for k in keywords for f in frames}
    got_values = {k: dicomio.get_param_values(ds, k) for k in across}
    assert got == expected
    assert got_values == expected_values
    assert searches == []                      # every lookup came from the index
    assert len(expected) >= 30 * len(frames)   # and there were many


def test_a_copy_of_an_indexed_data_set_is_searched_again():
    """De-identification previews work on a deep copy and change it: the copy must not use the original's index."""
    ds = dicomio.read_header(ENHANCED[-1])
    assert dicomio._index(ds) is not None
    dup = copy.deepcopy(ds)
    assert dicomio._index(dup) is None
    dup.SharedFunctionalGroupsSequence[0].MRTimingAndRelatedParametersSequence[0].RepetitionTime = 1234.5
    assert dicomio.get_param(dup, "RepetitionTime") == 1234.5
    assert dicomio.get_param(ds, "RepetitionTime") != 1234.5


def test_a_data_set_read_elsewhere_is_not_indexed():
    ds = pydicom.dcmread(ENHANCED[-1], stop_before_pixels=True)
    assert dicomio._index(ds) is None


def test_a_shared_value_is_made_once_when_two_nodes_ask_at_once():
    cache = ExamCache()
    made = []

    def make():
        made.append(1)
        time.sleep(0.2)  # long enough for the second thread to ask while the first is making it
        return object()

    results = []
    threads = [threading.Thread(target=lambda: results.append(cache.get("volume", make))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(made) == 1
    assert results[0] is results[1] is results[2]


def test_a_failed_make_is_retried_by_the_next_caller():
    cache = ExamCache()

    def boom():
        raise ValueError("undecodable")

    with pytest.raises(ValueError):
        cache.get("k", boom)
    assert cache.get("k", lambda: 7) == 7


def test_qc_checks_of_a_series_share_one_foreground(monkeypatch):
    rng = np.random.default_rng(0)
    a = rng.rayleigh(5.0, (8, 32, 32))
    a[:, 8:24, 8:24] += 200.0
    vol = qc.Volume(data=a.astype(np.float32), stored=np.rint(a).astype(np.int64), positions=list(range(8)),
                    instance_numbers=list(range(1, 9)), modality="MR", pe_direction="ROW", bits_stored=12,
                    signed=False)
    calls = []
    real = qc.volume_otsu
    monkeypatch.setattr(qc, "volume_otsu", lambda v: calls.append(1) or real(v))
    snr, _ = qc.m_snr(vol)
    ghost, _ = qc.m_ghosting(vol)
    qc.m_clipping(vol)
    assert len(calls) == 1
    fresh = qc.Volume(**{k: getattr(vol, k) for k in ("data", "stored", "positions", "instance_numbers", "modality",
                                                       "pe_direction", "bits_stored", "signed")})
    monkeypatch.setattr(qc, "volume_otsu", real)
    assert qc.m_snr(fresh)[0] == snr and qc.m_ghosting(fresh)[0] == ghost   # the same values as computed alone
