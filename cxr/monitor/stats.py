"""A score run's statistics from its rows: counts a person (and a drift test) can compare night over night.

Counts, not shares, so that runs pool by adding them up. Binned statistics have fixed edges (part of the
statistic: a reference written at training compares only with runs binned the same way). Pandas in, a
JSON-ready dict out; the same function describes a score run and a model's training reference.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np
import pandas as pd

from cxr import CLASSES

SCHEMA = 1
STATUS = {"ok": "scored", "error": "rejected", "out_of_scope": "out_of_scope"}
# max class probability of a scored image (3 classes: never under 1/3)
CONFIDENCE_EDGES = [0.0, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0]
# mean pixel value of the preprocessed image (what the model sees), 0..255
INTENSITY_EDGES = [float(x) for x in range(0, 257, 16)]
# longer side of the stored image in pixels
SIZE_EDGES = [0.0, 256.0, 512.0, 1024.0, 1536.0, 2048.0, 3072.0, 4096.0, 65536.0]
BINNED = {"confidence": CONFIDENCE_EDGES, "intensity": INTENSITY_EDGES, "size": SIZE_EDGES}
CATEGORICAL = ("status", "calls", "ood", "formats", "bit_depths", "reasons")
# the columns a run's rows need (cxr/score/frames.py writes them into its results)
COLUMNS = ("status", "stage", "reason", "label", *(f"p_{c.lower()}" for c in CLASSES), "in_distribution",
           "source_format", "orig_dtype", "orig_height", "orig_width", "bits_stored", "mean_intensity")

_PAREN = re.compile(r"\s*\([^)]*\)")
_NUMBER = re.compile(r"\d+(\.\d+)?")


def reason_key(stage: Any, reason: Any) -> str:
    """A reason without its particulars (numbers, parenthesised details, exception text after the second ':'),
    so that rejections group: 'decode: truncated PNG: file ends before the IEND chunk'."""
    text = _NUMBER.sub("N", _PAREN.sub("", str(reason or "no reason")))
    text = ": ".join(part.strip() for part in text.split(": ")[:2])
    return f"{stage or 'unknown'}: {text}"[:80]


def bit_depth(dtype: Any, bits_stored: Any) -> str | None:
    """Bits per pixel as stored: a DICOM's BitsStored, else the decoded array's type (uint8 -> 8)."""
    if bits_stored is not None and not pd.isna(bits_stored):
        return str(int(bits_stored))
    if dtype is None or pd.isna(dtype):
        return None
    match = re.fullmatch(r"u?int(\d+)", str(dtype))
    return match.group(1) if match else str(dtype)


def binned(values: np.ndarray, edges: list[float]) -> dict[str, list]:
    """Counts per bin [edges[i], edges[i+1]); values beyond the ends count in the first or last bin."""
    values = np.asarray(values, float)
    values = values[np.isfinite(values)]
    idx = np.clip(np.searchsorted(np.asarray(edges, float), values, side="right") - 1, 0, len(edges) - 2)
    return {"edges": list(edges), "counts": np.bincount(idx, minlength=len(edges) - 1).tolist()}


def _counts(series: pd.Series) -> dict[str, int]:
    series = series.dropna()
    return {str(k): int(v) for k, v in series.value_counts().sort_index().items()}


def run_statistics(rows: pd.DataFrame, status_counts: Mapping[str, int] | None = None) -> dict[str, Any]:
    """rows: a run's result rows (COLUMNS; missing ones count as absent). status_counts replaces the status
    counts (a training reference takes them from the whole preprocess run, its other rows from one split)."""
    rows = rows.reindex(columns=list(dict.fromkeys([*rows.columns, *COLUMNS])))
    status = rows["status"].map(lambda s: STATUS.get(s, "rejected"))
    scored = rows[status == "scored"]
    probs = scored[[f"p_{c.lower()}" for c in CLASSES]].astype(float).to_numpy()
    kept_out = rows[status != "scored"]
    sizes = np.fmax(scored["orig_height"].astype(float).to_numpy(), scored["orig_width"].astype(float).to_numpy())
    categorical = {
        "status": dict(status_counts) if status_counts is not None else _counts(status),
        "calls": {c: int((scored["label"] == c).sum()) for c in CLASSES},
        "ood": _counts(scored["in_distribution"].map(
            lambda v: None if v is None or pd.isna(v) else ("in_distribution" if v else "out_of_distribution"))),
        "formats": _counts(rows["source_format"].map(lambda f: None if f is None or pd.isna(f) else str(f).lower())),
        "bit_depths": _counts(pd.Series([bit_depth(d, b) for d, b in zip(rows["orig_dtype"], rows["bits_stored"])],
                                        dtype=object)),
        "reasons": _counts(pd.Series([reason_key(s, r) for s, r in zip(kept_out["stage"], kept_out["reason"])],
                                     dtype=object)),
    }
    return {
        "schema": SCHEMA, "rows": int(len(rows)), "scored": int(len(scored)),
        "categorical": categorical,
        "binned": {"confidence": binned(probs.max(axis=1) if len(probs) else np.empty(0), CONFIDENCE_EDGES),
                   "intensity": binned(scored["mean_intensity"].astype(float).to_numpy(), INTENSITY_EDGES),
                   "size": binned(sizes, SIZE_EDGES)},
    }


def pooled(stats: list[Mapping[str, Any]]) -> dict[str, Any] | None:
    """The statistics of several runs as one (counts added up); bins must match (older runs binned otherwise
    are left out)."""
    stats = [s for s in stats if s and s.get("schema") == SCHEMA]
    if not stats:
        return None
    out: dict[str, Any] = {"schema": SCHEMA, "rows": sum(s["rows"] for s in stats),
                           "scored": sum(s["scored"] for s in stats), "categorical": {}, "binned": {}, "runs": len(stats)}
    for name in CATEGORICAL:
        total: dict[str, int] = {}
        for s in stats:
            for k, v in (s["categorical"].get(name) or {}).items():
                total[k] = total.get(k, 0) + int(v)
        out["categorical"][name] = dict(sorted(total.items()))
    for name, edges in BINNED.items():
        same = [s["binned"][name] for s in stats if s["binned"].get(name, {}).get("edges") == list(edges)]
        if same:
            out["binned"][name] = {"edges": list(edges), "counts": np.sum([b["counts"] for b in same], axis=0).tolist()}
    return out


def bin_labels(edges: list[float]) -> list[str]:
    """'0-16', '16-32', ...; the size statistic's last bin is open ('>=4096')."""
    open_top = list(edges) == SIZE_EDGES
    return [f">={edges[i]:g}" if open_top and i == len(edges) - 2 else f"{edges[i]:g}-{edges[i + 1]:g}"
            for i in range(len(edges) - 1)]


def counts_of(stats: Mapping[str, Any], name: str) -> dict[str, int]:
    """One statistic as {category or bin label: count}."""
    if name in BINNED:
        b = stats["binned"].get(name)
        return dict(zip(bin_labels(b["edges"]), b["counts"])) if b else {}
    return dict(stats["categorical"].get(name) or {})


def shares(counts: Mapping[str, int]) -> dict[str, float]:
    total = sum(counts.values())
    return {k: (v / total if total else 0.0) for k, v in counts.items()}
