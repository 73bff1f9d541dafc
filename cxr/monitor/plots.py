"""The run page's pictures as data: URIs (inline PNG), so that the page needs no server and no network."""
from __future__ import annotations

import base64
import io
from typing import Any, Mapping, Sequence

import numpy as np

from cxr.explain.viz import plt, save_figure
from cxr.monitor.stats import BINNED, counts_of

COLORS = ("#1f77b4", "#ff7f0e", "#7f7f7f")   # this run, the training reference, the last N runs


def png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def figure_uri(fig) -> str:
    buf = io.BytesIO()
    save_figure(fig, buf, dpi=72)
    return png_uri(buf.getvalue())


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
    fig, ax = plt().subplots(figsize=(5.2, 2.6))
    width = 0.8 / len(series)
    x = np.arange(len(categories))
    for i, (label, counts) in enumerate(series):
        values = np.array([counts.get(c, 0) for c in categories], float)
        total = values.sum()
        ax.bar(x + (i - (len(series) - 1) / 2) * width, values / total if total else values, width,
               label=f"{label} ({int(total)})", color=COLORS[i % len(COLORS)])
    tilt = len(categories) > 4
    ax.set_xticks(x, [c[:28] for c in categories], rotation=30 if tilt else 0, ha="right" if tilt else "center",
                  fontsize=7)
    ax.set_ylabel("share", fontsize=8)
    ax.legend(fontsize=7)
    return figure_uri_with_title(fig, title)


def figure_uri_with_title(fig, title: str) -> str:
    fig.axes[0].set_title(title, fontsize=9)
    return figure_uri(fig)


def over_nights(points: Sequence[tuple[str, Mapping[str, float]]], threshold: float, title: str) -> str:
    """PSI of each named statistic against the training reference, one point per night (oldest first)."""
    fig, ax = plt().subplots(figsize=(6.4, 2.8))
    labels = [run for run, _ in points]
    names = sorted({k for _, values in points for k in values})
    for name in names:
        ax.plot(range(len(points)), [values.get(name, np.nan) for _, values in points], marker="o", label=name)
    ax.axhline(threshold, color="#d62728", linestyle="--", linewidth=1, label=f"threshold {threshold:g}")
    ax.set_xticks(range(len(points)), labels, rotation=30, ha="right", fontsize=6)
    ax.set_ylabel("PSI", fontsize=8)
    ax.legend(fontsize=7)
    return figure_uri_with_title(fig, title)

