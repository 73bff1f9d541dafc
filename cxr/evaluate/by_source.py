"""Metrics per (source, class): what a pooled score hides when each class comes from its own collections.

Why: a model that learnt "adult film from a paper = COVID" scores well pooled on a test split drawn from the same
collections, yet calls a normal adult film from another hospital COVID. Recall per (source, class) shows each
collection's films on their own: a class whose second source is missed is a class the model has not learnt.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pandas as pd

from cxr import CLASSES
from cxr.evaluate.metrics import wilson_interval
from cxr.common.manifest import source_names


def cells(y_true: np.ndarray, y_pred: np.ndarray, sources: Sequence) -> list[dict[str, Any]]:
    """One row per (source, true class) present: n, correct, recall with its 95% Wilson interval, and how many
    were called each class (`called_<CLASS>`). y_true / y_pred: class indices."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    names = source_names(sources)
    rows = []
    for source in sorted(set(names)):
        for i, c in enumerate(CLASSES):
            mask = (names == source) & (y_true == i)
            n = int(mask.sum())
            if not n:
                continue
            correct = int((y_pred[mask] == i).sum())
            lo, hi = wilson_interval(correct, n)
            rows.append({"source": source, "class": c, "n": n, "correct": correct, "recall": correct / n,
                         "recall_low": lo, "recall_high": hi,
                         **{f"called_{k}": int((y_pred[mask] == j).sum()) for j, k in enumerate(CLASSES)}})
    return rows


def table(rows: Sequence[dict[str, Any]], title: str | None = None) -> str:
    """Markdown of cells() rows; a recall under 0.9 is in bold."""
    lines = ([f"**{title}**", ""] if title else []) + [
        "| source | class | images | recall (95% interval) | " + " | ".join(f"called {c}" for c in CLASSES) + " |",
        "|---|---|---|---|" + "---|" * len(CLASSES)]
    for r in rows:
        rec = f"{r['recall']:.3f} ({r['recall_low']:.2f}-{r['recall_high']:.2f})"
        rec = f"**{rec}**" if r["recall"] < 0.9 else rec
        lines.append(f"| {r['source']} | {r['class']} | {r['n']} | {rec} | "
                     + " | ".join(str(r[f"called_{c}"]) for c in CLASSES) + " |")
    return "\n".join(lines)


def across_runs(predictions: pd.DataFrame, sources: pd.Series, proba_columns: Sequence[str]) -> pd.DataFrame:
    """Cross-validation's held-out predictions (seed, model, sha256, y, p_*) -> recall per (model, source, class):
    each seed's recall pooled over its folds, then mean, sd, min over the seeds, and the images per seed."""
    frame = predictions.assign(source=source_names(sources.reindex(predictions["sha256"]).to_numpy()),
                               pred=predictions[list(proba_columns)].to_numpy().argmax(axis=1))
    frame["hit"] = frame["pred"] == frame["y"]
    per_seed = frame.groupby(["model", "source", "y", "seed"])["hit"].agg(["mean", "size"]).reset_index()
    out = per_seed.groupby(["model", "source", "y"]).agg(recall=("mean", "mean"), sd=("mean", "std"),
                                                          worst=("mean", "min"), n=("size", "max"),
                                                          seeds=("seed", "nunique")).reset_index()
    shares = pd.crosstab([frame["model"], frame["source"], frame["y"]], frame["pred"], normalize="index")
    shares = shares.reindex(columns=range(len(CLASSES)), fill_value=0.0)
    shares.columns = [f"called_{c}" for c in CLASSES]
    out = out.merge(shares.reset_index(), on=["model", "source", "y"], how="left")
    out["class"] = np.asarray(CLASSES)[out["y"].to_numpy()]
    return out.drop(columns=["y"]).fillna({"sd": 0.0})


def across_runs_table(frame: pd.DataFrame, model: str) -> str:
    """Markdown of across_runs() for one model; a mean recall under 0.9 is in bold."""
    lines = ["| source | class | images | recall (mean ± sd over seeds) | worst seed | called "
             + " / ".join(CLASSES) + " (all seeds) |", "|---|---|---|---|---|---|"]
    for _, r in frame[frame["model"] == model].sort_values(["source", "class"]).iterrows():
        rec = f"{r['recall']:.3f} ± {r['sd']:.3f}"
        calls = " / ".join(f"{r.get(f'called_{c}', float('nan')):.0%}" for c in CLASSES)
        lines.append(f"| {r['source']} | {r['class']} | {int(r['n'])} | "
                     f"{'**' + rec + '**' if r['recall'] < 0.9 else rec} | {r['worst']:.3f} | {calls} |")
    return "\n".join(lines)
