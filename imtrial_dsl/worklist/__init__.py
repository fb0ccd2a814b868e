"""Research scheduling at the site and the Modality Worklist that carries it to the scanners.

* :mod:`.schedule` keeps the scheduled research procedure steps (table ``scheduled_steps`` of
  ``W/state.sqlite``): planned from the study's schedule and each subject's baseline exam or
  enrolment, moved or cancelled by the coordinator, imported and exported as CSV;
* :mod:`.items` turns a step into the Modality Worklist item a scanner receives (the patient as the
  hospital knows them, the Clinical Trial Subject/Study attributes, the requested procedure, the
  scheduled protocol codes of the e-protocol export, the required station) and matches C-FIND keys;
* :mod:`.scp` is the DICOM service (pynetdicom): Modality Worklist C-FIND, and Modality Performed
  Procedure Step N-CREATE/N-SET;
* :mod:`.claim` is what identification asks: do the worklist attributes an exam carries agree with
  the registry?
"""
from __future__ import annotations

from ..diagnostics import ImtrialError


class WorklistError(ImtrialError):
    """A scheduling or worklist request that cannot be carried out (codes E870–E879, docs/diagnostics.md)."""

    code = "E870"
