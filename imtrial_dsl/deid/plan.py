"""The de-identification plan: a profile, the study's options and its overrides compiled once into one
operation per tag, and :func:`resolve_action`, the one owner of "which action applies to a profile row".

The checker calls :func:`resolve_action` for its W403/W404/W407 warnings, so that what it reports is what the
engine does; this module therefore loads without pydicom (``imtrial check`` never pays for it). The choices
where PS3.15 leaves room are explained in ``docs/deidentification.md``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Optional

from .. import ir
from ..diagnostics import ImtrialError
from ..dicom_tables import BASIC_PROFILE_CODE, CID7050, CLEAN_PIXEL_DATA_CODE, OPTION_CODES
from .vr import DATE_VRS, TEXT_VRS

FULL_DATES = ir.DeidOption.RETAIN_LONGITUDINAL_FULL_DATES.value
MODIFIED_DATES = ir.DeidOption.RETAIN_LONGITUDINAL_MODIFIED_DATES.value


class DeidError(ImtrialError):
    code = "E701"


# Operation codes of the compiled plan (ints: compared in the hot loop).
KEEP, DEL, EMPTY, DUMMY, UID, SHIFT, CLEAN, AEPSEUDO, SET, HASH, SEQ_RECURSE, SEQ_STRICT, SEQ_CLEAN, SEQ_EMPTY = range(14)
OP_NAMES = ["keep", "remove", "empty", "dummy", "uid", "shift", "clean", "ae_pseudonym", "replace", "hash",
            "recurse", "recurse_strict", "recurse_clean", "empty_sequence"]

# Conformance alternatives ("X unless Z/D is required by the IOD") without per-IOD module tables.
# X/Z/D -> Z, not D: a dummy serial/station/institution reads like a different real device to anything that
# matches devices downstream (adherence does); zero length is conformant wherever the attribute is Type 2 or 3.
CONFORMANCE = {"X/Z": "Z", "X/D": "D", "X/Z/D": "Z", "Z/D": "D", "X/Z/U*": "U*"}
# When two applied options give a row different actions, the more protective one wins.
_PROTECTIVE = {"X": 5, "Z": 4, "D": 3, "U": 2, "U*": 2, "C": 1, "K": 0}


def effective_options(options: Iterable[str]) -> frozenset[str]:
    """The options in force. Full dates and modified dates are alternatives for the same attributes (and
    LongitudinalTemporalInformationModified has one value): when a study names both, full dates govern."""
    opts = frozenset(options)
    return opts - {MODIFIED_DATES} if FULL_DATES in opts else opts


def option_names(deid: Optional[ir.Deidentify]) -> frozenset[str]:
    """The study's chosen option names, as written (before :func:`effective_options`)."""
    return frozenset(o.value if isinstance(o, ir.DeidOption) else str(o) for o in (deid.options if deid else []))


def resolve_action(rule: ir.ProfileRule, options: Iterable[str]) -> tuple[str, Optional[str]]:
    """The table action that applies to ``rule`` under ``options``, and the option that decided it (None: the
    basic profile's action). An applied option's action replaces the basic one; among several applied options
    the most protective action wins (X > Z > D > U > C > K, an alternative such as X/Z/D ranked as what it
    resolves to), ties going to the option listed first in the rule (the table's column order)."""
    opts = effective_options(options)
    hits = [(opt, code) for opt, code in rule.options.items() if opt in opts]
    if not hits:
        return rule.action, None
    opt, code = max(hits, key=lambda oc: _PROTECTIVE.get(CONFORMANCE.get(oc[1], oc[1]), 0))   # max keeps the first
    return code, opt


def shifts_dates(options: Iterable[str]) -> bool:
    return MODIFIED_DATES in effective_options(options)


@dataclass
class Plan:
    """A compiled de-identification plan (tag -> (op, arg)) plus group rules and method codes."""

    ops: dict[int, tuple[int, Any]]
    curve_op: int                       # 50xx: always DEL (retired curves)
    overlay_op: int                     # 60xx (whole group): DEL or KEEP (clean_graphics)
    private_op: int                     # DEL, or KEEP for the safe-private list
    options: frozenset[str]             # in force (see effective_options)
    shift_dates: bool
    dates_state: str                    # LongitudinalTemporalInformationModified value
    method_codes: list[tuple[str, str]]
    method_text: str
    actions: dict[str, tuple[str, Optional[str]]]   # rule tag -> resolve_action(): what ``ops`` was compiled from

    def action_for(self, tag: int) -> str:
        """Human-readable operation for a tag (docs, tests)."""
        op = self.ops.get(tag)
        return OP_NAMES[op[0]] if op else "keep"


