"""What de-identification needs to know about value representations (pure data, no pydicom)."""
from __future__ import annotations

TEXT_VRS = frozenset({"LO", "SH", "ST", "LT", "UT", "UC", "PN"})
FREE_TEXT_VRS = frozenset({"ST", "LT", "UT", "UC", "PN"})
DATE_VRS = frozenset({"DA", "DT", "TM"})
SINGLE_VALUED_TEXT_VRS = frozenset({"LT", "ST", "UT", "UR"})        # a backslash is text, not a separator
# VRs whose values are ASCII in every character set (or are written as ASCII here)
ASCII_VRS = frozenset({"AE", "AS", "CS", "DA", "DT", "TM", "DS", "IS", "UI", "LO", "SH", "ST", "LT", "UT", "UC",
                       "PN", "UR"})

DUMMY_TEXT = {"AE": "ANONYMOUS", "AS": "000Y", "CS": "ANONYMIZED", "DA": "19000101", "DT": "19000101000000",
              "TM": "000000", "DS": "0", "IS": "0", "LO": "ANONYMIZED", "SH": "ANONYMIZED", "ST": "ANONYMIZED",
              "LT": "ANONYMIZED", "UT": "ANONYMIZED", "UC": "ANONYMIZED", "PN": "ANONYMIZED",
              "UR": "urn:x-anonymized"}
DUMMY_NUM = {"US": 0, "SS": 0, "UL": 0, "SL": 0, "FL": 0.0, "FD": 0.0, "AT": 0, "SV": 0, "UV": 0}
MAX_LENGTH = {"AE": 16, "CS": 16, "SH": 16, "LO": 64, "PN": 64, "UC": 64, "ST": 1024, "LT": 10240, "UT": 10240}
