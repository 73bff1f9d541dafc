"""Synthetic chest-X-ray-like archive, so that `make demo` and the tests run anywhere without real data.

    python -m cxr.datasets.synth OUT [--per-class N] [--size S] [--seed K] [--no-broken] [--json]

writes

    OUT/COVID/   OUT/NORMAL/   OUT/VIRAL/    class folders: valid images in mixed formats, plus broken files
    OUT/MANIFEST.csv                         relative_path,class,patient_id,sha256 of every *valid* image

The images are drawn, not sampled from real data: a body with shoulders and neck, two dark lung fields,
heart shadow, spine, clavicles, ribs as faint bright arcs and vascular markings from the hila, then a
random pose (shift, scale, a few degrees of rotation), exposure, gamma, noise and occasionally ECG
electrodes or a lead marker. The three classes differ only in lung texture:

    NORMAL  clear lungs (normal vascular markings only)
    COVID   bilateral, peripheral, lower-zone patchy ground-glass opacities (soft blobs near the outer lung edges)
    VIRAL   diffuse perihilar / interstitial streaky reticular texture radiating from both hila

Every image's mean brightness is drawn from the same distribution whatever its class, so a
global-brightness classifier is at chance while texture separates the classes. Exposure, gamma and
contrast vary a lot on purpose: a CNN learns the classes in a few epochs at 64x64 when each image is
normalised (z-score, or histogram equalisation), much more slowly on raw [0, 1] pixels.

Per class there are at most 6 special-format files (DICOM, 16-bit PNG, RGB JPEG, RGBA PNG, BMP,
TIFF, upper-case extensions, a name with a space); the rest are 8-bit PNG and JPEG. With
per_class < 6 the lower-priority specials are left out (DICOM comes first).

Everything is a function of the seed: two runs with the same arguments give byte-identical files
(no timestamps in PNG/TIFF/DICOM, DICOM UIDs derived from the seed). Same bytes are guaranteed for
the same OpenCV/libjpeg/zlib/pydicom versions; another library version may encode differently.
"""

from __future__ import annotations

import argparse
import csv
import functools
import hashlib
import io
import json
import os
import shutil
import struct
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

CLASSES = ("COVID", "NORMAL", "VIRAL")
MANIFEST = "MANIFEST.csv"
MIN_SIZE = 32

# Formats of valid images. Value: (file extension, dtype of the decoded array, channels).
FORMATS = {
    "png8": (".png", "uint8", 1),
    "jpeg": (".jpg", "uint8", 1),
    "png16": (".png", "uint16", 1),        # full 16-bit range
    "png16_12bit": (".png", "uint16", 1),  # 12-bit detector values (max 4095) in a 16-bit PNG
    "jpeg_rgb": (".jpg", "uint8", 3),      # gray replicated to RGB with a slight tint
    "png_rgba": (".png", "uint8", 4),
    "bmp": (".bmp", "uint8", 1),
    "tiff": (".tif", "uint8", 1),
    "dicom_mono2": (".dcm", "uint16", 1),  # 12 bits stored in 16, MONOCHROME2 (0 = black)
    "dicom_mono1": (".dcm", "uint16", 1),  # 12 bits stored in 16, MONOCHROME1 (0 = white): must be inverted
}

# Special formats per class, in priority order (if per_class is smaller, the tail is dropped).
# A (format, extension override, name override) triple; None = default.
_SPECIALS = {
    "COVID": [("dicom_mono2", None, None), ("png16", None, None), ("jpeg_rgb", None, None),
              ("tiff", None, None), ("png8", ".PNG", None), ("jpeg", ".JPG", None)],
    "NORMAL": [("dicom_mono2", None, None), ("dicom_mono1", None, None), ("png16_12bit", None, None),
               ("png_rgba", None, None), ("png8", None, "space"), ("jpeg", ".JPG", None)],
    "VIRAL": [("dicom_mono2", None, None), ("png16", None, None), ("jpeg_rgb", None, None),
              ("bmp", None, None), ("png8", ".PNG", None)],
}


# --------------------------------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Anatomy:
    """Per-patient geometry (fractions of the image size). Images of one patient share it."""

    lung_w: float      # width of each lung field
    lung_h: float      # height of the lung fields
    lung_top: float    # y of the apices
    gap: float         # mediastinum width between the lungs
    asym: float        # right/left lung width ratio jitter
    heart_w: float
    heart_h: float
    body_w: float
    rib_spacing: float
    rib_drop: float
    vessel_seed: int


