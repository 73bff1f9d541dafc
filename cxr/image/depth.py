"""16-bit rasters (PNG, TIFF, JPEG 2000) by the bits they really use, not by their 16-bit container.

Hospital exports often store 10- or 12-bit values in 16-bit PNGs (0-4095): taken as 16-bit, they are a nearly
black image whose equalisation gives a handful of grey levels. So the values are windowed first: by PNG's
`sBIT` chunk when present (and the values stay below 2^bits: unscaled storage), else by the image's own
min..max, and the window is mapped onto uint8, the depth the study's CLAHE works at. (OpenCV's 16-bit CLAHE
uses 65,536 bins, so its clip limit falls to one count per bin and it barely equalises: a 12-bit copy of an
8-bit X-ray would come out nothing like the 8-bit file.) DICOM is not touched here: its own VOI window applies.
"""
from __future__ import annotations

import struct

import cv2
import numpy as np

__all__ = ["png_significant_bits", "window", "to_equalization_input"]


def png_significant_bits(data: bytes) -> int | None:
    """The largest channel value of a PNG's sBIT chunk (before IDAT), or None when there is none."""
    pos, n = 8, len(data)
    while pos + 8 <= n:
        length, kind = struct.unpack_from(">I4s", data, pos)
        if kind == b"sBIT" and 1 <= length <= 4 and pos + 8 + length <= n:
            return max(data[pos + 8:pos + 8 + length])
        if kind in (b"IDAT", b"IEND"):
            return None
        pos += 12 + length
    return None


def window(pixels: np.ndarray, significant_bits: int | None = None) -> tuple[int, int]:
    """(low, high) of the values that carry the image: 0..2^bits-1 when sBIT says so, else min..max."""
    lo, hi, _, _ = cv2.minMaxLoc(pixels)
    if significant_bits and 1 <= significant_bits < 16 and hi < (1 << significant_bits):
        return 0, (1 << significant_bits) - 1
    return int(lo), int(hi)


def to_equalization_input(pixels: np.ndarray, source_format: str, significant_bits: int | None = None) -> np.ndarray:
    """uint16 PNG/TIFF/JPEG 2000 -> uint8 through its window; everything else (uint8, DICOM) unchanged."""
    if pixels.dtype != np.uint16 or source_format == "DICOM":
        return pixels
    lo, hi = window(pixels, significant_bits)
    if hi <= lo:
        return np.zeros(pixels.shape, np.uint8)
    scale = 255.0 / (hi - lo)
    return cv2.convertScaleAbs(pixels, alpha=scale, beta=-lo * scale)  # rounds and saturates in one pass
