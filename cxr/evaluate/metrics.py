"""Classification metrics in plain NumPy (no sklearn on the workers or in the image).

Confusion matrices have true classes as rows and predicted classes as columns, in cxr.CLASSES order; they
add up across partitions, which is how the distributed evaluation reduces them. A metric that is undefined
(e.g. precision of a class never predicted) is None, not a made-up 0, except inside F1 as noted.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from cxr import CLASSES

Z95 = 1.959963984540054


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int = len(CLASSES)) -> np.ndarray:
    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"{y_true.shape} true labels but {y_pred.shape} predictions")
    if y_true.size and (min(y_true.min(), y_pred.min()) < 0 or max(y_true.max(), y_pred.max()) >= n_classes):
        raise ValueError(f"labels must lie in [0, {n_classes})")
    return np.bincount(y_true * n_classes + y_pred, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def _ratio(num: float, den: float) -> float | None:
    return float(num) / float(den) if den else None


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float | None, float | None]:
    """Wilson score interval for a proportion: sensible at small n and at 0 or 1, unlike the normal one."""
    if n <= 0:
        return None, None
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def per_class(cm: np.ndarray, classes: Sequence[str] = CLASSES) -> dict[str, dict]:
    """Sensitivity (recall), specificity, precision and F1 of each class, one-vs-rest from the matrix."""
    cm = np.asarray(cm, dtype=np.int64)
    total = int(cm.sum())
    out = {}
    for i, name in enumerate(classes):
        tp = int(cm[i, i])
        fn = int(cm[i].sum()) - tp
        fp = int(cm[:, i].sum()) - tp
        tn = total - tp - fn - fp
        recall, precision = _ratio(tp, tp + fn), _ratio(tp, tp + fp)
        if tp + fn + fp == 0:
            f1 = None  # class absent from both truth and predictions: no F1 at all
        else:
            f1 = 2 * tp / (2 * tp + fp + fn)  # equals 2PR/(P+R); 0 when a present class is never hit
        out[name] = {"support": tp + fn, "predicted": tp + fp, "tp": tp, "fn": fn, "fp": fp, "tn": tn,
                     "sensitivity": recall, "specificity": _ratio(tn, tn + fp), "precision": precision, "f1": f1}
    return out


def macro_f1(cm: np.ndarray) -> float | None:
    """Mean F1 over the classes present in the truth or the predictions (sklearn's convention)."""
    values = [m["f1"] for m in per_class(cm).values() if m["f1"] is not None]
    return float(np.mean(values)) if values else None


def _average_ranks(scores: np.ndarray) -> np.ndarray:
    """1-based ranks with ties sharing their mean rank."""
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(len(scores), dtype=np.float64)
    boundaries = np.flatnonzero(np.diff(sorted_scores)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(scores)]])
    for s, e in zip(starts, ends):
        ranks[order[s:e]] = (s + 1 + e) / 2.0
    return ranks


def roc_auc(positive: np.ndarray, scores: np.ndarray) -> float | None:
    """Area under the ROC curve = P(score of a positive > score of a negative) + 0.5 P(tie) (Mann-Whitney U).
    None when only one class is present."""
    positive = np.asarray(positive, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = _average_ranks(scores)
    u = ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def roc_curve(positive: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rates, true positive rates) at every distinct threshold, from (0, 0) to (1, 1)."""
    positive = np.asarray(positive, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-scores, kind="mergesort")
    s, p = scores[order], positive[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1] if len(s) else np.array([], int)
    tps = np.cumsum(p)[last_of_tie]
    fps = np.cumsum(~p)[last_of_tie]
    n_pos, n_neg = max(int(p.sum()), 1), max(int((~p).sum()), 1)
    return np.r_[0.0, fps / n_neg], np.r_[0.0, tps / n_pos]


def roc_auc_ovr(y_true: np.ndarray, proba: np.ndarray, classes: Sequence[str] = CLASSES) -> dict:
    """One-vs-rest AUC of each class from its probability column, and their unweighted mean."""
    y_true = np.asarray(y_true)
    proba = np.asarray(proba)
    per = {name: roc_auc(y_true == i, proba[:, i]) for i, name in enumerate(classes)}
    defined = [v for v in per.values() if v is not None]
    return {"per_class": per, "macro": float(np.mean(defined)) if defined else None}


def normal_vs_viral(y_true: np.ndarray, proba: np.ndarray) -> dict:
    """Rows whose truth is NORMAL or VIRAL, called by the larger of those two outputs only.

    In the real sample set those two classes come from one hospital while COVID comes from elsewhere, so
    this is the one comparison a model cannot win by recognising the source.
    """
    i_n, i_v = CLASSES.index("NORMAL"), CLASSES.index("VIRAL")
    y_true = np.asarray(y_true)
    proba = np.asarray(proba)
    mask = (y_true == i_n) | (y_true == i_v)
    truth = (y_true[mask] == i_v).astype(np.int64)  # 0 NORMAL, 1 VIRAL
    pred = (proba[mask, i_v] > proba[mask, i_n]).astype(np.int64)
    cm = confusion_matrix(truth, pred, 2)
    n, correct = int(mask.sum()), int(np.trace(cm))
    lo, hi = wilson_interval(correct, n)
    return {"classes": ["NORMAL", "VIRAL"], "n": n, "confusion": cm.tolist(), "accuracy": _ratio(correct, n),
            "accuracy_ci95": [lo, hi], "auc_viral_vs_normal": roc_auc(truth == 1, proba[mask, i_v] - proba[mask, i_n]),
            "also_called_covid": int((proba[mask].argmax(1) == CLASSES.index("COVID")).sum())}


def summarize(y_true: np.ndarray, proba: np.ndarray, cm: np.ndarray | None = None) -> dict:
    """Every reported number for one model on one split. `cm` may come from a distributed reduction;
    it must then equal the matrix of argmax(proba)."""
    y_true = np.asarray(y_true, dtype=np.int64)
    proba = np.asarray(proba, dtype=np.float64)
    if cm is None:
        cm = confusion_matrix(y_true, proba.argmax(axis=1)) if len(y_true) else np.zeros((3, 3), np.int64)
    cm = np.asarray(cm, dtype=np.int64)
    n, correct = int(cm.sum()), int(np.trace(cm))
    lo, hi = wilson_interval(correct, n)
    return {
        "n": n,
        "confusion": cm.tolist(),
        "accuracy": _ratio(correct, n),
        "accuracy_ci95": [lo, hi],
        "macro_f1": macro_f1(cm),
        "per_class": per_class(cm),
        "roc_auc": roc_auc_ovr(y_true, proba) if n else {"per_class": {}, "macro": None},
        "normal_vs_viral": normal_vs_viral(y_true, proba),
    }
