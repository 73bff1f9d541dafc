"""The score job's `--explain N`: Grad-CAM overlays for N images per predicted class of a run (or all of them).

A separate small pass after the run's predictions are in place, so that explaining never slows or changes
the scoring itself:

 1. the run's predictions partition, one row per sha256, N rows per predicted `label` by a window ordered by
    sha256 (a stable, content-based pseudo-random pick) — every row when N is `all` (small archives);
 2. a mapInPandas that gets each image again — from the preprocessed table (joined on sha256) or by
    re-reading and re-preprocessing the raw file with the model's params — computes the heatmap of the
    predicted class (cxr.explain.gradcam.gradcam, HiResCAM variant) and writes the overlay PNG;
 3. an index table written like the predictions (staged, then renamed into place).

Output under PRED_DIR:
    explain/run_id=R/<sha256>.png                     the image beside its heatmap overlay, caption on top
    explanations/run_date=D/run_id=R/*.parquet        path, sha256, model_id, label, p_label, explain_png
                                                      (the PNG's URI), cam_border, cam_outside_lung
                                                      (shares of heatmap mass, see cxr.explain.gradcam), explain_error
Join `explanations` to `predictions` on (sha256, model_id) to put the PNG path beside a prediction.

Workers read raw files and write PNGs through pyarrow's filesystems (local paths, s3://, gs://, hdfs:// with
libhdfs). A run that crashes during this pass has no runs/R.json: the score job removes its predictions on
the next run and this module removes its explanations and PNGs (remove_orphans).
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd
from pyspark.sql import SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T

from cxr import CLASSES
from cxr.common.storage import filesystem
from cxr.score.frames import PROB_COLUMNS
from cxr.spark import fs
from cxr.spark.session import default_parallelism

log = logging.getLogger(__name__)

EXPLAIN_SCHEMA = T.StructType([
    T.StructField("path", T.StringType()), T.StructField("sha256", T.StringType()),
    T.StructField("label", T.StringType()), T.StructField("p_label", T.FloatType()),
    T.StructField("explain_png", T.StringType()), T.StructField("cam_border", T.FloatType()),
    T.StructField("cam_outside_lung", T.FloatType()), T.StructField("explain_error", T.StringType())])


def parse_explain(value: str | int | None) -> int | str | None:
    """--explain's value: a count per predicted class (>= 0; 0 = off) or 'all'. For argparse `type=`."""
    if value is None:
        return None
    text = str(value).strip().lower()
    if text == "all":
        return "all"
    try:
        n = int(text)
    except ValueError:
        raise ValueError(f"--explain takes a number of images per class or 'all', not {value!r}") from None
    if n < 0:
        raise ValueError(f"--explain must be >= 0, got {n}")
    return n or None


def check_explain_args(model_dir: str, explain: int | str | None) -> int | str | None:
    """Validate before scoring starts (a model Grad-CAM cannot explain is refused with the reason)."""
    explain = parse_explain(explain)
    if explain:
        from cxr.explain.gradcam import check_explainable

        check_explainable(model_dir)
    return explain


# ------------------------------------------------------------------------------------------ worker side

def read_bytes(uri: str) -> bytes:
    store, path, _ = filesystem(uri)
    with store.open_input_stream(path) as stream:
        return stream.read()


def write_bytes(uri: str, data: bytes) -> None:
    """Write via a temporary name and a rename, so a reader never sees half a PNG."""
    store, path, _ = filesystem(uri)
    parent = path.rsplit("/", 1)[0]
    store.create_dir(parent, recursive=True)
    tmp = f"{parent}/.{path.rsplit('/', 1)[-1]}.tmp"
    with store.open_output_stream(tmp) as stream:
        stream.write(data)
    store.move(tmp, path)


