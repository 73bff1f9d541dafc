"""Categorical cross-entropy, fused with softmax so training never takes log(0)."""

from __future__ import annotations

import numpy as np


def one_hot(labels: np.ndarray, n_classes: int, dtype=np.float32) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"integer labels must be 1-D, got shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
        raise ValueError(f"labels must lie in [0, {n_classes}), got {labels.min()}..{labels.max()}")
    out = np.zeros((labels.shape[0], n_classes), dtype=dtype)
    out[np.arange(labels.shape[0]), labels.astype(np.intp)] = 1
    return out


def log_softmax(z: np.ndarray) -> np.ndarray:
    shifted = z - z.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def softmax_cross_entropy(logits: np.ndarray, targets: np.ndarray, weights: np.ndarray | None = None):
    """Mean categorical cross-entropy of softmax(logits) against one-hot/soft targets.

    Returns (loss, dL/dlogits, probabilities). Working from logits via log-softmax keeps the
    loss finite for any logits, and the gradient is the exact (p - y) / N. With per-sample
    weights w the loss is sum(w * ce) / N, Keras' "sum_over_batch_size" with sample_weight.
    """
    logp = log_softmax(logits)
    n = logits.shape[0]
    ce = -(targets * logp).sum(axis=-1)
    p = np.exp(logp)
    grad = p - targets
    if weights is not None:
        weights = np.asarray(weights, dtype=logits.dtype)
        ce = ce * weights
        grad *= weights[:, None]
    grad /= np.asarray(n, dtype=logits.dtype)
    return float(ce.sum() / n), grad.astype(logits.dtype, copy=False), p


def categorical_crossentropy(probs: np.ndarray, targets: np.ndarray, eps: float = 1e-7) -> float:
    """Mean cross-entropy of given probabilities, clipped like Keras' from_logits=False path."""
    p = np.clip(probs, eps, 1 - eps)
    return float(-(targets * np.log(p)).sum() / probs.shape[0])
