"""Training on the driver: the study's Keras models (the CNN once per optimizer) and cxr.nn's scratch models.

No Spark here: the train/val splits are streamed from Parquet into NumPy (cxr.data.loader), which fits in
driver memory for this study's data sizes. Every model directory gets metrics.json recording exactly what
produced it (seed, data counts, preprocess manifest hash and params, class weights, per-epoch history).
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
from cxr.data.loader import SplitData, check_disjoint, load_metadata, load_split, read_manifest
from cxr.models import store
from cxr.models.keras_models import FAMILIES, OPTIMIZERS
from cxr.models.onnx_export import export_onnx
from cxr.provenance import package_versions

log = logging.getLogger(__name__)

SCRATCH_FAMILIES = ("scratch-cnn", "scratch-dnn")
ALL_MODELS = (*FAMILIES, *SCRATCH_FAMILIES)


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


def class_weights(y: np.ndarray, spec: Any) -> dict:
    """'balanced' (n / (k * n_class), sklearn's rule), an explicit {CLASS: weight}, or none.

    Returns {"mode", "weights": {CLASS: w} | None, "train_counts"} for the record and the report.
    """
    counts = {c: int((y == i).sum()) for i, c in enumerate(CLASSES)}
    if spec in (None, False, "none", "None", "null"):
        return {"mode": "none", "weights": None, "train_counts": counts}
    if spec == "balanced":
        present = [c for c in CLASSES if counts[c]]
        n = sum(counts.values())
        weights = {c: (n / (len(present) * counts[c]) if counts[c] else 0.0) for c in CLASSES}
        return {"mode": "balanced", "weights": weights, "train_counts": counts}
    if isinstance(spec, Mapping):
        unknown = set(spec) - set(CLASSES)
        if unknown:
            raise ValueError(f"train.class_weight names unknown classes {sorted(unknown)}; classes: {CLASSES}")
        weights = {c: float(spec.get(c, 1.0)) for c in CLASSES}
        if any(w < 0 for w in weights.values()):
            raise ValueError("train.class_weight values must be >= 0")
        return {"mode": "explicit", "weights": weights, "train_counts": counts}
    raise ValueError(f"train.class_weight must be 'balanced', 'none' or a mapping of class -> weight, got {spec!r}")


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


def _history_dict(raw: Mapping[str, Sequence[float]]) -> dict[str, list[float]]:
    keys = ("loss", "accuracy", "val_loss", "val_accuracy")
    return {k: [float(v) for v in raw[k]] for k in keys if k in raw}


def _train_keras(spec: dict, train: SplitData, val: SplitData, conf: Mapping, weights: dict | None,
                 epochs: int, seed: int) -> tuple[Any, dict, list[float], dict]:
    import keras

    from cxr.models.keras_models import architecture, augmentation, build, optimizer, optimizer_config

    family = spec["family"]
    arch = architecture(family, (conf.get("keras") or {}).get(family))
    aug = augmentation(conf.get("augment"))
    model = build(family, train.x.shape[1:], arch, augment={**aug, "seed": seed})
    opt = optimizer(spec["optimizer"], (conf.get("optimizer_config") or {}).get(spec["optimizer"]))
    model.compile(optimizer=opt, loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    times: list[float] = []

    class EpochTimer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self._t = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            times.append(round(time.perf_counter() - self._t, 3))

    cw = {i: weights[c] for i, c in enumerate(CLASSES)} if weights else None
    history = model.fit(train.x, train.y.astype(np.int64), batch_size=int(conf["batch_size"]), epochs=epochs,
                        validation_data=(val.x, val.y.astype(np.int64)) if len(val) else None,
                        class_weight=cw, shuffle=True, verbose=int(conf.get("verbose", 2)),
                        callbacks=[EpochTimer()])
    details = {"architecture": {"family": family, **arch, "params": int(model.count_params())},
               "optimizer": {"name": spec["optimizer"], "config": optimizer_config(opt)},
               "augment": {**aug, "seed": seed} if aug["enabled"] else {"enabled": False}}
    return model, _history_dict(history.history), times, details


def _train_scratch(spec: dict, train: SplitData, val: SplitData, conf: Mapping, weights: dict | None,
                   epochs: int, seed: int) -> tuple[Any, dict, list[float], dict]:
    """cxr.nn's network, trained by its own Network.train (class weights applied as Keras does)."""
    from cxr.nn import models as nn_models
    from cxr.nn import optimizers as nn_opt

    sconf = conf.get("scratch") or {}
    family = spec["family"].split("-", 1)[1]
    arch = dict((sconf.get(family) or {}))
    x, xv = train.x, val.x
    size = sconf.get("input_size")
    if size and int(size) != x.shape[1]:
        x, xv = store.resize_batch(x, (int(size), int(size))), store.resize_batch(xv, (int(size), int(size)))
    builder = nn_models.cnn if family == "cnn" else nn_models.dnn
    net = builder(x.shape[1:], len(CLASSES), seed=seed, **arch)
    opt = nn_opt.get(spec["optimizer"], **((conf.get("optimizer_config") or {}).get(spec["optimizer"]) or {}))

    def progress(epoch, metrics):
        log.info("%s epoch %d/%d %s", spec["name"], epoch + 1, epochs,
                 " ".join(f"{k} {v:.4f}" for k, v in metrics.items()))

    history = net.train(x, train.y.astype(np.int64), epochs=epochs, batch_size=int(conf["batch_size"]),
                        optimizer=opt, validation_data=(xv, val.y.astype(np.int64)) if len(xv) else None,
                        shuffle=True, seed=seed, callback=progress,
                        class_weight={i: weights[c] for i, c in enumerate(CLASSES)} if weights else None)
    details = {"architecture": {"family": spec["family"], **arch, "input_size": int(x.shape[1]),
                                "params": int(net.count_params())},
               "optimizer": {"name": spec["optimizer"], "config": opt.get_config()},
               "model_size": [int(x.shape[1]), int(x.shape[2])]}
    return net, _history_dict(history.history), [round(t, 3) for t in history.times], details


def _split_summary(data: SplitData) -> dict:
    return {"images": len(data), "patients": data.n_patients(), "classes": data.class_counts()}


def train_and_save(spec: dict, train: SplitData, val: SplitData, conf: Mapping[str, Any], cw: dict, epochs: int,
                   seed: int, target: Path, data_record: Mapping[str, Any], manifest: Mapping[str, Any],
                   calibrate_on: str | None = None) -> dict:
    """Train one planned model from seeded state, save it with its metrics.json to target (replacing it) and,
    when there is a validation set, fit its temperature there. Shared by train and cross-validation."""
    seeds = set_seeds(seed, bool(conf.get("deterministic", True)))
    log.info("training %s (%s, optimizer %s, %d epochs)", spec["name"], spec["family"], spec["optimizer"], epochs)
    t_model = time.perf_counter()
    trainer = _train_scratch if spec["family"] in SCRATCH_FAMILIES else _train_keras
    model, history, times, details = trainer(spec, train, val, conf, cw["weights"], epochs, seed)
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
        "training": {"epochs": epochs, "batch_size": int(conf["batch_size"]), "shuffle": True,
                     "loss": "sparse categorical cross-entropy (class-weighted when weights are on)",
                     "class_weight": cw, "seeds": seeds, "augment": details.get("augment", {"enabled": False})},
        "history": history,
        "epoch_times_s": times,
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
    # model.onnx for the executors' ONNX Runtime engine, checked against the saved model on the val images
    # (on train images where there is no val split, as in cross-validation); a mismatch fails the training.
    t_onnx = time.perf_counter()
    check_on, check_name = (val, "val split") if len(val) else (train, "train split (no val split)")
    export_onnx(target, check_on.x, images_from=check_name)
    metadata["timings_s"]["onnx_export"] = round(time.perf_counter() - t_onnx, 3)
    store.write_metadata(target, {**store.read_metadata(target), "timings_s": metadata["timings_s"]})
    if len(val) and calibrate_on:  # temperature scaling on val; recorded, applied by score only when trustworthy
        from cxr.calibration import calibrate_model

        calibrate_model(target, calibrate_on, val=val)
    last = {k: v[-1] for k, v in history.items() if v}
    log.info("saved %s in %.1fs: %s", target, train_s, " ".join(f"{k}={v:.4f}" for k, v in last.items()))
    del model
    if spec["family"] not in SCRATCH_FAMILIES:
        import keras

        keras.backend.clear_session()
    return {"name": spec["name"], "dir": str(target), "train_s": train_s, "final": last}


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
    rows = int(conf.get("loader_batch_rows", 64))
    train = load_split(data_dir, "train", batch_rows=rows)
    val = load_split(data_dir, "val", batch_rows=rows)
    load_s = round(time.perf_counter() - t0, 3)
    if len(train) == 0:
        raise ValueError(f"no labeled training images in {data_dir}")
    log.info("loaded train %s and val %s images of %dx%d in %.1fs (%.1f MB array)", len(train), len(val),
             train.x.shape[1], train.x.shape[2], load_s, (train.x.nbytes + val.x.nbytes) / 1e6)
    cw = class_weights(train.y, conf.get("class_weight", "balanced"))
    log.info("class weights (%s): %s; train counts %s", cw["mode"], cw["weights"], cw["train_counts"])
    data_record = {
        "dir": str(data_dir),
        "manifest_sha256": manifest_sha,
        "image_size": [int(train.x.shape[1]), int(train.x.shape[2])],
        "train": _split_summary(train),
        "val": _split_summary(val),
        "test": {"images": disjoint["images"], "patients": disjoint["patients"]},
        "unlabeled_rows": int(meta["label"].isna().sum()),
        "split_disjointness": disjoint,
        "load_s": load_s,
        "loader": train.stats,
    }
    results = [train_and_save(spec, train, val, conf, cw, epochs, seed, out / spec["name"], data_record, manifest,
                              calibrate_on=data_dir) for spec in todo]
    return {"models": results, "data": data_record, "class_weight": cw, "seed": seed, "epochs": epochs,
            "total_s": round(time.perf_counter() - t0, 3)}
