"""Reading image archives with Spark's binaryFile source and preprocessing them on the executors.

Shared by the preprocess job and the score job, so that both read, filter and prepare files the same way.
"""
from __future__ import annotations

import contextlib
import re
import uuid
from urllib.parse import unquote, urlsplit
from typing import Iterator, Mapping, Sequence

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from cxr.image.batch import process_frame
from cxr.image.pipeline import PreprocessParams
from cxr.image.source import UNREAD_KINDS, VANISHED
from cxr.spark import fs

PREPROCESSED_SCHEMA = T.StructType([
    T.StructField("path", T.StringType()),
    T.StructField("rel_path", T.StringType()),
    T.StructField("label", T.StringType()),
    T.StructField("sha256", T.StringType()),
    T.StructField("status", T.StringType()),
    T.StructField("stage", T.StringType()),
    T.StructField("reason", T.StringType()),
    T.StructField("image", T.BinaryType()),
    T.StructField("height", T.IntegerType()),
    T.StructField("width", T.IntegerType()),
    T.StructField("orig_height", T.IntegerType()),
    T.StructField("orig_width", T.IntegerType()),
    T.StructField("orig_dtype", T.StringType()),
    T.StructField("source_format", T.StringType()),
    T.StructField("color_mode", T.StringType()),
])


def _case_insensitive(ext: str) -> str:
    return "".join(f"[{c.lower()}{c.upper()}]" if c.isalpha() else re.escape(c) for c in ext)


def extension_glob(extensions: Sequence[str]) -> str:
    """A Hadoop glob matching file names ending in any extension, in any letter case (*.{[pP][nN][gG],...})."""
    return "*.{" + ",".join(_case_insensitive(e.lstrip(".")) for e in extensions) + "}"


def _reader(spark: SparkSession):
    # ignoreMissingFiles: a file deleted between the listing and the read is skipped instead of failing the
    # job; preprocess then reports it as an errors row (vanished_files)
    return (spark.read.format("binaryFile").option("recursiveFileLookup", "true")
            .option("ignoreMissingFiles", "true"))


def _relative(root: str) -> Column:
    return F.substring(F.col("path"), len(root.rstrip("/")) + 2, 1 << 30)


def _extension_ok(extensions: Sequence[str]) -> Column:
    pattern = r"\.(" + "|".join(re.escape(e.lstrip(".").lower()) for e in extensions) + r")$"
    return F.lower(F.col("path")).rlike(pattern)


def _in_excluded_dir(root: str, exclude_dirs: Sequence[str]) -> Column:
    if not exclude_dirs:
        return F.lit(False)
    pattern = r"(^|/)(" + "|".join(re.escape(d.lower()) for d in exclude_dirs) + r")/"
    return F.lower(_relative(root)).rlike(pattern)


def _as_path_column(uri: str) -> str:
    """inputFiles() gives encoded URIs (file:///a%20b.png); the scan's path column has Hadoop's form (file:/a b.png)."""
    parts = urlsplit(uri)
    authority = f"//{parts.netloc}" if parts.netloc else ""
    return f"{parts.scheme}:{authority}{unquote(parts.path)}" if parts.scheme else unquote(uri)


