"""The score job: an archive (raw files or the preprocess job's Parquet) -> predictions in Parquet, incrementally.

Layout of PRED_DIR, queryable by any Parquet/SQL engine:
    predictions/run_date=YYYY-MM-DD/run_id=R/*.parquet   one row per scored file
    errors/run_date=YYYY-MM-DD/run_id=R/*.parquet        one row per rejected file, with the reason
    runs/R.json                                          counts, timings, throughput of run R
Each run is written under _staging/R (invisible to readers: Spark skips names starting with '_') and moved
into place by directory renames, then its runs/R.json is written last: a run without its json crashed, and
its leftovers are removed by the next run, so a rerun never adds duplicate rows.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import uuid
from pathlib import Path
from typing import Any, Mapping

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from cxr.image.pipeline import PreprocessParams
from cxr.labels import alias_table
from cxr.models import store
from cxr.provenance import package_versions
from cxr.scoring import PROB_COLUMNS, model_id, params_mismatch, score_preprocessed_frame, score_raw_frame
from cxr.spark import fs
from cxr.spark.images import list_files, listing_counts, read_contents, unread_files, vanished_files
from cxr.spark.preprocess import Stopwatch

log = logging.getLogger(__name__)

RESULT_SCHEMA = T.StructType(
    [T.StructField(c, T.StringType()) for c in ("path", "sha256", "folder_label", "status", "stage", "reason", "label")]
    + [T.StructField(c, T.FloatType()) for c in PROB_COLUMNS])


def is_preprocessed(spark: SparkSession, uri: str) -> bool:
    return fs.exists(spark, f"{uri.rstrip('/')}/manifest.json") and fs.exists(spark, f"{uri.rstrip('/')}/images")


def _scored_keys(spark: SparkSession, out: str, mid: str) -> DataFrame | None:
    if not fs.exists(spark, f"{out}/predictions"):
        return None
    return (spark.read.parquet(f"{out}/predictions").where(F.col("model_id") == mid)
            .select("sha256").distinct())


def _remove_crashed_runs(spark: SparkSession, out: str) -> list[str]:
    """Partitions of runs that never wrote runs/<id>.json (a crash between the renames) and old staging."""
    removed = []
    fs.delete(spark, f"{out}/_staging")
    for table in ("errors", "predictions"):
        for date_dir in fs.list_dirs(spark, f"{out}/{table}"):
            for run_dir in fs.list_dirs(spark, date_dir):
                run_id = run_dir.rsplit("run_id=", 1)[-1]
                if not fs.exists(spark, f"{out}/runs/{run_id}.json"):
                    fs.delete(spark, run_dir)
                    removed.append(run_dir)
    return removed


def run(spark: SparkSession, input_uri: str, model_dir: str, output_dir: str, config: Mapping[str, Any],
        batch_size: int | None = None, full: bool = False, run_id: str | None = None,
        explain: int | str | None = None) -> dict[str, Any]:
    score_conf = config.get("score", {})
    batch_size = int(batch_size or score_conf.get("batch_size", 32))
    tf_threads = int(score_conf.get("tf_threads", 1))
    clock = Stopwatch(log)
    started = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    run_id = run_id or f"{started:%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"
    run_date = started.date().isoformat()

    model_path = str(Path(model_dir).resolve())
    meta = store.read_metadata(model_path)
    mid, name = model_id(model_path), meta.get("name", Path(model_path).name)
    model_params = meta.get("preprocess") or {}
    if "size" not in model_params:
        raise ValueError(f"{model_dir}/metrics.json records no preprocess params: cannot prepare images for it")
    params = PreprocessParams.from_dict(model_params)
    if explain:  # Grad-CAM overlays after the run (cxr/spark/explain.py); refuse unexplainable models now
        from cxr.spark.explain import check_explain_args, explain_run
        explain = check_explain_args(model_path, explain)
    if not fs.exists(spark, input_uri):
        raise FileNotFoundError(f"input does not exist: {input_uri}")
    out = fs.qualified(spark, output_dir)
    removed = _remove_crashed_runs(spark, out)
    if removed:
        log.warning("removed %d partitions of runs that did not finish: %s", len(removed), removed)

    if is_preprocessed(spark, input_uri):
        mode = "preprocessed"
        data_params = json.loads(fs.read_text(spark, f"{input_uri.rstrip('/')}/manifest.json")).get("params", {})
        mismatch = params_mismatch(model_params, data_params)
        if mismatch:
            raise ValueError(f"{input_uri} was preprocessed differently from the data model {name} was trained on "
                             f"(param: (model, data)): {mismatch}; score the raw archive instead")
        files = spark.read.parquet(f"{input_uri.rstrip('/')}/images").select(
            "path", "sha256", "label", "image", "height", "width")
        n_input, unread = files.count(), None
    else:
        mode = "raw"
        pre = config["preprocess"]
        root = fs.qualified(spark, input_uri)
        extensions, exclude_dirs = list(pre["extensions"]), list(pre.get("exclude_dirs") or [])
        max_bytes = int(float(pre["max_file_mb"]) * 1024 * 1024)
        # cached: the listing is the record of what was there when the run started (vanished files are
        # found against it at the end)
        listing = list_files(spark, root, extensions, exclude_dirs, max_bytes).cache()
        n_input, _, _ = listing_counts(listing)
        unread = unread_files(listing, pre["max_file_mb"])
        files = read_contents(spark, root, extensions, exclude_dirs, max_bytes).withColumn(
            "sha256", F.sha2(F.col("content"), 256))
    clock.lap("list", "%s input: %d files", mode, n_input)

    # Files already scored by this model (same content) are flagged, their bytes dropped before Python, and come
    # back as 'skipped' rows: every file read is then in the results, so a listed file missing from them vanished.
    scored_keys = None if full else _scored_keys(spark, out, mid)
    if scored_keys is None:
        todo = files.withColumn("already_scored", F.lit(False))
    else:
        payload = "content" if mode == "raw" else "image"
        todo = (files.join(F.broadcast(scored_keys.withColumn("already_scored", F.lit(True))), "sha256", "left")
                .withColumn("already_scored", F.coalesce(F.col("already_scored"), F.lit(False)))
                .withColumn(payload, F.when(F.col("already_scored"), F.lit(None).cast("binary"))
                            .otherwise(F.col(payload))))

    if mode == "raw":
        aliases = alias_table(config["preprocess"]["labels"])

        def score(frames):
            for frame in frames:
                yield score_raw_frame(frame, root, params, aliases, model_path, batch_size, tf_threads)
    else:
        def score(frames):
            for frame in frames:
                yield score_preprocessed_frame(frame, model_path, batch_size, tf_threads)

    staging = f"{out}/_staging/{run_id}"
    todo.mapInPandas(score, schema=RESULT_SCHEMA).write.parquet(f"{staging}/all")
    results = spark.read.parquet(f"{staging}/all")
    stamp = F.lit(started.isoformat()).cast("timestamp")
    predictions = (results.where(F.col("status") == "ok")
                   .select("path", "sha256", F.lit(mid).alias("model_id"), F.lit(name).alias("model_name"),
                           "label", *PROB_COLUMNS, "folder_label", stamp.alias("scored_at")))  # run_date, run_id: partition columns
    errors = results.where(F.col("status") == "error").select("path", "sha256", "stage", "reason")
    if unread is not None:
        errors = errors.unionByName(unread).unionByName(vanished_files(listing, results))
    predictions.sortWithinPartitions("path").write.parquet(f"{staging}/predictions")
    errors.coalesce(1).write.parquet(f"{staging}/errors")
    clock.lap("score", "model %s (%s) on the executors", name, mid[:12])

    n_scored = spark.read.parquet(f"{staging}/predictions").count()
    n_rejected = spark.read.parquet(f"{staging}/errors").count()
    n_skipped = results.where(F.col("status") == "skipped").count()
    counts = {"input": n_input, "scored": n_scored, "rejected": n_rejected, "skipped_already_scored": n_skipped}
    accounted = n_input == n_scored + n_rejected + n_skipped
    if not accounted:
        log.error("accounting mismatch: %d input files but %d scored + %d rejected + %d skipped", n_input, n_scored,
                  n_rejected, n_skipped)
    partition = f"run_date={run_date}/run_id={run_id}"
    fs.rename(spark, f"{staging}/errors", f"{out}/errors/{partition}")
    fs.rename(spark, f"{staging}/predictions", f"{out}/predictions/{partition}")
    fs.delete(spark, f"{out}/_staging")  # one run at a time per output: its start cleared it too
    if mode == "raw":
        listing.unpersist()
    clock.lap("commit", "run %s: %s", run_id, counts)
    seconds = sum(clock.timings.values())
    explained = None
    if explain:
        explained = explain_run(spark, out, run_id, run_date, model_path, mid, input_uri, mode, params, explain,
                                batch_size, tf_threads)
        clock.lap("explain", "Grad-CAM overlays: %s", explained.get("images"))
    record = {
        "job": "score", "run_id": run_id, "run_date": run_date, "started": started.isoformat(),
        "input": input_uri, "mode": mode, "output": output_dir, "full": full,
        "model": {"dir": model_dir, "name": name, "model_id": mid, "kind": store.model_kind(model_path)},
        "counts": counts, "accounted": accounted, "batch_size": batch_size, "params": params.to_dict(), "explain": explained,
        "timings_s": clock.timings, "images_per_s": round(n_scored / max(seconds, 1e-9), 2),
        "versions": package_versions(), "spark": {"version": spark.version, "master": spark.sparkContext.master},
    }
    fs.write_text(spark, f"{out}/runs/{run_id}.json", json.dumps(record, indent=2, sort_keys=True))
    return record
