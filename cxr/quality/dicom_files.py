"""DICOM files the project writes itself: frontal chest films, laterals, CT, other body parts, objects without
pixels and multi-frame files, each with identity tags and, when asked, planted patient data.

Why: the scope gate and the patient-data rules must be tested on what a PACS export holds, and real exports
cannot be shipped. Pixels come from the caller (a real X-ray, a rendered shape); the tags make the kind.
"""
from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, generate_uid

SOP_CLASSES = {
    "CR": "1.2.840.10008.5.1.4.1.1.1",          # Computed Radiography Image Storage
    "DX": "1.2.840.10008.5.1.4.1.1.1.1",        # Digital X-Ray Image Storage - For Presentation
    "CT": "1.2.840.10008.5.1.4.1.1.2",          # CT Image Storage
    "MR": "1.2.840.10008.5.1.4.1.1.4",          # MR Image Storage
    "OT": "1.2.840.10008.5.1.4.1.1.7",          # Secondary Capture Image Storage
    "SR": "1.2.840.10008.5.1.4.1.1.88.11",      # Basic Text SR (no pixels)
    "PR": "1.2.840.10008.5.1.4.1.1.11.1",       # Grayscale Softcopy Presentation State (no pixels)
}

# patient data a test plants in a file and then looks for in every output (values unlikely to occur by chance)
PHI_TAGS = ("PatientName", "PatientBirthDate", "PatientAddress", "ReferringPhysicianName", "OperatorsName",
            "InstitutionName", "StudyDescription", "ImageComments", "PatientID", "OtherPatientIDs")


def planted_phi(n: int) -> dict[str, str]:
    """Recognisable fake patient data for file n: every value unique to that file."""
    return {"PatientName": f"Zyxwuv^Qetra{n:03d}", "PatientBirthDate": f"1931{(n % 12) + 1:02d}17",
            "PatientAddress": f"{n} Xylophone Lane Qwmbl", "ReferringPhysicianName": f"Drqvk^Pelmo{n:03d}",
            "OperatorsName": f"Opqrz^Tech{n:03d}", "InstitutionName": f"Vrellmont Clinic {n:03d}",
            "StudyDescription": f"free text about Qetra{n:03d} history", "ImageComments": f"note Ynklo{n:03d}",
            "PatientID": f"MRN-7Q{n:06d}", "OtherPatientIDs": f"ALT-9K{n:06d}"}


def write_dicom(path: str | Path, pixels: np.ndarray | None, *, modality: str = "DX", body_part: str | None = "CHEST",
                view: str | None = "PA", frames: int = 1, seed: int = 0, phi: Mapping[str, str] | None = None,
                accession: str | None = None, study_date: str = "20250301", extra: Mapping[str, Any] | None = None
                ) -> dict[str, Any]:
    """Write one uncompressed DICOM file; pixels None writes an object without pixel data (SR, PR). Returns the
    identity tags written (the UIDs are derived from `seed`: the same call writes the same file)."""
    sop_class = SOP_CLASSES[modality]
    uid = lambda part: generate_uid(entropy_srcs=[f"cxr-test-{seed}-{part}"])  # noqa: E731
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, uid("sop")
    ds.StudyInstanceUID, ds.SeriesInstanceUID = uid("study"), uid("series")
    ds.Modality = modality
    ds.AccessionNumber = accession or f"ACC{seed:07d}"
    ds.StudyDate, ds.StudyTime = study_date, "101500"
    ds.Manufacturer = "cxr-spark test writer"
    if body_part is not None:
        ds.BodyPartExamined = body_part
    if view is not None:
        ds.ViewPosition = view
    for keyword, value in (phi or {}).items():
        setattr(ds, keyword, value)
    if pixels is not None:
        arr = np.asarray(pixels)
        if arr.dtype not in (np.uint8, np.uint16):
            raise ValueError(f"pixels must be uint8 or uint16, got {arr.dtype}")
        stack = np.stack([arr] * frames) if frames > 1 else arr
        ds.Rows, ds.Columns = arr.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        bits = 8 * arr.dtype.itemsize
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
        ds.PixelSpacing = [0.143, 0.143]
        ds.ImageType = ["ORIGINAL", "PRIMARY"] if modality in ("CR", "DX") else ["ORIGINAL", "PRIMARY", "AXIAL"]
        if frames > 1:
            ds.NumberOfFrames = frames
        ds.PixelData = np.ascontiguousarray(stack).tobytes()
    for keyword, value in (extra or {}).items():
        setattr(ds, keyword, value)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop_class, ds.SOPInstanceUID
    meta.TransferSyntaxUID, meta.ImplementationClassUID = ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(str(path), enforce_file_format=True)
    return {"sop_instance_uid": str(ds.SOPInstanceUID), "study_instance_uid": str(ds.StudyInstanceUID),
            "series_instance_uid": str(ds.SeriesInstanceUID), "accession_number": ds.AccessionNumber,
            "modality": modality, "study_date": dt.datetime.strptime(study_date, "%Y%m%d").date()}