def compile_plan(profile: ir.DeidProfile, deid: Optional[ir.Deidentify] = None) -> Plan:
    """Compile a profile + the study's options and overrides into a :class:`Plan` (once per run)."""
    from .elements import parse_tag, vr_of   # pydicom's dictionary: loaded here, not when the checker imports us

    options = effective_options(option_names(deid))
    actions = {rule.tag: resolve_action(rule, options) for rule in profile.rules}
    ops: dict[int, tuple[int, Any]] = {}
    curve_op = overlay_op = private_op = DEL
    for rule in profile.rules:
        action, opt = actions[rule.tag]
        action = CONFORMANCE.get(action, action)
        tag_text = rule.tag.lower()
        if tag_text.startswith("(50xx"):
            curve_op = DEL      # retired curves: removing them is the only cleaning we can vouch for
            continue
        if tag_text.startswith("(60xx"):
            if tag_text == "(60xx,3000)":
                overlay_op = KEEP if action in ("C", "K") else DEL
            continue
        if tag_text.startswith("(gggg"):
            private_op = KEEP if action in ("C", "K") else DEL
            continue
        tag = parse_tag(rule.tag)
        ops[tag] = _compile_action(tag, vr_of(tag), action, opt)
    for ov in (deid.overrides if deid else []):
        try:
            tag = parse_tag(ov.attribute)
        except KeyError:
            raise DeidError(ov, f"unknown DICOM attribute '{ov.attribute}' in a de-identification override") from None
        vr = vr_of(tag)
        if ov.action == "keep":
            ops[tag] = (SEQ_RECURSE if vr == "SQ" else KEEP, None)
        elif ov.action == "remove":
            ops[tag] = (DEL, None)
        elif ov.action == "empty":
            ops[tag] = (SEQ_EMPTY if vr == "SQ" else EMPTY, None)
        elif ov.action == "replace":
            ops[tag] = (SET, ov.value or "")
        elif ov.action == "hash":
            ops[tag] = (UID if vr == "UI" else HASH, None)
    shift = MODIFIED_DATES in options
    dates_state = "UNMODIFIED" if FULL_DATES in options else "MODIFIED" if shift else "REMOVED"
    codes = [(BASIC_PROFILE_CODE, CID7050[BASIC_PROFILE_CODE])]
    for opt in sorted(options, key=lambda o: OPTION_CODES.get(o, "999999")):
        if opt in OPTION_CODES and OPTION_CODES[opt] != CLEAN_PIXEL_DATA_CODE:
            codes.append((OPTION_CODES[opt], CID7050[OPTION_CODES[opt]]))
    # DeidentificationMethod is LO 1-n: one value (<= 64 chars) per code, mirroring the code sequence
    text = "\\".join(meaning[:64] for _, meaning in codes)
    return Plan(ops, curve_op, overlay_op, private_op, options, shift, dates_state, codes, text, actions)


def _compile_action(tag: int, vr: str, action: str, opt: Optional[str]) -> tuple[int, Any]:
    if action == "X":
        return (DEL, None)
    if vr == "SQ":
        if action == "Z":
            return (SEQ_EMPTY, None)
        if action == "D":
            return (SEQ_STRICT, None)
        if action == "C":
            return (SEQ_CLEAN, None)
        return (SEQ_RECURSE, None)       # K, U, U*
    if action == "Z":
        return (EMPTY, None)
    if action == "K":
        return (KEEP, None)
    if action in ("U", "U*") or (vr == "UI" and action in ("D", "C")):
        return (UID, None)
    if action == "D":
        return (DUMMY, vr)
    if action == "C":
        if opt == MODIFIED_DATES or vr in DATE_VRS:
            return (SHIFT, vr) if vr in DATE_VRS else (KEEP, None)
        if vr == "AE":
            return (AEPSEUDO, None)
        if vr in TEXT_VRS:
            return (CLEAN, vr)
        return (KEEP, None)   # numbers etc. under a retain/clean option carry no free text
    raise DeidError(None, f"unknown action code '{action}' for tag {tag:08X}")
