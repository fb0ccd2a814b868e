"""A synthetic, realistic DICOM corpus generated from a trial description.

For every site device, subject and scheduled visit, each protocol the visit
acquires becomes a series whose header parameters satisfy the device's effective
constraints (``ir.effective_constraints``) and whose SeriesDescription/ImageType
classify to that protocol; pixel data is a 3-D head phantom (scalp, skull, CSF,
grey and white matter, ventricles; tissue contrast by protocol type) with Rician
noise (CT: a head in Hounsfield units with Gaussian noise). Named deviations are
injected at seeded places and every one is recorded in the manifest, so tests
can assert that classification, adherence and QC report exactly those.

Deterministic: the same trial, options and seed give byte-identical files.

Modules: ``values`` (a header value for one constraint), ``scanners`` (vendor identity, parameter
defaults, series names), ``pixels`` (phantom, noise, ghosts), ``writer`` (DICOM files),
``corpus`` (subjects, visits, deviations, manifest).
"""
from .corpus import DEVIATIONS, SIZES, synthesize

__all__ = ["DEVIATIONS", "SIZES", "synthesize"]
