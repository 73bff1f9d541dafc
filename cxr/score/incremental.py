"""What a score run must read: the archive's listing against what earlier runs recorded, on the driver.

Listing is one pass over the file names (pyarrow.fs: names, sizes and modification times, no file opened), and
the state table is read thin (path, size, mtime, status): for an unchanged archive the run decides that
nothing needs reading without starting a single Spark job. The names follow Spark's own file index: files and
folders starting with '.' or '_' are not part of a dataset, so they are not listed here either.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from cxr.common.storage import filesystem
from cxr.image.source import UNREAD_KINDS

LISTING_COLUMNS = ("path", "length", "mtime_ms", "kind")


def _hidden(rel: str) -> bool:
    return any((part.startswith("_") and "=" not in part) or part.startswith(".") or part.endswith("._COPYING_")
               for part in rel.split("/"))


def list_archive(root: str, extensions: Sequence[str], exclude_dirs: Sequence[str], max_bytes: int) -> pd.DataFrame:
    """Every file under root: path (as Spark writes it, e.g. file:/abs/x.png), length, mtime_ms and `kind`:
    read | empty | too_large | vanished (listed, then gone or a dangling link) | ignored_extension | ignored_dir."""
    import pyarrow.fs as pafs

    fs, base, prefix = filesystem(root)
    infos = fs.get_file_info(pafs.FileSelector(base, recursive=True))
    exts = {"." + e.lstrip(".").lower() for e in extensions}
    excluded = {d.lower() for d in exclude_dirs}
    rows = []
    for info in infos:
        if info.type == pafs.FileType.Directory:
            continue
        rel = info.path[len(base):].lstrip("/")
        if _hidden(rel):
            continue
        name = rel.rsplit("/", 1)[-1].lower()
        dot = name.rfind(".")
        if dot <= 0 or name[dot:] not in exts:
            kind = "ignored_extension"
        elif excluded and any(part.lower() in excluded for part in rel.split("/")[:-1]):
            kind = "ignored_dir"
        elif info.type != pafs.FileType.File:
            kind = "vanished"
        elif info.size == 0:
            kind = "empty"
        elif info.size > max_bytes:
            kind = "too_large"
        else:
            kind = "read"
        size = info.size if info.type == pafs.FileType.File else None
        mtime = info.mtime_ns // 1_000_000 if info.mtime_ns is not None else None
        rows.append((f"{prefix}{info.path}", size, mtime, kind))
    frame = pd.DataFrame(rows, columns=list(LISTING_COLUMNS))
    frame["length"] = frame["length"].astype("Int64")
    frame["mtime_ms"] = frame["mtime_ms"].astype("Int64")
    return frame.sort_values("path", ignore_index=True)


def latest_state(out: str, model_id: str, table_format: str = "parquet") -> pd.DataFrame | None:
    """The newest state row per path for this model (s_size, s_mtime_ms, s_status), or None before any.
    Delta: the rows of the table's current files (delta-rs reads its log; no Spark, no Delta jars)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.dataset as ds
    import pyarrow.fs as pafs

    columns = ["path", "size", "mtime", "status", "seen_at", "run_id"]
    if table_format == "delta":
        from cxr.score.delta_table import read_table

        table = read_table(out, "state", columns, filter=ds.field("model_id") == model_id)
        if table is None or table.num_rows == 0:
            return None
    else:
        fs, base, _ = filesystem(out)
        folder = f"{base}/state/model_id={model_id}"
        if fs.get_file_info(folder).type != pafs.FileType.Directory:
            return None
        table = ds.dataset(folder, filesystem=fs, format="parquet", partitioning="hive",
                           exclude_invalid_files=True).to_table(columns=columns)
    mtime_ms = pc.cast(pc.cast(table["mtime"], pa.timestamp("ms")), pa.int64())
    frame = pd.DataFrame({"path": table["path"].to_pandas(), "s_size": table["size"].to_pandas().astype("Int64"),
                          "s_mtime_ms": mtime_ms.to_pandas().astype("Int64"),
                          "s_status": table["status"].to_pandas(), "seen_at": table["seen_at"].to_pandas(),
                          "run_id": table["run_id"].to_pandas().astype(str)})
    frame = frame.sort_values(["seen_at", "run_id"], kind="stable").drop_duplicates("path", keep="last")
    return frame[["path", "s_size", "s_mtime_ms", "s_status"]]


def classify(listing: pd.DataFrame, state: pd.DataFrame | None, retry_errors: bool) -> pd.DataFrame:
    """listing + `todo`: ignored | unchanged (not opened: same path, size and mtime as the newest state row,
    and not a rejection to retry) | unread (empty, too large, vanished: an errors row) | read."""
    kind = listing["kind"]
    todo = np.where(kind.str.startswith("ignored"), "ignored", np.where(kind.isin(UNREAD_KINDS), "unread", "read"))
    out = listing.assign(todo=todo)
    if state is None or state.empty:
        return out
    seen = listing.merge(state, on="path", how="left")
    same = ((seen["length"] == seen["s_size"]).fillna(False).astype(bool)
            & (seen["mtime_ms"] == seen["s_mtime_ms"]).fillna(False).astype(bool))
    settled = (seen["s_status"] != "rejected") | (not retry_errors)
    unchanged = (out["todo"] != "ignored").to_numpy() & (same & settled.fillna(False)).to_numpy()
    out.loc[unchanged, "todo"] = "unchanged"
    return out

