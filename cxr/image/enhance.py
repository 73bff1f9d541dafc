"""Contrast, brightness and size steps of the study's preprocessing (section 3.1, Figure 1).

Works on 2-D grayscale uint8 or uint16 arrays; 16-bit images keep their full depth through equalization
and become uint8 only afterwards, so that no contrast is thrown away before it is redistributed.
"""
from __future__ import annotations

import cv2
import numpy as np

cv2.setNumThreads(1)  # Spark already runs one task per core; OpenCV's own threads would fight it

RESIZE_MODES = ("stretch", "pad", "crop")


def _levels(image: np.ndarray) -> int:
    if image.dtype == np.uint8:
        return 256
    if image.dtype == np.uint16:
        return 65536
    raise TypeError(f"expected a uint8 or uint16 image, got {image.dtype}")


def equalize_hist(image: np.ndarray) -> np.ndarray:
    """The study's histogram equalization: T(i) = (cdf(i) - cdf_min) / (M*N - cdf_min), scaled to the top level.

    cdf_min is the cdf at the lowest intensity present. The product is taken in float32 and rounded to
    nearest, as OpenCV does, which makes the result equal to cv2.equalizeHist on uint8 images bit for bit
    (the study's real-valued formula differs from it by at most one level, from rounding alone).
    """
    levels = _levels(image)
    hist = np.bincount(image.ravel(), minlength=levels)
    nonzero = np.flatnonzero(hist)
    first = int(nonzero[0])
    total = image.size
    if hist[first] == total:  # one intensity only: nothing to spread
        return image.copy()
    cdf = np.cumsum(hist, dtype=np.int64)
    scale = np.float32(levels - 1) / np.float32(total - hist[first])
    lut = np.rint((cdf - cdf[first]).astype(np.float32) * scale)
    lut[:first] = 0
    return lut.astype(image.dtype)[image]


def clahe(image: np.ndarray, clip_limit: float = 2.0, tile_grid: int = 8) -> np.ndarray:
    """OpenCV's contrast-limited adaptive equalization (accepts uint8 and uint16)."""
    _levels(image)
    return cv2.createCLAHE(clipLimit=float(clip_limit), tileGridSize=(int(tile_grid), int(tile_grid))).apply(image)


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Full-range uint16 to uint8 by rounding x/257 (65535 -> 255), never by dropping the high byte."""
    if image.dtype == np.uint8:
        return image
    _levels(image)
    return cv2.convertScaleAbs(image, alpha=1.0 / 257.0)


def adjust_brightness(image: np.ndarray, alpha: float = 1.0, beta: float = 10.0) -> np.ndarray:
    """The study's brightness step after equalization: saturate(alpha * x + beta) on uint8."""
    if image.dtype != np.uint8:
        raise TypeError("brightness is applied to the uint8 image")
    if alpha == 1.0 and beta == 0.0:
        return image
    return cv2.convertScaleAbs(image, alpha=float(alpha), beta=float(beta))


def _border_value(image: np.ndarray) -> int:
    edges = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
    return int(np.median(edges))


def to_square(image: np.ndarray, mode: str) -> np.ndarray:
    """pad: keep the aspect ratio, filling with the border's median value; crop: keep the centre square."""
    h, w = image.shape
    if mode == "stretch" or h == w:
        return image
    if mode == "crop":
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        return image[top:top + side, left:left + side]
    if mode == "pad":
        side = max(h, w)
        top, left = (side - h) // 2, (side - w) // 2
        return cv2.copyMakeBorder(image, top, side - h - top, left, side - w - left,
                                  cv2.BORDER_CONSTANT, value=_border_value(image))
    raise ValueError(f"unknown resize mode {mode!r}; expected one of {RESIZE_MODES}")


def centre_cut(image: np.ndarray, aspect: float) -> np.ndarray:
    """The image cut at its centre to width / height = aspect (only cut, never padded): the same film as an archive
    whose films have another shape would hold it."""
    h, w = image.shape[:2]
    if w / h > aspect:
        cut = max(1, int(round(h * aspect)))
        return image[:, (w - cut) // 2:(w - cut) // 2 + cut]
    cut = max(1, int(round(w / aspect)))
    return image[(h - cut) // 2:(h - cut) // 2 + cut]


def resize_square(image: np.ndarray, size: int, mode: str = "stretch") -> np.ndarray:
    """size x size; INTER_AREA when shrinking (no aliasing), INTER_LINEAR when enlarging."""
    square = to_square(image, mode)
    h, w = square.shape
    if (h, w) == (size, size):
        return np.ascontiguousarray(square)
    shrinking = h * w >= size * size
    return cv2.resize(square, (size, size), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)
