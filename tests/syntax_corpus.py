"""Test data shared by tests/test_integrity.py and tests/test_transfer.py: pydicom-data files in every transfer
syntax the pipeline must carry end to end, re-labelled as series of a mini-corpus exam."""
from __future__ import annotations

from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid


# pydicom-data files, one per transfer syntax the pipeline must carry end to end (JPEG-lossy.dcm: 12-bit JPEG
# Extended, which no installed decoder reads — it must be quarantined as undecodable)
SYNTAXES = {
    "image_dfl.dcm": "1.2.840.10008.1.2.1.99",          # deflated explicit VR little endian
    "MR_small_bigendian.dcm": "1.2.840.10008.1.2.2",     # explicit VR big endian
    "SC_rgb_jpeg_dcmtk.dcm": "1.2.840.10008.1.2.4.50",   # JPEG baseline
    "MR_small_jpeg_ls_lossless.dcm": "1.2.840.10008.1.2.4.80",
    "MR_small_jp2klossless.dcm": "1.2.840.10008.1.2.4.90",
    "MR_small_RLE.dcm": "1.2.840.10008.1.2.5",
}
UNDECODABLE = "JPEG-lossy.dcm"


def _into_exam(src: str, like: pydicom.Dataset, description: str, number: int) -> pydicom.Dataset:
    """A pydicom-data file re-labelled as one more T2 series of ``like``'s exam, keeping its transfer syntax."""
    ds = pydicom.dcmread(get_testdata_file(src))
    for k in ("PatientID", "PatientName", "IssuerOfPatientID", "StudyInstanceUID", "StudyDate", "StudyTime",
              "Manufacturer", "ManufacturerModelName", "DeviceSerialNumber", "StationName", "SoftwareVersions",
              "InstitutionName", "RepetitionTime", "EchoTime", "SliceThickness"):
        if k in like:
            setattr(ds, k, like.get(k))
    ds.Modality = "MR"
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = like.SOPClassUID
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SeriesDescription, ds.SeriesNumber = description, number
    return ds


def transfer_syntax_inbox(mini) -> dict[str, str]:
    """Adds one series per transfer syntax (and the undecodable file) to the mini corpus' baseline exam;
    returns file name -> SOPInstanceUID."""
    inbox = Path(mini["inbox"])
    like = pydicom.dcmread(sorted(inbox.rglob("t2_*.dcm"))[0])
    folder = sorted(inbox.rglob("t2_*.dcm"))[0].parent
    uids = {}
    for i, name in enumerate([*SYNTAXES, UNDECODABLE]):
        ds = _into_exam(name, like, f"t2 {name}", 100 + i)
        ds.save_as(folder / f"ts_{name}", enforce_file_format=True)
        assert pydicom.dcmread(folder / f"ts_{name}").file_meta.TransferSyntaxUID == \
            (SYNTAXES.get(name) or "1.2.840.10008.1.2.4.51")
        uids[name] = str(ds.SOPInstanceUID)
    return uids
