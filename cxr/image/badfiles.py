"""A small, deterministic corpus of awkward input files, each labelled with the stage that must catch it.

Real image folders contain empty files, downloads cut short, HTML error pages saved as .png, header-only
decompression bombs and odd-but-valid images (16-bit, RGBA, CMYK, non-ASCII names). Tests of the decoder,
the synthetic-data generator and the Spark jobs all write this corpus to check that every such file ends
up either decoded ("ok") or as one clear row of the `errors` output with the expected stage.
"""

from __future__ import annotations

import struct
import zlib
from io import BytesIO
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom import dcmwrite
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ComputedRadiographyImageStorage, ExplicitVRLittleEndian, generate_uid

__all__ = ["write_bad_inputs", "synthetic_dicom"]

OK = "ok"
UNICODE_NAME = "chest x-ray Ünïcödé 胸部 (1).png"  # spaces, accents, CJK, brackets: a valid image


def _pattern(height: int, width: int, top: int = 255, seed: int = 0) -> np.ndarray:
    """A non-blank, X-ray-ish test picture: bright ellipse on a gradient, plus a little noise."""
    y, x = np.mgrid[0:height, 0:width] / np.array([height, width])[:, None, None]
    picture = 0.35 + 0.3 * x + 0.4 * (((x - 0.5) / 0.4) ** 2 + ((y - 0.5) / 0.45) ** 2 < 1)
    picture += np.random.default_rng(seed).normal(0, 0.03, picture.shape)
    return (np.clip(picture, 0, 1) * top).astype(np.uint8 if top <= 255 else np.uint16)


def _save(image: Image.Image, fmt: str, **options) -> bytes:
    buf = BytesIO()
    image.save(buf, fmt, **options)
    return buf.getvalue()


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid-looking PNG (correct CRCs) whose IHDR claims width x height pixels; only a few bytes of data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
            + _png_chunk(b"IDAT", zlib.compress(b"\0" * 4096)) + _png_chunk(b"IEND", b""))


def synthetic_dicom(pixels: np.ndarray | None = None, *, photometric: str = "MONOCHROME1",
                    with_pixels: bool = True) -> bytes:
    """A small, standard-conforming CR DICOM (explicit VR little endian, 12 bits stored, window set).

    MONOCHROME1 by default, so a decoder that forgets to invert shows it as a negative.
    """
    if pixels is None:
        pixels = _pattern(160, 128, top=4095, seed=3)
        if photometric == "MONOCHROME1":
            pixels = 4095 - pixels  # stored as MONOCHROME1: bright body = low values
    uid = generate_uid(entropy_srcs=["cxr-spark synthetic dicom", photometric])  # deterministic
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ComputedRadiographyImageStorage
    meta.MediaStorageSOPInstanceUID = uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = ComputedRadiographyImageStorage, uid
    ds.Modality, ds.BodyPartExamined, ds.PatientName = "CR", "CHEST", "Synthetic^Test"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept, ds.WindowCenter, ds.WindowWidth = 1, 0, 2048, 4096
    if with_pixels:
        ds.PixelData = pixels.astype("<u2").tobytes()
    buf = BytesIO()
    dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def bad_inputs() -> dict[str, tuple[bytes, str]]:
    """File name -> (content, expected stage); "ok" means it must decode."""
    gray = Image.fromarray(_pattern(160, 128))
    noisy = Image.fromarray(np.random.default_rng(1).integers(0, 256, (160, 128), dtype=np.uint8))
    jpeg, png, dicom = _save(gray, "JPEG", quality=90), _save(noisy, "PNG"), synthetic_dicom()
    rgb = np.dstack([_pattern(120, 100, seed=s) for s in (4, 5, 6)])
    html = b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head><body>Not Found</body></html>\n"
    return {
        "empty.png": (b"", "read"),
        "truncated.jpg": (jpeg[: len(jpeg) * 6 // 10], "decode"),
        "truncated.png": (png[: len(png) * 6 // 10], "decode"),
        "error_page.png": (html, "sniff"),
        "random_bytes.jpg": (np.random.default_rng(7).bytes(4096), "sniff"),
        "bomb_100000x100000.png": (_png_bomb(), "header"),
        "corrupt.dcm": (b"\0" * 128 + b"DICM" + np.random.default_rng(8).bytes(4096), "decode"),
        "truncated_pixels.dcm": (dicom[: len(dicom) * 6 // 10], "decode"),
        "no_pixel_data.dcm": (synthetic_dicom(with_pixels=False), "header"),
        "tiny_1x1.png": (_save(Image.new("L", (1, 1), 128), "PNG"), "validate"),
        "thin_8x3000.png": (_save(Image.fromarray(_pattern(3000, 8)), "PNG"), "validate"),
        "blank.png": (_save(Image.new("L", (256, 256), 200), "PNG"), "validate"),
        "gray16.png": (_save(Image.fromarray(_pattern(160, 128, top=60000)), "PNG"), OK),
        "rgba.png": (_save(Image.fromarray(np.dstack([rgb, _pattern(120, 100, seed=7)]), "RGBA"), "PNG"), OK),
        "cmyk.jpg": (_save(Image.fromarray(rgb).convert("CMYK"), "JPEG", quality=90), OK),
        "synthetic_mono1.dcm": (dicom, OK),
        UNICODE_NAME: (_save(gray, "PNG"), OK),
    }


def write_bad_inputs(directory) -> dict[str, str]:
    """Write the corpus into `directory` (created if needed); return file name -> expected stage or "ok"."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    expected = {}
    for name, (content, stage) in bad_inputs().items():
        (directory / name).write_bytes(content)
        expected[name] = stage
    return expected
