"""Out-of-distribution score: how far an image's activations lie from the training images', layer by layer.

Every model.onnx returns "features" (cxr.models.onnx_export, store.FEATURE_RULE): each convolution block's
activations averaged over the image (GlobalAveragePool of every max-pooling layer's input), the hidden Dense
activations, the penultimate (the final Dense's input) last; an ensemble's members' concatenated. The block sizes
are in the graph's metadata, and layer_groups turns them into layers: layer g pools that block of every member
(aligned from the penultimate). Why several layers: the penultimate features of a classifier keep what separates
its classes, so pictures with little structure (gradients, flat shapes, cloudy textures) land near the training
mean there; the early blocks' pooled activations (edge and texture statistics) see them. On the bench's ensemble
(docs/scope_gate.md) AUROC against in-scope X-rays went from 0.945 to 0.993.

Training fits, per layer g, the mean and the inverse of the Ledoit-Wolf shrunk covariance of the train split's
features (sklearn.covariance.LedoitWolf, float64; shrinkage keeps it invertible with fewer images than dimensions
or dead ReLU units), factored as P_g = L_g L_g^T, and a scale s_g: the median of the layer's out-of-fold distances
(FOLDS = 5: each fold's train images from a reference fitted on the other folds). The score is

    distance(f) = sum_g ||(f_g - mean_g) @ L_g||_2 / s_g

(one Mahalanobis distance per layer, in units of that layer's typical distance, so no layer swamps the others as
one Mahalanobis over the concatenation would). The threshold is the `quantile` (scope.ood_quantile, default 0.98)
of the calibration scores: the out-of-fold train scores pooled with the val split's (without a val split, as in
cross-validation folds, the out-of-fold scores alone; with fewer than 2 x FOLDS train images, the val scores or
the train images' own), recorded in "threshold_on": hundreds of scores instead of the val split's few dozen, whose
99.5% quantile is just their maximum. The reference (and its calibration scores) is saved beside the model as
ood.npz (plain arrays, loaded with allow_pickle=False; part of the model id; a pre-layer ood.npz loads as one
unscaled layer), summarised in metrics.json under "ood" (per layer: dims, shrinkage, scale), and built into
model.onnx as a third output "ood_distance" (N,) float32: per layer Gather -> Sub(mean) -> MatMul(L) -> Mul(self)
-> ReduceSum(axis 1) -> Sqrt -> Mul(1 / scale), then Sum; checked against the NumPy distance on the check images
(within RTOL) before it is kept.

    python -m cxr.scope.ood fit MODEL_DIR [MODEL_DIR ...] --data PRE_OUT [--quantile Q]   (models trained before)
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np

from cxr.models import store

OOD_FILE = store.OOD_FILE
DISTANCE_NAME = store.DISTANCE_OUTPUT
FEATURES_NAME = store.FEATURES_OUTPUT
METHOD = ("sum over feature layers of Mahalanobis distances (Ledoit-Wolf shrinkage), each divided by its median "
          "out-of-fold train distance; layers: conv blocks (global average pooled) and hidden activations")
DEFAULT_QUANTILE = 0.98
FOLDS = 5               # out-of-fold train distances: each layer's scale, and (with val) the threshold's sample
RTOL = 1e-4             # ONNX vs NumPy distance: max |diff| / max(distance, 1)
EIGEN_FLOOR = 1e-10     # covariance eigenvalues below this x the largest are raised to it (degenerate features)
FEATURE_BATCH = 64      # images per ONNX Runtime call when computing a split's features
MAX_CHECK_IMAGES = 512


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


# --------------------------------------------------------------------------------------------- the graph
def _distance_nodes(graph, ref: Reference) -> None:
    """Append (in place), per layer g: Gather(its features) -> Sub(mean) -> MatMul(L) -> Mul(self) ->
    ReduceSum(axis 1) -> Sqrt -> Mul(1 / scale), then Sum over the layers: the "ood_distance" output, right after
    the node that makes "features" (so an ensemble's Mean stays the last node)."""
    from onnx import TensorProto, helper, numpy_helper

    from cxr.models.onnx_export import keep_outputs

    names = [o.name for o in graph.output]
    if FEATURES_NAME not in names:
        raise ValueError(f"model.onnx has no {FEATURES_NAME!r} output (outputs: {names}): re-export it with "
                         "`python -m cxr.models.onnx_export MODEL_DIR` first")
    keep_outputs(graph, [n for n in names if n != DISTANCE_NAME])   # replace an older distance
    inits = [numpy_helper.from_array(np.asarray([1], np.int64), "ood_axes")]
    new, terms = [], []
    for g, factor in enumerate(ref.factors):
        i = np.flatnonzero(ref.groups == g)
        p = f"ood_l{g}_"
        inits += [numpy_helper.from_array(i.astype(np.int64), p + "index"),
                  numpy_helper.from_array(ref.mean[i].astype(np.float32), p + "mean"),
                  numpy_helper.from_array(factor.astype(np.float32), p + "factor"),
                  numpy_helper.from_array(np.asarray([1.0 / ref.scales[g]], np.float32), p + "inv_scale")]
        new += [helper.make_node("Gather", [FEATURES_NAME, p + "index"], [p + "features"], name=p + "gather", axis=1),
                helper.make_node("Sub", [p + "features", p + "mean"], [p + "centered"], name=p + "sub"),
                helper.make_node("MatMul", [p + "centered", p + "factor"], [p + "whitened"], name=p + "matmul"),
                helper.make_node("Mul", [p + "whitened", p + "whitened"], [p + "squared"], name=p + "square"),
                helper.make_node("ReduceSum", [p + "squared", "ood_axes"], [p + "sum"], name=p + "sum", keepdims=0),
                helper.make_node("Sqrt", [p + "sum"], [p + "distance"], name=p + "sqrt"),
                helper.make_node("Mul", [p + "distance", p + "inv_scale"], [p + "scaled"], name=p + "scale")]
        terms.append(p + "scaled")
    new.append(helper.make_node("Sum", terms, [DISTANCE_NAME], name="ood_layers_sum"))
    graph.initializer.extend(inits)
    at = next(i for i, node in enumerate(graph.node) if FEATURES_NAME in node.output) + 1
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes[:at] + new + nodes[at:])
    graph.output.append(helper.make_tensor_value_info(DISTANCE_NAME, TensorProto.FLOAT, ["N"]))


