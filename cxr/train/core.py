"""Training on the driver: the study's Keras models (the CNN once per optimizer) and cxr.nn's scratch models,
each a single model or a seed ensemble (train.ensemble).

No Spark here: the train/val splits are streamed from Parquet every epoch through a bounded shuffle buffer
(cxr.data.stream), so driver memory does not grow with the number of images. Every model directory gets
metrics.json recording exactly what produced it (seed, data counts, preprocess manifest hash and params,
class weights, shuffle, per-epoch history).

After a model (single, scratch or ensemble) is saved and exported, its out-of-distribution reference is fitted
(cxr.scope.ood): features of the train split (every layer's: pooled conv blocks, hidden activations) streamed
through model.onnx, one Ledoit-Wolf Mahalanobis distance per layer, threshold at scope.ood_quantile of the
out-of-fold train scores pooled with the val split's (the out-of-fold scores alone in cross-validation folds),
ood.npz written and "ood_distance" added to model.onnx. An ensemble gets one reference on its members'
concatenated features (each layer pooled over the members); members get none. Last, the train job writes each
model's run-monitoring reference (cxr.monitor.reference: monitor_reference.json, the score job's statistics of
the val split).
"""
from __future__ import annotations

import logging
import random
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from cxr import CLASSES
from cxr.data.loader import check_disjoint, load_metadata, read_manifest
from cxr.models import store
from cxr.models.keras_models import FAMILIES, OPTIMIZERS
from cxr.models.onnx_export import export_onnx
from cxr.common.manifest import source_names
from cxr.common.provenance import package_versions

log = logging.getLogger(__name__)

SCRATCH_FAMILIES = ("scratch-cnn", "scratch-dnn")
ALL_MODELS = (*FAMILIES, *SCRATCH_FAMILIES)
DEFAULT_OOD_QUANTILE = 0.995   # scope.ood_quantile when the config has none (conf/default.yaml says why)


class OutputExistsError(RuntimeError):
    """Model folders that would be overwritten (the CLI turns this into exit code 2)."""

    pass


def set_seeds(seed: int, deterministic: bool = True) -> dict:
    """Seed Python, NumPy and TensorFlow (keras.utils.set_random_seed does all three) and, if asked, make TF
    ops deterministic, so two runs with one seed give the same numbers. Returns what was set, for the record."""
    random.seed(seed)
    np.random.seed(seed)
    record = {"seed": int(seed), "python": int(seed), "numpy": int(seed), "tensorflow": None,
              "op_determinism": False}
    try:
        import keras
        import tensorflow as tf
    except ImportError:  # scratch-only environments
        return record
    keras.utils.set_random_seed(seed)
    record["tensorflow"] = int(seed)
    if deterministic:
        tf.config.experimental.enable_op_determinism()
        record["op_determinism"] = True
    return record


def class_weights(y: np.ndarray, spec: Any, sources=None) -> dict:
    """'balanced' (n / (k * n_class), sklearn's rule), 'balanced_by_source', an explicit {CLASS: weight}, or none.

    'balanced_by_source' (needs `sources`, one per row) weighs every (class, source) cell so that each class
    counts n / k in all and each of its sources an equal share of that: n / (k * sources_of_class * n_cell).
    A class whose films come mostly from one collection then cannot be learnt as "that collection".

    Returns {"mode", "weights": {CLASS: w} | None, "train_counts"} for the record and the report (plus "cells":
    {CLASS: {source: weight}} and "cell_counts" for balanced_by_source, whose "weights" are the class-level
    balanced ones, used by models that take no per-row weights).
    """
    counts = {c: int((y == i).sum()) for i, c in enumerate(CLASSES)}
    if spec in (None, False, "none", "None", "null"):
        return {"mode": "none", "weights": None, "train_counts": counts}
    if spec in ("balanced", "balanced_by_source"):
        present = [c for c in CLASSES if counts[c]]
        n = sum(counts.values())
        weights = {c: (n / (len(present) * counts[c]) if counts[c] else 0.0) for c in CLASSES}
        if spec == "balanced":
            return {"mode": "balanced", "weights": weights, "train_counts": counts}
        if sources is None:
            raise ValueError("train.class_weight balanced_by_source needs each image's source")
        names = source_names(sources)
        cells, cell_counts = {}, {}
        for i, c in enumerate(CLASSES):
            srcs, k = np.unique(names[y == i], return_counts=True)
            cell_counts[c] = {str(s): int(m) for s, m in zip(srcs, k)}
            cells[c] = {str(s): n / (len(present) * len(srcs) * int(m)) for s, m in zip(srcs, k)}
        return {"mode": "balanced_by_source", "weights": weights, "train_counts": counts, "cells": cells,
                "cell_counts": cell_counts}
    if isinstance(spec, Mapping):
        unknown = set(spec) - set(CLASSES)
        if unknown:
            raise ValueError(f"train.class_weight names unknown classes {sorted(unknown)}; classes: {CLASSES}")
        weights = {c: float(spec.get(c, 1.0)) for c in CLASSES}
        if any(w < 0 for w in weights.values()):
            raise ValueError("train.class_weight values must be >= 0")
        return {"mode": "explicit", "weights": weights, "train_counts": counts}
    raise ValueError(f"train.class_weight must be 'balanced', 'none' or a mapping of class -> weight, got {spec!r}")


