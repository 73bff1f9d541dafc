"""Images that cross-validated models keep getting wrong, and the score they cap a model at.

Many cross-validations of one data set (other seeds, other settings) give each image dozens of held-out
predictions. An image that nearly every model calls the same wrong class is either mislabelled or looks like
the other class to this model family; either way no setting is likely to win it back, so the score a model
would reach if it got every other image right is a ceiling worth knowing before tuning for a goal.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from cxr import CLASSES
from cxr.evaluate.crossval import PROBA_COLUMNS as PROBA
from cxr.evaluate.crossval import run_metrics


def error_rates(predictions: pd.DataFrame) -> pd.DataFrame:
    """One row per image (sha256, y): how many held-out predictions it got (`n`), the fraction that were wrong
    (`error_rate`), the class most often predicted (`most_predicted`) and the mean probabilities."""
    p = predictions.assign(pred=predictions[PROBA].to_numpy().argmax(axis=1))
    p["wrong"] = p["pred"] != p["y"]
    out = p.groupby(["sha256", "y"], sort=True).agg(n=("wrong", "size"), error_rate=("wrong", "mean"),
                                                     most_predicted=("pred", lambda s: s.value_counts().idxmax()),
                                                     **{c: (c, "mean") for c in PROBA}).reset_index()
    if out["sha256"].duplicated().any():
        raise ValueError("an image has two labels across the predictions: they are not from one data set")
    return out


def ceiling(rates: pd.DataFrame, threshold: float) -> dict:
    """The metrics of a model that gets every image right except those wrong in more than `threshold` of the
    predictions, which keep their mean probabilities (so NORMAL vs VIRAL still sees which of the two led)."""
    hard = rates["error_rate"].to_numpy() > threshold
    y = rates["y"].to_numpy()
    proba = np.eye(len(CLASSES))[y]
    proba[hard] = rates.loc[hard, PROBA].to_numpy()
    return {"threshold": threshold, "images": int(hard.sum()), **run_metrics(y, proba)}