def random_anatomy(rng: np.random.Generator) -> Anatomy:
    return Anatomy(
        lung_w=rng.uniform(0.25, 0.30),
        lung_h=rng.uniform(0.52, 0.62),
        lung_top=rng.uniform(0.12, 0.17),
        gap=rng.uniform(0.10, 0.14),
        asym=rng.uniform(0.94, 1.04),
        heart_w=rng.uniform(0.14, 0.19),
        heart_h=rng.uniform(0.11, 0.15),
        body_w=rng.uniform(0.44, 0.50),
        rib_spacing=rng.uniform(0.052, 0.062),
        rib_drop=rng.uniform(0.10, 0.15),
        vessel_seed=int(rng.integers(2**31)),
    )


# Lung outline in lung-local coordinates: u 0 = medial .. 1 = lateral, v 0 = apex .. 1 = base
# (lateral costophrenic angle at the bottom outside, diaphragm dome along the bottom).
_LUNG_UV = np.array([
    (0.30, 0.00), (0.55, 0.03), (0.76, 0.15), (0.90, 0.35), (0.98, 0.60), (1.00, 0.84), (0.97, 1.00),
    (0.82, 0.93), (0.58, 0.85), (0.34, 0.86), (0.10, 0.93), (0.03, 0.72), (0.05, 0.42), (0.13, 0.14),
], dtype=np.float64)


def _chaikin(pts: np.ndarray, rounds: int = 3) -> np.ndarray:
    for _ in range(rounds):
        nxt = np.roll(pts, -1, axis=0)
        pts = np.stack([0.75 * pts + 0.25 * nxt, 0.25 * pts + 0.75 * nxt], axis=1).reshape(-1, 2)
    return pts


_LUNG_SMOOTH = _chaikin(_LUNG_UV)


