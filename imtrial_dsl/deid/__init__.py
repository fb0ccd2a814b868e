"""De-identification (DICOM PS3.15 Annex E): one module per responsibility.

- :mod:`.plan`: profile + options + overrides -> a :class:`Plan` (tag -> operation), and
  :func:`resolve_action`, the one owner of which action applies to a profile row (the checker uses it too);
- :mod:`.pseudonyms`: the study key, UID remapping, date shifting, keyed hashes, the audit map;
- :mod:`.text`: free-text cleaning; :mod:`.elements` / :mod:`.vr`: reading elements, VR facts;
- :mod:`.walk`: the :class:`Deidentifier`, applying a plan through nested sequences;
- :mod:`.pixels`: burned-in annotation and overlays; :mod:`.part10`: deterministic Part 10 bytes and writes;
- :mod:`.conformance`: ``deid/conformance.json`` (what was done to each attribute of Table E.1-1);
- :mod:`.results`: the policy that step results carry no device or institution identity;
- :mod:`.step`: :func:`deidentify_exam` and the registered ``deidentify`` step.

Names are loaded from their module on first use (PEP 562), so that ``import imtrial_dsl.deid.plan`` (the
checker) does not import pydicom, which the engine modules need and which costs ~0.2 s at start-up.
The choices where the standard leaves room are in ``docs/deidentification.md``.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "plan": ("AEPSEUDO", "CLEAN", "DEL", "DUMMY", "EMPTY", "HASH", "KEEP", "SEQ_CLEAN", "SEQ_EMPTY", "SEQ_RECURSE",
             "SEQ_STRICT", "SET", "SHIFT", "UID", "DeidError", "Plan", "compile_plan", "effective_options",
             "identity_overrides", "keeps_identity", "option_conflicts", "resolve_action"),
    "elements": ("parse_tag",),
    "pseudonyms": ("Pseudonymizer", "audit_entries", "check_key", "pseudonymizer", "resolve_key", "shift_date",
                   "shift_datetime", "store_audit", "subject_date_shift", "trial_scope"),
    "text": ("clean_text", "identifier_tokens"),
    "walk": ("Deidentifier", "InstanceResult"),
    "part10": ("ENGINE_VERSION", "IMPLEMENTATION_CLASS_UID", "IMPLEMENTATION_VERSION_NAME", "to_bytes"),
    "step": ("deidentify_exam",),
}
_MODULE_OF = {name: mod for mod, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    mod = _MODULE_OF.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{mod}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