def row_weights(cw: Mapping[str, Any], y: np.ndarray, sources) -> np.ndarray | None:
    """One weight per training row from class_weights' cells (None for modes without per-row weights)."""
    cells = cw.get("cells")
    if not cells:
        return None
    names = source_names(sources)
    return np.asarray([cells[CLASSES[int(label)]][s] for label, s in zip(y, names)], np.float32)


def plan(models: Sequence[str], optimizers: Sequence[str], default_optimizer: str) -> list[dict]:
    """(name, family, optimizer) of every model to train: cnn-<optimizer> for each optimizer, others once."""
    out = []
    for family in models:
        if family not in ALL_MODELS:
            raise ValueError(f"unknown model {family!r}; known: {', '.join(ALL_MODELS)}")
        if family == "cnn":
            for opt in optimizers:
                if opt not in OPTIMIZERS:
                    raise ValueError(f"unknown optimizer {opt!r}; known: {', '.join(OPTIMIZERS)}")
                out.append({"name": f"cnn-{opt}", "family": "cnn", "optimizer": opt})
        else:
            out.append({"name": family, "family": family, "optimizer": default_optimizer})
    return out


def _as_list(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return [str(v) for v in value]


def _split_summary(data) -> dict:
    return {"images": len(data), "patients": data.n_patients(), "classes": data.class_counts()}


def _fit_and_save(spec: dict, train, val, conf: Mapping[str, Any], cw: dict, epochs: int, seed: int, target: Path,
                  data_record: Mapping[str, Any], manifest: Mapping[str, Any],
                  ood_quantile: float | None = None) -> dict:
    """Train one model from seeded state, save it with its metrics.json to target, export its model.onnx
    (checked against it) and, unless ood_quantile is None (ensemble members), fit its OOD reference; returns the
    metadata written."""
    seeds = set_seeds(seed, bool(conf.get("deterministic", True)))
    log.info("training %s (%s, optimizer %s, %d epochs, seed %d)", spec["name"], spec["family"], spec["optimizer"],
             epochs, seed)
    t_model = time.perf_counter()
    if spec["family"] in SCRATCH_FAMILIES:
        from cxr.train.scratch_fit import train_scratch as trainer
    else:
        from cxr.train.keras_fit import train_keras as trainer
    rows_w = row_weights(cw, train.y, train.source) if spec["family"] not in SCRATCH_FAMILIES else None
    model, history, times, details = trainer(spec, train, val, conf, cw["weights"], epochs, seed,
                                             **({"row_weights": rows_w} if rows_w is not None else {}))
    train_s = round(time.perf_counter() - t_model, 3)
    data_size = list(data_record["image_size"])
    model_size = details.get("model_size", data_size)
    metadata = {
        "schema": store.SCHEMA,
        "name": spec["name"],
        "family": spec["family"],
        "classes": list(CLASSES),
        "input": {"data_size": data_size, "channels": 1, "dtype": "float32", "scale": "x / 255",
                  "model_size": model_size, "resize": "area" if model_size != data_size else None},
        "architecture": details["architecture"],
        "optimizer": details["optimizer"],
        "training": {"epochs": epochs, "batch_size": int(conf["batch_size"]), "shuffle": shuffle_record(train),
                     "loss": "categorical cross-entropy (class-weighted when weights are on)",
                     "label_smoothing": details.get("label_smoothing", 0.0),
                     "class_weight": cw, "seeds": seeds, "augment": details.get("augment", {"enabled": False}),
                     "site_augment": details.get("site_augment", {"enabled": False}),
                     "framing": details.get("framing", {"p": 0.0}),
                     "source_adversary": details.get("source_adversary", {"enabled": False})},
        "history": history,
        "epoch_times_s": times,
        "epoch_cpu_s": details.get("epoch_cpu_s"),
        "timings_s": {"load_data": data_record.get("load_s"), "train": train_s},
        "data": dict(data_record),
        "preprocess": manifest.get("params", {}),
        "preprocess_versions": manifest.get("versions", {}),
        "versions": package_versions(),
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    target = Path(target)
    if target.exists():
        shutil.rmtree(target)
    t_save = time.perf_counter()
    if spec["family"] in SCRATCH_FAMILIES:
        store.save_scratch(model, target, metadata)
    else:
        store.save_keras(model, target, metadata)
    metadata["timings_s"]["save"] = round(time.perf_counter() - t_save, 3)
    del model
    if spec["family"] not in SCRATCH_FAMILIES:
        import keras

        keras.backend.clear_session()
    _export(target, train, val, metadata["timings_s"], ood_quantile)
    return store.read_metadata(target)


def _export(target: Path, train, val, timings: dict, ood_quantile: float | None = None) -> None:
    """model.onnx for the executors' ONNX Runtime engine, checked against the saved model on the first val
    images (train images where there is no val split, as in cross-validation); a mismatch fails the training.
    Then (ood_quantile given) the OOD reference: the train split's features through model.onnx, the threshold at
    that quantile of the out-of-fold train scores and the val split's (out-of-fold alone without a val split),
    "ood_distance" added to the graph (timings_s.ood)."""
    from cxr.data.stream import as_unit_float
    from cxr.models.onnx_export import MAX_CHECK_IMAGES

    t_onnx = time.perf_counter()
    check_on, check_name = (val, "val split") if len(val) else (train, "train split (no val split)")
    export_onnx(target, as_unit_float(check_on.head(MAX_CHECK_IMAGES)), images_from=check_name)
    timings["onnx_export"] = round(time.perf_counter() - t_onnx, 3)
    if ood_quantile is not None:
        from cxr.scope.ood import fit_model

        t_ood = time.perf_counter()
        rec = fit_model(target, train, val, float(ood_quantile))
        timings["ood"] = round(time.perf_counter() - t_ood, 3)
        log.info("OOD reference for %s: %d dims in %d layers, threshold %.3f at q=%g of the %s scores (%.1fs)",
                 target.name, rec["dims"], len(rec["layers"]), rec["threshold"], rec["quantile"], rec["threshold_on"],
                 timings["ood"])
    store.write_metadata(target, {**store.read_metadata(target), "timings_s": timings})


def shuffle_record(train) -> dict:
    """How the minibatch order was drawn, for metrics.json (see cxr.data.stream)."""
    buffer = getattr(train, "buffer", None)
    whole = buffer is None or buffer >= len(train)
    return {"enabled": True, "source": "parquet stream" if buffer is not None else "in-memory array",
            "buffer_images": buffer, "rows": len(train),
            "order": "a permutation of the split per epoch (seeded by seed and epoch)" if whole else
                     f"row groups interleaved {getattr(train, 'cycle', None)} at a time through a "
                     f"{buffer}-image shuffle buffer (seeded by seed and epoch)"}


def train_and_save(spec: dict, train, val, conf: Mapping[str, Any], cw: dict, epochs: int,
                   seed: int, target: Path, data_record: Mapping[str, Any], manifest: Mapping[str, Any],
                   calibrate_on: str | None = None, ood_quantile: float | None = None) -> dict:
    """Train one planned model (train.ensemble > 1: that many members, seeds seed, seed+1, ..., saved as one
    ensemble model) into target (replacing it), fit its OOD reference (threshold at ood_quantile, default
    scope.ood_quantile's 0.98, of the out-of-fold train and the val scores) and, when there is a
    validation set, fit its temperature there. train/val are training sources (cxr.data.stream.ParquetSplit or
    SplitData). Shared by train and cross-validation."""
    from cxr.train import ensemble

    quantile = float(DEFAULT_OOD_QUANTILE if ood_quantile is None else ood_quantile)
    target = Path(target)
    if target.exists():
        shutil.rmtree(target)
    k = ensemble.size(conf)
    t0 = time.perf_counter()
    if k == 1:
        meta = _fit_and_save(spec, train, val, conf, cw, epochs, seed, target, data_record, manifest, quantile)
    else:
        members = []
        for s in ensemble.member_seeds(seed, k):
            name = ensemble.member_name(spec["name"], s)
            members.append(_fit_and_save({**spec, "name": name}, train, val, conf, cw, epochs, s,
                                         target / store.MEMBERS_DIR / name, data_record, manifest))
        ensemble.save(target, spec, members)
        timings = store.read_metadata(target)["timings_s"]
        _export(target, train, val, timings, quantile)  # one reference on the members' concatenated features
        meta = store.read_metadata(target)
    train_s = round(time.perf_counter() - t0, 3) if k > 1 else meta["timings_s"]["train"]
    if len(val) and calibrate_on:  # temperature scaling on val; recorded, applied by score only when trustworthy
        from cxr.evaluate.calibration import calibrate_model

        calibrate_model(target, calibrate_on, val=val)
    last = {key: v[-1] for key, v in meta["history"].items() if v}
    log.info("saved %s in %.1fs: %s", target, train_s, " ".join(f"{key}={v:.4f}" for key, v in last.items()))
    return {"name": spec["name"], "dir": str(target), "train_s": train_s, "final": last,
            **({"members": [m["name"] for m in meta["ensemble"]["members"]]} if k > 1 else {})}

def run(data_dir: str, out_dir: str, config: Mapping[str, Any], models: Sequence[str] | str | None = None,
        optimizers: Sequence[str] | str | None = None, epochs: int | None = None, overwrite: bool = False) -> dict:
    """Train every requested model on PRE_OUT's train split (val for the curves) and save it to out_dir/<name>."""
    conf = config["train"]
    models = _as_list(models) or _as_list(conf["models"])
    optimizers = _as_list(optimizers) or _as_list(conf["optimizers"])
    epochs = int(epochs or conf["epochs"])
    seed = int(conf["seed"])
    todo = plan(models, optimizers, conf.get("default_optimizer", "adam"))
    out = Path(out_dir)
    clashes = [t["name"] for t in todo if (out / t["name"]).exists()]
    if clashes and not overwrite:
        raise OutputExistsError(f"{out} already holds {', '.join(clashes)}; pass --overwrite to replace them")

    t0 = time.perf_counter()
    manifest, manifest_sha = read_manifest(data_dir)
    meta = load_metadata(data_dir)
    disjoint = check_disjoint(meta, "test", ("train", "val"))
    check_disjoint(meta, "val", ("train",))
    from cxr.data.stream import open_training_split

    train = open_training_split(data_dir, "train", conf)
    val = open_training_split(data_dir, "val", conf)
    load_s = round(time.perf_counter() - t0, 3)
    if len(train) == 0:
        raise ValueError(f"no labeled training images in {data_dir}")
    h, w = train.image_size
    log.info("streaming train %s and val %s images of %dx%d (metadata read in %.1fs; shuffle buffer %d images, "
             "%.1f MB)", len(train), len(val), h, w, load_s, train.buffer, min(train.buffer, len(train)) * h * w / 1e6)
    cw = class_weights(train.y, conf.get("class_weight", "balanced"), train.source)
    log.info("class weights (%s): %s; train counts %s", cw["mode"], cw["weights"], cw["train_counts"])
    data_record = {
        "dir": str(data_dir),
        "manifest_sha256": manifest_sha,
        "image_size": [int(h), int(w)],
        "train": _split_summary(train),
        "val": _split_summary(val),
        "test": {"images": disjoint["images"], "patients": disjoint["patients"]},
        "unlabeled_rows": int(meta["label"].isna().sum()),
        "split_disjointness": disjoint,
        "load_s": load_s,
        "loader": {"mode": "stream", "shuffle_buffer": train.buffer, "shuffle_cycle": train.cycle,
                   "batch_rows": train.batch_rows, "row_groups": len(train.index.plan),
                   "buffer_bytes": int(min(train.buffer, len(train)) * h * w)},
    }
    quantile = float((config.get("scope") or {}).get("ood_quantile", DEFAULT_OOD_QUANTILE))
    results = [train_and_save(spec, train, val, conf, cw, epochs, seed, out / spec["name"], data_record, manifest,
                              calibrate_on=data_dir, ood_quantile=quantile) for spec in todo]
    if config.get("monitor"):   # run monitoring's training reference (part of the model id): after calibration
        from cxr.monitor.reference import write_reference

        for r in results:
            write_reference(r["dir"], data_dir, config)
    from cxr.models import card

    rows = card.training_rows(data_dir)
    for r in results:   # what each model was trained on (part of the model id); evaluation adds its numbers
        card.write(r["dir"], card.build(r["dir"], rows, config))
    return {"models": results, "data": data_record, "class_weight": cw, "seed": seed, "epochs": epochs,
            "total_s": round(time.perf_counter() - t0, 3)}
