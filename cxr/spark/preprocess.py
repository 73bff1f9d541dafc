"""The preprocess job: an X-ray archive -> OUT/images, OUT/errors, OUT/out_of_scope, OUT/duplicates (Parquet) +
OUT/manifest.json.

Every input file ends in exactly one of images, errors, out_of_scope or duplicates, and the manifest's counts prove
it: input == written + rejected + out_of_scope + duplicates. Out of scope are DICOM files the scope rules keep from
the model (laterals, CT, other body parts, no pixels: cxr.scope.rules), so that neither training, evaluation nor
cross-validation ever sees them.

Pixels are written once. One listing (on the driver, no Spark job), then one stage in which each task's
Python worker reads its files, preprocesses them, adds patient id and split (both follow from the row alone)
and Spark writes the rows straight into OUT/images. Everything after that reads thin columns only (path,
sha256, split, label, patient id): the counts, the duplicates (exact copies: the first path is kept, the
Parquet files holding the others are rewritten, the only second write of pixels, and only where copies
exist) and the rejected files, whose reasons come from reading just those files again.
"""
from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Any, Mapping, Sequence
from urllib.parse import unquote, urlsplit

import pandas as pd
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from cxr.image.pipeline import PreprocessParams
from cxr.common.labels import alias_table
from cxr.common.manifest import read_manifests
from cxr.common.provenance import package_versions
from cxr.score.incremental import list_archive
from cxr.spark import fs
from cxr.spark.session import default_parallelism, master_url, session_conf
from cxr.scope.dicom_header import DICOM_COLUMNS
from cxr.scope.rules import STAGE as SCOPE_STAGE, ScopeGate
from cxr.spark.images import (ERROR_COLUMNS, ImageRows, file_tasks, listing_counts, pack_tasks, preprocess_files, rejected_files,
                              row_schema, split_bytes, unread_rows)
from cxr.common.splits import validate_ratios

log = logging.getLogger(__name__)

IMAGE_COLUMNS = ["path", "sha256", "label", "split", "patient_id", "source", "image", "height", "width", "orig_height",
                 "orig_width", "orig_dtype", "source_format", "color_mode", "decode_warnings", *DICOM_COLUMNS]
DUPLICATE_COLUMNS = ["path", "sha256", "label", "duplicate_of"]


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


def _arrow_target(uri: str):
    """(pyarrow file system, path) of a URI, as cxr.spark.fs resolves it."""
    t = fs._target(uri)
    return t.fs, t.path


def _empty_table(spark: SparkSession, columns, uri: str) -> None:
    """A readable, schema'd table with no rows (one Parquet file without row groups), written from the driver
    with pyarrow: no Spark job for nothing."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    types = {"binary": pa.binary(), "int": pa.int32(), "bigint": pa.int64(), "date": pa.date32(),
             "double": pa.float64(), "float": pa.float32(), "boolean": pa.bool_()}
    schema = pa.schema([(f.name, types.get(f.dataType.simpleString(), pa.string())) for f in row_schema(columns)])
    filesystem, path = _arrow_target(uri)
    filesystem.create_dir(path, recursive=True)
    pq.write_table(schema.empty_table(), f"{path}/part-00000-empty.zstd.parquet", filesystem=filesystem,
                   compression="zstd")


def _rows_on_disk(uri: str) -> int:
    """Rows of a Parquet table, from its files' footers (no Spark job): the counts the manifest verifies."""
    import pyarrow.dataset as ds

    filesystem, path = _arrow_target(uri)
    return ds.dataset(path, filesystem=filesystem, format="parquet").count_rows()


def _read(spark: SparkSession, uri: str, columns) -> DataFrame:
    """A table this job wrote, with its known schema (no schema inference job)."""
    return spark.read.schema(row_schema(columns)).parquet(uri)


def _local_uri(uri: str) -> str:
    """A file URI as Spark's _metadata.file_path gives it (file:///a%20b) -> the form fs and readers take."""
    parts = urlsplit(uri)
    if parts.scheme in ("", "file"):
        return f"file:{unquote(parts.path)}"
    return uri


