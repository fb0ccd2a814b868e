"""Classic MR values derived from Enhanced MR attributes, generated from the standard's enumerations.

PS3.3 C.8.13.4 (MR Pulse Sequence module) and C.8.13.5 (MR Modifier, MR FOV/Geometry macros) define
the enumerated values of the Enhanced attributes; C.8.3.1 (MR Image module) the defined terms of the
classic ones. Every combination of the enumerated values must derive only classic defined terms, and
the derivation must read the Enhanced object the way the standard places the attributes (top level,
shared or per-frame functional groups). Real Siemens XA30 objects are in tests/test_real_data.py.
"""
from __future__ import annotations

import itertools

import pytest
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from imtrial_dsl.runner import dicomio

# Enumerated values, PS3.3 C.8.13.4 / C.8.13.5.x
ENUMS = {
    "EchoPulseSequence": ["SPIN", "GRADIENT", "BOTH"],
    "EchoPlanarPulseSequence": ["YES", "NO"],
    "InversionRecovery": ["YES", "NO"],
    "SteadyStatePulseSequence": ["FREE_PRECESSION", "TRANSVERSE", "TIME_REVERSED", "LONGITUDINAL", "NONE"],
    "Spoiling": ["RF", "GRADIENT", "RF_AND_GRADIENT", "NONE"],
    "SegmentedKSpaceTraversal": ["SINGLE", "PARTIAL", "FULL"],
    "MagnetizationTransfer": ["ON_RESONANCE", "OFF_RESONANCE", "NONE"],
    "T2Preparation": ["YES", "NO"],
    "OversamplingPhase": ["2D", "3D", "2D_3D", "NONE"],
    "FlowCompensation": ["ACCELERATION", "VELOCITY", "OTHER", "NONE"],
    "SpatialPresaturation": ["SLAB", "NONE"],
    "SpectrallySelectedSuppression": ["FAT", "WATER", "FAT_AND_WATER", "SILICON_GEL", "NONE"],
    "PartialFourier": ["YES", "NO"],
    "PartialFourierDirection": ["PHASE", "FREQUENCY", "SLICE_SELECT", "COMBINATION"],
    "RectilinearPhaseEncodeReordering": ["LINEAR", "CENTRIC", "SEGMENTED", "REVERSE_LINEAR", "REVERSE_CENTRIC"],
}
# Defined terms of the classic attributes, PS3.3 C.8.3.1
CLASSIC = {
    "ScanningSequence": {"SE", "IR", "GR", "EP", "RM"},
    "SequenceVariant": {"SK", "MTC", "SS", "TRSS", "SP", "MP", "OSP", "NONE"},
    "ScanOptions": {"PER", "RG", "CG", "PPG", "FC", "PFF", "PFP", "SP", "FS"},
}
# where the standard puts each: the MR Pulse Sequence module is top level, the MR Modifier macro a group
IN_MR_MODIFIER = {"InversionRecovery", "Spoiling", "T2Preparation", "FlowCompensation", "SpatialPresaturation",
                  "PartialFourier", "PartialFourierDirection"}


def enhanced(values: dict[str, str], per_frame: bool = False) -> Dataset:
    ds = Dataset()
    mod = Dataset()
    for kw, v in values.items():
        setattr(mod if kw in IN_MR_MODIFIER else ds, kw, v)
    group = Dataset()
    group.MRModifierSequence = Sequence([mod])
    if per_frame:
        ds.SharedFunctionalGroupsSequence = Sequence([Dataset()])
        ds.PerFrameFunctionalGroupsSequence = Sequence([group])
    else:
        ds.SharedFunctionalGroupsSequence = Sequence([group])
    return ds


def test_the_source_attributes_are_standard_keywords():
    for kw in list(dicomio.DERIVED_FROM) + list(ENUMS):
        assert tag_for_keyword(kw) is not None, kw
    for classic, names in dicomio.ALIASES.items():
        for kw in (classic,) + names:
            assert tag_for_keyword(kw) is not None, kw
            assert dictionary_VR(kw) != "SQ"


SCAN = ["EchoPulseSequence", "EchoPlanarPulseSequence", "InversionRecovery"]


