"""Small DICOM facts the engine and the exporters share (hand-written, each with its source).

- Value Representation classes (PS3.5 Table 6.2-1).
- CID 7050 "De-identification Method" (PS3.16): code per profile / option, scheme DCM.
- A subset of PS3.15 Table E.3.10-1 "Safe Private Attributes" for the Retain Safe Private Option.

The PS3.15 Table E.1-1 rules themselves are not here: they ship as the generated stdlib profile
``stdlib/deid/ps315.imtrial`` (see ``scripts/gen_ps315.py``) and reach the engine through the IR.
"""
from __future__ import annotations

# Value Representations by what their values hold (PS3.5 Table 6.2-1). OL/OV (streams of 32/64-bit
# words) are not numbers to compare and are in none of these.
#: Integers: the Integer String and the binary integers.
INTEGER_VRS = frozenset({"IS", "SS", "US", "SL", "UL", "SV", "UV"})
#: Binary floating point, one number per value.
FLOAT_VRS = frozenset({"FL", "FD"})
#: Streams of binary floats (Other Float, Other Double).
FLOAT_STREAM_VRS = frozenset({"OF", "OD"})
#: Every VR whose values are numbers: the above and the Decimal String.
NUMERIC_VRS = INTEGER_VRS | FLOAT_VRS | FLOAT_STREAM_VRS | {"DS"}
#: Text VRs whose Value Multiplicity is always 1: a backslash in them is a character, not a separator.
SINGLE_VALUED_TEXT_VRS = frozenset({"ST", "LT", "UT", "UR"})

CODING_SCHEME = "DCM"

#: CID 7050 code value -> code meaning (PS3.16, verified against CID 7050).
CID7050: dict[str, str] = {
    "113100": "Basic Application Confidentiality Profile",
    "113101": "Clean Pixel Data Option",
    "113102": "Clean Recognizable Visual Features Option",
    "113103": "Clean Graphics Option",
    "113104": "Clean Structured Content Option",
    "113105": "Clean Descriptors Option",
    "113106": "Retain Longitudinal Temporal Information Full Dates Option",
    "113107": "Retain Longitudinal Temporal Information Modified Dates Option",
    "113108": "Retain Patient Characteristics Option",
    "113109": "Retain Device Identity Option",
    "113110": "Retain UIDs Option",
    "113111": "Retain Safe Private Option",
    "113112": "Retain Institution Identity Option",
}

BASIC_PROFILE_CODE = "113100"
CLEAN_PIXEL_DATA_CODE = "113101"

#: ir.DeidOption value -> CID 7050 code value.
OPTION_CODES: dict[str, str] = {
    "clean_pixel_data": "113101",
    "clean_recognizable_visual_features": "113102",
    "clean_graphics": "113103",
    "clean_structured_content": "113104",
    "clean_descriptors": "113105",
    "retain_longitudinal_full_dates": "113106",
    "retain_longitudinal_modified_dates": "113107",
    "retain_patient_characteristics": "113108",
    "retain_device_identity": "113109",
    "retain_uids": "113110",
    "retain_safe_private": "113111",
    "retain_institution_identity": "113112",
}

#: Safe private attributes kept under the Retain Safe Private Option:
#: (private creator, group, element byte) -> description. A SUBSET of PS3.15 Table E.3.10-1 limited to
#: acquisition parameters (diffusion b-values/directions, table speed) whose listing we verified; every
#: other private element is removed even under the option.
SAFE_PRIVATE: dict[tuple[str, int, int], str] = {
    ("SIEMENS MR HEADER", 0x0019, 0x0C): "B_value",
    ("SIEMENS MR HEADER", 0x0019, 0x0D): "DiffusionDirectionality",
    ("SIEMENS MR HEADER", 0x0019, 0x0E): "DiffusionGradientDirection",
    ("SIEMENS MR HEADER", 0x0019, 0x27): "B_matrix",
    ("GEMS_ACQU_01", 0x0019, 0x23): "Table Speed [mm/rotation]",
    ("Philips Imaging DD 001", 0x2001, 0x03): "Diffusion B-Factor",
    ("Philips Imaging DD 001", 0x2001, 0x04): "Diffusion Direction",
}

#: Modalities whose images commonly carry burned-in annotation even without BurnedInAnnotation=YES.
BURNED_IN_RISK_MODALITIES = frozenset({"US", "XA", "RF", "SC", "OT", "ES", "XC", "GM", "SM", "DOC"})
#: Modalities at risk only for derived/secondary images (ImageType contains SECONDARY or DERIVED screen captures).
BURNED_IN_RISK_IF_SECONDARY = frozenset({"DX", "CR", "MG", "IO", "PX"})
