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
ood.npz (cxr.scope.reference: the fit, the NumPy distance and the file; plain arrays, loaded with
allow_pickle=False; part of the model id; a pre-layer ood.npz loads as one unscaled layer), summarised in
metrics.json under "ood" (per layer: dims, shrinkage, scale), and built into model.onnx as a third output
"ood_distance" (N,) float32 by cxr.models.onnx_export.add_distance_to_onnx: per layer Gather -> Sub(mean) ->
MatMul(L) -> Mul(self) -> ReduceSum(axis 1) -> Sqrt -> Mul(1 / scale), then Sum; checked against the NumPy
distance on the check images (within DISTANCE_RTOL) before it is kept. This module fits a model's reference.

    python -m cxr.scope.ood fit MODEL_DIR [MODEL_DIR ...] --data PRE_OUT [--quantile Q]   (models trained before)
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from cxr.models import store
from cxr.models.onnx_export import MAX_CHECK_IMAGES, add_distance_to_onnx
from cxr.scope.reference import DEFAULT_QUANTILE, fit_reference, layer_groups, save_reference

FEATURES_NAME = store.FEATURES_OUTPUT
FEATURE_BATCH = 64      # images per ONNX Runtime call when computing a split's features


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
