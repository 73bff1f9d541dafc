"""The score job's tables as Delta tables: Spark writes a run's Parquet files, the driver commits them with delta-rs.

Why not the Parquet layout's directory renames: on object stores a rename is a copy (a reader can see half a
run) and the lease there is check-then-write (two runs can both believe they hold it). A Delta commit is one
put-if-absent of the next log entry (rename-free on local disk, a conditional write on S3), so:
- readers see a run's rows all at once or not at all, through any Delta reader (Spark with Delta, DuckDB,
  Polars, pandas via deltalake, delta-rs itself);
- a run commits against the table versions it saw when it started: if another run committed in between, its
  commit fails (`ConcurrentRunError`, exit 3) and it removes the files it had moved in;
- every commit carries the app transaction (`cxr-score:<run id>`, 1): committing the same run again is a no-op.

Layout: predictions, errors and out_of_scope are partitioned by run_date and run_id as in the Parquet layout; the
state table only by model_id (run_id is a column), so that compaction can merge the nights into a few files.
A data file is named `<run id>_<Spark's part name>`: a file whose run never committed (a driver killed between
moving and committing) is recognised by that and removed by the next run under the lease.

No Spark and no Delta jars: delta-rs and pyarrow.fs only, on the driver.
"""
from __future__ import annotations

import json
import logging
import posixpath
import time
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

from cxr.common.storage import NATIVE_SCHEMES, filesystem

log = logging.getLogger(__name__)

APP_ID = "cxr-score"
PARTITIONS = {"predictions": ["run_date", "run_id"], "errors": ["run_date", "run_id"],
              "out_of_scope": ["run_date", "run_id"], "state": ["model_id"]}
COMMIT_ORDER = ("errors", "out_of_scope", "predictions", "state")   # state last: it is what makes files skipped
NAME_SEPARATOR = "_part-"   # <run id>_part-00000-....parquet


class ConcurrentRunError(RuntimeError):
    """Another run committed to PRED_DIR after this one started (cxr.cli exits 3)."""


def app_id(run_id: str) -> str:
    return f"{APP_ID}:{run_id}"


def table_uri(out: str, table: str) -> str:
    """The URI delta-rs takes for PRED_DIR/table: a plain absolute path locally, s3:// for s3a/s3n."""
    fs, base, _ = filesystem(out)
    local = fs.type_name == "local"
    if local:
        return posixpath.join(base, table)
    scheme = out.split("://", 1)[0]
    native = NATIVE_SCHEMES.get(scheme, scheme)
    return f"{native}://{base}/{table}" if native in ("s3", "gs") else f"{out.rstrip('/')}/{table}"


def open_table(uri: str):
    """The table's newest version, or None where there is no table yet."""
    from deltalake import DeltaTable

    return DeltaTable(uri) if DeltaTable.is_deltatable(uri) else None


def snapshot(out: str, tables: Iterable[str] = COMMIT_ORDER) -> dict:
    """{table: DeltaTable at the version this run starts from, or None}: what the run's commit is checked against."""
    return {t: open_table(table_uri(out, t)) for t in tables}


@dataclass
class Staged:
    """One table's files of this run, written (by Spark) under a staging folder."""
    table: str
    folder: str                                   # URI of the folder holding part-*.parquet
    partition: Mapping[str, str] = field(default_factory=dict)


def _part_files(folder: str) -> list:
    import pyarrow.fs as pafs

    fs, base, _ = filesystem(folder)
    infos = fs.get_file_info(pafs.FileSelector(base, recursive=False, allow_not_found=True))
    return sorted((i for i in infos if i.type == pafs.FileType.File and i.base_name.endswith(".parquet")
                   and not i.base_name.startswith((".", "_"))), key=lambda i: i.path)


def _arrow_schema(fs, path: str):
    import pyarrow.parquet as pq

    with fs.open_input_file(path) as fh:
        meta = pq.ParquetFile(fh).metadata
        return meta.schema.to_arrow_schema(), meta.num_rows


