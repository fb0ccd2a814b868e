"""The de-identification plan: a profile, the study's options and its overrides compiled once into one
operation per tag, and :func:`resolve_action`, the one owner of "which action applies to a profile row".

The checker calls :func:`resolve_action` for its W403/W404 warnings (and the E705–E707 rules), so that what it reports is what the
engine does; this module therefore loads without pydicom (``imtrial check`` never pays for it). The choices
where PS3.15 leaves room are explained in ``docs/deidentification.md``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

from .. import ir
from ..diagnostics import ImtrialError
from ..dicom_tables import BASIC_PROFILE_CODE, CID7050, CLEAN_PIXEL_DATA_CODE, OPTION_CODES
from .vr import DATE_VRS, TEXT_VRS

FULL_DATES = ir.DeidOption.RETAIN_LONGITUDINAL_FULL_DATES.value
MODIFIED_DATES = ir.DeidOption.RETAIN_LONGITUDINAL_MODIFIED_DATES.value
VISUAL_FEATURES = ir.DeidOption.CLEAN_RECOGNIZABLE_VISUAL_FEATURES.value
CLEAN_PIXELS = ir.DeidOption.CLEAN_PIXEL_DATA.value
# Options the engine cannot carry out, with the code of the error that refuses them (checker and engine).
UNSUPPORTED_OPTIONS = {VISUAL_FEATURES: "E705"}
# Dummies that must keep a value's format (DUMMY_TEXT has one value per VR): UTC for the time-zone offset.
DUMMY_BY_TAG = {0x00080201: "+0000"}           # TimezoneOffsetFromUTC (SH, "&ZZXX")


class DeidError(ImtrialError):
    code = "E701"


def option_conflicts(options: Iterable[str]) -> list[tuple[str, str, str]]:
    """(code, option, message) for every chosen option the engine refuses: one it cannot carry out
    (113102, Clean Recognizable Visual Features: defacing is not implemented) and the two date options
    together (they are alternatives for the same attributes). The checker reports these; the engine raises."""
    opts = set(options)
    out = []
    if VISUAL_FEATURES in opts:
        out.append(("E705", VISUAL_FEATURES, "option clean_recognizable_visual_features (113102) is not implemented: "
                                             "imtrial does not deface or otherwise remove recognizable visual features"))
    if FULL_DATES in opts and MODIFIED_DATES in opts:
        out.append(("E706", MODIFIED_DATES, "retain_longitudinal_full_dates and retain_longitudinal_modified_dates "
                                            "exclude each other: dates are either kept or shifted"))
    return out

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


def identity_overrides(profile: ir.DeidProfile, deid: Optional[ir.Deidentify]) -> tuple[list[str], list[str]]:
    """What the study's ``keep`` overrides retain beyond the profile: ``(identity, implied)``.

    ``identity``: attributes kept that no option of Table E.1-1 keeps (``keep PatientID``, ``keep PatientName``,
    ``keep SeriesDescription``…): the output then keeps identity (PatientIdentityRemoved NO, no 113100).
    ``implied``: options (values) that do keep an attribute the study keeps without choosing the option
    (``keep PatientSex`` without retain_patient_characteristics): their codes are recorded, so the method code
    sequence never claims that less was retained than was."""
    if deid is None:
        return [], []
    options = effective_options(option_names(deid))
    rules = {}
    for r in profile.rules:
        if r.keyword:
            rules[r.keyword] = r
        rules[r.tag.upper()] = r
    identity, implied = [], []
    for ov in deid.overrides:
        rule = rules.get(ov.attribute) or rules.get(ov.attribute.upper())
        if ov.action != "keep" or rule is None:
            continue
        action, _ = resolve_action(rule, options)
        if action == "K":
            continue
        keepers = [o for o, a in rule.options.items() if a == "K" and o not in options and o != MODIFIED_DATES]
        if keepers:
            implied += [k for k in keepers[:1] if k not in implied]
        elif ov.attribute not in identity:
            identity.append(ov.attribute)
    return identity, implied


def keeps_identity(trial: ir.Trial) -> list[str]:
    """The attributes the study's overrides keep although no option of the profile keeps them ([] = none)."""
    d = trial.deidentify
    prof = trial.profile(d.profile.name) if d else None
    return identity_overrides(prof, d)[0] if prof is not None else []


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
    identity_kept: tuple[str, ...] = ()             # overrides that keep identity (PatientIdentityRemoved NO)
    # tag -> (table action, operation, deciding option or None): what the conformance report says
    decided: dict[int, tuple[str, str, Optional[str]]] = field(default_factory=dict)
    overrides: dict[int, str] = field(default_factory=dict)   # tag -> override verb ("keep", "remove", …)

    def action_for(self, tag: int) -> str:
        """Human-readable operation for a tag (docs, tests)."""
        op = self.ops.get(tag)
        return OP_NAMES[op[0]] if op else "keep"


