"""Transfer: send the archive's de-identified instances to a destination the study declares.

Kinds: ``dicomweb`` (STOW-RS over plain ``urllib``, :mod:`.stow`), ``dicom`` (C-STORE with pynetdicom,
:mod:`.dimse`), ``folder`` (a verified copy, :mod:`.folder`). What was sent where is a ledger
(:mod:`.ledger`), the ``transfers`` table of ``W/state.sqlite`` (one row per destination and instance
sha256), so a re-run sends only what the receiver has not acknowledged and every failure stays
recorded with its reason. :func:`.send.transfer` is the operation and the ``transfer`` pipeline step.

Guarantees, in the order they are checked for every instance before anything leaves (:mod:`.objects`):
the object's bytes still hash to its name, it is DICOM Part 10, and PatientIdentityRemoved is YES;
anything else is *refused* (recorded, never sent). Bearer tokens come from the destination's
``auth`` (env or file) and appear in no log, result or ledger row.

``via`` (relay): ``transfer X … via R`` means the data for X travel through R, so the instances are
sent to R's endpoint (following R's own ``via`` to the first hop), with R's kind and credentials;
forwarding to X is the relay's job. The ledger still names X (:mod:`.destinations`).

Why ``urllib`` rather than dicomweb-client: STOW-RS is one multipart/related POST; doing it by hand
keeps the dependency set small and gives direct control over the points that matter here — the
per-instance status in the response (ReferencedSOPSequence / FailedSOPSequence), no redirects
(which would forward the token), and where the token goes.
"""
from __future__ import annotations

from ..diagnostics import ImtrialError


class TransferError(ImtrialError):
    """A transfer that cannot start (unknown destination, missing credentials, bad override, no archive):
    nothing is sent. The code says which (E831–E836, docs/diagnostics.md)."""

    code = "E831"