def _written_stats(spark: SparkSession, images_uri: str) -> tuple[list[dict], list[dict], int, int, int]:
    """From the written image rows' thin columns, per content hash the first path's (split, label, source,
    patient): ([{split, label, count}], [{source, label, count}], rows written, distinct contents, kept rows with
    a patient id). One query, two shuffles of thin rows."""
    thin = _read(spark, images_uri, IMAGE_COLUMNS).select("path", "sha256", "split", "label", "source", "patient_id")
    per_content = thin.groupBy("sha256").agg(
        F.count("*").alias("n"), F.min_by(F.struct("split", "label", "source", "patient_id"), "path").alias("kept"))
    rows = (per_content.groupBy(F.col("kept.split").alias("split"), F.col("kept.label").alias("label"),
                                F.col("kept.source").alias("source"))
            .agg(F.count("*").alias("count"), F.sum("n").alias("rows"), F.count("kept.patient_id").alias("with_pid"))
            .toPandas())

    def counts(by: list[str]) -> list[dict]:
        table = rows.groupby(by, dropna=False)["count"].sum().reset_index()
        return sorted(({k: (None if pd.isna(r[k]) else r[k]) for k in by} | {"count": int(r["count"])}
                       for _, r in table.iterrows()), key=lambda d: tuple(d[k] or "" for k in by))

    return (counts(["split", "label"]), counts(["source", "label"]), int(rows["rows"].sum()),
            int(rows["count"].sum()), int(rows["with_pid"].sum()))


def _remove_duplicates(spark: SparkSession, out: str) -> tuple[pd.DataFrame, list[str]]:
    """Exact copies among the written rows: every row after its content's first path goes to OUT/duplicates,
    and only the Parquet files holding such rows are rewritten without them (same name, rows in path order).
    Returns (duplicates, rewritten files)."""
    images = f"{out}/images"
    thin = _read(spark, images, IMAGE_COLUMNS).select("path", "sha256", "label",
                                                       F.col("_metadata.file_path").alias("file"))
    firsts = (thin.groupBy("sha256").agg(F.count("*").alias("n"), F.min("path").alias("duplicate_of"))
              .where(F.col("n") > 1).drop("n"))
    dups = (thin.join(firsts, "sha256").where(F.col("path") != F.col("duplicate_of"))
            .select("path", "sha256", "label", "duplicate_of", "file").toPandas().sort_values("path", ignore_index=True))
    rewritten = []
    scratch = f"{out}/_rewrite-{uuid.uuid4().hex[:8]}"
    for i, (file_uri, group) in enumerate(dups.groupby("file", sort=True)):
        target = _local_uri(file_uri)
        kept = _read(spark, target, IMAGE_COLUMNS).where(~F.col("path").isin(list(group["path"])))
        tmp = f"{scratch}/{i}"
        kept.coalesce(1).sortWithinPartitions("path").write.parquet(tmp)
        parts = sorted(n for n in fs.list_names(spark, tmp) if n.endswith(".parquet"))
        folder, name = target.rsplit("/", 1)
        for gone in (target, f"{folder}/.{name}.crc"):   # Hadoop's local checksum file would not match anymore
            fs.delete(spark, gone)
        if parts:
            fs.rename(spark, f"{tmp}/{parts[0]}", target)
        rewritten.append(target)
    fs.delete(spark, scratch)
    return dups.drop(columns=["file"]), rewritten


def as_list(value: str | Sequence[str] | None) -> list[str]:
    """--input / --manifest values: one, several (repeated flag), or comma-separated."""
    if value is None:
        return []
    items = [value] if isinstance(value, str) else list(value)
    return [part.strip() for item in items for part in str(item).split(",") if part.strip()]


