"""Augmentation that takes away the cues by which a model can tell one source of films from another.

Why: when each class comes from its own collections, a network separates them by what differs between the
collections (how large the original film was, so how sharp it looks after the resize; its contrast curve and
grey level; the frame, padding and burnt-in text at its border) instead of by the lungs. Each minibatch here gets
random resized crops (scale, framing), gamma and contrast jitter (intensity curve), blur and noise (resolution
and detector) and border masking (frame and markers), so none of those cues is stable enough to learn.

Runs in NumPy/OpenCV on the uint8 minibatch before it reaches the model (tf.data generator, cxr.train.keras_fit):
nothing is added to the model, so its saved form, the ONNX export and scoring are untouched. Seeded by
(seed, epoch): two runs with one seed train on the same pictures.
"""
from __future__ import annotations

from typing import Any, Mapping

import cv2
import numpy as np

from cxr.image.enhance import centre_cut, resize_square

DEFAULTS: dict[str, Any] = {
    "enabled": False,
    "crop_scale": [0.70, 1.0],     # area fraction of the random crop, resized back to the full side
    "crop_ratio": [0.85, 1.18],    # its aspect ratio
    "gamma": [0.7, 1.45],          # x -> x ** gamma on [0, 1]
    "contrast": [0.75, 1.25],      # around the image's mean
    "brightness": [-0.08, 0.08],   # added on [0, 1]
    "blur_p": 0.3,                 # probability of a Gaussian blur ...
    "blur_sigma": [0.4, 1.2],      # ... of this sigma, in pixels of the model's input
    "noise_p": 0.3,                # probability of Gaussian noise ...
    "noise_sd": [0.01, 0.04],      # ... of this standard deviation on [0, 1]
    "border_p": 0.5,               # probability of masking a band along each side ...
    "border_max": 0.10,            # ... up to this fraction of the side, filled black, white or the mean
}
# train.framing, its own switch (it runs with or without the rest): the probability that a film is re-framed as
# an archive of other shapes frames it, and the range of those shapes (width / height)
FRAMING_DEFAULTS: dict[str, Any] = {"p": 0.0, "aspect": [0.8, 1.25]}


def _filled(conf: Mapping[str, Any] | None, defaults: Mapping[str, Any], name: str) -> dict[str, Any]:
    unknown = set(conf or {}) - set(defaults)
    if unknown:   # a typo would silently do nothing
        raise ValueError(f"{name}: unknown keys {sorted(unknown)}; known: {sorted(defaults)}")
    return {**defaults, **(conf or {})}


def settings(conf: Mapping[str, Any] | None) -> dict[str, Any]:
    """train.site_augment with defaults filled in; unknown keys are refused."""
    return _filled(conf, DEFAULTS, "train.site_augment")


def framing_settings(conf: Mapping[str, Any] | None) -> dict[str, Any]:
    """train.framing with defaults filled in; unknown keys are refused."""
    return _filled(conf, FRAMING_DEFAULTS, "train.framing")


def active(site: Mapping[str, Any] | None, framing: Mapping[str, Any] | None = None) -> bool:
    return bool((site or {}).get("enabled")) or float((framing or {}).get("p", 0.0)) > 0


def _uniform(rng: np.random.Generator, bounds) -> float:
    lo, hi = (float(b) for b in bounds)
    return float(rng.uniform(lo, hi)) if hi > lo else lo


def _crop(image: np.ndarray, rng: np.random.Generator, scale, ratio) -> np.ndarray:
    h, w = image.shape
    area = _uniform(rng, scale) * h * w
    r = float(np.exp(_uniform(rng, np.log(np.asarray(ratio, np.float64)))))
    ch = int(round(min(h, np.sqrt(area / r))))
    cw = int(round(min(w, np.sqrt(area * r))))
    if ch >= h and cw >= w:
        return image
    top = int(rng.integers(0, h - ch + 1))
    left = int(rng.integers(0, w - cw + 1))
    return cv2.resize(image[top:top + ch, left:left + cw], (w, h), interpolation=cv2.INTER_LINEAR)


def _content_box(image: np.ndarray) -> tuple[int, int, int, int]:
    """The film inside the bands `pad` added (constant rows or columns at the edges): top, bottom, left, right."""
    rows = np.flatnonzero(image.max(axis=1) != image.min(axis=1))
    cols = np.flatnonzero(image.max(axis=0) != image.min(axis=0))
    if not len(rows) or not len(cols):
        return 0, image.shape[0], 0, image.shape[1]
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def reframe(image: np.ndarray, aspect: float) -> np.ndarray:
    """A square model input: its film (bands taken off) cut at its centre to width/height = aspect, then padded
    back to the square as the preprocess job pads (cxr.image.enhance): what the same film looks like from an
    archive whose films have another shape. Only cuts, never invents pixels. Why: every NIH NORMAL film is square
    and most COVID films are landscape, so with `pad` the bands' shape names the class (docs/sources.md,
    "Framing")."""
    top, bottom, left, right = _content_box(image)
    return resize_square(centre_cut(image[top:bottom, left:right], aspect), image.shape[0], "pad")


def _mask_borders(x: np.ndarray, rng: np.random.Generator, p: float, most: float) -> None:
    h, w = x.shape
    fill = (0.0, 1.0, float(x.mean()))[int(rng.integers(3))]
    for side in range(4):
        if rng.random() >= p:
            continue
        n = int(rng.integers(1, max(2, int(most * (h if side < 2 else w)) + 1)))
        if side == 0:
            x[:n] = fill
        elif side == 1:
            x[h - n:] = fill
        elif side == 2:
            x[:, :n] = fill
        else:
            x[:, w - n:] = fill


def augment_image(image: np.ndarray, rng: np.random.Generator, conf: Mapping[str, Any],
                  framing: Mapping[str, Any] | None = None) -> np.ndarray:
    """One uint8 (H, W) image -> an augmented uint8 (H, W) image (conf: settings(); framing: framing_settings(),
    applied first; with the site augmentation off, the only step)."""
    img = image
    p = float((framing or {}).get("p", 0.0))
    if p > 0 and rng.random() < p:
        img = reframe(img, float(np.exp(_uniform(rng, np.log(np.asarray(framing["aspect"], np.float64))))))
    if not conf.get("enabled"):
        return img
    img = _crop(img, rng, conf["crop_scale"], conf["crop_ratio"])
    x = img.astype(np.float32) / 255.0
    x = np.power(x, _uniform(rng, conf["gamma"]), dtype=np.float32)
    mean = float(x.mean())
    x = (x - mean) * _uniform(rng, conf["contrast"]) + mean + _uniform(rng, conf["brightness"])
    if rng.random() < float(conf["blur_p"]):
        x = cv2.GaussianBlur(x, (0, 0), _uniform(rng, conf["blur_sigma"]))
    if rng.random() < float(conf["noise_p"]):
        x = x + rng.normal(0.0, _uniform(rng, conf["noise_sd"]), x.shape).astype(np.float32)
    _mask_borders(x, rng, float(conf["border_p"]), float(conf["border_max"]))
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


def augment_batch(images: np.ndarray, rng: np.random.Generator, conf: Mapping[str, Any],
                  framing: Mapping[str, Any] | None = None) -> np.ndarray:
    """A uint8 minibatch (b, H, W) -> its augmented copy (the input is left as it is)."""
    return np.stack([augment_image(im, rng, conf, framing) for im in images]) if len(images) else images.copy()


def epoch_rng(seed: int, epoch: int) -> np.random.Generator:
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch), 7])