def add_distance_to_onnx(model_dir: str | Path, images: np.ndarray | None = None, ref: Reference | None = None,
                         rtol: float = RTOL, images_from: str | None = None) -> Path:
    """Rewrite model_dir/model.onnx with the "ood_distance" output of `ref` (default: the folder's ood.npz),
    checked before it is kept: on `images` (float32 (N, H, W, 1) at the data size; None: a seeded random batch)
    ONNX Runtime's distance must equal the NumPy distance of the graph's own features within `rtol`
    (relative_error). Raises ValueError otherwise, leaving model.onnx as it was. Records metrics.json "ood"."""
    import onnx

    from cxr.models.onnx_export import check_images

    d = Path(model_dir)
    ref = ref if ref is not None else load_reference(d)
    if ref is None:
        raise FileNotFoundError(f"{d / OOD_FILE} is missing: fit the reference first (python -m cxr.scope.ood fit)")
    proto = onnx.load(str(d / store.ONNX_FILE))
    _distance_nodes(proto.graph, ref)
    onnx.checker.check_model(proto)
    meta = store.read_metadata(d)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=store.ONNX_FILE + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(proto.SerializeToString())
        graph = store.OnnxPredictor(d, meta, batch_size=FEATURE_BATCH, threads=1, onnx_path=tmp)
        x = check_images(graph, images, MAX_CHECK_IMAGES)
        feats, got = graph.run_outputs(x, [FEATURES_NAME, DISTANCE_NAME])
        del graph
        want = distances(feats, ref)
        err = relative_error(got, want)
        if not err <= rtol:  # also catches NaN
            raise ValueError(f"{d}: model.onnx's {DISTANCE_NAME} differs from the NumPy distance by {err:.3g} "
                             f"(max |diff| / max(distance, 1)) > {rtol:g} on {len(x)} images: model.onnx not "
                             "rewritten")
        os.replace(tmp, d / store.ONNX_FILE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    meta = store.read_metadata(d)
    onnx_rec = meta.get("onnx") or {}
    if onnx_rec:
        onnx_rec["outputs"] = [o.name for o in proto.graph.output]
    meta["ood"] = {**(meta.get("ood") or {}), **ref.summary(), "onnx_output": DISTANCE_NAME,
                   "onnx_max_rel_diff": err, "onnx_rtol": rtol, "checked_on": int(len(x)),
                   "checked_with": (images_from or "images given") if images is not None and len(images)
                   else f"seeded uniform random batch (seed 0, {len(x)} images)"}
    files = [f for f in meta.get("files") or [] if f not in (OOD_FILE, store.ONNX_FILE, store.METRICS_FILE)]
    meta["files"] = [*files, OOD_FILE, store.ONNX_FILE, store.METRICS_FILE]
    store.write_metadata(d, meta)
    return d / store.ONNX_FILE


# --------------------------------------------------------------------------------------------- fitting a model
def source_features(predictor: store.OnnxPredictor, source, batch_size: int = FEATURE_BATCH) -> np.ndarray:
    """(N, D) float32 features of a training source (cxr.data.stream.ParquetSplit or SplitData), streamed batch by
    batch through the graph: memory is one batch of images plus the features."""
    from cxr.data.stream import as_unit_float

    parts = [predictor.run_outputs(as_unit_float(images), [FEATURES_NAME])[0]
             for images, _ in source.batches(batch_size)]
    if parts:
        return np.concatenate(parts)
    dim = next((o.shape[1] for o in predictor.session.get_outputs() if o.name == FEATURES_NAME), 0)
    return np.zeros((0, dim if isinstance(dim, int) else 0), np.float32)


def fit_model(model_dir: str | Path, train, val=None, quantile: float = DEFAULT_QUANTILE,
              threads: int | None = None, batch_size: int = FEATURE_BATCH) -> dict:
    """Fit model_dir's reference on its model.onnx features of `train` (threshold on `val`, or on `train` when val
    is None or empty), write ood.npz, add "ood_distance" to model.onnx (checked on the first val images, else
    train) and record metrics.json "ood". train/val: training sources (ParquetSplit or SplitData).
    Returns metrics.json "ood"."""
    from cxr.data.stream import as_unit_float

    d = Path(model_dir)
    t0 = time.perf_counter()
    threads = int(threads or min(os.cpu_count() or 1, 4))
    predictor = store.OnnxPredictor(d, store.read_metadata(d), batch_size=batch_size, threads=threads)
    if FEATURES_NAME not in predictor.output_names:
        raise ValueError(f"{d / store.ONNX_FILE} has no {FEATURES_NAME!r} output: re-export it with "
                         f"`python -m cxr.models.onnx_export {d}` first")
    has_val = val is not None and len(val) > 0
    layers = predictor.feature_layers
    train_f = source_features(predictor, train, batch_size)
    val_f = source_features(predictor, val, batch_size) if has_val else None
    features_s = time.perf_counter() - t0
    del predictor
    ref = fit_reference(train_f, val_f, quantile, groups=layer_groups(layers, train_f.shape[1]))
    save_reference(d, ref)
    check_on, name = (val, "val split") if has_val else (train, "train split (no val split)")
    add_distance_to_onnx(d, as_unit_float(check_on.head(MAX_CHECK_IMAGES)), ref, images_from=name)
    meta = store.read_metadata(d)
    meta["ood"].update({"features_s": round(features_s, 3), "fit_s": round(time.perf_counter() - t0, 3)})
    store.write_metadata(d, meta)
    return meta["ood"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cxr.scope.ood",
                                     description="Out-of-distribution references for saved cxr models.")
    sub = parser.add_subparsers(dest="command", required=True)
    fit = sub.add_parser("fit", help="fit a model's reference on a preprocess output's train (and val) split")
    fit.add_argument("model_dirs", nargs="+", metavar="MODEL_DIR",
                     help="a model folder (or a folder of models, as jobs/train.py --out writes)")
    fit.add_argument("--data", required=True, help="the preprocess job's output (PRE_OUT) the model trained on")
    fit.add_argument("--quantile", type=float, default=None,
                     help="threshold quantile of the out-of-fold train + val scores (default: conf "
                          f"scope.ood_quantile, {DEFAULT_QUANTILE})")
    fit.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads (default: up to 4 cores)")
    args = parser.parse_args(argv)
    quantile = args.quantile
    if quantile is None:
        try:
            from cxr.config import load_config

            quantile = float((load_config().get("scope") or {}).get("ood_quantile", DEFAULT_QUANTILE))
        except Exception:  # noqa: BLE001 (no readable conf: the documented default)
            quantile = DEFAULT_QUANTILE
    try:
        dirs = store.expand_model_dirs(args.model_dirs)
    except FileNotFoundError as exc:
        print(exc, file=sys.stderr)
        return 2
    from cxr.data.stream import ParquetSplit

    train = ParquetSplit.open(args.data, "train")
    val = ParquetSplit.open(args.data, "val")
    failed = 0
    for d in dirs:
        try:
            rec = fit_model(d, train, val, quantile, threads=args.threads)
        except (ValueError, FileNotFoundError) as exc:
            print(f"FAILED {d}: {exc}", file=sys.stderr)
            failed += 1
            continue
        print(f"{d}: {rec['dims']} dims in {len(rec['layers'])} layers, {rec['n_train']} train / {rec['n_val']} "
              f"val images, threshold {rec['threshold']:.3f} (q {rec['quantile']} of {rec['n_calibration']} "
              f"scores: {rec['threshold_on']}), {rec['fit_s']:.1f}s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
