"""The preprocess job: an X-ray archive -> OUT/images, OUT/errors, OUT/duplicates (Parquet) + OUT/manifest.json.

Every input file ends in exactly one of images, errors or duplicates, and the manifest's counts prove it:
input == written + rejected + duplicates.
"""
from __future__ import annotations

import json
import logging
import math
import time
from typing import Any, Mapping

import pandas as pd
from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T

from cxr.image.pipeline import PreprocessParams
from cxr.labels import alias_table
from cxr.provenance import package_versions
from cxr.spark import fs
from cxr.spark.session import master_url
from cxr.spark.images import (list_files, listing_counts, preprocess_images, read_contents, unread_files,
                              vanished_files)
from cxr.splits import assign_split, validate_ratios

log = logging.getLogger(__name__)

IMAGE_COLUMNS = ["path", "sha256", "label", "split", "patient_id", "image", "height", "width", "orig_height",
                 "orig_width", "orig_dtype", "source_format", "color_mode"]
ERROR_COLUMNS = ["path", "sha256", "label", "stage", "reason"]


class OutputExistsError(RuntimeError):
    pass


class Stopwatch:
    """Wall time per stage, logged as each stage ends and kept for the manifest."""

    def __init__(self, logger: logging.Logger = log):
        self.log = logger
        self.timings: dict[str, float] = {}
        self._start = time.perf_counter()

    def lap(self, stage: str, message: str = "", *args) -> None:
        now = time.perf_counter()
        self.timings[stage] = round(now - self._start, 3)
        self._start = now
        self.log.info("[%s] %.1fs " + message, stage, self.timings[stage], *args)


def read_patient_manifest(path: str) -> tuple[pd.DataFrame, str]:
    """A CSV with `patient_id` and a key: `sha256` (preferred: survives moved files) or a relative path."""
    table = pd.read_csv(path, dtype=str)
    if "patient_id" not in table.columns:
        raise ValueError(f"manifest {path} has no patient_id column (columns: {', '.join(table.columns)})")
    for key in ("sha256", "relative_path", "rel_path", "path"):
        if key in table.columns:
            keyed = table[[key, "patient_id"]].dropna().drop_duplicates(subset=[key])
            return keyed.rename(columns={key: "key"}), ("sha256" if key == "sha256" else "rel_path")
    raise ValueError(f"manifest {path} needs a sha256 or relative_path column to match files")


def _split_udf(ratios: Mapping[str, float], seed: int):
    @F.pandas_udf(T.StringType())
    def split_of(keys: pd.Series) -> pd.Series:
        return keys.map(lambda key: assign_split(key, ratios, seed))

    return split_of


def _with_groups(spark: SparkSession, images: DataFrame, manifest_path: str | None) -> tuple[DataFrame, dict]:
    """Group key = patient id from the manifest, or the content hash when the file has none."""
    info: dict[str, Any] = {"manifest": manifest_path}
    if manifest_path:
        table, key = read_patient_manifest(manifest_path)
        patients = spark.createDataFrame(table).withColumnRenamed("key", "_key")
        images = images.join(F.broadcast(patients), images[key] == patients["_key"], "left").drop("_key")
        info["matched_by"] = key
    else:
        images = images.withColumn("patient_id", F.lit(None).cast("string"))
    group = F.coalesce(F.concat(F.lit("patient:"), F.col("patient_id")), F.concat(F.lit("sha256:"), F.col("sha256")))
    return images.withColumn("group_key", group), info


