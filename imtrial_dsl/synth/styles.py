"""What each vendor's scanner writes, as data: Manufacturer and SoftwareVersions spellings, which objects
(classic or Enhanced MR), which attributes its headers leave out, classic values it spells its own way,
and its private creators. Read by ``scanners`` (header values) and ``writer`` (files).

Sources: the DICOM conformance statements' IOD lists (Siemens syngo MR XA: Enhanced MR Image Storage;
GE SIGNA and Philips Achieva/Ingenia: MR Image Storage), dcm2niix's vendor notes (where vendors keep
b-values and sequence names: GE and old Philips releases only in private groups, Philips leaves the
public SequenceName empty), and real headers of those scanners (tests/data/real, which the
``tests/test_synth_realism.py`` comparison checks against). A rule here is about a vendor (or a software
generation), never about one file.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Optional

from ..vendors import software_values


@dataclass(frozen=True)
class Private:
    """One private block a vendor writes: group, creator, and elements (offset -> (VR, value or a key
    of the series' values: 'bvalue', 'sequence', 'asset'))."""

    group: int
    creator: str
    elements: tuple[tuple[int, str, Any], ...]
    shared_item: bool = False   # inside a private item of the Enhanced MR shared functional group


@dataclass(frozen=True)
class Style:
    vendor: str
    manufacturer: str
    enhanced_mr: bool = False
    omits: frozenset[str] = frozenset()        # attributes these headers leave out (or empty)
    diffusion_public: bool = True               # b-values in the public DiffusionBValue
    private: tuple[Private, ...] = ()
    # Enhanced MR as this vendor fills the MR Pulse Sequence attributes (None: the standard's meaning)
    enhanced_pulse: Optional[dict[str, str]] = None
    enhanced_top: frozenset[str] = frozenset()  # classic attributes it keeps at the top level of Enhanced MR
    notes: dict[str, str] = field(default_factory=dict)  # why an attribute is omitted


def _release_major(values: list[str]) -> Optional[int]:
    for v in values:
        m = re.search(r"\d+", v.rsplit(":", 1)[-1])
        if m:
            return int(m.group())
    return None


SIEMENS_XA = re.compile(r"(^|[\s_])XA\d", re.I)

_PHILIPS_OMITS = {
    "dBdt": "not written by every Philips release (Type 3)",
    "BodyPartExamined": "left empty by some Philips releases",
    "SequenceName": "Philips leaves the public SequenceName empty (the sequence is named in private 2005 elements)",
    "ImagingFrequency": "not written by every Philips release (Type 3; absent in Achieva dStream 5.1 EPI headers)",
    "ImagedNucleus": "not written by every Philips release (Type 3)",
    "NumberOfAverages": "not written by every Philips release (Type 3)",
    "TransmitCoilName": "not written by every Philips release (Type 3)",
}
_GE_OMITS = {
    "dBdt": "not written by GE classic MR headers (Type 3)",
    "BodyPartExamined": "GE MR headers leave it out unless the technologist sets it",
    "SequenceName": "GE names the pulse sequence in private GEMS_ACQU_01 (0019,xx9C), not in SequenceName",
    "NumberOfPhaseEncodingSteps": "GE classic headers give the matrix in AcquisitionMatrix only",
    "TransmitCoilName": "not written by GE classic MR headers (Type 3)",
}
_ENHANCED_MR_OMITS = {
    "EchoNumbers": "not an attribute of the Enhanced MR Image IOD",
    "TriggerTime": "Enhanced MR has Cardiac Synchronization instead (written for gated series only)",
}


def style(vendor: str, software: Any, modality: str) -> Style:
    """The style of a device (canonical vendor, its SoftwareVersions values, the modality)."""
    values = software_values(software)
    if vendor == "Siemens":
        xa = any(SIEMENS_XA.search(v) for v in values)
        if modality == "MR" and xa:
            return Style("Siemens", "Siemens Healthineers", enhanced_mr=True, omits=frozenset(_ENHANCED_MR_OMITS),
                         notes=dict(_ENHANCED_MR_OMITS),
                         # syngo MR XA fills these with their defaults whatever the sequence (its classic values
                         # are in its private shared group); EPI readouts say GRADIENT, also for spin-echo EPI
                         enhanced_pulse={"SegmentedKSpaceTraversal": "SINGLE", "Spoiling": "NONE",
                                         "SteadyStatePulseSequence": "NONE", "MagnetizationTransfer": "NONE",
                                         "OversamplingPhase": "NONE", "EchoPulseSequence:EP": "GRADIENT"},
                         enhanced_top=frozenset({"SpacingBetweenSlices"}),
                         private=(Private(0x0021, "SIEMENS MR SDS 01", ((0x5A, "CS", "ScanningSequence"),
                                                                         (0x5B, "CS", "SequenceVariant"),
                                                                         (0x5C, "CS", "ScanOptions")),
                                         shared_item=True),))
        return Style("Siemens", "Siemens Healthineers" if xa else "SIEMENS", diffusion_public=modality != "MR",
                     private=(Private(0x0019, "SIEMENS MR HEADER", ((0x0C, "IS", "bvalue_dwi"),)),) if modality == "MR" else ())
    if vendor == "GE":
        if modality != "MR":
            return Style("GE", "GE MEDICAL SYSTEMS")
        return Style("GE", "GE MEDICAL SYSTEMS", omits=frozenset(_GE_OMITS), notes=dict(_GE_OMITS), diffusion_public=False,
                     private=(Private(0x0019, "GEMS_ACQU_01", ((0x9C, "LO", "sequence"),)),
                              Private(0x0043, "GEMS_PARM_01", ((0x39, "IS", "bvalue4"), (0x83, "DS", "asset")))))
    if vendor == "Philips":
        if modality != "MR":
            return Style("Philips", "Philips Medical Systems")
        major = _release_major(values)
        old = major is not None and major < 3
        notes = dict(_PHILIPS_OMITS)
        if old:
            notes["DiffusionBValue"] = "Philips releases before 3 write b-values only in private (2001,xx03)"
        return Style("Philips", "Philips Medical Systems", omits=frozenset(notes), notes=notes, diffusion_public=not old,
                     private=(Private(0x2001, "Philips Imaging DD 001", ((0x03, "FL", "bvalue"), (0x04, "CS", "direction"))),
                              Private(0x2005, "Philips MR Imaging DD 001", ((0x14, "CS", "diffusion_flag"),))))
    return Style(vendor, {"Canon": "CANON_MEC", "Hitachi": "Hitachi Medical Corporation", "Fujifilm": "FUJIFILM Healthcare",
                          "United Imaging": "UIH", "Bruker": "Bruker BioSpin MRI GmbH"}.get(vendor, vendor))


def software_versions(vendor: str, declared: Optional[str]) -> list[str]:
    """SoftwareVersions as the vendor writes it. A declared multi-valued form is written as declared;
    a release is expanded the vendor's way: GE ``<n>\\LX\\MR Software release:<release>``, Philips
    ``<release>\\<release>.<build>``, Siemens ``syngo MR <release>``."""
    given = software_values(declared)
    if len(given) > 1:
        return given
    rel = given[0] if given else {"Siemens": "XA30", "GE": "MR30.1", "Philips": "R5.7"}.get(vendor, "1.0")
    if vendor == "Siemens":
        return [rel] if rel.lower().startswith("syngo") else [f"syngo MR {rel}"]
    if vendor == "GE":
        if ":" in rel:
            return [rel]
        full = rel if "_" in rel else f"{rel}_R01_2133.a"
        major = _release_major([rel])
        return [str(major if major is not None else 1), "LX", f"MR Software release:{full}"]
    if vendor == "Philips":
        parts = rel.lstrip("Rr").split(".")
        if len(parts) >= 3:
            return [rel, f"{rel}.0"]
        return [f"{rel}.1", f"{rel}.1.2"]
    return [rel]
