"""A DICOM file's identity and acquisition tags as a thin set of typed columns, read without the pixels.

Why: a prediction must join back to the study it came from (SOP/Series/Study Instance UID, AccessionNumber),
and the scope gate (cxr.scope.rules) needs Modality, BodyPartExamined, ViewPosition and the frame count before
any pixel is decoded. Only the tags below ever leave this module: patient names, birth dates, addresses,
physicians and free-text tags are never read into a row. PatientID becomes `patient_key`, an HMAC-SHA256 keyed
by a site secret; without a secret the column is null (a plain hash of an MRN is undone by hashing every MRN).
InstitutionName / StationName / Manufacturer become `site_key` by the same rule: which site and machine a film
came from is what shortcut checks and unseen-site warnings need, and a short list of hospital names is as easy to
hash through as MRNs.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import os
import warnings
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any, Mapping

from cxr.image.decode import dicom

# column name -> (DICOM keyword, kind); kind: str | multi (backslash-joined) | int | date | spacing
HEADER_COLUMNS: dict[str, tuple[str, str]] = {
    "sop_instance_uid": ("SOPInstanceUID", "str"),
    "sop_class_uid": ("SOPClassUID", "str"),
    "series_instance_uid": ("SeriesInstanceUID", "str"),
    "study_instance_uid": ("StudyInstanceUID", "str"),
    "accession_number": ("AccessionNumber", "str"),
    "modality": ("Modality", "str"),
    "body_part_examined": ("BodyPartExamined", "str"),
    "view_position": ("ViewPosition", "str"),
    "patient_orientation": ("PatientOrientation", "multi"),
    "image_type": ("ImageType", "multi"),
    "photometric_interpretation": ("PhotometricInterpretation", "str"),
    "dicom_rows": ("Rows", "int"),
    "dicom_columns": ("Columns", "int"),
    "bits_stored": ("BitsStored", "int"),
    "number_of_frames": ("NumberOfFrames", "int"),
    "pixel_spacing_row_mm": ("PixelSpacing", "spacing0"),
    "pixel_spacing_col_mm": ("PixelSpacing", "spacing1"),
    "manufacturer": ("Manufacturer", "str"),
    "study_date": ("StudyDate", "date"),
}
PATIENT_KEY = "patient_key"
SITE_KEY = "site_key"
# the tags that name where a film was taken; only their keyed hash (site_key) ever leaves this module
SITE_TAGS = ("InstitutionName", "StationName", "Manufacturer")
# every column a DICOM adds to images/, predictions/, errors/ and out_of_scope/ (null for other files)
DICOM_COLUMNS: tuple[str, ...] = (*HEADER_COLUMNS, PATIENT_KEY, SITE_KEY)
COLUMN_KINDS: dict[str, str] = {c: k for c, (_, k) in HEADER_COLUMNS.items()} | {PATIENT_KEY: "str", SITE_KEY: "str"}

_PIXEL_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


@dataclass(frozen=True)
class DicomHeader:
    """The columns of one DICOM file plus what the scope gate needs to know about its pixels."""
    columns: dict[str, Any]
    has_pixels: bool   # pixel data present, or at least announced by Rows/Columns (else: not an image object)


@dataclass(frozen=True)
class HeaderReader:
    """Reads DICOM headers into columns; carries the site secret for the patient key to the workers (kept out
    of repr, so it never lands in a log line or a record)."""
    secret: bytes | None = field(default=None, repr=False)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "HeaderReader":
        return cls(patient_key_secret(config.get("dicom") or {}))

    def patient_key(self, patient_id: str | None) -> str | None:
        if not self.secret or not patient_id:
            return None
        return hmac.new(self.secret, patient_id.encode("utf-8"), hashlib.sha256).hexdigest()

    def site_key(self, ds) -> str | None:
        """HMAC of the site tags (institution, station, manufacturer), None without a secret or without any of them."""
        parts = [_value(ds, tag, "str") for tag in SITE_TAGS]
        if not self.secret or not any(parts):
            return None
        text = "site\x1f" + "\x1f".join(p or "" for p in parts)
        return hmac.new(self.secret, text.encode("utf-8"), hashlib.sha256).hexdigest()

    def read(self, data: bytes) -> DicomHeader | None:
        """The header of a DICOM file's bytes, or None when they do not parse as DICOM (the decoder then says
        why in its own words)."""
        fp = BytesIO(data)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = dicom().dcmread(fp, force=True, stop_before_pixels=True)
        except Exception:
            return None
        if not any(tag.group in (0x0008, 0x0028) for tag in ds.keys()):
            return None   # random bytes after "DICM" parse as a few odd elements: that is corrupt, not a header
        # an object without pixels AND without image size is not an image (SR, presentation state, ...); an image
        # header whose pixel data is missing is a broken file, which the decoder rejects as such
        has_pixels = (fp.tell() < len(data) or any(t in ds for t in _PIXEL_TAGS)
                      or ds.get("Rows") is not None or ds.get("Columns") is not None)
        columns = {col: _value(ds, kw, kind) for col, (kw, kind) in HEADER_COLUMNS.items()}
        columns[PATIENT_KEY] = self.patient_key(_value(ds, "PatientID", "str"))
        columns[SITE_KEY] = self.site_key(ds)
        return DicomHeader(columns, has_pixels)


def empty_columns() -> dict[str, Any]:
    return dict.fromkeys(DICOM_COLUMNS)


def patient_key_secret(dicom_conf: Mapping[str, Any]) -> bytes | None:
    """The secret from the environment variable conf names (dicom.patient_key_secret_env), else from the file
    it names (dicom.patient_key_secret_file); None when neither is set."""
    env = dicom_conf.get("patient_key_secret_env") or "CXR_PATIENT_KEY_SECRET"
    value = os.environ.get(str(env))
    if value:
        return value.encode("utf-8")
    path = dicom_conf.get("patient_key_secret_file")
    if path:
        secret = Path(os.path.expanduser(str(path))).read_bytes().strip()
        if not secret:
            raise ValueError(f"dicom.patient_key_secret_file {path} is empty")
        return secret
    return None


def _text(value) -> str | None:
    text = str(value).replace("\x00", "").strip()
    return text or None


def _value(ds, keyword: str, kind: str):
    """One tag as a typed Python value; absent, empty or malformed -> None."""
    try:
        elem = ds.get(keyword)
        if elem is None or elem == "":
            return None
        if kind == "str":
            return _text(elem)
        if kind == "multi":
            values = list(elem) if isinstance(elem, dicom().multival.MultiValue) else [elem]
            return "\\".join(str(v).strip() for v in values) or None
        if kind == "int":
            return int(elem)
        if kind == "date":
            return dt.datetime.strptime(str(elem).strip()[:8], "%Y%m%d").date()
        if kind.startswith("spacing"):
            values = list(elem) if isinstance(elem, dicom().multival.MultiValue) else [elem]
            return float(values[int(kind[-1])]) if len(values) > int(kind[-1]) else None
    except (ValueError, TypeError, IndexError):
        return None
    raise ValueError(f"unknown column kind {kind!r}")


def with_column_types(frame):
    """A pandas frame's DICOM columns in dtypes Arrow maps to the Spark schema (nullable ints stay ints)."""
    for col, kind in COLUMN_KINDS.items():
        if col in frame:
            if kind == "int":
                frame[col] = frame[col].astype("Int32")
            elif kind.startswith("spacing"):
                frame[col] = frame[col].astype("float64")
    return frame