def compile_plan(profile: ir.DeidProfile, deid: Optional[ir.Deidentify] = None) -> Plan:
    """Compile a profile + the study's options and overrides into a :class:`Plan` (once per run).

    Raises :class:`DeidError` for options the engine refuses (:func:`option_conflicts`)."""
    from .elements import parse_tag, vr_of   # pydicom's dictionary: loaded here, not when the checker imports us

    for code, opt, message in option_conflicts(option_names(deid)):
        raise DeidError(deid, message, "remove the option from the deidentify block", code=code)
    options = effective_options(option_names(deid))
    actions = {rule.tag: resolve_action(rule, options) for rule in profile.rules}
    ops: dict[int, tuple[int, Any]] = {}
    decided: dict[int, tuple[str, str, Optional[str]]] = {}
    curve_op = overlay_op = private_op = DEL
    for rule in profile.rules:
        action, opt = actions[rule.tag]
        applied = CONFORMANCE.get(action, action)
        tag_text = rule.tag.lower()
        if tag_text.startswith("(50xx"):
            curve_op = DEL      # retired curves: removing them is the only cleaning we can vouch for
            continue
        if tag_text.startswith("(60xx"):
            if tag_text == "(60xx,3000)":
                overlay_op = KEEP if applied in ("C", "K") else DEL
            continue
        if tag_text.startswith("(gggg"):
            private_op = KEEP if applied in ("C", "K") else DEL
            continue
        tag = parse_tag(rule.tag)
        ops[tag] = _compile_action(tag, vr_of(tag), applied, opt)
        decided[tag] = (action, OP_NAMES[ops[tag][0]], opt)
    overrides: dict[int, str] = {}
    for ov in (deid.overrides if deid else []):
        try:
            tag = parse_tag(ov.attribute)
        except KeyError:
            raise DeidError(ov, f"unknown DICOM attribute '{ov.attribute}' in a de-identification override") from None
        vr = vr_of(tag)
        overrides[tag] = ov.action
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
    identity, implied = identity_overrides(profile, deid)
    shift = MODIFIED_DATES in options
    dates_state = "UNMODIFIED" if FULL_DATES in options else "MODIFIED" if shift else "REMOVED"
    codes = [] if identity else [(BASIC_PROFILE_CODE, CID7050[BASIC_PROFILE_CODE])]
    for opt in sorted(set(options) | set(implied), key=lambda o: OPTION_CODES.get(o, "999999")):
        if opt in OPTION_CODES and OPTION_CODES[opt] != CLEAN_PIXEL_DATA_CODE:
            codes.append((OPTION_CODES[opt], CID7050[OPTION_CODES[opt]]))
    # DeidentificationMethod is LO 1-n: one value (<= 64 chars) per code, mirroring the code sequence
    values = [meaning[:64] for _, meaning in codes]
    if identity:   # say so in the method text too: the code sequence alone would read as "nothing claimed"
        values.insert(0, ("identity kept: " + ", ".join(identity))[:64])
    return Plan(ops, curve_op, overlay_op, private_op, options, shift, dates_state, codes, "\\".join(values), actions,
                tuple(identity), decided, overrides)


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
        # Clean: nothing identifying may survive. What cannot be cleaned is dummied or removed
        # (docs/deidentification.md, "Clean on values that are not text").
        if vr in DATE_VRS:
            return (SHIFT, vr)
        if vr == "AE":
            return (AEPSEUDO, None)
        if vr in TEXT_VRS:
            if opt == MODIFIED_DATES:       # text under the dates option (TimezoneOffsetFromUTC): a dummy
                return (SET, DUMMY_BY_TAG[tag]) if tag in DUMMY_BY_TAG else (DUMMY, vr)
            return (CLEAN, vr)
        if vr == "CS":                      # a code string cannot be cleaned of meaning: a dummy
            return (DUMMY, vr)
        return (DEL, None)                  # bytes (MakerNote, timestamps), numbers: no cleaning to vouch for
    raise DeidError(None, f"unknown action code '{action}' for tag {tag:08X}")