class _Frame:
    """Canvas of size S with helpers mapping lung-local (u, v) coordinates to pixels."""

    def __init__(self, S: int, anat: Anatomy):
        self.S = S
        self.a = anat
        self.k = S / 256.0  # pixel scale relative to the 256 design size
        self.cx = 0.5 * S

    def lung_xy(self, side: int, u, v):
        """side -1 = image left (patient's right lung), +1 = image right (patient's left lung)."""
        a = self.a
        w = a.lung_w * (a.asym if side < 0 else 1.0)
        mx = 0.5 + side * a.gap / 2
        x = (mx + side * np.asarray(u) * w) * self.S
        y = (a.lung_top + np.asarray(v) * a.lung_h) * self.S
        return x, y

    def hilum(self, side: int):
        x, y = self.lung_xy(side, 0.12, 0.42)
        return float(x), float(y)


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    if sigma <= 0.3:
        return img
    return cv2.GaussianBlur(img, (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REPLICATE)


def _pts(x, y) -> np.ndarray:
    return np.round(np.stack([np.asarray(x), np.asarray(y)], axis=-1) * 16).astype(np.int32)


_SHIFT = 4  # cv2 drawing with 4 fractional bits: coordinates are multiplied by 16


def _polyline(layer, x, y, value, thickness):
    cv2.polylines(layer, [_pts(x, y)], False, value, max(1, int(round(thickness))), cv2.LINE_AA, _SHIFT)


def _body_mask(F: _Frame) -> np.ndarray:
    S, a = F.S, F.a
    m = np.zeros((S, S), np.uint8)
    c = (int(F.cx * 16), int(0.74 * S * 16))
    cv2.ellipse(m, c, (int(a.body_w * S * 16), int(0.72 * S * 16)), 0, 0, 360, 255, -1, cv2.LINE_AA, _SHIFT)
    cv2.ellipse(m, (int(F.cx * 16), int(0.17 * S * 16)), (int(0.56 * S * 16), int(0.14 * S * 16)),
                0, 0, 360, 255, -1, cv2.LINE_AA, _SHIFT)
    cv2.rectangle(m, (int(0.41 * S), 0), (int(0.59 * S), int(0.2 * S)), 255, -1)  # neck
    return _blur(m.astype(np.float32) / 255.0, 0.012 * S)


def _lung_mask(F: _Frame) -> tuple[np.ndarray, np.ndarray]:
    """Lung fields (1 inside) with the heart shadow taken out, and the heart mask."""
    S, a = F.S, F.a
    m = np.zeros((S, S), np.uint8)
    for side in (-1, 1):
        x, y = F.lung_xy(side, _LUNG_SMOOTH[:, 0], _LUNG_SMOOTH[:, 1])
        cv2.fillPoly(m, [_pts(x, y)], 255, cv2.LINE_AA, _SHIFT)
    lungs = _blur(m.astype(np.float32) / 255.0, 0.010 * S)
    h = np.zeros((S, S), np.uint8)
    hx, hy = F.cx + 0.055 * S, (a.lung_top + 0.80 * a.lung_h) * S
    cv2.ellipse(h, (int(hx * 16), int(hy * 16)), (int(a.heart_w * S * 16), int(a.heart_h * S * 16)),
                -18, 0, 360, 255, -1, cv2.LINE_AA, _SHIFT)
    # aortic knob
    cv2.circle(h, (int((F.cx + 0.045 * S) * 16), int((a.lung_top + 0.22 * a.lung_h) * S * 16)),
               int(0.035 * S * 16), 255, -1, cv2.LINE_AA, _SHIFT)
    heart = _blur(h.astype(np.float32) / 255.0, 0.012 * S)
    return lungs * (1.0 - 0.8 * heart), heart


def _bones(F: _Frame) -> tuple[np.ndarray, np.ndarray]:
    """(spine, ribs and clavicles) as two layers in [0, 1]."""
    S, a, k = F.S, F.a, F.k
    spine = np.zeros((S, S), np.uint8)
    # spine: vertebral bodies with disc spaces, and spinous processes
    sw = 0.034 * S
    y = 0.0
    while y < S:
        h = (0.040 + 0.006 * y / S) * S
        cv2.rectangle(spine, (int((F.cx - sw) * 16), int(y * 16)), (int((F.cx + sw) * 16), int((y + h * 0.8) * 16)),
                      170, -1, cv2.LINE_AA, _SHIFT)
        cv2.ellipse(spine, (int(F.cx * 16), int((y + h * 0.45) * 16)), (int(0.007 * S * 16), int(0.013 * S * 16)),
                    0, 0, 360, 255, -1, cv2.LINE_AA, _SHIFT)
        y += h
    ribs = np.zeros((S, S), np.uint8)
    # posterior ribs: from the spine out and slightly up, curving down at the lateral wall;
    # anterior ribs fainter, from the lateral wall down towards the sternum.
    n_ribs = 9
    t = np.linspace(0.0, 1.0, 24)
    for side in (-1, 1):
        for i in range(n_ribs):
            y0 = (a.lung_top - 0.02 + i * a.rib_spacing * (1 + 0.02 * i)) * S
            L = (a.lung_w + a.gap / 2 + 0.03) * S * (0.7 + 0.3 * min(1.0, i / 3))
            xs = F.cx + side * (0.03 * S + t * L)
            ys = y0 - 0.022 * S * np.sin(np.pi * t * 0.8) + a.rib_drop * S * t ** 2.2
            _polyline(ribs, xs, ys, 110, 0.016 * S)
            _polyline(ribs, xs, ys + 0.006 * S, 170, 0.005 * S)  # inferior cortex
            if i < 6:  # anterior rib, fading towards the sternum
                xa = F.cx + side * (L + 0.03 * S - t[:12] * 0.5 * L)
                ya = ys[-1] - 0.04 * S + t[:12] * 0.12 * S
                _polyline(ribs, xa, ya, 55, 0.014 * S)
        # clavicle
        xs = F.cx + side * (0.05 + t * 0.28) * S
        ys = (a.lung_top - 0.005) * S - t * 0.05 * S + 0.010 * S * np.sin(2 * np.pi * t)
        _polyline(ribs, xs, ys, 200, 0.022 * S)
    return _blur(spine.astype(np.float32) / 255.0, 0.8 * k), _blur(ribs.astype(np.float32) / 255.0, 0.7 * k)


def _branches(F, rng, layer, side, n, length, amp, width, spread, jitter, steps=5):
    """n lines radiating laterally from a hilum, each a slightly wandering polyline."""
    S = F.S
    hx, hy = F.hilum(side)
    # direction: into the lung, away from the mediastinum (angle 0 = lateral), wandering a little
    ang = rng.uniform(-spread, spread, (n, 1)) + np.cumsum(rng.normal(0, jitter, (n, steps)), axis=1)
    seg = rng.uniform(*length, (n, 1)) * S / steps
    x0 = hx + rng.normal(0, 0.015 * S, (n, 1))
    y0 = hy + rng.normal(0, 0.03 * S, (n, 1))
    xs = np.hstack([x0, x0 + side * np.cumsum(np.cos(ang) * seg, axis=1)])
    ys = np.hstack([y0, y0 + np.cumsum(np.sin(ang) * seg, axis=1)])
    pts = np.round(np.stack([xs, ys], axis=-1) * 16).astype(np.int32)
    vals = (255 * rng.uniform(*amp, n)).astype(int)
    thick = np.maximum(1, np.round(rng.uniform(*width, n) * F.k)).astype(int)
    for p, v, t in zip(pts, vals, thick):
        cv2.polylines(layer, [p], False, int(v), int(t), cv2.LINE_AA, _SHIFT)


def _vessels(F: _Frame, rng: np.random.Generator) -> np.ndarray:
    layer = np.zeros((F.S, F.S), np.uint8)
    for side in (-1, 1):
        _branches(F, rng, layer, side, n=int(rng.integers(10, 16)), length=(0.06, 0.16), amp=(0.25, 0.5),
                  width=(1.0, 2.0), spread=1.3, jitter=0.25)
    return _blur(layer.astype(np.float32) / 255.0, 0.8 * F.k)


def _covid(F: _Frame, rng: np.random.Generator, severity: float) -> np.ndarray:
    """Bilateral, peripheral, lower-zone patchy ground-glass opacities."""
    S = F.S
    layer = np.zeros((S, S), np.uint8)
    for side in (-1, 1):
        n = int(rng.integers(5, 10))
        u = rng.uniform(0.58, 0.97, n)
        v = np.where(rng.random(n) < 0.8, rng.uniform(0.50, 0.92, n), rng.uniform(0.25, 0.50, n))
        x, y = F.lung_xy(side, u, v)
        r = rng.uniform(0.045, 0.09, n) * S
        vals = (255 * rng.uniform(0.5, 1.0, n)).astype(int)
        for xi, yi, ri, vi in zip(x, y, r, vals):
            axes = (int(ri * 16), int(ri * rng.uniform(0.6, 1.0) * 16))
            cv2.ellipse(layer, (int(xi * 16), int(yi * 16)), axes, float(rng.uniform(0, 180)), 0, 360,
                        int(vi), -1, cv2.LINE_AA, _SHIFT)
    ggo = _blur(layer.astype(np.float32) / 255.0, 0.018 * S)
    # patchiness: low-frequency noise modulating the opacities
    patch = _smooth_noise(rng, S, 20)
    return ggo * np.clip(0.75 + 0.35 * patch, 0.2, 1.4) * (0.50 * severity)


def _viral(F: _Frame, rng: np.random.Generator, severity: float) -> np.ndarray:
    """Diffuse perihilar / interstitial streaky reticular texture, both lungs."""
    S, k = F.S, F.k
    layer = np.zeros((S, S), np.uint8)
    for side in (-1, 1):
        _branches(F, rng, layer, side, n=int(rng.integers(28, 44)), length=(0.12, 0.30), amp=(0.6, 1.0),
                  width=(2.0, 3.5), spread=1.45, jitter=0.22)
    streaks = _blur(layer.astype(np.float32) / 255.0, 0.7 * k)
    # reticular net: the zero crossings of band-passed noise form a mesh of thin curved lines
    h = (S + 1) // 2  # drawn at half resolution, then upsampled
    noise = rng.standard_normal((h, h), dtype=np.float32)
    band = cv2.resize(_blur(noise, 1.2 * k) - _blur(noise, 3.0 * k), (S, S), interpolation=cv2.INTER_LINEAR)
    band /= band.std() + 1e-6
    net = np.exp(-(band / 0.35) ** 2)
    # perihilar weighting, both sides
    r = np.arange(S, dtype=np.float32)
    w = np.zeros((S, S), np.float32)
    for side in (-1, 1):
        hx, hy = F.hilum(side)
        w = np.maximum(w, np.exp(-((r[None, :] - hx) / (0.22 * S)) ** 2) * np.exp(-((r[:, None] - hy) / (0.28 * S)) ** 2))
    return (0.20 * streaks * (0.5 + 0.5 * w) + 0.12 * net * w + 0.12 * w) * severity


def _extras(F: _Frame, rng: np.random.Generator, img: np.ndarray) -> None:
    """Class-independent clutter on the patient: ECG electrodes, sometimes."""
    S = F.S
    if rng.random() < 0.3:
        layer = np.zeros((S, S), np.uint8)
        for _ in range(int(rng.integers(1, 4))):
            x, y = rng.uniform(0.2, 0.8) * S, rng.uniform(0.15, 0.85) * S
            cv2.circle(layer, (int(x * 16), int(y * 16)), int(0.018 * S * 16), 255, -1, cv2.LINE_AA, _SHIFT)
            cv2.circle(layer, (int(x * 16), int(y * 16)), int(0.028 * S * 16), 110, max(1, int(F.k)),
                       cv2.LINE_AA, _SHIFT)
        img += 0.35 * _blur(layer.astype(np.float32) / 255.0, 0.5 * F.k)


def _marker(F: _Frame, rng: np.random.Generator, img: np.ndarray) -> None:
    """A lead side marker (on the detector, so drawn after the pose), sometimes."""
    S = F.S
    if rng.random() < 0.5:
        layer = np.zeros((S, S), np.uint8)
        corner_x = rng.uniform(0.04, 0.12) if rng.random() < 0.5 else rng.uniform(0.82, 0.87)
        cv2.putText(layer, "L" if rng.random() < 0.5 else "R", (int(corner_x * S), int(rng.uniform(0.08, 0.14) * S)),
                    cv2.FONT_HERSHEY_SIMPLEX, 0.9 * F.k, 255, max(1, int(round(2 * F.k))), cv2.LINE_AA)
        img += 0.8 * layer.astype(np.float32) / 255.0


@functools.lru_cache(maxsize=16)
def _anatomy_layers(anat: Anatomy, S: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What depends on the patient only (cached: a patient's images share it).

    Returns (base, lung_term, lungs): base = soft tissue + bones + vascular markings, lung_term = the
    lung air to subtract (scaled per image), lungs = the lung-field mask. Read-only arrays.
    """
    F = _Frame(S, anat)
    body = _body_mask(F)
    lungs, heart = _lung_mask(F)
    yy = np.linspace(0, 1, S, dtype=np.float32)[:, None]
    spine, ribs = _bones(F)
    base = 0.62 * body
    base += 0.12 * spine * body * (1.0 - 0.6 * heart) * (1.0 - 0.5 * yy)
    # ribs show best against the lungs' air, faintly over soft tissue
    base += 0.12 * ribs * body * (0.35 + 0.65 * lungs)
    base += 0.12 * _vessels(F, np.random.default_rng(anat.vessel_seed)) * lungs
    # the lungs are a little denser at the bases (overlying soft tissue)
    lung_term = lungs * (1.0 - 0.25 * yy)
    for a in (base, lung_term, lungs):
        a.flags.writeable = False
    return base, lung_term, lungs


def _smooth_noise(rng: np.random.Generator, S: int, cells: int) -> np.ndarray:
    """Smooth random field with unit std: cells x cells white noise, bicubic upsampled to S x S."""
    n = cv2.resize(rng.standard_normal((cells, cells), dtype=np.float32), (S, S), interpolation=cv2.INTER_CUBIC)
    return n / (n.std() + 1e-6)


def render_chest(label: str, size: int = 256, rng: np.random.Generator | int | None = None,
                 anatomy: Anatomy | None = None) -> np.ndarray:
    """One synthetic chest radiograph of class `label`: float32 (size, size) in [0, 1], 1 = white (bone)."""
    if label not in CLASSES:
        raise ValueError(f"label must be one of {CLASSES}, not {label!r}")
    if size < MIN_SIZE:
        raise ValueError(f"size must be at least {MIN_SIZE}")
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    anat = anatomy if anatomy is not None else random_anatomy(rng)
    S = int(size)
    F = _Frame(S, anat)

    base, lung_term, lungs = _anatomy_layers(anat, S)
    # attenuation map: soft tissue and bone, minus the air in the lungs
    img = base - rng.uniform(0.36, 0.44) * lung_term
    # faint class-independent mottling of the lung fields (overlapping vessels, soft tissue)
    img += 0.025 * lungs * _smooth_noise(rng, S, 13)
    severity = rng.uniform(0.7, 1.0)
    if label == "COVID":
        img += _covid(F, rng, severity) * lungs
    elif label == "VIRAL":
        img += _viral(F, rng, severity) * lungs
    _extras(F, rng, img)

    # pose: rotation of a few degrees, scale, shift; outside the canvas is air
    ang = rng.uniform(-4.0, 4.0)
    scale = rng.uniform(1.0, 1.14)
    M = cv2.getRotationMatrix2D((S / 2, 0.45 * S), ang, scale)
    M[:, 2] += rng.uniform(-0.04, 0.04, 2) * S
    img = cv2.warpAffine(img, M, (S, S), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0.0)
    _marker(F, rng, img)

    # exposure: heel-effect gradient, gamma, contrast; then a class-independent mean brightness
    gx = np.linspace(-1, 1, S, dtype=np.float32)
    img = img + rng.uniform(-0.04, 0.04) * gx[None, :] + rng.uniform(-0.04, 0.04) * gx[:, None]
    img = np.clip(img + 0.03, 0.0, None) ** rng.uniform(0.8, 1.25)
    target = rng.uniform(0.33, 0.58)
    contrast = rng.uniform(0.8, 1.25)
    img = (img - img.mean()) * contrast + target
    # detector blur and quantum noise (stronger in the darker, lower-dose regions)
    img = _blur(img, rng.uniform(0.3, 0.9) * F.k)
    sigma = rng.uniform(0.006, 0.022)
    img = img + sigma * rng.standard_normal((S, S), dtype=np.float32) * (1.2 - 0.6 * np.clip(img, 0, 1))
    return np.clip(img, 0.0, 1.0).astype(np.float32)


def sample_dataset(per_class: int = 40, size: int = 256, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """In-memory images without files: X float32 (3 * per_class, size, size), y int (index into CLASSES)."""
    X, y = [], []
    for ci, cls in enumerate(CLASSES):
        for i in range(per_class):
            X.append(render_chest(cls, size, np.random.default_rng([seed, ci, 7, i])))
            y.append(ci)
    return np.stack(X), np.array(y)


# --------------------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------------------

def _imencode(ext: str, arr: np.ndarray, params: list[int] | None = None) -> bytes:
    ok, buf = cv2.imencode(ext, arr, params or [])
    if not ok:  # pragma: no cover
        raise RuntimeError(f"OpenCV could not encode {ext}")
    return buf.tobytes()


def _to_u8(img: np.ndarray) -> np.ndarray:
    return np.round(img * 255.0).astype(np.uint8)


def _dicom_bytes(img: np.ndarray, *, mono1: bool, patient_id: str, uid_src: list[str], study_date: str) -> bytes:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    values = np.round(img * 4095.0).astype(np.uint16)
    if mono1:
        values = (4095 - values).astype(np.uint16)
    sop_class = "1.2.840.10008.5.1.4.1.1.1"  # Computed Radiography Image Storage
    sop_uid = generate_uid(entropy_srcs=uid_src + ["sop"])
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = generate_uid(entropy_srcs=["cxr-spark synth implementation"])
    meta.ImplementationVersionName = "CXRSYNTH_1"
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = generate_uid(entropy_srcs=uid_src + ["study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=uid_src + ["series"])
    ds.PatientID = patient_id
    ds.PatientName = f"SYNTHETIC^{patient_id}"
    ds.PatientSex = "O"
    ds.StudyDate = study_date
    ds.SeriesDate = study_date
    ds.ContentDate = study_date
    ds.StudyTime = "120000"
    ds.ContentTime = "120000"
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.Modality = "CR"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.Manufacturer = "cxr-spark synthetic"
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if mono1 else "MONOCHROME2"
    ds.Rows, ds.Columns = values.shape
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.WindowCenter = 2048
    ds.WindowWidth = 4096
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.PixelData = values.astype("<u2").tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def encode(img: np.ndarray, fmt: str, rng: np.random.Generator, *, patient_id: str = "", uid_src=(),
           study_date: str = "20200101") -> bytes:
    """Bytes of `img` (float [0, 1]) in one of FORMATS."""
    if fmt == "png8":
        return _imencode(".png", _to_u8(img))
    if fmt == "jpeg":
        return _imencode(".jpg", _to_u8(img), [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(85, 96))])
    if fmt == "png16":
        # real 16-bit content: a detector-like offset and most of the range
        return _imencode(".png", np.round(800 + img * 62000).astype(np.uint16))
    if fmt == "png16_12bit":
        return _imencode(".png", np.round(img * 4095).astype(np.uint16))
    if fmt == "jpeg_rgb":
        g = img[..., None]
        tint = np.array([0.93, 0.98, 1.0], np.float32)  # BGR: a slightly warm gray
        bgr = _to_u8(np.clip(g * tint + 0.01, 0, 1))
        return _imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 92])
    if fmt == "png_rgba":
        u8 = _to_u8(img)
        bgra = np.dstack([u8, u8, u8, np.full_like(u8, 255)])
        return _imencode(".png", bgra)
    if fmt == "bmp":
        return _imencode(".bmp", _to_u8(img))
    if fmt == "tiff":
        return _imencode(".tif", _to_u8(img))
    if fmt in ("dicom_mono2", "dicom_mono1"):
        return _dicom_bytes(img, mono1=fmt == "dicom_mono1", patient_id=patient_id, uid_src=list(uid_src),
                            study_date=study_date)
    raise ValueError(f"unknown format {fmt!r}")


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A PNG header that claims width x height 8-bit gray (correct CRC) and has no image data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IEND", b"")


_HTML_ERROR = b"""<!DOCTYPE html>
<html>
<head><title>502 Bad Gateway</title></head>
<body>
<center><h1>502 Bad Gateway</h1></center>
<p>The image you requested could not be downloaded. Please try again later.</p>
<hr><center>nginx</center>
</body>
</html>
"""

# Leading bytes of formats a reader might sniff; random junk must not start with one of them.
_MAGIC_FIRST = set(b"\x89\xff\x42\x49\x4d\x47\x52\x50\x00\x01\x0a\x3c\x44\x25\x1f\x78")


def _broken_files(seed: int, size: int) -> list[tuple[str, str, bytes, str]]:
    """(class, file name, bytes, what is wrong)."""
    rng = np.random.default_rng([seed, 99])
    real = encode(render_chest("COVID", size, np.random.default_rng([seed, 99, 1])), "jpeg", rng)
    junk = bytearray(rng.bytes(4096))
    while junk[0] in _MAGIC_FIRST:
        junk[0] = int(rng.integers(256))
    tiny = _imencode(".png", _to_u8(render_chest("NORMAL", MIN_SIZE, np.random.default_rng([seed, 99, 2]))
                                    [::4, ::4][:8, :8].copy()))
    return [
        ("COVID", "empty.png", b"", "empty file (0 bytes)"),
        ("COVID", "truncated.jpg", real[: len(real) // 2],
         f"truncated JPEG: first {len(real) // 2} of {len(real)} bytes, no end-of-image marker"),
        ("NORMAL", "download_error.png", _HTML_ERROR, "HTML error page saved with a .png name"),
        ("NORMAL", "random_bytes.jpg", bytes(junk), "4096 random bytes with a .jpg name"),
        ("VIRAL", "bomb_100000x100000.png", _bomb_png(),
         "decompression bomb: valid PNG signature and IHDR claiming 100000x100000, no image data"),
        ("VIRAL", "tiny_8x8.png", tiny, "valid 8x8 PNG, too small to be a chest X-ray"),
    ]


# --------------------------------------------------------------------------------------------------
# Archive
# --------------------------------------------------------------------------------------------------

def _plan_class(cls: str, ci: int, per_class: int, seed: int) -> list[dict]:
    """Formats, names and patients of one class's images."""
    rng = np.random.default_rng([seed, ci, 0])
    specials = _SPECIALS[cls][:per_class]
    slots = rng.permutation(per_class)[: len(specials)]
    plan = []
    for i in range(per_class):
        fmt = "png8" if rng.random() < 0.55 else "jpeg"
        plan.append({"index": i, "format": fmt, "ext": FORMATS[fmt][0], "space": False})
    for slot, (fmt, ext, name) in zip(slots, specials):
        plan[slot].update(format=fmt, ext=ext or FORMATS[fmt][0], space=name == "space")
    # patients: mostly one image, some with 2 or 3 (same anatomy, different pose/exposure/day)
    i = 0
    patient = 0
    while i < per_class:
        n = int(rng.choice([1, 2, 3], p=[0.6, 0.25, 0.15]))
        for j in range(i, min(per_class, i + n)):
            plan[j]["patient"] = patient
            plan[j]["visit"] = j - i
        i += n
        patient += 1
    return plan


_MANIFEST_HEADER = "relative_path,class,patient_id,sha256"


def _is_ours(out: Path) -> bool:
    """An earlier cxr.datasets.synth output: a MANIFEST.csv with our header, and no folders but the class folders."""
    try:
        with open(out / MANIFEST, encoding="utf-8") as f:
            header = f.readline().strip()
    except OSError:
        return False
    dirs = {p.name for p in out.iterdir() if p.is_dir()}
    return header == _MANIFEST_HEADER and dirs <= set(CLASSES)


def _prepare_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out} exists and is not a directory")
    if out.exists() and any(out.iterdir()):
        if not _is_ours(out):
            raise FileExistsError(f"{out} is not empty and does not look like an earlier cxr.datasets.synth output "
                                  f"(no {MANIFEST} with header {_MANIFEST_HEADER}); refusing to write into it")
        for cls in CLASSES:
            shutil.rmtree(out / cls, ignore_errors=True)
        (out / MANIFEST).unlink()
    out.mkdir(parents=True, exist_ok=True)


def generate_archive(out_dir, per_class: int = 40, size: int = 256, seed: int = 0, broken: bool = True) -> dict:
    """Write the synthetic archive to out_dir; return a summary dict (`python -m cxr.datasets.synth OUT --json` prints it).

    Summary keys: seed, per_class, size, classes (valid files per class, duplicate included),
    formats (valid files per format), n_valid, n_patients, images (one dict per valid file: path,
    class, format, patient_id, shape, dtype), duplicates ([{path, original}]), broken ([{path,
    class, problem}]), manifest (file name).

    Rewriting a directory made by an earlier run (MANIFEST.csv with this header, only class folders)
    replaces its class folders and manifest, leaving other files there alone; any other non-empty
    directory is refused (FileExistsError).
    """
    if per_class < 1:
        raise ValueError("per_class must be at least 1")
    if size < MIN_SIZE:
        raise ValueError(f"size must be at least {MIN_SIZE}")
    seed = int(seed)
    out = Path(out_dir)
    _prepare_out(out)

    images: list[dict] = []
    patient_base = 0
    for ci, cls in enumerate(CLASSES):
        (out / cls).mkdir()
        plan = _plan_class(cls, ci, per_class, seed)
        anats = {}
        for p in plan:
            pid = f"SYN{seed}-{patient_base + p['patient'] + 1:04d}"
            if p["patient"] not in anats:
                anats[p["patient"]] = random_anatomy(np.random.default_rng([seed, ci, 1, p["patient"]]))
            rng = np.random.default_rng([seed, ci, 2, p["index"]])
            img = render_chest(cls, size, rng, anats[p["patient"]])
            stem = f"{cls.lower()}_{p['index'] + 1:04d}"
            if p["space"]:
                stem = f"{cls.lower()} {p['index'] + 1:04d}"
            name = stem + p["ext"]
            day = 1 + 7 * p["visit"] + (p["patient"] % 20)
            data = encode(img, p["format"], rng, patient_id=pid,
                          uid_src=["cxr-synth", str(seed), cls, str(p["index"])],
                          study_date=f"2020{3 + p['patient'] % 9:02d}{min(day, 28):02d}")
            (out / cls / name).write_bytes(data)
            _, dtype, ch = FORMATS[p["format"]]
            shape = [size, size] if ch == 1 else [size, size, ch]
            images.append({"path": f"{cls}/{name}", "class": cls, "format": p["format"], "patient_id": pid,
                           "shape": shape, "dtype": dtype, "sha256": hashlib.sha256(data).hexdigest()})
        patient_base += max(p["patient"] for p in plan) + 1

    # one exact duplicate: a byte copy of a COVID image (an 8-bit PNG if there is one) under another name
    duplicates = []
    covid = [d for d in images if d["class"] == "COVID"]
    src = next((d for d in covid if d["format"] == "png8"), covid[0])
    if src is not None:
        stem, ext = os.path.splitext(src["path"])
        dup_path = f"{stem}_copy{ext}"
        shutil.copyfile(out / src["path"], out / dup_path)
        images.append(dict(src, path=dup_path))
        duplicates.append({"path": dup_path, "original": src["path"]})

    broken_list = []
    if broken:
        for cls, name, data, problem in _broken_files(seed, size):
            (out / cls / name).write_bytes(data)
            broken_list.append({"path": f"{cls}/{name}", "class": cls, "problem": problem})

    images.sort(key=lambda d: d["path"])
    with open(out / MANIFEST, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(_MANIFEST_HEADER.split(","))
        for d in images:
            w.writerow([d["path"], d["class"], d["patient_id"], d["sha256"]])

    formats: dict[str, int] = {}
    for d in images:
        formats[d["format"]] = formats.get(d["format"], 0) + 1
    summary = {
        "seed": seed,
        "per_class": per_class,
        "size": size,
        "classes": {c: sum(d["class"] == c for d in images) for c in CLASSES},
        "formats": dict(sorted(formats.items())),
        "n_valid": len(images),
        "n_patients": len({d["patient_id"] for d in images}),
        "images": images,
        "duplicates": duplicates,
        "broken": broken_list,
        "manifest": MANIFEST,
    }
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cxr.datasets.synth", description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="output directory (created; an earlier cxr.datasets.synth output is replaced)")
    ap.add_argument("--per-class", type=int, default=40, help="valid images per class (default 40)")
    ap.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    ap.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    ap.add_argument("--no-broken", action="store_true", help="do not write the broken files")
    ap.add_argument("--json", action="store_true", help="print the full summary as JSON")
    args = ap.parse_args(argv)
    try:
        s = generate_archive(args.out, per_class=args.per_class, size=args.size, seed=args.seed,
                             broken=not args.no_broken)
    except (ValueError, FileExistsError, NotADirectoryError) as e:
        print(f"cxr.datasets.synth: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(s, indent=1))
    else:
        counts = ", ".join(f"{c} {n}" for c, n in s["classes"].items())
        fmts = ", ".join(f"{f} {n}" for f, n in s["formats"].items())
        print(f"synthetic archive in {os.path.abspath(args.out)} (seed {s['seed']}, {s['size']}px): "
              f"{s['n_valid']} valid images ({counts}; {s['n_patients']} patients, "
              f"{len(s['duplicates'])} duplicate), {len(s['broken'])} broken files")
        print(f"formats: {fmts}")
        for b in s["broken"]:
            print(f"broken: {b['path']}: {b['problem']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