def explain_frame(frame: pd.DataFrame, model_dir: str, png_dir: str, params_dict: dict | None,
                  batch_size: int = 32, tf_threads: int = 1) -> pd.DataFrame:
    """Rows (path, sha256, label, p_label, and image/height/width for preprocessed input) -> overlay PNGs
    written to png_dir/<sha256>.png and one result row each; a row that fails gets explain_error instead."""
    from cxr.explain.gradcam import cam_fractions, gradcam, overlay, png_bytes
    from cxr.models import store

    out = frame[["path", "sha256", "label", "p_label"]].copy()
    for col in ("explain_png", "explain_error"):
        out[col] = None
    out["cam_border"] = np.nan
    out["cam_outside_lung"] = np.nan
    images, rows = [], []
    params = None
    if params_dict is not None:
        from cxr.image.pipeline import PreprocessParams, preprocess_bytes

        params = PreprocessParams.from_dict(params_dict)
    for i, r in enumerate(frame.itertuples(index=False)):
        try:
            if params is None:
                img = np.frombuffer(r.image, np.uint8).reshape(int(r.height), int(r.width))
            else:
                img = preprocess_bytes(read_bytes(r.path), params)[1]
        except Exception as exc:  # moved, unreadable or changed since scoring: say so in the row
            reason = f"cannot get the image again: {type(exc).__name__}: {exc}"
            out.iloc[i, out.columns.get_loc("explain_error")] = reason
            continue
        images.append(img)
        rows.append(i)
    if not rows:
        return out
    predictor = store.cached_predictor(model_dir, batch_size=batch_size, tf_threads=tf_threads)
    x = np.stack(images)
    labels = out["label"].to_numpy()[rows]
    cams, _ = gradcam(predictor.model, x, class_index=[CLASSES.index(v) for v in labels], batch_size=batch_size)
    fractions = cam_fractions(cams)
    for k, i in enumerate(rows):
        sha, label, p = out["sha256"].iat[i], labels[k], out["p_label"].iat[i]
        name = str(out["path"].iat[i]).rsplit("/", 1)[-1]
        uri = f"{png_dir.rstrip('/')}/{sha}.png"
        try:
            write_bytes(uri, png_bytes(overlay(x[k], cams[k], f"{label} p={p:.2f}  {name}")))
        except Exception as exc:
            out.iloc[i, out.columns.get_loc("explain_error")] = f"cannot write {uri}: {type(exc).__name__}: {exc}"
            continue
        out.iloc[i, out.columns.get_loc("explain_png")] = uri
        out.iloc[i, out.columns.get_loc("cam_border")] = fractions["border"][k]
        out.iloc[i, out.columns.get_loc("cam_outside_lung")] = fractions["outside_lung"][k]
    for col in ("p_label", "cam_border", "cam_outside_lung"):
        out[col] = out[col].astype("float32")
    return out[[f.name for f in EXPLAIN_SCHEMA.fields]]


# ------------------------------------------------------------------------------------------ driver side

def remove_orphans(spark: SparkSession, out: str, keep_run: str | None = None) -> list[str]:
    """explanations/ partitions and explain/ PNG folders of runs without runs/<id>.json (crashed runs)."""
    removed = []
    candidates = [d for date_dir in fs.list_dirs(spark, f"{out}/explanations") for d in fs.list_dirs(spark, date_dir)]
    candidates += fs.list_dirs(spark, f"{out}/explain")
    for run_dir in candidates:
        run_id = run_dir.rsplit("run_id=", 1)[-1]
        if "run_id=" in run_dir and run_id != keep_run and not fs.exists(spark, f"{out}/runs/{run_id}.json"):
            fs.delete(spark, run_dir)
            removed.append(run_dir)
    return removed


def select_rows(predictions, n: int | str):
    """One row per sha256 (first path), then the first n by sha256 within each predicted label (all if 'all')."""
    prob = F.coalesce(*[F.when(F.col("label") == c, F.col(p)) for c, p in zip(CLASSES, PROB_COLUMNS)])
    rows = (predictions.withColumn("p_label", prob.cast("float"))
            .groupBy("sha256").agg(F.min("path").alias("path"), F.first("label").alias("label"),
                                   F.first("p_label").alias("p_label")))
    if n == "all":
        return rows
    rank = F.row_number().over(Window.partitionBy("label").orderBy("sha256"))
    return rows.withColumn("_rank", rank).where(F.col("_rank") <= int(n)).drop("_rank")


