"""The score job: an archive (raw files or the preprocess job's Parquet) -> predictions in Parquet, incrementally.

Layout of PRED_DIR, queryable by any Parquet/SQL engine:
    predictions/run_date=YYYY-MM-DD/run_id=R/*.parquet   one row per scored file (DICOM identity columns,
                                                         ood_distance and in_distribution included)
    errors/run_date=YYYY-MM-DD/run_id=R/*.parquet        one row per rejected file, with the reason
    out_of_scope/run_date=YYYY-MM-DD/run_id=R/*.parquet  one row per file kept from the model (a lateral, CT, no
                                                         pixels; out of distribution with scope.ood: skip), why
    state/model_id=M/run_id=R/*.parquet                  what run R learnt of each file it looked at (raw input):
                                                         path, size, mtime, sha256, status, seen_at
    runs/R.json                                          counts, timings, throughput, monitoring of run R
    reports/R.html                                       the run's page (cxr/spark/monitor.py)
    _lease                                               the running run's lease (cxr/score/lease.py)

A night costs what changed: the archive is listed and compared with the state table on the driver
(cxr/score/incremental.py); a raw file whose (path, size, mtime) equal the latest state row for the same
model is skipped without being opened; only new or changed files are read (in the Python workers, never
through the JVM). A changed file whose content (sha256) already has a prediction from this model (touched,
copied, moved) is hashed but not decoded, and gets a state row instead of a prediction row.

Each run holds PRED_DIR's lease, writes under _staging/R (invisible to readers: Spark skips names starting
with '_'), moves its partitions into place by directory renames and writes runs/R.json last: a run without
its json crashed; only a run holding the lease removes such leftovers, so nothing committed by one run is
ever deleted by another.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import uuid
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from cxr.image.source import local_path
from cxr.common.labels import alias_table
from cxr.models import store
from cxr.common.provenance import package_versions
from cxr.score.frames import (CARRIED_COLUMNS, HASH_COLUMNS, OOD_COLUMNS, PROB_COLUMNS, RESULT_COLUMNS, Engine,
                              grouped, hash_frame, model_id, params_mismatch, score_preprocessed_frame,
                              score_raw_frame, scoring_params)
from cxr.scope.dicom_header import DICOM_COLUMNS
from cxr.scope.rules import ScopeGate
from cxr.models import card
from cxr.score import delta_table, sources
from cxr.score.incremental import classify, latest_state, list_archive
from cxr.score.known import ALREADY_SCORED, scored_digests
from cxr.score.summary import SUMMARY_COLUMN, combine, with_summaries
from cxr.score.lease import Lease, LocalLeaseFiles
from cxr.spark import fs, monitor
from cxr.spark.images import COLUMN_TYPES, unread_reason, unread_rows as listed_errors
from cxr.spark.jobs import JobCount, together
from cxr.spark.preprocess import Stopwatch
from cxr.spark.session import classic_context, default_parallelism, master_url, session_conf
from cxr.spark.worker import with_frozen_heap

log = logging.getLogger(__name__)

_TYPES = {**COLUMN_TYPES, "size": T.LongType(), "mtime_ms": T.LongType(), **{c: T.FloatType() for c in PROB_COLUMNS}}
RESULT_SCHEMA = T.StructType([T.StructField(c, _TYPES.get(c, T.StringType())) for c in RESULT_COLUMNS])
# the scoring pass's output: the result rows and, in one row per task, its summary (cxr.score.summary)
SUMMARISED_SCHEMA = T.StructType([*RESULT_SCHEMA.fields, T.StructField(SUMMARY_COLUMN, T.StringType())])
HASH_SCHEMA = T.StructType([T.StructField(c, _TYPES.get(c, T.StringType())) for c in HASH_COLUMNS])
ARROW_BATCH = "spark.sql.execution.arrow.maxRecordsPerBatch"
RESULT_ROWS = 256   # result rows per Arrow batch out of the scoring pass (cxr.score.frames.grouped)
TABLES = ("predictions", "errors", "out_of_scope", "state")
TABLE_FORMATS = ("parquet", "delta")


def is_preprocessed(spark: SparkSession, uri: str) -> bool:
    return fs.exists(spark, f"{uri.rstrip('/')}/manifest.json") and fs.exists(spark, f"{uri.rstrip('/')}/images")


def _scored_shas(spark: SparkSession, out: str, mid: str, table_format: str) -> DataFrame | None:
    """Content this model already has a prediction row for (thin: one column of the predictions table).
    Delta: read on the driver through the table's file list (no Delta jars in Spark)."""
    if table_format == "delta":
        import pyarrow.compute as pc
        import pyarrow.dataset as ds

        table = delta_table.read_table(out, "predictions", ["sha256"], filter=ds.field("model_id") == mid)
        if table is None:
            return None
        shas = pc.unique(table["sha256"]).to_pylist()
        return spark.createDataFrame([(sha,) for sha in shas], "sha256 string")
    if not fs.exists(spark, f"{out}/predictions"):
        return None
    return (spark.read.parquet(f"{out}/predictions").where(F.col("model_id") == mid)
            .select("sha256").distinct())


