"""How deep a uniform black or white frame runs along each side of a film.

Why: a black frame around an adult normal film (a collimated film, a scanned film's edge) makes the shipped
profile call it COVID more often than not (out of fold: recall 0.944 -> 0.411 with 8% of each side black;
docs/sources.md "Frames, resolution and markers"), and its training films almost never carry one (a band of at
least 4% on three sides or more: 3 of 1,037 films). The score job flags such a film as unlike the training films
instead of trusting its call.
"""
from __future__ import annotations

import numpy as np

LONG_SIDE = 256      # the film is measured on a strided copy about this long (a frame is large; speed matters)
MOST = 0.25          # no side is scanned deeper than this fraction
EXTREME = 0.06       # a frame line's mean lies within this fraction of the film's range from its black or white
FLAT = 0.02          # ... and its standard deviation under this fraction of the range
DEPTH = 0.04         # a side is framed from this depth on ...
SIDES = 3            # ... and a film when this many of its sides are


def _run(std: np.ndarray, mean: np.ndarray, lo: float, hi: float) -> int:
    span = hi - lo
    line = (std <= FLAT * span) & ((mean <= lo + EXTREME * span) | (mean >= hi - EXTREME * span))
    return int(np.argmin(line)) if not line.all() else len(line)


def margins(pixels: np.ndarray) -> tuple[float, float, float, float]:
    """(top, bottom, left, right): the fraction of the film's side covered by near-uniform lines at its black or
    white end, counted inwards from each edge (up to MOST). A line is measured over the middle half of its length,
    so a frame of another shade along the crossing sides does not hide it."""
    x = pixels if pixels.ndim == 2 else pixels.mean(axis=2)
    step = max(1, max(x.shape) // LONG_SIDE)
    x = x[::step, ::step]
    h, w = x.shape
    if h < 8 or w < 8:
        return 0.0, 0.0, 0.0, 0.0
    lo, hi = float(x.min()), float(x.max())
    if hi <= lo:
        return 0.0, 0.0, 0.0, 0.0
    dh, dw = max(1, int(h * MOST)), max(1, int(w * MOST))
    across = slice(w // 4, w - w // 4)   # the middle half of a row ...
    down = slice(h // 4, h - h // 4)     # ... and of a column
    strips = (x[:dh, across], x[::-1][:dh, across], x[down, :dw].T, x[down, ::-1][:, :dw].T)
    sides = (h, h, w, w)
    out = []
    for strip, side in zip(strips, sides):
        lines = strip.astype(np.float32)
        out.append(_run(lines.std(axis=1), lines.mean(axis=1), lo, hi) / side)
    return tuple(out)


def framed_sides(pixels: np.ndarray) -> int:
    """How many sides carry a frame at least DEPTH deep; the film counts as framed from SIDES on."""
    return sum(m >= DEPTH for m in margins(pixels))
