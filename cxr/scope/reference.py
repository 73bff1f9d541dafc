"""The out-of-distribution reference itself: fitting it on features, the distance in NumPy, its file (ood.npz).

Plain NumPy (and scikit-learn's Ledoit-Wolf when fitting): no model, no ONNX, no Spark, so that the predictors
(cxr.models.store) can load it and the exporter (cxr.models.onnx_export) can build it into a graph without either
importing the other's module back. What the features are and how a model's reference is fitted: cxr.scope.ood.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np

OOD_FILE = "ood.npz"    # the reference beside a model (part of its model id: cxr.models.store.weight_files)
METHOD = ("sum over feature layers of Mahalanobis distances (Ledoit-Wolf shrinkage), each divided by its median "
          "out-of-fold train distance; layers: conv blocks (global average pooled) and hidden activations")
DEFAULT_QUANTILE = 0.98
FOLDS = 5               # out-of-fold train distances: each layer's scale, and (with val) the threshold's sample
EIGEN_FLOOR = 1e-10     # covariance eigenvalues below this x the largest are raised to it (degenerate features)


@dataclass(frozen=True)
class Reference:
    mean: np.ndarray        # (D,) float64
    groups: np.ndarray      # (D,) int64: each feature's layer, 0..G-1 (layer_groups)
    factors: tuple          # per layer g, L_g (d_g, d_g) float64: its distance = ||(f_g - mean_g) @ L_g||_2
    scales: np.ndarray      # (G,) float64: layer g's distance is divided by this (its median out-of-fold distance)
    threshold: float        # `quantile` of the calibration scores (threshold_on says which)
    quantile: float
    n_train: int
    n_val: int
    dims: int
    shrinkage: np.ndarray   # (G,) Ledoit-Wolf's shrinkage coefficient per layer (0: sample covariance, 1: identity)
    threshold_on: str = "val"
    folds: int = 0          # k of the out-of-fold train distances (0: none, too few train images)
    calibration: np.ndarray = field(default_factory=lambda: np.zeros(0))   # the scores the quantile was taken of

    @property
    def layers(self) -> int:
        return len(self.factors)

    def summary(self) -> dict:
        """metrics.json "ood"."""
        dims = np.bincount(self.groups, minlength=self.layers)
        return {"method": METHOD, "dims": int(self.dims), "n_train": int(self.n_train), "n_val": int(self.n_val),
                "quantile": float(self.quantile), "threshold": float(self.threshold),
                "threshold_on": self.threshold_on, "folds": int(self.folds),
                "n_calibration": int(len(self.calibration)),
                "layers": [{"dims": int(d), "shrinkage": round(float(sh), 6), "scale": round(float(sc), 6)}
                           for d, sh, sc in zip(dims, self.shrinkage, self.scales)],
                "file": OOD_FILE}


def _as_matrix(features, name: str) -> np.ndarray:
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2:
        raise ValueError(f"{name} features must be (N, D), got shape {f.shape}")
    if not np.all(np.isfinite(f)):
        raise ValueError(f"{name} features hold NaN or inf")
    return f


def layer_groups(layers: Sequence[Sequence[int]] | None, dims: int) -> np.ndarray:
    """(dims,) int64 layer index of each feature, from the graph's block sizes per member (store.FEATURE_LAYERS_KEY;
    None: one layer). Members' blocks are aligned from the end (the penultimate is every member's last), so an
    ensemble's layer g pools that layer of all its members into one distance."""
    if not layers:
        return np.zeros(int(dims), np.int64)
    depth = max(len(m) for m in layers)
    groups = np.concatenate([np.full(int(size), depth - len(m) + j, np.int64)
                             for m in layers for j, size in enumerate(m)])
    if len(groups) != int(dims):
        raise ValueError(f"feature layers {layers} add up to {len(groups)} dims, the features have {dims}")
    return groups


