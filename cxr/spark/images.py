"""Listing image archives and turning listed files into preprocessed rows on the executors.

Shared by the preprocess job and the score job, so that both list, filter and prepare files the same way.
Image bytes never pass through the JVM: a task gets a list of paths (thin rows), its Python worker opens the
files itself (cxr.image.source.read_bytes) and hands back finished rows, which Spark writes once.
"""
from __future__ import annotations

import contextlib
import heapq
import re
import uuid
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit
from typing import Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from cxr.image.batch import process_file
from cxr.image.pipeline import PreprocessParams
from cxr.image.source import UNREAD_KINDS, VANISHED, read_bytes
from cxr.common.manifest import FileFacts, site_source
from cxr.scope.dicom_header import COLUMN_KINDS, DICOM_COLUMNS, PATIENT_KEY, SITE_KEY, with_column_types
from cxr.scope.rules import ScopeGate
from cxr.common.splits import assign_split
from cxr.spark import fs
from cxr.spark.worker import with_frozen_heap

# Spark types of the row columns that are not strings (every other column of an images or errors row is one)
COLUMN_TYPES = {"image": T.BinaryType(), "height": T.IntegerType(), "width": T.IntegerType(),
          "orig_height": T.IntegerType(), "orig_width": T.IntegerType(), "length": T.LongType(),
          "mtime_ms": T.LongType(), "task": T.LongType(), "ood_distance": T.FloatType(), "scope_score": T.FloatType(),
          "in_distribution": T.BooleanType(), "mean_intensity": T.FloatType(),
          **{c: {"int": T.IntegerType(), "date": T.DateType(), "spacing0": T.DoubleType(),
                 "spacing1": T.DoubleType()}.get(k, T.StringType()) for c, k in COLUMN_KINDS.items()}}
# errors and out_of_scope rows: which file, why, and its DICOM identity (null for other formats)
ERROR_COLUMNS = ["path", "sha256", "label", "stage", "reason", *DICOM_COLUMNS]
_INTS = ("height", "width", "orig_height", "orig_width")
CHANGED = ("rejected when first read, decoded when read again for its reason: the file changed while the job "
           "ran (or the first attempt ran out of memory); not written, run the job again")


def row_schema(columns: Sequence[str]) -> T.StructType:
    """The Spark schema of rows with these columns (images, errors or duplicates tables)."""
    return T.StructType([T.StructField(c, COLUMN_TYPES.get(c, T.StringType())) for c in columns])


def _reader(spark: SparkSession):
    # ignoreMissingFiles: a file deleted while the scan runs is skipped instead of failing the job
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
    """Spark's own listing (binaryFile, no content read): the reference that the jobs' driver-side listing
    (cxr.score.incremental.list_archive, no Spark job) is tested against. Every file under root with what a job
    does with it: `read`, `empty`, `too_large`, `vanished`, `ignored_extension` or `ignored_dir`. One listing of
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


def unread_reason(max_file_mb: float) -> Column:
    """Why a listed file of an UNREAD_KINDS kind is an errors row without being read."""
    return (F.when(F.col("kind") == "empty", F.lit("file is empty (0 bytes)"))
            .when(F.col("kind") == "vanished", F.lit(VANISHED))
            .otherwise(F.format_string(f"file is %d bytes, over the {max_file_mb} MB limit "
                                       "(preprocess.max_file_mb): not read", F.col("length"))))


def listing_counts(listing: pd.DataFrame) -> tuple[int, dict[str, int], dict[str, int]]:
    """(input files, {kind: n}, {ignored kind + extension: n}) of a listing (cxr.score.incremental.list_archive);
    input counts every file not ignored."""
    kinds = {str(k): int(n) for k, n in listing["kind"].value_counts().items()}
    ignored_rows = listing[listing["kind"].str.startswith("ignored")]
    ext = ignored_rows["path"].str.extract(r"(\.[^./]+)$", expand=False).str.lower().fillna("(none)")
    ignored = {f"{k}{e}": int(n) for (k, e), n in
               ignored_rows.assign(ext=ext).groupby(["kind", "ext"]).size().items()}
    return sum(n for kind, n in kinds.items() if not kind.startswith("ignored")), kinds, ignored


def unread_rows(listing: pd.DataFrame, max_file_mb: float) -> pd.DataFrame:
    """Errors rows (ERROR_COLUMNS) of the listed files that are never read: empty, too
    large, or gone while being listed."""
    rows = listing[listing["kind"].isin(UNREAD_KINDS)]
    reasons = [("file is empty (0 bytes)" if kind == "empty" else VANISHED if kind == "vanished" else
                f"file is {int(n)} bytes, over the {max_file_mb} MB limit (preprocess.max_file_mb): not read")
               for kind, n in zip(rows["kind"], rows["length"].fillna(0))]
    return with_column_types(pd.DataFrame({"path": rows["path"].to_numpy(), "sha256": None, "label": None,
                                           "stage": "read", "reason": reasons}, columns=ERROR_COLUMNS))


# ----------------------------------------------------------------------------- tasks: lists of paths
def _bytes(value, default: int) -> int:
    """Spark's byte strings ('64MB', '4194304b', '128m', 134217728) -> bytes."""
    if value is None or str(value).strip() == "":
        return default
    match = re.fullmatch(r"\s*(\d+)\s*([kmgt]?)i?b?\s*", str(value).lower())
    if not match:
        return default
    return int(match.group(1)) * 1024 ** " kmgt".index(match.group(2) or " ")


