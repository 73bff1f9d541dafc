"""The run page's pictures as data: URIs (SVG charts drawn here, JPEG thumbnails), so that the page needs no
server and no network. The charts are a few rectangles and labels written as SVG text, not matplotlib figures:
matplotlib's import and its layout took ~2 CPU s of every score run's driver for seven bar charts."""
from __future__ import annotations

import base64
import math
from html import escape
from typing import Any, Mapping, Sequence

import numpy as np

from cxr.monitor.stats import BINNED, counts_of

COLORS = ("#1f77b4", "#ff7f0e", "#7f7f7f", "#2ca02c", "#9467bd", "#8c564b")   # this run, the reference, runs
WIDTH, HEIGHT = 380, 200               # every chart's size (px)
LEFT, RIGHT, TOP, BOTTOM = 40, 8, 20, 46   # plot area margins: y labels left, x labels and legend below


def svg_uri(svg: str) -> str:
    return "data:image/svg+xml;base64," + base64.b64encode(svg.encode("utf-8")).decode("ascii")


def _text(x: float, y: float, s: str, size: int = 8, anchor: str = "middle", extra: str = "") -> str:
    return (f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}" {extra}>'
            f"{escape(str(s))}</text>")


def _chart(title: str, y_max: float, y_label: str, body: list[str], x_labels: Sequence[tuple[float, str]],
           legend: Sequence[tuple[str, str]]) -> str:
    """The frame every chart shares: title, y axis with 5 ticks from 0 to y_max, x labels, a legend row, body."""
    h = HEIGHT - TOP - BOTTOM
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
             f'font-family="sans-serif"><rect width="100%" height="100%" fill="white"/>',
             _text(WIDTH / 2, 12, title, 9)]
    for k in range(5):
        v = y_max * k / 4
        y = TOP + h - h * k / 4
        parts += [f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>',
                  _text(LEFT - 3, y + 3, f"{v:.2g}", 7, "end")]
    parts.append(_text(9, TOP + h / 2, y_label, 8, extra=f'transform="rotate(-90 9 {TOP + h / 2:.1f})"'))
    parts += body
    tilt = len(x_labels) > 4
    for x, label in x_labels:
        y = TOP + h + 10
        parts.append(_text(x, y, label[:22], 7, "end" if tilt else "middle",
                           f'transform="rotate(-30 {x:.1f} {y:.1f})"' if tilt else ""))
    x = LEFT
    for color, label in legend:
        parts += [f'<rect x="{x}" y="{HEIGHT - 10}" width="8" height="8" fill="{color}"/>',
                  _text(x + 11, HEIGHT - 3, label, 7, "start")]
        x += 16 + 4.2 * len(label)
    return svg_uri("".join(parts) + "</svg>")


def _y(v: float, y_max: float) -> float:
    h = HEIGHT - TOP - BOTTOM
    return TOP + h - h * (v / y_max if y_max else 0.0)


def thumbnail_uri(image: np.ndarray, side: int = 160) -> str:
    """A JPEG thumbnail (a tenth of a PNG's bytes for a radiograph) of a uint8 grayscale or RGB image, longer
    side at most `side` pixels."""
    import cv2

    h, w = image.shape[:2]
    scale = side / max(h, w)
    if scale < 1:
        image = cv2.resize(image, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    if image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 85])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return "data:image/jpeg;base64," + base64.b64encode(buf.tobytes()).decode("ascii")


def distribution(stats: Mapping[str, Any], baselines: Mapping[str, Mapping[str, Any]], name: str, title: str) -> str:
    """Shares of one statistic in this run beside its baselines (bars side by side)."""
    series = [("this run", counts_of(stats, name))] + [(label, counts_of(s, name)) for label, s in baselines.items()]
    categories = list(dict.fromkeys(k for _, counts in series for k in counts))
    if name not in BINNED:
        categories.sort()
    shares = []
    for _, counts in series:
        values = np.array([counts.get(c, 0) for c in categories], float)
        shares.append(values / values.sum() if values.sum() else values)
    y_max = max([float(v.max()) for v in shares if len(v)] + [0.0]) or 1.0
    slot = (WIDTH - LEFT - RIGHT) / max(len(categories), 1)
    width = 0.8 * slot / len(series)
    body = []
    for i, values in enumerate(shares):
        for j, v in enumerate(values):
            x = LEFT + j * slot + 0.1 * slot + i * width
            y = _y(float(v), y_max)
            body.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{width:.1f}" height="{_y(0, y_max) - y:.1f}" '
                        f'fill="{COLORS[i % len(COLORS)]}"><title>{escape(categories[j])}: {v:.3f}</title></rect>')
    legend = [(COLORS[i % len(COLORS)], f"{label} ({sum(counts.values())})") for i, (label, counts) in enumerate(series)]
    return _chart(title, y_max, "share", body, [(LEFT + (j + 0.5) * slot, c) for j, c in enumerate(categories)],
                  legend)


def over_nights(points: Sequence[tuple[str, Mapping[str, float]]], threshold: float, title: str) -> str:
    """PSI of each named statistic against the training reference, one point per night (oldest first)."""
    names = sorted({k for _, values in points for k in values})
    finite = [v for _, values in points for v in values.values() if v is not None and math.isfinite(v)]
    y_max = max(finite + [threshold]) * 1.1 or 1.0
    step = (WIDTH - LEFT - RIGHT) / max(len(points), 1)
    xs = [LEFT + (i + 0.5) * step for i in range(len(points))]
    body = [f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{_y(threshold, y_max):.1f}" y2="{_y(threshold, y_max):.1f}" '
            f'stroke="#d62728" stroke-dasharray="4 3"/>']
    for k, name in enumerate(names):
        color = COLORS[k % len(COLORS)]
        pts = [(x, _y(values[name], y_max)) for x, (_, values) in zip(xs, points)
               if values.get(name) is not None and math.isfinite(values[name])]
        if len(pts) > 1:
            body.append(f'<polyline fill="none" stroke="{color}" points="'
                        + " ".join(f"{x:.1f},{y:.1f}" for x, y in pts) + '"/>')
        body += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.5" fill="{color}"/>' for x, y in pts]
    legend = [(COLORS[k % len(COLORS)], n) for k, n in enumerate(names)] + [("#d62728", f"threshold {threshold:g}")]
    return _chart(title, y_max, "PSI", body, [(x, run) for x, (run, _) in zip(xs, points)], legend)
