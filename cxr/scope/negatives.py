"""Pictures that are not frontal chest radiographs, made from what the project has: frontal films re-framed so
that they stop being one, and rendered radiographs of other body parts.

Why: the frontal-film check (cxr.scope.frontal) is trained with outlier exposure (Hendrycks et al., 2019), and
the hardest out-of-scope files a site sends are other radiographs: laterals, limbs, a pelvis, a film loaded the
wrong way round. No real lateral or limb film is in ../shared, so these stand in for them: the grey levels and
textures of real films with the frontal layout (two lung fields either side of a vertical spine, the heart on
one side) taken away. What they cannot stand for is said in docs/scope_gate.md.

Every function takes a gray uint8 picture (any size) and a numpy Generator and returns a gray uint8 picture;
the same generator state gives the same picture.
"""
from __future__ import annotations

from typing import Callable

import cv2
import numpy as np

# ---------------------------------------------------------------------------------------------- re-framed films


def rotated_90(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A film loaded sideways (either way)."""
    return np.ascontiguousarray(np.rot90(img, 1 if rng.random() < 0.5 else 3))


def rotated_180(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Upside down (a rotation by 180 degrees; half of them also mirrored: upside down, the heart on either side)."""
    out = np.rot90(img, 2)
    return np.ascontiguousarray(out[:, ::-1] if rng.random() < 0.5 else out)


def _half(img: np.ndarray, rng: np.random.Generator, frac: tuple[float, float] = (0.45, 0.55)) -> np.ndarray:
    """The left or right part of a film, cut near its middle (the spine)."""
    w = img.shape[1]
    cut = int(round(w * rng.uniform(*frac)))
    return img[:, :cut] if rng.random() < 0.5 else img[:, cut:][:, ::-1]   # always outer side on the left


def mirrored_one_side(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One side of a film and its mirror image side by side: two copies of one lung, no heart shadow on one side
    only; a film no X-ray tube makes."""
    half = _half(img, rng)
    pair = np.concatenate([half, half[:, ::-1]], axis=1)
    return np.ascontiguousarray(pair if rng.random() < 0.5 else pair[:, ::-1])


def one_lung(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A film cut to one lung: the outer part of one side, with or without the spine."""
    w = img.shape[1]
    half = _half(img, rng, (0.42, 0.62))
    out = half[:, :max(8, int(half.shape[1] * rng.uniform(0.75, 1.0)))]
    if rng.random() < 0.5:
        out = out[:, ::-1]
    return np.ascontiguousarray(out) if out.shape[1] < w else np.ascontiguousarray(half)


def lungs_cut_away(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """What is left of a film with the lungs cut away: the neck and shoulders, or the abdomen below the
    diaphragm."""
    h = img.shape[0]
    if rng.random() < 0.5:
        return np.ascontiguousarray(img[:int(h * rng.uniform(0.15, 0.28))])
    return np.ascontiguousarray(img[int(h * rng.uniform(0.68, 0.8)):])


def lateral_like(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A lateral-like re-framing: a narrow upright strip of one lung and the spine, squeezed further
    (a tall picture of one lung field beside a band of bone), as a lateral chest film is framed."""
    h, w = img.shape
    centre = w // 2
    left = int(centre - w * rng.uniform(0.02, 0.12))
    right = int(centre + w * rng.uniform(0.25, 0.42))
    strip = img[int(h * rng.uniform(0.0, 0.08)):int(h * rng.uniform(0.85, 1.0)), max(0, left):min(w, right)]
    if rng.random() < 0.5:
        strip = strip[:, ::-1]
    squeeze = rng.uniform(0.6, 1.0)
    strip = cv2.resize(strip, (max(8, int(strip.shape[1] * squeeze)), strip.shape[0]), interpolation=cv2.INTER_AREA)
    if rng.random() < 0.5:   # a lateral is usually framed square on the detector: pad its sides
        pad = (strip.shape[0] - strip.shape[1]) // 2
        fill = int(np.median(strip[:, :4]))
        strip = cv2.copyMakeBorder(strip, 0, 0, pad // 2, pad - pad // 2, cv2.BORDER_CONSTANT, value=fill)
    return np.ascontiguousarray(strip)


def corner_zoom(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A corner of a film enlarged (a detail view, a cone-down): a quarter or less of the chest."""
    h, w = img.shape
    side = rng.uniform(0.3, 0.5)
    y = int(rng.uniform(0, 1 - side) * h)
    x = int(rng.uniform(0, 1 - side) * w)
    return np.ascontiguousarray(img[y:y + int(side * h), x:x + int(side * w)])


REFRAMINGS: dict[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]] = {
    "rotated_90": rotated_90, "rotated_180": rotated_180, "mirrored_one_side": mirrored_one_side,
    "one_lung": one_lung, "lungs_cut_away": lungs_cut_away, "lateral_like": lateral_like,
    "corner_zoom": corner_zoom,
}

# ---------------------------------------------------------------------------------------------- rendered radiographs


def _film(canvas: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Attenuation (float, bone ~1) -> a radiograph-looking uint8: mottled texture (trabeculae, soft tissue), a
    random pose (rotation, zoom, shift), blur, exposure, noise, sometimes inverted."""
    h, w = canvas.shape
    texture = sum(cv2.resize(rng.standard_normal((c, c)).astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC)
                  / (k + 1) for k, c in enumerate((4, 11, 29, 67)))
    canvas = canvas * (1 + rng.uniform(0.05, 0.2) * texture) + rng.uniform(0, 0.1) * np.linspace(0, 1, w)[None, :]
    m = cv2.getRotationMatrix2D((w / 2, h / 2), rng.uniform(-35, 35), rng.uniform(0.8, 1.3))
    m[:, 2] += rng.uniform(-0.1, 0.1, 2) * (w, h)
    canvas = cv2.warpAffine(canvas.astype(np.float32), m, (w, h), borderMode=cv2.BORDER_REFLECT)
    img = cv2.GaussianBlur(canvas, (0, 0), rng.uniform(1.0, 3.0))
    img = np.clip(img, 0, None) ** rng.uniform(0.7, 1.3)
    img = img * rng.uniform(0.6, 0.9) + rng.uniform(0.02, 0.15)
    img = img + rng.uniform(0.01, 0.04) * rng.standard_normal(img.shape).astype(np.float32)
    if rng.random() < 0.1:
        img = 1 - img
    return np.clip(img * 255, 0, 255).astype(np.uint8)


def _bone(canvas, p0, p1, width, rng, value=1.0) -> None:
    """A long bone: a shaft with a brighter cortex and rounded ends."""
    p0, p1 = tuple(int(v) for v in p0), tuple(int(v) for v in p1)
    w = max(2, int(width))
    cv2.line(canvas, p0, p1, 0.55 * value, w, cv2.LINE_AA)
    cv2.line(canvas, p0, p1, 0.8 * value, max(1, w // 4), cv2.LINE_AA)
    for p in (p0, p1):
        cv2.circle(canvas, p, int(w * rng.uniform(0.6, 0.9)), 0.7 * value, -1, cv2.LINE_AA)


def _soft(canvas, rng, centre, axes, angle) -> None:
    cv2.ellipse(canvas, tuple(int(v) for v in centre), tuple(int(v) for v in axes), angle, 0, 360,
                float(rng.uniform(0.18, 0.3)), -1, cv2.LINE_AA)


def render_limb(rng: np.random.Generator, size: int = 256) -> np.ndarray:
    """A long-bone film: a knee, an elbow, a forearm or a leg (one or two bones meeting at a joint)."""
    h, w = size, int(size * rng.uniform(0.6, 1.0))
    c = np.zeros((h, w), np.float32)
    x = w * rng.uniform(0.4, 0.6)
    _soft(c, rng, (x, h / 2), (w * rng.uniform(0.2, 0.35), h * 0.7), rng.uniform(-8, 8))
    joint = h * rng.uniform(0.35, 0.65)
    tilt = rng.uniform(-0.25, 0.25) * w
    bw = w * rng.uniform(0.08, 0.16)
    _bone(c, (x, -10), (x + tilt * 0.2, joint - bw * 0.6), bw, rng)
    pair = rng.random() < 0.5
    for dx in ((-0.35, 0.4) if pair else (0.0,)):
        _bone(c, (x + tilt * 0.2 + dx * bw * 2, joint + bw * 0.6), (x + tilt + dx * bw * 2.5, h + 10),
              bw * (0.55 if pair else 0.9), rng)
    if rng.random() < 0.5:   # a patella / small bones at the joint
        cv2.circle(c, (int(x + bw * 0.8), int(joint)), int(bw * 0.5), 0.6, -1, cv2.LINE_AA)
    return _film(c, rng)


def render_hand(rng: np.random.Generator, size: int = 256) -> np.ndarray:
    """A hand or foot film: a palm of short bones and five rays of phalanges."""
    h, w = size, int(size * rng.uniform(0.7, 1.0))
    c = np.zeros((h, w), np.float32)
    base = np.array([w * 0.5, h * rng.uniform(0.8, 0.95)])
    _soft(c, rng, (base[0], h * 0.55), (w * 0.35, h * 0.45), rng.uniform(-10, 10))
    spread = rng.uniform(0.35, 0.7)
    for i, a in enumerate(np.linspace(-spread, spread, 5) + rng.uniform(-0.1, 0.1)):
        d = np.array([np.sin(a), -np.cos(a)])
        p = base + d * h * 0.12
        length = h * rng.uniform(0.12, 0.2) * (0.7 if i in (0, 4) else 1.0)
        bw = w * rng.uniform(0.03, 0.05)
        for _ in range(3 if i else 2):
            q = p + d * length
            _bone(c, p, q, bw, rng)
            p, length, bw = q + d * bw * 0.8, length * 0.72, bw * 0.85
    for _ in range(8):   # carpals
        cv2.circle(c, (int(base[0] + rng.uniform(-0.15, 0.15) * w), int(base[1] - rng.uniform(0, 0.12) * h)),
                   int(w * rng.uniform(0.025, 0.045)), 0.6, -1, cv2.LINE_AA)
    return _film(c, rng)


def render_pelvis(rng: np.random.Generator, size: int = 256) -> np.ndarray:
    """An AP pelvis film: the iliac wings, the pelvic ring, both hips with the upper femora."""
    h, w = size, int(size * rng.uniform(1.0, 1.3))
    c = np.full((h, w), 0.2, np.float32)
    cx, cy = w / 2, h * rng.uniform(0.4, 0.55)
    for s in (-1, 1):
        cv2.ellipse(c, (int(cx + s * w * 0.22), int(cy - h * 0.12)), (int(w * 0.2), int(h * 0.22)),
                    s * rng.uniform(15, 35), 0, 360, 0.55, -1, cv2.LINE_AA)                       # iliac wing
        head = (int(cx + s * w * 0.28), int(cy + h * 0.15))
        cv2.circle(c, head, int(h * 0.08), 0.75, -1, cv2.LINE_AA)                                 # femoral head
        _bone(c, head, (cx + s * w * rng.uniform(0.3, 0.4), h + 10), w * 0.09, rng)               # femur
    cv2.ellipse(c, (int(cx), int(cy + h * 0.12)), (int(w * 0.14), int(h * 0.13)), 0, 0, 360, 0.25, -1,
                cv2.LINE_AA)                                                                      # the ring's hole
    cv2.rectangle(c, (int(cx - w * 0.05), 0), (int(cx + w * 0.05), int(cy)), 0.6, -1)             # sacrum, spine
    return _film(c, rng)


def render_skull_or_spine(rng: np.random.Generator, size: int = 256) -> np.ndarray:
    """A skull (a bright oval vault) or a lateral spine (a column of stacked vertebrae)."""
    h, w = size, int(size * rng.uniform(0.7, 1.0))
    c = np.zeros((h, w), np.float32)
    if rng.random() < 0.5:
        ax = (int(w * rng.uniform(0.35, 0.45)), int(h * rng.uniform(0.38, 0.46)))
        cv2.ellipse(c, (w // 2, h // 2), ax, 0, 0, 360, 0.8, -1, cv2.LINE_AA)
        cv2.ellipse(c, (w // 2, h // 2), (int(ax[0] * 0.9), int(ax[1] * 0.9)), 0, 0, 360, 0.35, -1, cv2.LINE_AA)
        cv2.ellipse(c, (w // 2, int(h * 0.7)), (int(w * 0.25), int(h * 0.15)), 0, 0, 180, 0.7, -1, cv2.LINE_AA)
    else:
        _soft(c, rng, (w / 2, h / 2), (w * 0.4, h * 0.6), 0)
        x, y = w * rng.uniform(0.4, 0.6), -5.0
        while y < h:
            hh = h * rng.uniform(0.07, 0.1)
            cv2.rectangle(c, (int(x - w * 0.1), int(y)), (int(x + w * 0.1), int(y + hh)), 0.65, -1)
            y += hh * 1.25
            x += rng.uniform(-0.01, 0.01) * w
    return _film(c, rng)


def render_ct_slice(rng: np.random.Generator, size: int = 256) -> np.ndarray:
    """An axial CT slice as a picture: a round body on black, two dark lungs or round organs, a vertebra."""
    c = np.zeros((size, size), np.float32)
    ax = (int(size * rng.uniform(0.35, 0.46)), int(size * rng.uniform(0.25, 0.36)))
    cv2.ellipse(c, (size // 2, size // 2), ax, 0, 0, 360, 0.45, -1, cv2.LINE_AA)
    if rng.random() < 0.6:   # a chest slice: two lungs
        for s in (-1, 1):
            cv2.ellipse(c, (int(size / 2 + s * ax[0] * 0.45), size // 2), (int(ax[0] * 0.35), int(ax[1] * 0.7)),
                        0, 0, 360, 0.05, -1, cv2.LINE_AA)
    else:
        for _ in range(int(rng.integers(2, 6))):
            cv2.circle(c, (int(size / 2 + rng.uniform(-0.5, 0.5) * ax[0]), int(size / 2 + rng.uniform(-0.4, 0.4)
                                                                               * ax[1])),
                       int(size * rng.uniform(0.04, 0.12)), float(rng.uniform(0.3, 0.6)), -1, cv2.LINE_AA)
    cv2.circle(c, (size // 2, int(size / 2 + ax[1] * 0.7)), int(size * 0.05), 0.9, -1, cv2.LINE_AA)
    if rng.random() < 0.5:
        c = np.ascontiguousarray(np.rot90(c, int(rng.integers(4))))
    img = cv2.GaussianBlur(c, (0, 0), rng.uniform(0.6, 1.5)) + 0.02 * rng.standard_normal(c.shape).astype(np.float32)
    return np.clip(img * 255, 0, 255).astype(np.uint8)


RENDERED: dict[str, Callable[[np.random.Generator], np.ndarray]] = {
    "rendered_limb": render_limb, "rendered_hand": render_hand, "rendered_pelvis": render_pelvis,
    "rendered_skull_spine": render_skull_or_spine, "rendered_ct_slice": render_ct_slice,
}

# ---------------------------------------------------------------------------------------------- pictures
def _colour(rng) -> tuple[int, int, int]:
    return tuple(int(c) for c in rng.integers(0, 256, 3))


def _smooth_noise(rng, h: int, w: int, cells: int) -> np.ndarray:
    small = rng.standard_normal((cells, cells, 3)).astype(np.float32)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)


def render_picture(kind: str, rng: np.random.Generator) -> np.ndarray:
    """One (H, W, 3) uint8 BGR picture of `kind` (shapes | gradients | text | textures), 256-512 px a side."""
    h, w = (int(v) for v in rng.integers(256, 513, 2))
    if kind == "shapes":
        img = np.full((h, w, 3), _colour(rng), np.uint8)
        for _ in range(int(rng.integers(4, 16))):
            c, what = _colour(rng), rng.integers(4)
            x, y, r = int(rng.integers(w)), int(rng.integers(h)), int(rng.integers(10, max(h, w) // 3))
            if what == 0:
                cv2.circle(img, (x, y), r, c, -1, cv2.LINE_AA)
            elif what == 1:
                cv2.rectangle(img, (x, y), (x + r, y + int(rng.integers(10, h // 2))), c, -1)
            elif what == 2:
                pts = rng.integers(0, [w, h], (int(rng.integers(3, 7)), 2)).astype(np.int32)
                cv2.fillPoly(img, [pts], c, cv2.LINE_AA)
            else:
                cv2.line(img, (x, y), (int(rng.integers(w)), int(rng.integers(h))), c, int(rng.integers(2, 12)))
    elif kind == "gradients":
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        if rng.random() < 0.5:
            angle = rng.uniform(0, np.pi)
            t = (xx * np.cos(angle) + yy * np.sin(angle)) / (w * abs(np.cos(angle)) + h * abs(np.sin(angle)))
        else:
            cx, cy = rng.uniform(0, w), rng.uniform(0, h)
            t = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2) / np.hypot(w, h)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        a, b = np.array(_colour(rng), np.float32), np.array(_colour(rng), np.float32)
        img = (a + (b - a) * t[..., None] ** rng.uniform(0.5, 2.0)).astype(np.uint8)
    elif kind == "text":
        img = np.full((h, w, 3), _colour(rng) if rng.random() < 0.3 else (245, 245, 240), np.uint8)
        ink = (20, 20, 20) if img.mean() > 128 else (235, 235, 235)
        words = ("chest", "report", "patient", "invoice", "total", "lorem", "ipsum", "dolor", "2025", "scan",
                 "meeting", "page", "figure", "table", "result", "normal", "notes", "qty", "EUR", "ok")
        fonts = (cv2.FONT_HERSHEY_SIMPLEX, cv2.FONT_HERSHEY_DUPLEX, cv2.FONT_HERSHEY_COMPLEX,
                 cv2.FONT_HERSHEY_PLAIN, cv2.FONT_HERSHEY_TRIPLEX)
        font, scale = fonts[int(rng.integers(len(fonts)))], rng.uniform(0.5, 1.3)
        step = int(32 * scale) + 6
        for y in range(step, h - 4, step):
            line = " ".join(words[int(j)] for j in rng.integers(0, len(words), int(rng.integers(2, 9))))
            cv2.putText(img, line, (int(rng.integers(4, 24)), y), font, scale, ink, 1 + int(scale > 1), cv2.LINE_AA)
    elif kind == "textures":
        noise = sum(_smooth_noise(rng, h, w, cells) / (k + 1) for k, cells in enumerate((3, 7, 17, 41, 101)))
        noise += 0.15 * rng.standard_normal((h, w, 3)).astype(np.float32)
        img = noise * rng.uniform(20, 60) + np.array(_colour(rng), np.float32)
        if rng.random() < 0.5:                              # a "landscape": a horizon between sky and ground
            horizon = int(h * rng.uniform(0.3, 0.7))
            img[:horizon] = 0.4 * img[:horizon] + 0.6 * np.array(_colour(rng), np.float32)
        img = np.clip(img, 0, 255).astype(np.uint8)
    else:
        raise ValueError(f"unknown picture kind {kind!r}")
    return img