def run(spark: SparkSession, input_dir: str | Sequence[str], output_dir: str, config: Mapping[str, Any],
        manifest: str | Sequence[str] | None = None, overwrite: bool = False) -> dict[str, Any]:
    """input_dir: one folder, or several written as one table (e.g. two collections to train on together;
    each may have its own manifest, see cxr.common.manifest)."""
    pre = config["preprocess"]
    params = PreprocessParams.from_config(pre)
    ratios = validate_ratios(pre["split"])
    seed = int(pre["split"]["seed"])
    aliases = alias_table(pre["labels"])
    extensions, exclude_dirs = list(pre["extensions"]), list(pre.get("exclude_dirs") or [])
    max_bytes = int(float(pre["max_file_mb"]) * 1024 * 1024)
    clock = Stopwatch()

    inputs = as_list(input_dir)
    if not inputs:
        raise ValueError("no input folder given")
    for folder in inputs:
        if not fs.exists(spark, folder):
            raise FileNotFoundError(f"input folder does not exist: {folder}")
    if fs.is_nonempty_dir(spark, output_dir):
        if not overwrite:
            raise OutputExistsError(f"output {output_dir} is not empty; pass --overwrite to replace it")
        fs.delete(spark, output_dir)
    roots = tuple(fs.qualified(spark, folder) for folder in inputs)
    out = fs.qualified(spark, output_dir)

    # 1. one listing, on the driver: names, sizes, times (the same files Spark's own listing finds)
    listing = pd.concat([list_archive(root, extensions, exclude_dirs, max_bytes) for root in roots],
                        ignore_index=True).drop_duplicates("path").sort_values("path", ignore_index=True)
    n_input, kinds, ignored = listing_counts(listing)
    to_read = listing[listing["kind"] == "read"].reset_index(drop=True)
    unread = unread_rows(listing, pre["max_file_mb"])
    cores = default_parallelism(spark)
    task_bytes, open_cost = split_bytes(spark, int(to_read["length"].sum()), len(to_read), cores)
    tasks = pack_tasks(to_read["length"].to_numpy(), task_bytes, open_cost, cores)
    n_tasks = int(tasks.max()) + 1 if len(tasks) else 0
    clock.lap("list", "%d files to read in %d tasks, %d empty, %d too large, %d ignored %s", len(to_read), n_tasks,
              kinds.get("empty", 0), kinds.get("too_large", 0), sum(ignored.values()), ignored or "")
    if n_input == 0:
        log.warning("no image files under %s (extensions: %s)", ", ".join(inputs), ", ".join(extensions))

    # 2. one stage: read + preprocess in the Python workers -> OUT/images
    facts, group_info = read_manifests(as_list(manifest), roots)
    gate = ScopeGate.from_config(config)
    rows = ImageRows(roots if len(roots) > 1 else roots[0], params, aliases, tuple(IMAGE_COLUMNS), ratios, seed,
                     max_bytes, facts, gate)
    images_uri = f"{out}/images"
    if len(to_read):
        files = read_contents(spark, to_read, tasks)
        # no Parquet dictionary for the pixels: every image is unique, so the writer would hash each 50 KB
        # value into a dictionary only to fall back to plain encoding (measured in the JVM's CPU profile)
        # adaptive execution off for the one-stage write: with nothing to re-plan (a broadcast of a few KB of paths,
        # no shuffle) it only adds planning work, and it would run the stage from its own thread pool, named after
        # that pool instead of the Parquet write in the UI and the REST API
        with session_conf(spark, "spark.sql.adaptive.enabled", False):
            preprocess_files(files, rows).write.option("parquet.enable.dictionary#image", "false").parquet(images_uri)
    else:
        _empty_table(spark, IMAGE_COLUMNS, images_uri)
    by_split_label, by_source_label, n_rows, n_unique, with_pid = _written_stats(spark, images_uri)
    clock.lap("decode", "%d of %d files decoded and written", n_rows, len(to_read))

    # 3. thin columns only: the rejected files, then duplicates (rewriting just the files that hold them)
    n_failed = len(to_read) - n_rows
    errors = None
    if n_failed:
        listed = spark.createDataFrame(to_read[["path"]], row_schema(["path"]))
        written = _read(spark, images_uri, IMAGE_COLUMNS).select("path")
        errors = rejected_files(listed.join(written, "path", "left_anti"), rows)
    if len(unread):
        more = spark.createDataFrame(unread, row_schema(ERROR_COLUMNS))
        errors = more if errors is None else errors.unionByName(more)
    if errors is None:
        _empty_table(spark, ERROR_COLUMNS, f"{out}/errors")
        _empty_table(spark, ERROR_COLUMNS, f"{out}/out_of_scope")
    else:   # one write, two tables: errors, and the files the scope rules kept out (one partition folder each)
        table = F.when(F.col("stage") == SCOPE_STAGE, "out_of_scope").otherwise("errors")
        (errors.withColumn("table", table).coalesce(1).sortWithinPartitions("path")
         .write.partitionBy("table").parquet(f"{out}/_rejected"))
        for name in ("errors", "out_of_scope"):
            if fs.exists(spark, f"{out}/_rejected/table={name}"):
                fs.rename(spark, f"{out}/_rejected/table={name}", f"{out}/{name}")
            else:
                _empty_table(spark, ERROR_COLUMNS, f"{out}/{name}")
        fs.delete(spark, f"{out}/_rejected")
    # after the errors: a file whose row is dropped as a copy must not look like a rejected one
    rewritten: list[str] = []
    if n_rows > n_unique:
        dups, rewritten = _remove_duplicates(spark, out)
        spark.createDataFrame(dups, row_schema(DUPLICATE_COLUMNS)).coalesce(1).write.parquet(f"{out}/duplicates")
    else:
        dups = pd.DataFrame(columns=DUPLICATE_COLUMNS)
        _empty_table(spark, DUPLICATE_COLUMNS, f"{out}/duplicates")
    clock.lap("write", "%d images, %d duplicates (%d files rewritten), %d rejected or out of scope", n_unique,
              len(dups), len(rewritten), n_failed + len(unread))

    # the counts the manifest proves are read back from what is on disk (Parquet footers, no Spark job)
    counts = {"input": n_input, "written": _rows_on_disk(images_uri), "rejected": _rows_on_disk(f"{out}/errors"),
              "out_of_scope": _rows_on_disk(f"{out}/out_of_scope"), "duplicates": _rows_on_disk(f"{out}/duplicates"),
              "ignored": ignored}
    if group_info.get("manifest"):
        group_info["images_with_patient_id"] = with_pid
    balanced = counts["input"] == (counts["written"] + counts["rejected"] + counts["out_of_scope"]
                                   + counts["duplicates"])
    clock.lap("verify", "input %d = written %d + rejected %d + out of scope %d + duplicates %d: %s", counts["input"],
              counts["written"], counts["rejected"], counts["out_of_scope"], counts["duplicates"],
              "ok" if balanced else "MISMATCH")

    result = {
        "job": "preprocess",
        "input": inputs[0] if len(inputs) == 1 else inputs,
        "output": output_dir,
        "counts": counts,
        "accounted": balanced,
        "by_split_and_label": by_split_label,
        "by_source_and_label": by_source_label,
        "groups": group_info,
        "io": {"tasks": n_tasks, "bytes_per_task": task_bytes, "bytes_read": int(to_read["length"].sum()),
               "files_rewritten_for_duplicates": len(rewritten), "files_read_again_for_reasons": int(n_failed)},
        "params": {**params.to_dict(), "split": {**ratios, "seed": seed}, "extensions": extensions,
                   "exclude_dirs": exclude_dirs, "max_file_mb": pre["max_file_mb"], "labels": pre["labels"]},
        "scope": gate.rules.to_dict(),
        "patient_key": "HMAC-SHA256 of PatientID" if gate.reader.secret else "off (no secret: column null)",
        "versions": package_versions(),
        "spark": {"version": spark.version, "master": master_url(spark)},
        "timings_s": clock.timings,
    }
    fs.write_text(spark, f"{out}/manifest.json", json.dumps(result, indent=2, sort_keys=True))
    if not balanced:
        raise RuntimeError(f"files unaccounted for: {counts}; see {output_dir}/manifest.json")
    return result


def read_contents(spark: SparkSession, to_read: pd.DataFrame, tasks) -> DataFrame:
    """The listed files to read as (task, path, length), one Spark partition per task. (A module-level name
    so that tests can act between the listing and the read.)"""
    return file_tasks(spark, to_read, tasks)
