"""16-bit PNG/TIFF read by the bits they use: a 10-, 12- or 16-bit copy of an 8-bit X-ray looks like the 8-bit file.

Before this, a 16-bit PNG holding 12-bit values (0-4095) came out of the pipeline near-black with ~20 grey
levels. The copies here are made from real 8-bit X-rays; each is written with and without PNG's sBIT chunk.
"""
from __future__ import annotations

import struct
import zlib

import cv2
import numpy as np
import pytest

from cxr.image.decode import decode_image
from cxr.image.depth import png_significant_bits, window
from cxr.image.pipeline import PreprocessParams, preprocess_bytes
from tests.conftest import shared_data

PARAMS = PreprocessParams(size=224)


def _with_sbit(png: bytes, bits: int) -> bytes:
    """Insert an sBIT chunk (grayscale: one byte) right after IHDR (signature 8 + IHDR 25 bytes)."""
    chunk = struct.pack(">I", 1) + b"sBIT" + bytes([bits]) + struct.pack(">I", zlib.crc32(b"sBIT" + bytes([bits])))
    return png[:33] + chunk + png[33:]


def _span(image: np.ndarray) -> float:
    lo, hi = np.percentile(image, [1, 99])
    return float(hi - lo)


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel().astype(float), b.ravel().astype(float))[0, 1])


@pytest.fixture(scope="module")
def xrays():
    """A few real 8-bit X-rays (gray), downscaled to ~700 px to keep the test quick."""
    folder = shared_data("cxr")
    out = []
    for path in sorted(folder.rglob("*"))[5::60]:
        gray = cv2.imdecode(np.fromfile(path, np.uint8), cv2.IMREAD_GRAYSCALE)
        if gray is not None:
            scale = 700 / min(gray.shape)
            if scale < 1:
                gray = cv2.resize(gray, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
            out.append((path.name, gray))
    assert len(out) >= 5
    return out


def _copy(gray: np.ndarray, bits: int) -> np.ndarray:
    """The 8-bit values spread over 0..2^bits-1, stored in uint16 (unscaled: how hospital exports store them)."""
    return np.rint(gray.astype(np.float64) * ((1 << bits) - 1) / 255.0).astype(np.uint16)


@pytest.mark.parametrize("bits", [10, 12, 16])
@pytest.mark.parametrize("sbit", [True, False], ids=["sBIT", "no-sBIT"])
def test_deeper_copies_match_the_8bit_file(xrays, bits, sbit):
    for name, gray in xrays:
        reference = preprocess_bytes(cv2.imencode(".png", gray)[1].tobytes(), PARAMS)[1]
        png = cv2.imencode(".png", _copy(gray, bits))[1].tobytes()
        if sbit:
            png = _with_sbit(png, bits)
        decoded, out = preprocess_bytes(png, PARAMS)
        assert decoded.pixels.dtype == np.uint16 and decoded.orig_dtype == "uint16"
        assert decoded.significant_bits == (bits if sbit else None)
        assert _corr(out, reference) >= 0.98, (name, bits, _corr(out, reference))
        assert abs(_span(out) - _span(reference)) <= 0.1 * _span(reference), (name, _span(out), _span(reference))
        assert len(np.unique(out)) > 150, (name, len(np.unique(out)))


def test_12bit_tiff_matches_the_8bit_file(xrays):
    name, gray = xrays[0]
    reference = preprocess_bytes(cv2.imencode(".png", gray)[1].tobytes(), PARAMS)[1]
    tiff = cv2.imencode(".tiff", _copy(gray, 12))[1].tobytes()
    decoded, out = preprocess_bytes(tiff, PARAMS)
    assert decoded.source_format == "TIFF" and decoded.pixels.max() < 4096
    assert _corr(out, reference) >= 0.98
    assert abs(_span(out) - _span(reference)) <= 0.1 * _span(reference)


def test_the_issue_example_is_no_longer_crushed(xrays):
    """12 bits stored in 16 (values 0-4080, no sBIT) used to give ~22 grey levels between percentiles 10 and 28."""
    _, gray = xrays[1]
    png = cv2.imencode(".png", (gray.astype(np.uint16) * 16))[1].tobytes()
    out = preprocess_bytes(png, PARAMS)[1]
    lo, hi = np.percentile(out, [1, 99])
    assert len(np.unique(out)) > 200 and hi - lo > 150, (len(np.unique(out)), lo, hi)


def test_sbit_with_values_scaled_to_16_bits_is_read_as_16_bits(xrays):
    """The PNG spec stores sBIT images scaled up to the full depth: the window must not clip them."""
    _, gray = xrays[2]
    scaled = _copy(gray, 12) << 4   # 12 significant bits in the high bits, per the spec
    png = _with_sbit(cv2.imencode(".png", scaled)[1].tobytes(), 12)
    decoded = decode_image(png)
    assert decoded.significant_bits == 12
    assert window(decoded.pixels, 12) == (int(scaled.min()), int(scaled.max()))
    reference = preprocess_bytes(cv2.imencode(".png", gray)[1].tobytes(), PARAMS)[1]
    assert _corr(preprocess_bytes(png, PARAMS)[1], reference) >= 0.98


def test_significant_bits_reader():
    png = cv2.imencode(".png", np.zeros((70, 70), np.uint16))[1].tobytes()
    assert png_significant_bits(png) is None
    assert png_significant_bits(_with_sbit(png, 10)) == 10
    rgb_sbit = png[:33] + struct.pack(">I", 3) + b"sBIT" + bytes([5, 12, 7]) + b"\0\0\0\0" + png[33:]
    assert png_significant_bits(rgb_sbit) == 12   # the deepest channel


def test_8bit_and_dicom_are_unchanged():
    """Only 16-bit rasters are windowed: 8-bit files and DICOM (its own VOI window) go through as before."""
    from cxr.image.badfiles import synthetic_dicom
    from cxr.image.pipeline import equalization_input, preprocess_pixels

    gray = (np.arange(100 * 90) % 200 + 20).astype(np.uint8).reshape(100, 90)
    decoded = decode_image(cv2.imencode(".png", gray)[1].tobytes())
    assert equalization_input(decoded) is decoded.pixels
    dicom = decode_image(synthetic_dicom())
    assert dicom.pixels.dtype == np.uint16 and equalization_input(dicom) is dicom.pixels
    np.testing.assert_array_equal(preprocess_bytes(synthetic_dicom(), PARAMS)[1], preprocess_pixels(dicom.pixels, PARAMS))
