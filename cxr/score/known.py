"""The content a model has already scored, as the workers check it: one read per file.

A score run used to hash every changed or new file in one Spark pass, join the digests with the predictions
table, then read the remaining files again to score them (2 x the bytes of a first night's new files). Now the
driver reads the digests this model already has a prediction for (one column of the predictions table, through
pyarrow or the Delta log: no Spark job) into a sorted array of raw 32-byte digests, the workers get it once
(a broadcast), and each file is read once: hashed, looked up, and decoded and scored only when its content is
new. 32 bytes per scored content in every worker (32 MB at a million): beyond `score.known_in_workers` digests
the run falls back to the hash-first pass (cxr/spark/score.py), which keeps them in Spark.
"""
from __future__ import annotations

import numpy as np

from cxr.common.storage import filesystem

DIGEST = np.dtype("S32")
ALREADY_SCORED = "already_scored"   # result status (and state status) of content this model already scored


def digests(hex_shas) -> np.ndarray:
    """Hex sha256 strings (None skipped) -> their sorted, unique raw digests (S32)."""
    shas = [s for s in hex_shas if s]
    if not shas:
        return np.empty(0, DIGEST)
    raw = np.frombuffer(bytes.fromhex("".join(shas)), DIGEST)
    return np.unique(raw)


def contains(known: np.ndarray | None, hex_sha: str) -> bool:
    """Whether this content (hex sha256) is in the sorted digests."""
    if known is None or not len(known):
        return False
    key = np.frombuffer(bytes.fromhex(hex_sha), DIGEST)[0]
    i = int(np.searchsorted(known, key))
    return i < len(known) and known[i] == key


def scored_digests(out: str, model_id: str, table_format: str = "parquet") -> np.ndarray | None:
    """The sorted digests of the content this model has a prediction row for in PRED_DIR, read on the driver
    (one column; no Spark job), or None when there is no predictions table yet."""
    import pyarrow.dataset as ds
    import pyarrow.fs as pafs

    where = ds.field("model_id") == model_id
    if table_format == "delta":
        from cxr.score.delta_table import read_table

        table = read_table(out, "predictions", ["sha256"], filter=where)
    else:
        fs, base, _ = filesystem(out)
        folder = f"{base}/predictions"
        if fs.get_file_info(folder).type != pafs.FileType.Directory:
            return None
        table = ds.dataset(folder, filesystem=fs, format="parquet", partitioning="hive",
                           exclude_invalid_files=True).to_table(columns=["sha256"], filter=where)
    if table is None:
        return None
    return digests(table.column("sha256").unique().to_pylist())