def run(spark: SparkSession, input_dir: str, output_dir: str, config: Mapping[str, Any],
        manifest: str | None = None, overwrite: bool = False) -> dict[str, Any]:
    pre = config["preprocess"]
    params = PreprocessParams.from_config(pre)
    ratios = validate_ratios(pre["split"])
    seed = int(pre["split"]["seed"])
    aliases = alias_table(pre["labels"])
    extensions, exclude_dirs = list(pre["extensions"]), list(pre.get("exclude_dirs") or [])
    max_bytes = int(float(pre["max_file_mb"]) * 1024 * 1024)
    clock = Stopwatch()

    if not fs.exists(spark, input_dir):
        raise FileNotFoundError(f"input folder does not exist: {input_dir}")
    if fs.is_nonempty_dir(spark, output_dir):
        if not overwrite:
            raise OutputExistsError(f"output {output_dir} is not empty; pass --overwrite to replace it")
        fs.delete(spark, output_dir)
    root = fs.qualified(spark, input_dir)
    out = fs.qualified(spark, output_dir)

    with list_files(spark, root, extensions, exclude_dirs, max_bytes) as listing:
        n_input, kinds, ignored = listing_counts(listing)
        clock.lap("list", "%d files to read, %d empty, %d too large, %d ignored %s", kinds.get("read", 0),
                  kinds.get("empty", 0), kinds.get("too_large", 0), sum(ignored.values()), ignored or "")
        if n_input == 0:
            log.warning("no image files under %s (extensions: %s)", input_dir, ", ".join(extensions))

        staging = f"{out}/_staging/processed"
        processed = preprocess_images(read_contents(spark, root, extensions, exclude_dirs, max_bytes), root, params, aliases)
        processed.write.mode("overwrite").parquet(staging)
        processed = spark.read.parquet(staging)
        status = {r["status"]: r["count"] for r in processed.groupBy("status").count().collect()}
        clock.lap("decode", "%d decoded, %d rejected", status.get("ok", 0), status.get("error", 0))

        no_label = F.lit(None).cast("string")
        errors = (processed.where(F.col("status") == "error").select(*ERROR_COLUMNS)
                  .unionByName(unread_files(listing, pre["max_file_mb"]).withColumn("label", no_label))
                  .unionByName(vanished_files(listing, processed).withColumn("label", no_label)))

        ranked = processed.where(F.col("status") == "ok").withColumn(
            "_rank", F.row_number().over(Window.partitionBy("sha256").orderBy("path")))
        first_of = ranked.where(F.col("_rank") == 1).select("sha256", F.col("path").alias("duplicate_of"))
        duplicates = (ranked.where(F.col("_rank") > 1).select("path", "sha256", "label")
                      .join(first_of, "sha256").select("path", "sha256", "label", "duplicate_of"))
        unique = ranked.where(F.col("_rank") == 1).drop("_rank")
        grouped, group_info = _with_groups(spark, unique, manifest)
        images = grouped.withColumn("split", _split_udf(ratios, seed)(F.col("group_key"))).select(*IMAGE_COLUMNS)

        n_unique = unique.count()
        files = max(1, math.ceil(n_unique / int(pre.get("rows_per_file", 1000))))
        images.repartition(files, "sha256").sortWithinPartitions("path").write.parquet(f"{out}/images")
        errors.coalesce(1).sortWithinPartitions("path").write.parquet(f"{out}/errors")
        duplicates.coalesce(1).sortWithinPartitions("path").write.parquet(f"{out}/duplicates")
        clock.lap("write", "wrote %d images", n_unique)

        written_df = spark.read.parquet(f"{out}/images")
        counts = {
            "input": n_input,
            "written": written_df.count(),
            "rejected": spark.read.parquet(f"{out}/errors").count(),
            "duplicates": spark.read.parquet(f"{out}/duplicates").count(),
            "ignored": ignored,
        }
        by_split_label = [r.asDict() for r in
                          written_df.groupBy("split", "label").count().orderBy("split", "label").collect()]
        if group_info.get("manifest"):
            group_info["images_with_patient_id"] = written_df.where(F.col("patient_id").isNotNull()).count()
    fs.delete(spark, f"{out}/_staging")
    balanced = counts["input"] == counts["written"] + counts["rejected"] + counts["duplicates"]
    clock.lap("verify", "input %d = written %d + rejected %d + duplicates %d: %s", counts["input"], counts["written"],
              counts["rejected"], counts["duplicates"], "ok" if balanced else "MISMATCH")

    result = {
        "job": "preprocess",
        "input": input_dir,
        "output": output_dir,
        "counts": counts,
        "accounted": balanced,
        "by_split_and_label": by_split_label,
        "groups": group_info,
        "params": {**params.to_dict(), "split": {**ratios, "seed": seed}, "extensions": extensions,
                   "exclude_dirs": exclude_dirs, "max_file_mb": pre["max_file_mb"], "labels": pre["labels"]},
        "versions": package_versions(),
        "spark": {"version": spark.version, "master": master_url(spark)},
        "timings_s": clock.timings,
    }
    fs.write_text(spark, f"{out}/manifest.json", json.dumps(result, indent=2, sort_keys=True))
    if not balanced:
        raise RuntimeError(f"files unaccounted for: {counts}; see {output_dir}/manifest.json")
    return result
