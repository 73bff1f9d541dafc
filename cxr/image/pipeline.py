"""The per-image preprocessing function: bytes in, a size x size uint8 image out (or a RejectedImage).

This one function is what the preprocess job, the score job and the plain-multiprocessing benchmark all
call, so that a model is never fed images prepared differently from the ones it was trained on.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping

import numpy as np

from cxr.image.damage import ON_DAMAGED
from cxr.image.decode import DecodedImage, decode_image
from cxr.image.depth import to_equalization_input
from cxr.image.enhance import RESIZE_MODES, adjust_brightness, clahe, equalize_hist, resize_square, to_uint8

METHODS = ("clahe", "he", "none")
DECODE_REDUCTIONS = ("off", "auto")


@dataclass(frozen=True)
class PreprocessParams:
    size: int = 224
    method: str = "clahe"
    clip_limit: float = 2.0
    tile_grid: int = 8
    brightness_alpha: float = 1.0
    brightness_beta: float = 10.0
    resize_mode: str = "stretch"
    min_side: int = 64
    max_pixels: int = 100_000_000
    # Defaults below are what params recorded before these keys existed meant: full decode, damage rejected.
    decode_reduction: str = "off"  # auto: decode at 1/2, 1/4 or 1/8 while the short side stays >= 2 * size
    on_damaged: str = "reject"  # reject | flag (keep the image, its decoder warnings in decode_warnings)
    time_limit_s: float = 10.0  # per file, in the worker: a slower decode becomes an errors row (0 = none)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown equalization method {self.method!r}; expected one of {METHODS}")
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"unknown resize mode {self.resize_mode!r}; expected one of {RESIZE_MODES}")
        if not 8 <= self.size <= 4096:
            raise ValueError(f"size must be between 8 and 4096 pixels, got {self.size}")
        if self.clip_limit <= 0 or self.tile_grid < 1:
            raise ValueError("clip_limit must be > 0 and tile_grid >= 1")
        if self.decode_reduction not in DECODE_REDUCTIONS:
            raise ValueError(f"unknown decode_reduction {self.decode_reduction!r}; expected one of {DECODE_REDUCTIONS}")
        if self.on_damaged not in ON_DAMAGED:
            raise ValueError(f"unknown on_damaged {self.on_damaged!r}; expected one of {ON_DAMAGED}")

    @classmethod
    def from_config(cls, pre: Mapping[str, Any]) -> "PreprocessParams":
        bright = pre.get("brightness", {})
        return cls(size=int(pre["size"]), method=str(pre["method"]), clip_limit=float(pre["clip_limit"]),
                   tile_grid=int(pre["tile_grid"]), brightness_alpha=float(bright.get("alpha", 1.0)),
                   brightness_beta=float(bright.get("beta", 0.0)), resize_mode=str(pre.get("resize_mode", "stretch")),
                   min_side=int(pre["min_side"]), max_pixels=int(pre["max_pixels"]),
                   decode_reduction=str(pre.get("decode_reduction", "off")),
                   on_damaged=str(pre.get("on_damaged", "reject")), time_limit_s=float(pre.get("time_limit_s", 10.0)))

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> "PreprocessParams":
        """From to_dict()'s output, e.g. the params a model's metadata recorded (extra keys ignored)."""
        names = cls.__dataclass_fields__.keys()
        return cls(**{k: record[k] for k in names if k in record})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def reduce_to(self) -> int:
        """Short side a reduced decode must keep (twice the output), or 0 for a full decode."""
        return 2 * self.size if self.decode_reduction == "auto" else 0


def equalize(gray: np.ndarray, params: PreprocessParams) -> np.ndarray:
    if params.method == "clahe":
        return clahe(gray, params.clip_limit, params.tile_grid)
    if params.method == "he":
        return equalize_hist(gray)
    return gray


def preprocess_stages(gray: np.ndarray, params: PreprocessParams) -> dict[str, np.ndarray]:
    """Every intermediate image of the study's Figure 1, for panels and for checking one step at a time."""
    equalized = equalize(gray, params)
    bright = adjust_brightness(to_uint8(equalized), params.brightness_alpha, params.brightness_beta)
    return {"original": gray, "equalized": equalized, "brightness": bright,
            "resized": resize_square(bright, params.size, params.resize_mode)}


def preprocess_pixels(gray: np.ndarray, params: PreprocessParams) -> np.ndarray:
    return preprocess_stages(gray, params)["resized"]


def equalization_input(decoded: DecodedImage) -> np.ndarray:
    """The decoded pixels as equalisation takes them: 16-bit rasters through the window of their real depth."""
    return to_equalization_input(decoded.pixels, decoded.source_format, decoded.significant_bits)


def decode_with(data: bytes, params: PreprocessParams) -> DecodedImage:
    """decode_image as these params ask (size limits, reduced decode, damage policy): one place for every caller."""
    return decode_image(data, max_pixels=params.max_pixels, min_side=params.min_side,
                        reduce_to=params.reduce_to, on_damaged=params.on_damaged)


def preprocess_bytes(data: bytes, params: PreprocessParams) -> tuple[DecodedImage, np.ndarray]:
    """Decode, equalize, brighten, resize; raises RejectedImage with a reason for any unusable file."""
    decoded = decode_with(data, params)
    return decoded, preprocess_pixels(equalization_input(decoded), params)
