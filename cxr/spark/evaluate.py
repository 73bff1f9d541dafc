"""Data-parallel evaluation: the test split's partitions go through every model on the executors.

Each Python worker loads each model once (cxr.models.store.cached_predictor with conf `inference`'s engine,
ONNX Runtime or the model's own framework, one thread per worker since Spark already runs one worker per
core) and emits, per partition and model, its confusion matrix and the per-row class probabilities (3 floats
a row: small) that ROC-AUC needs. The driver adds the matrices up and computes the metrics with cxr.evaluate.metrics.
Before anything is scored, the split is checked to share no image (sha256) and no patient with train/val: a
leaked test set would make every number meaningless.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from cxr import CLASSES
from cxr.data.loader import SplitLeakError, to_unit_float
from cxr.evaluate import by_source
from cxr.evaluate.metrics import confusion_matrix, summarize
from cxr.models.store import (ONNX_FILE, ensemble_members, inference_settings, list_models, missing_onnx_message,
                              read_metadata)
from cxr.spark import fs
from cxr.spark.session import master_url, default_parallelism

log = logging.getLogger(__name__)

ALL_SPLITS = "all"   # evaluate every labelled row: an external archive, none of whose images trained the model
RESULT_SCHEMA = ("model string, partition int, rows long, cm array<long>, sha256 array<string>, "
                 "y array<int>, proba array<float>")


def images_frame(frame: pd.DataFrame) -> np.ndarray:
    """A pandas batch of the preprocess output -> float32 (n, H, W, 1) in [0, 1] (same scaling as training)."""
    h, w = int(frame["height"].iloc[0]), int(frame["width"].iloc[0])
    if not ((frame["height"] == h).all() and (frame["width"] == w).all()):
        raise ValueError("images of different sizes in one batch: was the data written by one preprocess run?")
    lengths = frame["image"].map(len)
    if not (lengths == h * w).all():
        raise ValueError(f"an image holds {int(lengths[lengths != h * w].iloc[0])} bytes, expected {h}x{w}")
    raw = np.frombuffer(b"".join(frame["image"].tolist()), dtype=np.uint8).reshape(len(frame), h, w)
    return to_unit_float(raw)[..., None]


def _label_index(labels: pd.Series) -> np.ndarray:
    lookup = {c: i for i, c in enumerate(CLASSES)}
    return labels.map(lookup).to_numpy(dtype=np.int64)


def partition_evaluator(model_dirs: Sequence[str], batch_size: int = 64, tf_threads: int = 1,
                        engine: str = "keras", onnx_threads: int = 1):
    """The function mapInPandas runs on each partition: one output row per model with the partition's
    confusion matrix, and its rows' ids, labels and probabilities."""
    model_dirs = [str(d) for d in model_dirs]

    def run(frames: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        from pyspark import TaskContext

        from cxr.models.store import cached_predictor

        ctx = TaskContext.get()
        part = ctx.partitionId() if ctx is not None else -1
        acc = {d: {"cm": np.zeros((len(CLASSES), len(CLASSES)), np.int64), "sha": [], "y": [], "p": []}
               for d in model_dirs}
        rows = 0
        for frame in frames:
            if frame.empty:
                continue
            x = images_frame(frame)
            y = _label_index(frame["label"])
            rows += len(frame)
            for d in model_dirs:
                proba = cached_predictor(d, batch_size=batch_size, tf_threads=tf_threads, engine=engine,
                                         onnx_threads=onnx_threads).predict_proba(x)
                a = acc[d]
                a["cm"] += confusion_matrix(y, proba.argmax(axis=1))
                a["sha"].extend(frame["sha256"].tolist())
                a["y"].append(y)
                a["p"].append(proba.astype(np.float32).ravel())
        if rows == 0:
            return
        yield pd.DataFrame({
            "model": [Path(d).name for d in model_dirs],
            "partition": [part] * len(model_dirs),
            "rows": [rows] * len(model_dirs),
            "cm": [acc[d]["cm"].ravel().tolist() for d in model_dirs],
            "sha256": [acc[d]["sha"] for d in model_dirs],
            "y": [np.concatenate(acc[d]["y"]).astype(np.int32).tolist() for d in model_dirs],
            "proba": [np.concatenate(acc[d]["p"]).tolist() for d in model_dirs],
        })

    return run


def sources_of(data_dir: str) -> pd.Series:
    """sha256 -> source of a preprocess output's images (thin column, on the driver; null where unknown or the
    table predates the column)."""
    from cxr.data.loader import images_dataset

    dataset = images_dataset(str(data_dir))
    if "source" not in dataset.schema.names:
        return pd.Series(dtype=object)
    table = dataset.to_table(columns=["sha256", "source"]).to_pandas().drop_duplicates("sha256")
    return table.set_index("sha256")["source"]


def split_checks(images: DataFrame, split: str) -> dict:
    """Counts for the report and the leakage check, with Spark joins (two jobs; no rows collected)."""
    seen_splits = [] if split == ALL_SPLITS else [x for x in ("train", "val") if x != split]

    def keys(df: DataFrame) -> DataFrame:
        by_image = df.select(F.lit("image").alias("kind"), F.col("sha256").alias("key"))
        by_patient = df.where(F.col("patient_id").isNotNull()).select(F.lit("patient").alias("kind"),
                                                                      F.col("patient_id").alias("key"))
        return by_image.unionByName(by_patient)

    held = images if split == ALL_SPLITS else images.where(F.col("split") == split)
    seen = images.where(F.col("split").isin(seen_splits))
    shared = keys(held).distinct().join(keys(seen), ["kind", "key"], "left_semi")
    found = {}
    for r in ([] if not seen_splits else shared.groupBy("kind").agg(F.count(F.lit(1)).alias("n"),
                                        F.slice(F.sort_array(F.collect_list("key")), 1, 3).alias("examples")).collect()):
        found[r["kind"]] = (int(r["n"]), list(r["examples"]))
    if found:
        n_img, ex_img = found.get("image", (0, []))
        n_pat, ex_pat = found.get("patient", (0, []))
        raise SplitLeakError(f"split '{split}' shares {n_img} images (by sha256, e.g. {ex_img}) and {n_pat} "
                             f"patients (e.g. {ex_pat}) with {'/'.join(seen_splits)}: refusing to evaluate")
    labeled = F.col("label").isin(list(CLASSES))
    row = held.agg(F.count(F.lit(1)).alias("rows"), F.sum(labeled.cast("long")).alias("labeled"),
                   F.countDistinct("patient_id").alias("patients"),
                   F.sum(F.col("patient_id").isNull().cast("long")).alias("no_patient"),
                   F.min("height").alias("h_min"), F.max("height").alias("h_max"),
                   F.min("width").alias("w_min"), F.max("width").alias("w_max"),
                   *[F.sum((F.col("label") == c).cast("long")).alias(c) for c in CLASSES]).first()
    return {"split": split, "rows": int(row["rows"] or 0), "images": int(row["labeled"] or 0),
            "unlabeled": int((row["rows"] or 0) - (row["labeled"] or 0)),
            "patients": int(row["patients"] or 0), "images_without_patient_id": int(row["no_patient"] or 0),
            "classes": {c: int(row[c] or 0) for c in CLASSES},
            "image_sizes": sorted({(row["h_min"], row["w_min"]), (row["h_max"], row["w_max"])} - {(None, None)}),
            "checked_against": seen_splits, "shared_images": 0, "shared_patients": 0}


def reduce_results(rows: Sequence[Mapping[str, Any]], n_classes: int = len(CLASSES)) -> dict[str, dict]:
    """Per-partition rows -> per-model (summed confusion matrix, rows ordered by sha256)."""
    merged: dict[str, dict] = {}
    for r in rows:
        m = merged.setdefault(r["model"], {"cm": np.zeros((n_classes, n_classes), np.int64), "sha": [], "y": [],
                                           "p": [], "partitions": 0})
        m["cm"] += np.asarray(r["cm"], np.int64).reshape(n_classes, n_classes)
        m["sha"].extend(r["sha256"])
        m["y"].extend(r["y"])
        m["p"].append(np.asarray(r["proba"], np.float32).reshape(-1, n_classes))
        m["partitions"] += 1
    for m in merged.values():
        order = np.argsort(np.asarray(m["sha"], dtype=object), kind="stable")
        m["sha"] = [m["sha"][i] for i in order]
        m["y"] = np.asarray(m["y"], np.int64)[order]
        m["p"] = np.concatenate(m["p"])[order] if m["p"] else np.zeros((0, n_classes), np.float32)
    return merged


def evaluate_local(predictor, x: np.ndarray, y: np.ndarray, batch_size: int = 64) -> dict:
    """The same metrics computed on the driver for rows already in memory (the oracle for the Spark path)."""
    proba = predictor.predict_proba(x)
    return summarize(y, proba)


def run(spark: SparkSession, data_dir: str, models_dir: str, config: Mapping[str, Any], split: str | None = None,
        models: Sequence[str] | None = None, write: bool = True) -> dict:
    """Evaluate every model under models_dir (or the named ones) on data_dir's split; writes
    models_dir/evaluation_<split>.json and returns the same dict."""
    conf = config.get("evaluate") or {}
    split = split or conf.get("split", "test")
    t0 = time.perf_counter()
    dirs = list_models(models_dir)
    if models:
        wanted = set(models)
        dirs = [d for d in dirs if d.name in wanted]
        missing = wanted - {d.name for d in dirs}
        if missing:
            raise FileNotFoundError(f"no model {', '.join(sorted(missing))} in {models_dir}")
    if not dirs:
        raise FileNotFoundError(f"no models (folders with metrics.json and weights) in {models_dir}")
    # a seed ensemble's members are evaluated beside it (same rows, same pass), so the report shows each
    members = {m: d.name for d in dirs for m in ensemble_members(d)}
    dirs = [*dirs, *members]
    metas = {d.name: read_metadata(d) for d in dirs}
    inference = inference_settings(config)
    if inference["engine"] == "onnx":  # fail on the driver, in one clear line, not in a task on an executor
        for d in dirs:
            if not (d / ONNX_FILE).is_file():
                raise FileNotFoundError(missing_onnx_message(d))

    images = spark.read.parquet(f"{fs.qualified(spark, str(data_dir))}/images")
    checks = split_checks(images, split)
    timings = {"checks": round(time.perf_counter() - t0, 3)}
    for name, meta in metas.items():
        want = tuple((meta.get("input") or {}).get("data_size") or ())
        if checks["image_sizes"] and any(tuple(sz) != want for sz in checks["image_sizes"]):
            raise ValueError(f"model {name} was trained on {want[0]}x{want[1]} images but {data_dir} holds "
                             f"{', '.join(f'{h}x{w}' for h, w in checks['image_sizes'])}: preprocess with "
                             f"--size {want[0]} (its metrics.json has the params) or pick other models")
    warnings = []
    min_images = int(conf.get("min_test_images", 100))
    if checks["images"] < min_images:
        warnings.append(f"the {split} split holds only {checks['images']} labeled images (< {min_images}): "
                        f"accuracy and F1 move by {100 / max(checks['images'], 1):.1f} points per image; "
                        "read the confidence intervals, not the point estimates")
    if checks["unlabeled"]:
        warnings.append(f"{checks['unlabeled']} {split} rows have no label and are not evaluated")
    from cxr.data.loader import read_manifest

    _, manifest_sha = read_manifest(data_dir)
    for name, meta in metas.items():
        trained_on = (meta.get("data") or {}).get("manifest_sha256")
        if trained_on and trained_on != manifest_sha:
            warnings.append(f"{name} was trained on another preprocess output (manifest sha256 {trained_on[:12]}… "
                            f"!= {manifest_sha[:12]}…): its {split} split may overlap that run's training images")
    parts = int(conf.get("partitions") or 0) or default_parallelism(spark)
    in_split = F.lit(True) if split == ALL_SPLITS else F.col("split") == split
    rows_df = (images.where(in_split & F.col("label").isin(list(CLASSES)))
               .select("sha256", "label", "image", "height", "width")
               .repartition(parts, "sha256"))
    t1 = time.perf_counter()
    evaluator = partition_evaluator([str(d.resolve()) for d in dirs], int(conf.get("batch_size", 64)),
                                    int(conf.get("tf_threads", 1)), **inference)
    collected = [r.asDict() for r in rows_df.mapInPandas(evaluator, schema=RESULT_SCHEMA).collect()]
    timings["predict"] = round(time.perf_counter() - t1, 3)
    merged = reduce_results(collected)

    sources = sources_of(data_dir)
    results = {}
    for d in dirs:
        m = merged.get(d.name)
        if m is None:  # no labeled rows in the split
            y, proba, sha, cm, n_parts = np.zeros(0, np.int64), np.zeros((0, 3), np.float32), [], None, 0
        else:
            y, proba, sha, cm, n_parts = m["y"], m["p"], m["sha"], m["cm"], m["partitions"]
            if not np.array_equal(cm, confusion_matrix(y, proba.argmax(axis=1))):
                raise RuntimeError(f"{d.name}: partition confusion matrices do not add up to the rows' predictions")
        summary = summarize(y, proba, cm)
        summary["partitions"] = n_parts
        if d in members:
            summary["member_of"] = members[d]
        summary["by_source"] = by_source.cells(y, proba.argmax(axis=1), sources.reindex(sha).to_numpy())
        summary["predictions"] = {"sha256": sha, "y": y.tolist(), "proba": np.round(proba, 6).tolist()}
        results[d.name] = summary
        log.info("%s on %s: n=%d accuracy %.4f macro-F1 %s", d.name, split, summary["n"], summary["accuracy"] or 0,
                 f"{summary['macro_f1']:.4f}" if summary["macro_f1"] is not None else "n/a")
    timings["total"] = round(time.perf_counter() - t0, 3)
    out = {"split": split, "data_dir": str(data_dir), "manifest_sha256": manifest_sha, "data": checks,
           "warnings": warnings, "partitions": parts, "models": results, "timings_s": timings, "inference": inference,
           "spark": {"version": spark.version, "master": master_url(spark)}}
    for w in warnings:
        log.warning("%s", w)
    if write:
        path = Path(models_dir) / f"evaluation_{split}.json"
        path.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
        log.info("wrote %s", path)
    return out


def format_summary(evaluation: Mapping[str, Any]) -> str:
    """The lines the jobs print: one per model, then the warnings."""
    data = evaluation["data"]
    lines = [f"evaluate: {data['images']} {evaluation['split']} images from {data['patients']} patients, "
             f"{evaluation['partitions']} partitions, {evaluation['timings_s']['total']:.0f}s"]
    for name, s in evaluation["models"].items():
        lo, hi = s["accuracy_ci95"]
        f1 = "n/a" if s["macro_f1"] is None else f"{s['macro_f1']:.4f}"
        nv = s["normal_vs_viral"]["accuracy"]
        lines.append(f"  {name:<14} accuracy {s['accuracy'] or 0:.4f} [{lo or 0:.3f}, {hi or 0:.3f}]  macro-F1 {f1}  "
                     f"NORMAL-vs-VIRAL {'n/a' if nv is None else f'{nv:.4f}'}")
    lines += [f"  warning: {w}" for w in evaluation["warnings"]]
    return "\n".join(lines)