def _staging_root(out: str, score_conf: Mapping[str, Any]) -> str:
    """Where Spark writes a run's files before the commit: PRED_DIR/_staging, or under score.staging_dir (for an
    output store Spark cannot write to, e.g. S3 without the hadoop-aws jars), one folder per PRED_DIR."""
    if not score_conf.get("staging_dir"):
        return f"{out}/_staging"
    return f"{str(score_conf['staging_dir']).rstrip('/')}/cxr-staging-{hashlib.sha1(out.encode()).hexdigest()[:12]}"


def _remove_uncommitted(spark: SparkSession, out: str, staging_root: str, table_format: str) -> list[str]:
    """Files of runs that did not commit (a crash between moving and committing) and old staging. Parquet
    layout: partitions of runs without runs/<id>.json. Called only while holding the lease: no other run can be
    writing."""
    fs.delete(spark, staging_root)
    if table_format == "delta":
        return delta_table.remove_uncommitted(out)
    removed = []
    committed = fs.list_names(spark, f"{out}/runs")
    for table in TABLES:
        for group_dir in fs.list_dirs(spark, f"{out}/{table}"):
            for run_dir in fs.list_dirs(spark, group_dir):
                run_id = run_dir.rsplit("run_id=", 1)[-1]
                if f"{run_id}.json" not in committed:
                    fs.delete(spark, run_dir)
                    removed.append(run_dir)
            if not fs.is_nonempty_dir(spark, group_dir):
                fs.delete(spark, group_dir)   # an empty partition folder would make the table unreadable
        if fs.exists(spark, f"{out}/{table}") and not fs.is_nonempty_dir(spark, f"{out}/{table}"):
            fs.delete(spark, f"{out}/{table}")
    return removed


def _plain_plans(spark: SparkSession, no_joins: bool):
    """Adaptive query execution off for a block whose queries have no join or shuffle to adapt (the one-pass
    scoring and the tables written after it): AQE only re-plans them, ~0.05 s a query, a tenth of the wall clock
    after scoring a small folder (measured on the 450 real X-rays). Where the hash pass's joins are in the plan,
    the session's setting stays."""
    return session_conf(spark, "spark.sql.adaptive.enabled", False) if no_joins else nullcontext()


def _lease_files(spark: SparkSession, out: str):
    return LocalLeaseFiles() if local_path(out) is not None else fs.FsLeaseFiles(spark)


def _dealt(spark: SparkSession, files, n_tasks: int, batch: int):
    """(a DataFrame of n_tasks rows, one per partition; a function turning a task's input frames into its files,
    in frames of `batch`): the files (path, size, mtime_ms, in path order) dealt round-robin into the tasks, so
    every task gets the same mix of folders and the cores finish together; broadcast to the workers, so the
    scoring pass is the run's one Spark job for them (a repartition would add a shuffle and a job). Over Spark
    Connect (no broadcast): the files as a DataFrame, repartitioned."""
    context = classic_context(spark)
    if context is None:
        frame = spark.createDataFrame(files, "path string, size long, mtime_ms long")
        return frame.repartition(n_tasks), iter
    chunks = context.broadcast([files.iloc[t::n_tasks].reset_index(drop=True) for t in range(n_tasks)])

    def files_of(frames):
        for frame in frames:
            for task in frame["id"]:
                chunk = chunks.value[int(task)]
                for start in range(0, len(chunk), batch):
                    yield chunk.iloc[start:start + batch]

    return spark.range(0, n_tasks, 1, n_tasks), files_of