def explain_run(spark: SparkSession, out: str, run_id: str, run_date: str, model_dir: str, model_id: str,
                input_uri: str, mode: str, params, n: int | str, batch_size: int = 32, tf_threads: int = 1,
                fail: bool = False) -> dict[str, Any]:
    """Overlays for run R's predictions in PRED_DIR `out` (qualified URI); returns the record for runs/R.json.

    mode is the score job's "raw" or "preprocessed"; params its PreprocessParams (used to re-preprocess raw
    files). Errors are logged and returned as {"error": ...} unless fail=True: the run's predictions are
    already in place and stay valid without pictures."""
    try:
        return _explain_run(spark, out, run_id, run_date, model_dir, model_id, input_uri, mode, params, n,
                            batch_size, tf_threads)
    except Exception as exc:
        if fail:
            raise
        log.exception("explain pass failed; the run's predictions are unaffected")
        return {"n_per_class": n, "error": f"{type(exc).__name__}: {exc}"}


def _explain_run(spark, out, run_id, run_date, model_dir, model_id, input_uri, mode, params, n, batch_size,
                 tf_threads) -> dict[str, Any]:
    removed = remove_orphans(spark, out, keep_run=run_id)
    if removed:
        log.warning("removed explanations of runs that did not finish: %s", removed)
    part = f"run_date={run_date}/run_id={run_id}"
    pred_dir = f"{out}/predictions/{part}"
    if not fs.exists(spark, pred_dir):
        return {"n_per_class": n, "images": 0, "note": "the run scored no images"}
    chosen = select_rows(spark.read.parquet(pred_dir), n)
    if mode == "preprocessed":
        images = (spark.read.parquet(f"{fs.qualified(spark, input_uri)}/images").select("sha256", "image", "height", "width")
                  .dropDuplicates(["sha256"]))
        todo = images.join(F.broadcast(chosen), "sha256")
        params_dict = None
    else:
        todo = chosen
        params_dict = params.to_dict()
    # spread the Grad-CAM work over the cores, but do not start (and load TensorFlow in) more Python workers
    # than there are Arrow batches (16 rows) to fill
    parts = default_parallelism(spark)
    if n != "all":
        parts = max(1, min(parts, -(-len(CLASSES) * int(n) // 16)))
    todo = todo.repartition(parts)
    png_dir = f"{out}/explain/run_id={run_id}"

    def run(frames):
        for frame in frames:
            yield explain_frame(frame, model_dir, png_dir, params_dict, batch_size, tf_threads)

    staging = f"{out}/_staging/explain-{run_id}"
    fs.delete(spark, staging)
    (todo.mapInPandas(run, schema=EXPLAIN_SCHEMA)
     .select("path", "sha256", F.lit(model_id).alias("model_id"), *[f.name for f in EXPLAIN_SCHEMA.fields[2:]])
     .write.parquet(staging))  # no coalesce: it would pull the Grad-CAM work into one task
    table = f"{out}/explanations/{part}"
    fs.delete(spark, table)
    fs.rename(spark, staging, table)
    fs.delete(spark, f"{out}/_staging")
    tally = (spark.read.parquet(table).groupBy("label")
             .agg(F.count("explain_png").alias("ok"), F.count("explain_error").alias("failed")).collect())
    counts = {r["label"]: int(r["ok"]) for r in tally if r["ok"]}
    errors = sum(int(r["failed"]) for r in tally)
    if errors:
        log.warning("explain: %d images could not be explained (see explain_error in %s)", errors, table)
    return {"n_per_class": n, "images": int(sum(counts.values())), "per_class": counts, "errors": errors,
            "png_dir": png_dir, "table": table, "method": "hirescam"}