@contextlib.contextmanager
def list_files(spark: SparkSession, root: str, extensions: Sequence[str], exclude_dirs: Sequence[str],
               max_bytes: int) -> Iterator[DataFrame]:
    """Every file under root (names, sizes and modification times: no content read) with what the job will do
    with it: `read`, `empty`, `too_large`, `vanished`, `ignored_extension` or `ignored_dir`. One listing of
    the archive, held (cached) until the `with` block ends.

    Spark's file scan silently skips 0-byte files, so they are found from the same file index (inputFiles)
    and added back, to be reported rather than lost."""
    scan = _reader(spark).load(root)
    # cached: later jobs see the files this scan saw, not a rescan of a changing archive. Spark matches cached
    # plans by their shape, so the listing carries a token of its own: a later listing of the same folder
    # would otherwise be served this one's rows. (Not localCheckpoint: its blocks die with an executor.)
    token = F.lit(uuid.uuid4().hex).alias("_listing")
    nonempty = scan.select("path", "length", F.unix_millis("modificationTime").alias("mtime_ms"), token).cache()
    every = scan.inputFiles()
    listing = nonempty.withColumn("missing", F.lit(False))
    if len(every) != nonempty.count():
        indexed = spark.createDataFrame([(_as_path_column(p),) for p in every], "path string")
        unscanned = [r["path"] for r in indexed.join(nonempty, "path", "left_anti").collect()]
        # in the file index but not in the scan: empty (the scan skips 0-byte files), or gone since indexed
        rows = [(p, 0, None, not fs.exists(spark, p)) for p in unscanned]
        listing = listing.unionByName(spark.createDataFrame(rows, "path string, length long, mtime_ms long, "
                                                                  "missing boolean"), allowMissingColumns=True)
    kind = (F.when(~_extension_ok(extensions), "ignored_extension")
            .when(_in_excluded_dir(root, exclude_dirs), "ignored_dir")
            .when(F.col("missing"), "vanished")
            .when(F.col("length") == 0, "empty")
            .when(F.col("length") > max_bytes, "too_large")
            .otherwise("read"))
    try:
        yield listing.withColumn("kind", kind).drop("missing", "_listing").withColumn(
            "extension", F.lower(F.regexp_extract(F.col("path"), r"(\.[^./]+)$", 1)))
    finally:
        nonempty.unpersist()


def listing_counts(listing: DataFrame) -> tuple[int, dict[str, int], dict[str, int]]:
    """(input files, {kind: n}, {ignored kind + extension: n}); input counts every file not ignored."""
    kinds = {r["kind"]: r["count"] for r in listing.groupBy("kind").count().collect()}
    ignored = {f"{r['kind']}{r['extension'] or '(none)'}": r["count"] for r in
               listing.where(F.col("kind").startswith("ignored")).groupBy("kind", "extension").count().collect()}
    return sum(n for kind, n in kinds.items() if not kind.startswith("ignored")), kinds, ignored


def unread_files(listing: DataFrame, max_file_mb: float) -> DataFrame:
    """Error rows (path, sha256, stage, reason) for the listed files that are never read: empty or too large."""
    return (listing.where(F.col("kind").isin(*UNREAD_KINDS))
            .select("path", F.lit(None).cast("string").alias("sha256"), F.lit("read").alias("stage"),
                    unread_reason(max_file_mb).alias("reason")))


def unread_reason(max_file_mb: float) -> Column:
    """Why a listed file of an UNREAD_KINDS kind is an errors row without being read."""
    return (F.when(F.col("kind") == "empty", F.lit("file is empty (0 bytes)"))
            .when(F.col("kind") == "vanished", F.lit(VANISHED))
            .otherwise(F.format_string(f"file is %d bytes, over the {max_file_mb} MB limit "
                                       "(preprocess.max_file_mb): not read", F.col("length"))))


def read_contents(spark: SparkSession, root: str, extensions: Sequence[str], exclude_dirs: Sequence[str],
                  max_bytes: int) -> DataFrame:
    """(path, content) of the files to read. The extension glob and the length filter are pushed into the
    file source, so that other files and oversized ones are never loaded into memory."""
    df = (_reader(spark).option("pathGlobFilter", extension_glob(extensions)).load(root)
          .where(F.col("length") <= max_bytes))
    return df.where(~_in_excluded_dir(root, exclude_dirs)).select("path", "content")


def preprocess_images(files: DataFrame, root: str, params: PreprocessParams, aliases: Mapping[str, str]) -> DataFrame:
    """Decode + equalize + brighten + resize on the executors, one Arrow batch at a time."""

    def run(batches):
        for frame in batches:
            yield process_frame(frame, root, params, aliases)

    return files.mapInPandas(run, schema=PREPROCESSED_SCHEMA)


def vanished_files(listing: DataFrame, read: DataFrame) -> DataFrame:
    """Error rows for files listed to be read that produced no row: deleted (or made unreadable) between the
    listing and the read."""
    return (listing.where(F.col("kind") == "read").select("path")
            .join(read.select("path"), "path", "left_anti")
            .select("path", F.lit(None).cast("string").alias("sha256"), F.lit("read").alias("stage"),
                    F.lit(VANISHED).alias("reason")))