def split_bytes(spark: SparkSession, total_bytes: int, n_files: int, cores: int) -> tuple[int, int]:
    """(bytes per task, cost of opening a file in bytes), by Spark's own rule for its file sources
    (FilePartition.maxSplitBytes): spark.sql.files.maxPartitionBytes, each file weighing its length plus
    spark.sql.files.openCostInBytes, and at least spark.sql.files.minPartitionNum (default: the cores) tasks."""
    def conf(key):
        try:
            return spark.conf.get(key, None)
        except Exception:
            return None

    max_partition = _bytes(conf("spark.sql.files.maxPartitionBytes"), 128 * 1024 ** 2)
    open_cost = _bytes(conf("spark.sql.files.openCostInBytes"), 4 * 1024 ** 2)
    min_tasks = int(conf("spark.sql.files.minPartitionNum") or cores)
    per_core = (total_bytes + n_files * open_cost) // max(1, min_tasks)
    return min(max_partition, max(open_cost, per_core)), open_cost


def pack_tasks(lengths: Sequence[int], max_bytes: int, open_cost: int, cores: int = 1) -> np.ndarray:
    """Task number of each file, files taken in the given order (by path: deterministic). As many tasks as
    max_bytes needs (each file weighing length + open_cost), rounded up to a multiple of the cores; each file
    goes to the task with the least weight so far. Consecutive files thus go to different tasks: every task
    gets the same mix of folders (classes, sources, image sizes), so that the cores finish together instead
    of one waiting for the task that drew the folder of large images."""
    weights = np.asarray(lengths, np.float64) + open_cost
    if not len(weights):
        return np.empty(0, np.int64)
    n_tasks = max(1, int(np.ceil(weights.sum() / max(1, max_bytes))))
    n_tasks = min(len(weights), -(-n_tasks // cores) * cores)
    heap = [(0.0, t) for t in range(n_tasks)]
    tasks = np.empty(len(weights), np.int64)
    for i, w in enumerate(weights):
        load, t = heapq.heappop(heap)
        tasks[i] = t
        heapq.heappush(heap, (load + float(w), t))
    return tasks


def file_tasks(spark: SparkSession, files: pd.DataFrame, tasks: np.ndarray) -> DataFrame:
    """(task, path, length) with exactly one Spark partition per task, rows in path order: a range of task
    numbers (one per partition) joined with the broadcast file list (thin), so no row is shuffled and a rerun
    puts the same files in the same task (and output file)."""
    n_tasks = int(tasks.max()) + 1 if len(tasks) else 0
    listed = spark.createDataFrame(
        pd.DataFrame({"task": tasks, "path": files["path"].to_numpy(), "length": files["length"].astype("int64")}),
        row_schema(["task", "path", "length"]))
    return (spark.range(0, max(n_tasks, 1), 1, max(n_tasks, 1)).withColumnRenamed("id", "task")
            .join(F.broadcast(listed), "task").sortWithinPartitions("path"))


# ----------------------------------------------------------------------------- the worker side
@dataclass(frozen=True)
class ImageRows:
    """Everything a Python worker needs to turn listed files into rows: read, preprocess (the one per-file
    function, cxr.image.batch.process_file), then patient id, source and split, which need only the row itself.
    root: the input folder, or several (labels and relative paths follow the one a file was listed under)."""
    root: str | tuple[str, ...]
    params: PreprocessParams
    aliases: Mapping[str, str]
    columns: tuple[str, ...]
    ratios: Mapping[str, float]
    seed: int
    max_bytes: int | None = None
    facts: FileFacts = field(default_factory=FileFacts)          # the manifests: patient id and source per file
    gate: ScopeGate | None = None                                # DICOM columns + scope rules

    def _process(self, path: str, content: bytes) -> dict:
        return process_file(path, content, self.root, self.params, self.aliases, self.gate)

    def _read(self, path: str) -> tuple[bytes | None, str | None]:
        try:
            return read_bytes(path, self.max_bytes), None
        except FileNotFoundError:
            return None, VANISHED
        except (OSError, ValueError) as exc:
            return None, f"could not read the file: {type(exc).__name__}: {exc}"

    def _group(self, row: dict) -> None:
        """patient_id from the manifest, else the DICOM's keyed PatientID; source from the manifest, else the
        DICOM's keyed site; split from the group key (patient, else content hash)."""
        pid, source = self.facts.of(row)
        if pid is None and row.get(PATIENT_KEY):
            pid = f"dicom:{row[PATIENT_KEY]}"
        row["patient_id"] = pid
        row["source"] = source if source is not None else site_source(row.get(SITE_KEY))
        key = f"patient:{pid}" if pid is not None else f"sha256:{row['sha256']}"
        row["split"] = assign_split(key, self.ratios, self.seed)

    def images(self, frame: pd.DataFrame) -> pd.DataFrame:
        """The image rows of the frame's files; files that cannot be read or are rejected give no row (the
        job finds them afterwards as listed-but-not-written and asks errors() why)."""
        rows = []
        for path in frame["path"]:
            content, _ = self._read(path)
            if content is None:
                continue
            row = self._process(path, content)
            if row["status"] == "ok":
                self._group(row)
                rows.append(row)
        out = pd.DataFrame([{c: r.get(c) for c in self.columns} for r in rows], columns=list(self.columns))
        for col in _INTS:
            if col in out:
                out[col] = out[col].astype("Int32")
        return with_column_types(out)

    def errors(self, frame: pd.DataFrame) -> pd.DataFrame:
        """One ERROR_COLUMNS row per file of the frame (stage "scope": out of scope, not an error)."""
        rows = []
        for path in frame["path"]:
            content, problem = self._read(path)
            if problem:
                rows.append({"path": path, "stage": "read", "reason": problem})
                continue
            row = self._process(path, content)
            if row["status"] == "ok":
                row.update(stage="read", reason=CHANGED)
            rows.append(row)
        return with_column_types(pd.DataFrame([{c: r.get(c) for c in ERROR_COLUMNS} for r in rows],
                                              columns=ERROR_COLUMNS))


def preprocess_files(files: DataFrame, rows: ImageRows) -> DataFrame:
    """Image rows of the listed files, made in the Python workers (one Arrow batch of paths at a time)."""
    def run(batches):
        for frame in batches:
            out = rows.images(frame)
            if len(out):
                yield out

    return files.mapInPandas(with_frozen_heap(run), schema=row_schema(rows.columns))


def rejected_files(files: DataFrame, rows: ImageRows) -> DataFrame:
    """Errors rows of listed files that produced no image row: read again, the reason asked for again."""
    def run(batches):
        for frame in batches:
            yield rows.errors(frame)

    return files.mapInPandas(with_frozen_heap(run), schema=row_schema(ERROR_COLUMNS))
