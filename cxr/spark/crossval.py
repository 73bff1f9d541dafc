"""Cross-validation's evaluation on the executors: every held-out fold through its own fold's models.

Rows are joined to their (seed, fold) assignment and grouped by (seed, fold, bucket), the bucket bounding a
group to about GROUP_ROWS images so a group fits a worker's memory whatever the archive's size. Each group
runs through the models trained without that fold, on the full images and on the shortcut probes' masked
variants (cxr.evaluate.probes), and comes back as one row per (model, region) holding the group's labels and
probabilities; the driver computes the metrics.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from cxr import CLASSES
from cxr.evaluate.folds import fold_key
from cxr.models.store import inference_settings
from cxr.evaluate.probes import REGIONS, mask_images
from cxr.spark.evaluate import _label_index, images_frame
from cxr.spark import fs

GROUP_ROWS = 128
RESULT_SCHEMA = ("seed int, fold int, model string, region string, sha256 array<string>, y array<int>, "
                 "proba array<float>")


def group_evaluator(models: Mapping[str, Sequence[str]], regions: Sequence[str] = ("full", *REGIONS),
                    batch_size: int = 64, tf_threads: int = 1, engine: str = "keras", onnx_threads: int = 1):
    """The function applyInPandas runs on one (seed, fold, bucket) group. models: fold_key -> model dirs."""
    models = {k: [str(d) for d in v] for k, v in models.items()}
    regions = tuple(regions)

    def run(frame: pd.DataFrame) -> pd.DataFrame:
        from cxr.models.store import cached_predictor

        seed, fold = int(frame["seed"].iloc[0]), int(frame["fold"].iloc[0])
        x = images_frame(frame)
        y = _label_index(frame["label"]).astype(np.int32).tolist()
        sha = frame["sha256"].tolist()
        variants = {r: (x if r == "full" else mask_images(x, r)) for r in regions}
        rows = []
        for d in models[fold_key(seed, fold)]:
            predictor = cached_predictor(d, batch_size=batch_size, tf_threads=tf_threads, engine=engine,
                                         onnx_threads=onnx_threads)
            for region, xr in variants.items():
                proba = predictor.predict_proba(xr).astype(np.float32)
                rows.append({"seed": seed, "fold": fold, "model": Path(d).name, "region": region, "sha256": sha,
                             "y": y, "proba": proba.ravel().tolist()})
        return pd.DataFrame(rows, columns=["seed", "fold", "model", "region", "sha256", "y", "proba"])

    return run


def evaluate_folds(spark: SparkSession, data_dir: str, assignment: pd.DataFrame,
                   models: Mapping[str, Sequence[str]], config: Mapping, regions: Iterable[str] | None = None
                   ) -> list[dict]:
    """assignment: (sha256, seed, fold) for every labeled image and seed. Returns one dict per
    (seed, fold, model, region) with y (n,) and proba (n, 3) ordered by sha256."""
    conf = config.get("evaluate") or {}
    regions = tuple(regions) if regions is not None else ("full", *REGIONS)
    fold_sizes = assignment.groupby(["seed", "fold"])["sha256"].transform("size")
    buckets = np.ceil(fold_sizes / GROUP_ROWS).astype(int).clip(lower=1)
    rank = assignment.groupby(["seed", "fold"]).cumcount()
    assign = assignment.assign(bucket=(rank % buckets).astype(np.int32),
                               seed=assignment["seed"].astype(np.int32), fold=assignment["fold"].astype(np.int32))
    keys = spark.createDataFrame(assign[["sha256", "seed", "fold", "bucket"]])
    images = (spark.read.parquet(f"{fs.qualified(spark, str(data_dir))}/images")
              .where(F.col("label").isin(list(CLASSES)))
              .select("sha256", "label", "image", "height", "width"))
    joined = images.join(F.broadcast(keys), "sha256")
    evaluator = group_evaluator(models, regions, batch_size=int(conf.get("batch_size", 64)),
                                tf_threads=int(conf.get("tf_threads", 1)), **inference_settings(config))
    rows = joined.groupBy("seed", "fold", "bucket").applyInPandas(evaluator, schema=RESULT_SCHEMA).collect()
    merged: dict[tuple, dict] = {}
    for r in rows:
        m = merged.setdefault((r["seed"], r["fold"], r["model"], r["region"]), {"sha": [], "y": [], "p": []})
        m["sha"].extend(r["sha256"])
        m["y"].extend(r["y"])
        m["p"].append(np.asarray(r["proba"], np.float32).reshape(-1, len(CLASSES)))
    out = []
    for (seed, fold, model, region), m in sorted(merged.items()):
        order = np.argsort(np.asarray(m["sha"], dtype=object), kind="stable")
        out.append({"seed": seed, "fold": fold, "model": model, "region": region,
                    "sha256": [m["sha"][i] for i in order], "y": np.asarray(m["y"], np.int64)[order],
                    "proba": np.concatenate(m["p"])[order]})
    return out