def _tasks(spark: SparkSession, n_rows: int, per_task: int) -> int:
    """Enough tasks to keep every core busy, about one per `per_task` files, a multiple of the cores (the files
    are dealt out equally, so the cores finish together)."""
    cores = default_parallelism(spark)
    rounds = -(-n_rows // (per_task * cores))   # of one task per core
    return max(1, min(rounds * cores, n_rows))


def run(spark: SparkSession, input_uri: str, model_dir: str, output_dir: str, config: Mapping[str, Any],
        batch_size: int | None = None, full: bool = False, run_id: str | None = None,
        explain: int | str | None = None, engine: str | None = None, retry_errors: bool = False,
        registry: Mapping[str, Any] | None = None, gate: ScopeGate | None = None) -> dict[str, Any]:
    """`registry`: where model_dir came from when it was resolved from a models:/ or runs:/ URI (uri, name,
    version), recorded in the run record and in every prediction row. `gate`: the scope rules and DICOM header
    reader (default: from config)."""
    score_conf = config.get("score", {})
    table_format = str(score_conf.get("table_format", "parquet"))
    if table_format not in TABLE_FORMATS:
        raise ValueError(f"score.table_format must be one of {TABLE_FORMATS}, not {table_format!r}")
    clock = Stopwatch(log)
    started = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    run_id = run_id or f"{started:%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"
    run_date = started.date().isoformat()

    registry = dict(registry or {})
    model_path = str(Path(model_dir).resolve())
    meta = store.read_metadata(model_path)
    runner = Engine.from_config(model_path, config, engine, batch_size)
    mid, name = model_id(model_path), meta.get("name", Path(model_path).name)
    model_params = meta.get("preprocess") or {}
    if "size" not in model_params:
        raise ValueError(f"{model_dir}/metrics.json records no preprocess params: cannot prepare images for it")
    if runner.name == "onnx" and not (Path(model_path) / store.ONNX_FILE).is_file():
        raise FileNotFoundError(store.missing_onnx_message(model_dir))   # before any Spark work
    params = scoring_params(model_params, config)   # the model's image steps, this run's on_damaged
    gate = gate or ScopeGate.from_config(config)
    if explain:  # Grad-CAM overlays after the run (cxr/spark/explain.py); refuse unexplainable models now
        from cxr.spark.explain import check_explain_args, explain_run
        explain = check_explain_args(model_path, explain)
    if not fs.exists(spark, input_uri):
        raise FileNotFoundError(f"input does not exist: {input_uri}")
    out = fs.qualified(spark, output_dir)
    staging_root = _staging_root(out, score_conf)
    if table_format == "delta":   # Delta's timestamp is microseconds; Spark's default INT96 is not one
        spark.conf.set("spark.sql.parquet.outputTimestampType", "TIMESTAMP_MICROS")

    page = (int(config["monitor"]["thumbnails"]), int(config["monitor"]["page_rows"]))   # the run page's rows
    lease = Lease(_lease_files(spark, out), out, run_id, float(score_conf.get("lease_seconds", 300)))
    with lease, JobCount(spark, f"cxr-score-{run_id}-{uuid.uuid4().hex[:8]}") as jobs:
        start = delta_table.snapshot(out) if table_format == "delta" else None   # what the commit is checked against
        removed = _remove_uncommitted(spark, out, staging_root, table_format)
        if removed:
            log.warning("removed %d files or partitions of runs that did not finish: %s", len(removed), removed)
        staging = f"{staging_root}/{run_id}"
        stamp = F.lit(started.isoformat()).cast("timestamp")
        if is_preprocessed(spark, input_uri):
            mode = "preprocessed"
            done = _score_preprocessed(spark, input_uri, model_params, name, mid, out, full, runner, staging, clock,
                                       gate, table_format, page)
        else:
            mode = "raw"
            done = _score_raw(spark, input_uri, config, params, mid, out, full, retry_errors, runner, staging, stamp,
                              clock, int(score_conf.get("files_per_task", 512)), gate, table_format, run_id, page)
        counts, bytes_read, flagged = done.counts, done.bytes_read, done.flagged
        rows, tables = done.results, {"state": done.state}
        if counts["scored"]:
            tables["predictions"] = (
                rows.where(F.col("status") == "ok")
                .select("path", "sha256", F.lit(mid).alias("model_id"), F.lit(name).alias("model_name"),
                        F.lit(registry.get("name")).cast("string").alias("registered_model"),
                        F.lit(registry.get("version")).cast("int").alias("registered_version"), "source", "label",
                        *PROB_COLUMNS, *OOD_COLUMNS, "folder_label", "decode_warnings", *DICOM_COLUMNS,
                        stamp.alias("scored_at"))  # run_date, run_id: partition columns
                .coalesce(_files_for(counts["scored"])).sortWithinPartitions("path"))
        if counts["out_of_scope"]:
            tables["out_of_scope"] = (
                rows.where(F.col("status") == "out_of_scope")
                .select("path", "sha256", "stage", "reason", "folder_label", F.lit(mid).alias("model_id"),
                        "ood_distance", "scope_score", *DICOM_COLUMNS, stamp.alias("seen_at"))
                .coalesce(1).sortWithinPartitions("path"))
        if counts["rejected"]:
            tables["errors"] = _error_rows(rows, done.unread).coalesce(1)
        # small jobs of one task or a few each: side by side they finish in the time of the longest
        with _plain_plans(spark, done.hashed is None):
            together(spark, [lambda t=t, f=f: f.write.parquet(f"{staging}/{t}")
                             for t, f in tables.items() if f is not None])
        if done.hashed is not None:
            done.hashed.unpersist()
        clock.lap("write", "predictions, errors and state of run %s", run_id)
        watched = monitor.watch(done.summary)   # run statistics: the scoring tasks' summaries added up
        clock.lap("monitor", "run statistics of run %s", run_id)

        lease.check()   # a run presumed dead must not commit over its successor
        versions = _commit(spark, out, staging, run_id, run_date, mid, table_format, start)
        clock.lap("commit", "run %s committed (%s): %s", run_id, table_format, versions or "renamed into place")
        fs.delete(spark, staging_root)
        accounted = counts["input"] == sum(counts[k] for k in ("scored", "rejected", "out_of_scope",
                                                                "skipped_unchanged", "skipped_already_scored"))
        if not accounted:
            log.error("accounting mismatch: %s", counts)
        clock.lap("cleanup", "run %s: %s", run_id, counts)
        seconds = sum(clock.timings.values())
        model_card = card.read(model_path)
        explained = None
        if explain:
            explained = explain_run(spark, out, run_id, run_date, model_path, mid, input_uri, mode, params, explain,
                                    runner.batch_size, runner.tf_threads)
            clock.lap("explain", "Grad-CAM overlays: %s", explained.get("images"))
        record = {
            "job": "score", "run_id": run_id, "run_date": run_date, "started": started.isoformat(),
            "input": input_uri, "mode": mode, "output": output_dir, "full": full, "retry_errors": retry_errors,
            "model": {"dir": model_dir, "name": name, "model_id": mid, "kind": store.model_kind(model_path),
                      "uri": registry.get("uri"), "registered_model": registry.get("name"),
                      "registered_version": registry.get("version"),
                      "card": {k: model_card[k] for k in ("sources", "limits")} if model_card else None},
            "engine": {"name": runner.name, "onnx_threads": runner.onnx_threads, "tf_threads": runner.tf_threads},
            "table_format": table_format, "delta_versions": versions,
            "counts": counts, "accounted": accounted, "bytes_read": bytes_read, "batch_size": runner.batch_size,
            "params": params.to_dict(), "scope": gate.rules.to_dict(), "ood": meta.get("ood"),
            "scored_out_of_distribution": flagged,   # of counts.scored: in_distribution false (scope.ood: flag)
            "sources": sources.check(done.summary.get("sources") or {}, model_card),
            "scope_reasons": watched.stats.get("scope_reasons"),   # files each check put out (cxr.spark.monitor)
            "frontal_check": gate.frontal.summary() if gate.frontal else None,
            "patient_key": "HMAC-SHA256 of PatientID" if gate.reader.secret else "off (no secret: column null)",
            "explain": explained, "lease_taken_over": lease.took_over,
            "timings_s": clock.timings, "seconds": round(seconds, 3),
            "images_per_s": round(counts["scored"] / max(seconds, 1e-9), 2),
            "versions": package_versions(), "spark": {"version": spark.version, "master": master_url(spark)},
        }
        for warning in record["sources"]["warnings"]:
            log.warning("%s", warning)
        record["monitoring"] = monitor.finish(spark, out, record, watched, model_path, config, input_uri, mode, params)
        record["spark_jobs"] = jobs.count()   # every Spark job this run started (None over Spark Connect)
        record["read_passes"] = done.read_passes
        fs.write_text(spark, f"{out}/runs/{run_id}.json", json.dumps(record, indent=2, sort_keys=True))
    return record


def _commit(spark: SparkSession, out: str, staging: str, run_id: str, run_date: str, mid: str, table_format: str,
            start) -> dict[str, int | None] | None:
    """Make the staged tables visible: one Delta transaction per table, or (Parquet layout) directory renames.
    Delta: {table: its version after the commit}."""
    partition = {"run_date": run_date, "run_id": run_id}
    placed = {"errors": partition, "out_of_scope": partition, "predictions": partition, "state": {"model_id": mid}}
    staged = [(table, values) for table, values in placed.items() if fs.exists(spark, f"{staging}/{table}")]
    if table_format == "delta":
        return delta_table.commit_run(out, run_id, [delta_table.Staged(t, f"{staging}/{t}", v) for t, v in staged],
                                      start)
    for table, values in staged:
        values = {**values, "run_id": run_id} if table == "state" else values
        fs.rename(spark, f"{staging}/{table}", f"{out}/{table}/" + "/".join(f"{k}={v}" for k, v in values.items()))
    return None


def _error_rows(results: DataFrame | None, unread: DataFrame | None) -> DataFrame:
    if results is None:
        return unread
    rows = results.where(F.col("status") == "error").select("path", "sha256", "stage", "reason", *DICOM_COLUMNS)
    return rows if unread is None else rows.unionByName(unread)


def _files_for(rows: int, per_file: int = 1_000_000) -> int:
    """Parquet files for a run's rows of a table: one per million (the scoring tasks' many small outputs are
    merged: each written file costs a task)."""
    return max(1, -(-rows // per_file))


@dataclass
class Scored:
    """What scoring left for the rest of the run: its results (the staged result rows), the listed files never
    read (errors rows, or None), the counts, the task summaries added up (cxr.score.summary.combine), and how
    many times each read file was opened (1: hashed and scored in one pass; 2: hashed first, then scored), the
    state rows to write (raw input) and the cached hash pass to let go of once they are written."""
    results: DataFrame | None
    unread: DataFrame | None
    counts: dict[str, int]
    bytes_read: int
    flagged: int
    summary: dict[str, Any]
    read_passes: int = 1
    state: DataFrame | None = None
    hashed: DataFrame | None = None


def _summarised(spark: SparkSession, staging: str, schema: T.StructType, extra_rows, page) -> tuple[DataFrame, dict]:
    """The staged results (explicit schema: no Spark job to infer it) and their tasks' summaries combined: one
    column of a few rows, read on the driver with pyarrow when the staging is on a local disk (a Spark job costs
    a tenth of a second of a small run's wall clock), else by one Spark job."""
    path = f"{staging}/results"
    if not fs.exists(spark, path):   # nothing read (an unchanged night): no DataFrame, no Spark call
        return None, combine([], extra_rows, *page)
    results = spark.read.schema(schema).parquet(path)
    local = local_path(path)
    if local is not None:
        import pyarrow.dataset as pads

        texts = (pads.dataset(local, format="parquet")   # Spark's _SUCCESS and .crc files are skipped
                 .to_table(columns=[SUMMARY_COLUMN], filter=pads.field(SUMMARY_COLUMN).is_valid())
                 .column(0).to_pylist())
    else:
        texts = [r[0] for r in results.where(F.col(SUMMARY_COLUMN).isNotNull()).select(SUMMARY_COLUMN).collect()]
    return results, combine([json.loads(t) for t in texts], extra_rows, *page)


def _score_raw(spark, input_uri, config, params, mid, out, full, retry_errors, runner, staging, stamp, clock,
               files_per_task, gate, table_format, run_id, page) -> Scored:
    pre, score_conf = config["preprocess"], config.get("score", {})
    source = score_conf.get("source")
    root = fs.qualified(spark, input_uri)
    max_file_mb = pre["max_file_mb"]
    max_bytes = int(float(max_file_mb) * 1024 * 1024)
    listing = list_archive(root, list(pre["extensions"]), list(pre.get("exclude_dirs") or []), max_bytes)
    plan = classify(listing, None if full else latest_state(out, mid, table_format), retry_errors)
    n = {k: int((plan["todo"] == k).sum()) for k in ("ignored", "unchanged", "unread", "read")}
    clock.lap("list", "raw input: %d files, %d unchanged since the last run, %d to read", n["unchanged"] + n["unread"]
              + n["read"], n["unchanged"], n["read"])

    def frame_of(todo: str) -> DataFrame:
        rows = plan.loc[plan["todo"] == todo, ["path", "length", "mtime_ms", "kind"]]
        return spark.createDataFrame(rows, "path string, length long, mtime_ms long, kind string")

    state_rows = []   # DataFrames of (path, size, mtime_ms, sha256, status) for files this run looked at
    unread, unread_rows = None, None
    if n["unread"]:   # listed but not readable (empty, too large, vanished): errors rows from the listing alone
        unread_rows = listed_errors(plan[plan["todo"] == "unread"], max_file_mb).assign(status="error")
        frame = frame_of("unread")
        unread = frame.select("path", F.lit(None).cast("string").alias("sha256"), F.lit("read").alias("stage"),
                              unread_reason(max_file_mb).alias("reason"),
                              *[F.lit(None).cast(_TYPES[c]).alias(c) for c in DICOM_COLUMNS])
        state_rows.append(frame.select("path", F.col("length").alias("size"), "mtime_ms",
                                       F.lit(None).cast("string").alias("sha256"), F.lit("rejected").alias("status")))
    n_known, bytes_read, hashed, passes = 0, 0, None, 1
    if n["read"]:
        bytes_read = int(plan.loc[plan["todo"] == "read", "length"].sum())
        known = None if full else scored_digests(out, mid, table_format)
        if known is not None and len(known) > int(score_conf.get("known_in_workers", 2_000_000)):
            # too much scored content to hand every worker: hash first, join in Spark, read the new content again
            passes, scored = 2, _scored_shas(spark, out, mid, table_format)
            to_read = frame_of("read").select("path", F.col("length").alias("size"), "mtime_ms")
            hashed = (to_read.repartition(_tasks(spark, n["read"], files_per_task * 4))
                      .mapInPandas(with_frozen_heap(lambda frames: (hash_frame(f, max_bytes) for f in frames)),
                                   schema=HASH_SCHEMA)
                      .cache())
            found = hashed.join(scored, "sha256", "left_semi")
            state_rows.append(found.select("path", "size", "mtime_ms", "sha256", F.lit(ALREADY_SCORED).alias("status")))
            n_known = found.count()
            to_read = hashed.join(scored, "sha256", "left_anti").select("path", "size", "mtime_ms")
            clock.lap("hash", "%d changed files hashed, %d of them already scored by this model", n["read"], n_known)
            known = None
        if n_known < n["read"]:
            aliases = alias_table(pre["labels"])
            shipped = _ship(spark, known)
            if hashed is None:   # every listed file to read: dealt into tasks on the driver, no shuffle, no job
                todo = plan.loc[plan["todo"] == "read", ["path", "length", "mtime_ms"]].rename(columns={"length": "size"})
                to_read, files_of = _dealt(spark, todo, _tasks(spark, len(todo), files_per_task), runner.batch_size)
            else:
                to_read, files_of = to_read.repartition(_tasks(spark, n["read"] - n_known, files_per_task)), iter

            def score(frames):
                digests = shipped() if shipped else None
                results = (score_raw_frame(frame, root, params, aliases, runner, max_bytes, gate, source, digests)
                           for frame in files_of(frames))
                yield from with_summaries(grouped(results, RESULT_ROWS), *page)

            # rows in are paths, one model batch per Arrow batch (not the session's 16); rows out have no image
            with session_conf(spark, ARROW_BATCH, runner.batch_size), _plain_plans(spark, hashed is None):
                (to_read.mapInPandas(with_frozen_heap(score), schema=SUMMARISED_SCHEMA)
                 .write.parquet(f"{staging}/results"))
        clock.lap("score", "%d files read and scored on the executors", n["read"] - n_known)
    results, summary = _summarised(spark, staging, SUMMARISED_SCHEMA, unread_rows, page)
    if results is not None:
        state_rows.append(results.select(
            "path", "size", "mtime_ms", "sha256",
            F.when(F.col("status") == "ok", "scored").when(F.col("status") == "out_of_scope", "out_of_scope")
            .when(F.col("status") == ALREADY_SCORED, ALREADY_SCORED).otherwise("rejected").alias("status")))
    state = None
    if state_rows:
        frame = state_rows[0]
        for more in state_rows[1:]:
            frame = frame.unionByName(more)
        in_file = [F.lit(run_id).alias("run_id")] if table_format == "delta" else []   # Delta: not a partition
        state = frame.select("path", "size", F.timestamp_millis("mtime_ms").alias("mtime"), "sha256", "status",
                             stamp.alias("seen_at"), *in_file).coalesce(1)
    c = summary["counts"]
    counts = {"input": n["unchanged"] + n["unread"] + n["read"], "scored": c["scored"], "rejected": c["rejected"],
              "out_of_scope": c["out_of_scope"], "skipped_unchanged": n["unchanged"],
              "skipped_already_scored": n_known + c[ALREADY_SCORED]}
    if hashed is not None:   # changed files were read once to hash them, the new content again to score it
        bytes_read += summary["bytes"]
    return Scored(results, unread, counts, int(bytes_read), summary["flagged"], summary, passes, state, hashed)


def _ship(spark: SparkSession, known):
    """A function giving the workers the known digests: a broadcast (once per executor) on a classic session,
    the closure itself over Spark Connect (no SparkContext there). None when there is nothing known."""
    if known is None or not len(known):
        return None
    context = classic_context(spark)
    if context is None:
        return lambda: known
    value = context.broadcast(known)
    return lambda: value.value


def _score_preprocessed(spark, input_uri, model_params, name, mid, out, full, runner, staging, clock, gate,
                        table_format, page) -> Scored:
    data_params = json.loads(fs.read_text(spark, f"{input_uri.rstrip('/')}/manifest.json")).get("params", {})
    mismatch = params_mismatch(model_params, data_params)
    if mismatch:
        raise ValueError(f"{input_uri} was preprocessed differently from the data model {name} was trained on "
                         f"(param: (model, data)): {mismatch}; score the raw archive instead")
    images = spark.read.parquet(f"{fs.qualified(spark, input_uri)}/images")
    keys = images.select("path", "sha256")   # thin: the image column is read only if something is new
    n_input = keys.count()
    scored = None if full else _scored_shas(spark, out, mid, table_format)
    new = keys if scored is None else keys.join(scored, "sha256", "left_anti")
    n_new = n_input if scored is None else new.count()
    clock.lap("list", "preprocessed input: %d images, %d not yet scored by this model", n_input, n_new)
    if n_new:
        todo = images.select("path", "sha256", "label", "image", "height", "width",
                             *[c for c in CARRIED_COLUMNS if c in images.columns])
        if scored is not None:
            todo = todo.join(new, ["path", "sha256"], "left_semi")

        def score(frames):
            results = (score_preprocessed_frame(f, runner, gate.rules.ood, gate.frontal) for f in frames)
            yield from with_summaries(grouped(results, RESULT_ROWS), *page)

        (todo.mapInPandas(with_frozen_heap(score), schema=SUMMARISED_SCHEMA)
         .write.parquet(f"{staging}/results"))
    clock.lap("score", "%d images scored on the executors", n_new)
    results, summary = _summarised(spark, staging, SUMMARISED_SCHEMA, None, page)
    c = summary["counts"]
    counts = {"input": n_input, "scored": c["scored"], "rejected": c["rejected"], "out_of_scope": c["out_of_scope"],
              "skipped_unchanged": 0, "skipped_already_scored": n_input - n_new}
    return Scored(results, None, counts, 0, summary["flagged"], summary)