@pytest.mark.parametrize("combo", list(itertools.product(*(ENUMS[k] for k in SCAN))), ids=str)
def test_scanning_sequence_from_every_pulse_sequence_combination(combo):
    values = dict(zip(SCAN, combo))
    got = dicomio.as_list(dicomio.get_param(enhanced(values), "ScanningSequence"))
    assert set(got) <= CLASSIC["ScanningSequence"] and len(got) == len(set(got))
    assert ("EP" in got) == (values["EchoPlanarPulseSequence"] == "YES")
    assert ("IR" in got) == (values["InversionRecovery"] == "YES")
    assert ("SE" in got) == (values["EchoPulseSequence"] in ("SPIN", "BOTH"))
    # a gradient-echo train read out as EPI is EP; GR stays for a non-EPI gradient echo
    assert ("GR" in got) == (values["EchoPulseSequence"] in ("GRADIENT", "BOTH") and "EP" not in got)


def _combos(keys: list[str], limit: int = 4000):
    pools = [ENUMS[k] + [None] for k in keys]
    for i, combo in enumerate(itertools.product(*pools)):
        if i >= limit:
            break
        yield {k: v for k, v in zip(keys, combo) if v is not None}


def test_sequence_variant_and_scan_options_only_use_defined_terms():
    keys = ["SteadyStatePulseSequence", "Spoiling", "SegmentedKSpaceTraversal", "MagnetizationTransfer",
            "OversamplingPhase", "InversionRecovery"]
    for values in _combos(keys):
        got = dicomio.as_list(dicomio.get_param(enhanced({"EchoPulseSequence": "GRADIENT", **values}), "SequenceVariant"))
        assert got and set(got) <= CLASSIC["SequenceVariant"], (values, got)
        assert ("NONE" in got) == (len(got) == 1 and got == ["NONE"])
    keys = ["FlowCompensation", "SpatialPresaturation", "SpectrallySelectedSuppression", "PartialFourier",
            "PartialFourierDirection", "RectilinearPhaseEncodeReordering"]
    order = ["PER", "RG", "CG", "PPG", "FC", "PFF", "PFP", "SP", "FS"]
    for values in _combos(keys):
        got = [o for o in dicomio.as_list(dicomio.get_param(enhanced({"EchoPulseSequence": "SPIN", **values}),
                                                            "ScanOptions")) if o]
        assert set(got) <= CLASSIC["ScanOptions"] and got == sorted(got, key=order.index), (values, got)
        assert ("FS" in got) == (values.get("SpectrallySelectedSuppression") in ("FAT", "FAT_AND_WATER"))
        assert ("PFP" in got) == (values.get("PartialFourier") == "YES"
                                  and values.get("PartialFourierDirection") in ("PHASE", "COMBINATION"))


def test_per_frame_groups_are_read_like_shared_ones():
    values = {"EchoPulseSequence": "GRADIENT", "EchoPlanarPulseSequence": "YES", "InversionRecovery": "YES"}
    assert dicomio.get_param(enhanced(values, per_frame=True), "ScanningSequence") == ["EP", "IR"]


def test_a_classic_header_keeps_its_own_values():
    ds = Dataset()
    ds.ScanningSequence = ["GR", "IR"]
    ds.EchoPulseSequence = "SPIN"    # a legacy-converted object may carry both: the classic value wins
    assert dicomio.get_param(ds, "ScanningSequence") == ["GR", "IR"]
    assert dicomio.get_param(Dataset(), "ScanningSequence") is dicomio.MISSING


def test_whole_body_sar_and_db_dt():
    ds = Dataset()
    items = []
    for definition, value in (("IEC_HEAD", 1.9), ("IEC_WHOLE_BODY", 0.7)):
        it = Dataset()
        it.SpecificAbsorptionRateDefinition, it.SpecificAbsorptionRateValue = definition, value
        items.append(it)
    timing = Dataset()
    timing.SpecificAbsorptionRateSequence = Sequence(items)
    timing.GradientOutputType, timing.GradientOutput = "DB_DT", 42.0
    group = Dataset()
    group.MRTimingAndRelatedParametersSequence = Sequence([timing])
    ds.SharedFunctionalGroupsSequence = Sequence([group])
    assert dicomio.get_param(ds, "SAR") == 0.7
    assert dicomio.get_param(ds, "dBdt") == 42.0
    timing.GradientOutputType = "PER_NERVE_STIM"
    assert dicomio.get_param(ds, "dBdt") is dicomio.MISSING