def _fit_layer(train: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Mean, precision factor L (L L^T = inverse of the Ledoit-Wolf covariance) and shrinkage of train (N, d)."""
    from sklearn.covariance import LedoitWolf

    lw = LedoitWolf(store_precision=False, assume_centered=False).fit(train)
    cov = np.asarray(lw.covariance_, np.float64)
    w, v = np.linalg.eigh((cov + cov.T) / 2)
    w = np.maximum(w, max(float(w.max()), 1.0) * EIGEN_FLOOR)
    return np.asarray(lw.location_, np.float64), v / np.sqrt(w), float(lw.shrinkage_)


def _layer_distance(f: np.ndarray, mean: np.ndarray, factor: np.ndarray) -> np.ndarray:
    z = (f - mean) @ factor
    return np.sqrt(np.einsum("ij,ij->i", z, z))


def fit_reference(train_features: np.ndarray, val_features: np.ndarray | None,
                  quantile: float = DEFAULT_QUANTILE, groups: np.ndarray | None = None,
                  folds: int = FOLDS) -> Reference:
    """Per layer (groups: (D,) layer index of each feature; None: one layer) the mean and Ledoit-Wolf precision
    factor of train_features (N, D), and its scale: the median of its out-of-fold distances (`folds`-fold over the
    train images: each fold's distances from a reference fitted on the other folds). The threshold is the
    `quantile` of the out-of-fold train scores pooled with the val scores (val_features None or empty: of the
    out-of-fold scores alone). With fewer than 2 x folds train images (or folds < 2) there are no out-of-fold
    scores: the scales are the train images' own median distances, the threshold is on val (train without val)."""
    from sklearn.model_selection import KFold

    if not 0.0 < float(quantile) <= 1.0:
        raise ValueError(f"scope.ood_quantile must be in (0, 1], got {quantile}")
    train = _as_matrix(train_features, "train")
    if len(train) < 2:
        raise ValueError(f"an OOD reference needs at least 2 training images, got {len(train)}")
    dims = train.shape[1]
    groups = np.zeros(dims, np.int64) if groups is None else np.asarray(groups, np.int64)
    n_layers = int(groups.max()) + 1 if dims else 0
    if groups.shape != (dims,) or set(np.unique(groups).tolist()) != set(range(n_layers)):
        raise ValueError(f"groups must give each of the {dims} features a layer 0..G-1, got {groups}")
    val = None if val_features is None or len(val_features) == 0 else _as_matrix(val_features, "val")
    if val is not None and val.shape[1] != dims:
        raise ValueError(f"val features have {val.shape[1]} dims, train {dims}")
    idx = [np.flatnonzero(groups == g) for g in range(n_layers)]
    fits = [_fit_layer(train[:, i]) for i in idx]
    folds = int(folds) if int(folds) >= 2 and len(train) >= 2 * int(folds) else 0
    oof = None
    if folds:
        oof = np.zeros((n_layers, len(train)))
        for keep, held in KFold(folds, shuffle=True, random_state=0).split(train):
            for g, i in enumerate(idx):
                mean, factor, _ = _fit_layer(train[np.ix_(keep, i)])
                oof[g, held] = _layer_distance(train[np.ix_(held, i)], mean, factor)
        scales = np.median(oof, axis=1)
    else:
        scales = np.array([np.median(_layer_distance(train[:, i], m, f)) for i, (m, f, _) in zip(idx, fits)])
    scales = np.maximum(scales, 1e-12)
    mean = np.zeros(dims)
    for i, (m, _, _) in zip(idx, fits):
        mean[i] = m
    ref = Reference(mean=mean, groups=groups, factors=tuple(f for _, f, _ in fits), scales=scales, threshold=0.0,
                    quantile=float(quantile), n_train=len(train), n_val=0 if val is None else len(val), dims=dims,
                    shrinkage=np.array([sh for _, _, sh in fits]), folds=folds)
    parts, on = [], []
    if oof is not None:
        parts.append((oof / scales[:, None]).sum(axis=0))
        on.append(f"out-of-fold train (k={folds})")
    if val is not None:
        parts.append(distances(val, ref))
        on.append("val")
    if not parts:
        parts, on = [distances(train, ref)], ["train"]
    calibration = np.sort(np.concatenate(parts))
    threshold_on = " + ".join(on) + ("" if val is not None else " (no val split)")
    return replace(ref, threshold=float(np.quantile(calibration, float(quantile))), threshold_on=threshold_on,
                   calibration=calibration)


def layer_distances(features: np.ndarray, ref: Reference) -> np.ndarray:
    """(N, G) float64: each layer's Mahalanobis distance divided by that layer's scale."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[1] != ref.dims:
        raise ValueError(f"features must be (N, {ref.dims}), got shape {f.shape}")
    out = np.zeros((len(f), ref.layers))
    for g, factor in enumerate(ref.factors):
        i = np.flatnonzero(ref.groups == g)
        out[:, g] = _layer_distance(f[:, i], ref.mean[i], factor) / ref.scales[g]
    return out


def distances(features: np.ndarray, ref: Reference) -> np.ndarray:
    """(N,) float64 OOD score of features (N, D): the sum of layer_distances."""
    return layer_distances(features, ref).sum(axis=1)


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    """max |got - want| / max(want, 1): relative for distances above one standard deviation, absolute below."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if got.shape != want.shape:
        raise ValueError(f"shapes differ: {got.shape} vs {want.shape}")
    return float(np.max(np.abs(got - want) / np.maximum(want, 1.0))) if want.size else 0.0


# --------------------------------------------------------------------------------------------- files
def save_reference(model_dir: str | Path, ref: Reference) -> Path:
    """model_dir/ood.npz (written atomically): plain numeric and string arrays, no pickle."""
    d = Path(model_dir)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=OOD_FILE + ".", suffix=".tmp")
    os.close(fd)
    try:
        with open(tmp, "wb") as fh:
            np.savez(fh, mean=ref.mean, groups=ref.groups, scales=ref.scales, threshold=np.float64(ref.threshold),
                     quantile=np.float64(ref.quantile), n_train=np.int64(ref.n_train), n_val=np.int64(ref.n_val),
                     dims=np.int64(ref.dims), shrinkage=np.asarray(ref.shrinkage, np.float64),
                     threshold_on=np.str_(ref.threshold_on), method=np.str_(METHOD), folds=np.int64(ref.folds),
                     calibration=np.asarray(ref.calibration, np.float64),
                     **{f"factor_{g}": f for g, f in enumerate(ref.factors)})
        os.replace(tmp, d / OOD_FILE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return d / OOD_FILE


def load_reference(model_dir: str | Path) -> Reference | None:
    """The reference in model_dir/ood.npz, None when there is none (one written before layers: one layer)."""
    path = Path(model_dir) / OOD_FILE
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as z:
        if "groups" in z.files:
            groups = z["groups"].astype(np.int64)
            factors = tuple(z[f"factor_{g}"].astype(np.float64) for g in range(int(groups.max()) + 1))
            extra = dict(scales=z["scales"].astype(np.float64), folds=int(z["folds"]),
                         calibration=z["calibration"].astype(np.float64))
        else:   # the penultimate layer only, unscaled
            groups, factors = np.zeros(int(z["dims"]), np.int64), (z["factor"].astype(np.float64),)
            extra = dict(scales=np.ones(1))
        return Reference(mean=z["mean"].astype(np.float64), groups=groups, factors=factors,
                         threshold=float(z["threshold"]), quantile=float(z["quantile"]), n_train=int(z["n_train"]),
                         n_val=int(z["n_val"]), dims=int(z["dims"]),
                         shrinkage=np.atleast_1d(z["shrinkage"]).astype(np.float64),
                         threshold_on=str(z["threshold_on"]), **extra)