def _delta_schema(file_schema, partition_by: Sequence[str]):
    """The table schema: the file's columns, then the partition columns (strings)."""
    import pyarrow as pa
    from deltalake import Schema

    fields = [f for f in file_schema if f.name not in partition_by]
    fields += [pa.field(p, pa.string()) for p in partition_by]
    return Schema.from_arrow(pa.schema(fields))


def _check_schema(table, file_schema, uri: str, partition_by: Sequence[str]) -> None:
    import pyarrow as pa

    have = {f.name: f.type for f in pa.schema(table.schema().to_arrow()) if f.name not in partition_by}
    got = {f.name: f.type for f in file_schema if f.name not in partition_by}
    if set(have) != set(got):
        raise ValueError(f"{uri} has columns {sorted(have)}; this run wrote {sorted(got)}. Score into a new "
                         "PRED_DIR (or compare the model/project versions that wrote them)")


def _move_in(staged: Staged, uri: str, run_id: str) -> list[tuple]:
    """Move the staged part files into the table folder: [(relative path, size, mtime_ms, rows, file schema)]."""
    import pyarrow.fs as pafs

    src_fs, _, _ = filesystem(staged.folder)
    dst_fs, dst_base, _ = filesystem(uri)
    sub = "/".join(f"{k}={v}" for k, v in staged.partition.items())
    moved = []
    for info in _part_files(staged.folder):
        rel = posixpath.join(sub, f"{run_id}_{info.base_name}") if sub else f"{run_id}_{info.base_name}"
        dst = posixpath.join(dst_base, rel)
        schema, rows = _arrow_schema(src_fs, info.path)
        if dst_fs.type_name == "local":
            dst_fs.create_dir(posixpath.dirname(dst), recursive=True)
        if src_fs.type_name == dst_fs.type_name == "local":
            src_fs.move(info.path, dst)
        else:
            pafs.copy_files(info.path, dst, source_filesystem=src_fs, destination_filesystem=dst_fs)
            src_fs.delete_file(info.path)
        done = dst_fs.get_file_info(dst)
        moved.append((rel, done.size, (done.mtime_ns or time.time_ns()) // 1_000_000, rows, schema))
    return moved


def _remove(uri: str, rels: Iterable[str]) -> None:
    fs, base, _ = filesystem(uri)
    for rel in rels:
        try:
            fs.delete_file(posixpath.join(base, rel))
        except (FileNotFoundError, OSError):
            pass


def _commit_one(staged: Staged, uri: str, start, latest, run_id: str) -> int | None:
    """Commit one table's files (start: the version the run began from, latest: the newest, seen just before);
    the new version, or None when this run was already committed there."""
    from deltalake import CommitProperties, Transaction
    from deltalake.exceptions import CommitFailedError, DeltaError
    from deltalake.transaction import AddAction, create_table_with_add_actions

    partition_by = PARTITIONS[staged.table]
    if latest is not None and latest.transaction_version(app_id(run_id)) is not None:
        log.info("%s: run %s is already committed (version %s): nothing to do", uri, run_id, latest.version())
        return None
    moved = _move_in(staged, uri, run_id)
    if not moved:
        return start.version() if start is not None else None
    actions = [AddAction(rel, size, dict(staged.partition), mtime, True, json.dumps({"numRecords": rows}))
               for rel, size, mtime, rows, _ in moved]
    props = CommitProperties(max_commit_retries=0, app_transactions=[Transaction(app_id(run_id), 1)],
                             custom_metadata={"cxr.run_id": run_id})
    try:
        if start is None:
            create_table_with_add_actions(uri, _delta_schema(moved[0][4], partition_by), actions, mode="error",
                                          partition_by=partition_by, commit_properties=props)
        else:
            _check_schema(start, moved[0][4], uri, partition_by)
            start.create_write_transaction(actions, mode="append", schema=start.schema(), partition_by=partition_by,
                                           commit_properties=props)
    except (CommitFailedError, DeltaError) as exc:
        _remove(uri, [m[0] for m in moved])
        raise ConcurrentRunError(f"another run committed to {uri} while run {run_id} was running ({exc})") from exc
    except Exception:
        _remove(uri, [m[0] for m in moved])
        raise
    return 0 if start is None else start.version() + 1   # no retries: exactly the next version, or a failure


def commit_run(out: str, run_id: str, staged: Sequence[Staged], start: Mapping[str, object]) -> dict[str, int | None]:
    """Commit the run's tables (COMMIT_ORDER), each against the version `start` saw. Raises ConcurrentRunError,
    committing nothing, when any table moved on since; {table: version after the commit}."""
    by_table, latest = {s.table: s for s in staged}, {}
    for table in by_table:
        uri, was = table_uri(out, table), start.get(table)
        now = latest[table] = open_table(uri)
        moved_on = (now is not None) if was is None else (now is None or now.version() != was.version())
        if moved_on and not (now is not None and now.transaction_version(app_id(run_id)) is not None):
            raise ConcurrentRunError(
                f"another run committed to {uri} after run {run_id} started (version "
                f"{None if was is None else was.version()} -> {None if now is None else now.version()}): "
                "nothing of this run was committed; run it again")
    versions = {}
    for table in COMMIT_ORDER:
        if table in by_table:
            uri = table_uri(out, table)
            versions[table] = _commit_one(by_table[table], uri, start.get(table), latest[table], run_id)
    return versions


def _run_of(name: str) -> str | None:
    return name.split(NAME_SEPARATOR, 1)[0] if NAME_SEPARATOR in name else None


def remove_uncommitted(out: str, tables: Iterable[str] = COMMIT_ORDER) -> list[str]:
    """Data files of runs that moved them in but never committed (killed in between). Call under the lease."""
    import pyarrow.fs as pafs

    removed = []
    for table in tables:
        uri = table_uri(out, table)
        fs, base, _ = filesystem(uri)
        if fs.get_file_info(base).type != pafs.FileType.Directory:
            continue
        current = open_table(uri)
        live = _live_names(current)
        committed: dict[str, bool] = {}
        for info in fs.get_file_info(pafs.FileSelector(base, recursive=True)):
            rel = info.path[len(base):].lstrip("/")
            if info.type != pafs.FileType.File or rel.startswith("_delta_log") or not rel.endswith(".parquet"):
                continue
            run = _run_of(info.base_name)
            if run is None or info.base_name in live:
                continue
            if run not in committed:
                committed[run] = current is not None and current.transaction_version(app_id(run)) is not None
            if not committed[run]:
                fs.delete_file(info.path)
                removed.append(info.path)
    return removed


def _live_names(current) -> set[str]:
    """File names (unique: run id + Spark's uuid) of the table's current files."""
    if current is None:
        return set()
    paths = current.get_add_actions(flatten=True).column("path").to_pylist()
    return {posixpath.basename(p) for p in paths}


def read_table(out: str, table: str, columns: Sequence[str] | None = None, filter=None):
    """A pyarrow Table of the table's current rows (None when the table does not exist)."""
    current = open_table(table_uri(out, table))
    if current is None:
        return None
    return current.to_pyarrow_dataset().to_table(columns=list(columns) if columns else None, filter=filter)


def maintain(out: str, retention_hours: int | None = None, tables: Iterable[str] = COMMIT_ORDER) -> dict[str, dict]:
    """Compact each table's small files (one a night and more, per partition), checkpoint the log, vacuum files
    no version younger than the retention needs, and drop old log entries. Run it under the lease (cxr.score.maintain):
    a score run that started before a compaction fails its commit (exit 3) rather than race it.
    retention_hours None: the table's own retention (delta.deletedFileRetentionDuration, 7 days by default)."""
    report = {}
    for table in tables:
        current = open_table(table_uri(out, table))
        if current is None:
            continue
        before = len(current.file_uris())
        compacted = current.optimize.compact()
        current = open_table(table_uri(out, table))
        current.create_checkpoint()
        vacuumed = current.vacuum(retention_hours, dry_run=False, enforce_retention_duration=retention_hours is None)
        current.cleanup_metadata()
        report[table] = {"files_before": before, "files_after": len(open_table(table_uri(out, table)).file_uris()),
                         "files_removed_by_compaction": int(compacted.get("numFilesRemoved", 0)),
                         "files_vacuumed": len(vacuumed), "version": open_table(table_uri(out, table)).version()}
    return report
