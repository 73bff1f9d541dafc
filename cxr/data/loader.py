"""The preprocess job's Parquet images -> one preallocated NumPy array, streamed batch by batch.

Training runs on the driver, so the split must end up in driver memory; what must not happen is holding it
twice (a collect() into Python rows, or a whole Arrow table beside the array). Here the rows are counted
first, the array is allocated once, and Arrow record batches of `batch_rows` rows are copied into it: peak
memory is the array plus one bounded batch (Parquet pages are streamed, not whole row groups).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Iterable, Sequence
from urllib.parse import urlparse

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs

from cxr import CLASSES

META_COLUMNS = ["path", "sha256", "label", "split", "patient_id", "height", "width"]


class SplitLeakError(ValueError):
    """An image (by content hash) or a patient appears in the evaluation split and in a training split."""


@dataclass
class SplitData:
    """Images (N, H, W, 1) with their labels (index into CLASSES, -1 when unlabeled) and row identities."""

    x: np.ndarray
    y: np.ndarray
    sha256: np.ndarray
    patient_id: np.ndarray
    path: np.ndarray
    splits: tuple[str, ...] = ()
    stats: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def class_counts(self) -> dict[str, int]:
        return {c: int((self.y == i).sum()) for i, c in enumerate(CLASSES)}

    def n_patients(self) -> int:
        """Distinct patients; an image without a patient id counts as its own patient."""
        ids = {p for p in self.patient_id if p is not None}
        return len(ids) + int(sum(p is None for p in self.patient_id))


def _filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    if not urlparse(uri).scheme or len(urlparse(uri).scheme) == 1:  # a local path (or a Windows drive letter)
        return pafs.LocalFileSystem(), os.path.abspath(uri)
    if uri.startswith("file:") and not uri.startswith("file://"):
        uri = "file://" + uri[len("file:"):]
    return pafs.FileSystem.from_uri(uri)


def images_dataset(data_dir: str) -> ds.Dataset:
    """PRE_OUT/images as a pyarrow dataset over its Parquet files in sorted order (so scans repeat exactly)."""
    fs, root = _filesystem(str(data_dir).rstrip("/"))
    root = f"{root}/images"
    info = fs.get_file_info(root)
    if info.type != pafs.FileType.Directory:
        raise FileNotFoundError(f"no images/ folder in {data_dir} (is it the preprocess job's output?)")
    files = sorted(f.path for f in fs.get_file_info(pafs.FileSelector(root, recursive=True))
                   if f.type == pafs.FileType.File and f.path.endswith(".parquet")
                   and not os.path.basename(f.path).startswith(("_", ".")))
    if not files:
        raise FileNotFoundError(f"{root} holds no Parquet files")
    return ds.dataset(files, format="parquet", filesystem=fs)


def read_manifest(data_dir: str) -> tuple[dict, str]:
    """The preprocess manifest.json and the sha256 of its bytes (recorded with every model)."""
    fs, root = _filesystem(str(data_dir).rstrip("/"))
    try:
        with fs.open_input_stream(f"{root}/manifest.json") as stream:
            raw = stream.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"no manifest.json in {data_dir} (is it the preprocess job's output?)") from None
    return json.loads(raw), hashlib.sha256(raw).hexdigest()


def split_filter(splits: Sequence[str], labeled_only: bool = True) -> ds.Expression:
    expr = ds.field("split").isin(list(splits))
    if labeled_only:
        expr = expr & ds.field("label").isin(list(CLASSES))
    return expr


_SCAN_OPTIONS = ds.ParquetFragmentScanOptions(use_buffered_stream=True, buffer_size=1 << 20, pre_buffer=False)


def _batches(dataset: ds.Dataset, columns, expr, batch_rows: int, memory_pool=None) -> Iterable[pa.RecordBatch]:
    # readahead 1 and no pre-buffering: Arrow holds about one batch (plus one Parquet page) at a time.
    return dataset.to_batches(columns=columns, filter=expr, batch_size=batch_rows, batch_readahead=1,
                              fragment_readahead=1, fragment_scan_options=_SCAN_OPTIONS, use_threads=False,
                              memory_pool=memory_pool)


def _image_block(column: pa.Array, h: int, w: int) -> np.ndarray:
    """A binary column of n equal-length images -> a zero-copy (n, h, w) uint8 view of Arrow's buffer."""
    if column.null_count:
        raise ValueError("image column holds nulls")
    n = len(column)
    offset_type = np.int64 if pa.types.is_large_binary(column.type) else np.int32
    _, offsets_buf, data_buf = column.buffers()
    offsets = np.frombuffer(offsets_buf, dtype=offset_type)[column.offset:column.offset + n + 1]
    if n and not np.all(np.diff(offsets) == h * w):
        bad = int(np.flatnonzero(np.diff(offsets) != h * w)[0])
        raise ValueError(f"image bytes of a row are {int(offsets[bad + 1] - offsets[bad])}, expected {h}x{w}={h * w}")
    if n == 0:
        return np.zeros((0, h, w), np.uint8)
    data = np.frombuffer(data_buf, dtype=np.uint8)[int(offsets[0]):int(offsets[-1])]
    return data.reshape(n, h, w)


def to_unit_float(images_u8: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """uint8 pixels -> float32 in [0, 1]: the one scaling used for training, evaluation and scoring."""
    return np.divide(images_u8, np.float32(255), out=out, dtype=np.float32, casting="unsafe")


def _strings(column: pa.Array) -> np.ndarray:
    return np.asarray(column.to_pylist(), dtype=object)


def load_split(data_dir: str, splits: str | Sequence[str], *, dtype: str = "float32", batch_rows: int = 64,
               labeled_only: bool = True, memory_pool=None) -> SplitData:
    """Rows of the given split(s) as x (N, H, W, 1): float32 scaled to [0, 1], or raw uint8.

    All images must share one size (the preprocess job guarantees it); anything else is refused.
    """
    splits = (splits,) if isinstance(splits, str) else tuple(splits)
    dataset = images_dataset(data_dir)
    expr = split_filter(splits, labeled_only)
    n = dataset.count_rows(filter=expr)
    dtype = np.dtype(dtype)
    if dtype not in (np.dtype(np.float32), np.dtype(np.uint8)):
        raise ValueError("dtype must be float32 or uint8")
    x = None
    y = np.full(n, -1, dtype=np.int8)
    sha, pid, path = (np.empty(n, dtype=object) for _ in range(3))
    filled, max_batch_bytes, n_batches = 0, 0, 0
    labels = pa.array(CLASSES)
    for batch in _batches(dataset, META_COLUMNS + ["image"], expr, batch_rows, memory_pool):
        m = batch.num_rows
        if m == 0:
            continue
        heights, widths = batch.column("height").to_numpy(), batch.column("width").to_numpy()
        if x is None:
            h, w = int(heights[0]), int(widths[0])
            x = np.empty((n, h, w, 1), dtype=dtype)
        if filled + m > n:
            raise RuntimeError(f"the dataset changed while being read: more than the {n} rows counted")
        if not (np.all(heights == h) and np.all(widths == w)):
            raise ValueError(f"images of different sizes in {data_dir}: expected {h}x{w} "
                             f"(was it written by one preprocess run?)")
        block = _image_block(batch.column("image"), h, w)
        target = x[filled:filled + m, :, :, 0]
        if dtype == np.uint8:
            target[...] = block
        else:
            to_unit_float(block, out=target)
        idx = pc.index_in(batch.column("label"), value_set=labels).fill_null(-1)
        y[filled:filled + m] = idx.to_numpy(zero_copy_only=False)
        sha[filled:filled + m] = _strings(batch.column("sha256"))
        pid[filled:filled + m] = _strings(batch.column("patient_id"))
        path[filled:filled + m] = _strings(batch.column("path"))
        max_batch_bytes = max(max_batch_bytes, batch.nbytes)
        n_batches += 1
        filled += m
    if filled != n:
        raise RuntimeError(f"read {filled} rows, {n} counted: the dataset changed while being read")
    if x is None:
        x = np.empty((0, 0, 0, 1), dtype=dtype)
    return SplitData(x=x, y=y, sha256=sha, patient_id=pid, path=path, splits=splits,
                     stats={"rows": n, "batches": n_batches, "batch_rows": batch_rows,
                            "max_batch_bytes": max_batch_bytes, "array_bytes": int(x.nbytes)})


def load_metadata(data_dir: str, splits: Sequence[str] | None = None):
    """(path, sha256, label, split, patient_id) of every row, without the image bytes (a pandas DataFrame)."""
    dataset = images_dataset(data_dir)
    expr = ds.field("split").isin(list(splits)) if splits else None
    return dataset.to_table(columns=["path", "sha256", "label", "split", "patient_id"], filter=expr).to_pandas()


def check_disjoint(meta, eval_split: str = "test", train_splits: Sequence[str] = ("train", "val")) -> dict:
    """Refuse evaluation on images seen in training: no shared sha256 and no shared patient id.

    Returns counts for the report; raises SplitLeakError naming a few offenders otherwise.
    """
    held = meta[meta["split"] == eval_split]
    seen = meta[meta["split"].isin(list(train_splits))]
    shared_sha = sorted(set(held["sha256"]) & set(seen["sha256"]))
    held_p = set(held["patient_id"].dropna())
    shared_pat = sorted(held_p & set(seen["patient_id"].dropna()))
    if shared_sha or shared_pat:
        raise SplitLeakError(
            f"split '{eval_split}' overlaps {'/'.join(train_splits)}: {len(shared_sha)} images by sha256 "
            f"(e.g. {shared_sha[:3]}), {len(shared_pat)} patients (e.g. {shared_pat[:3]}); refusing to evaluate")
    return {"split": eval_split, "images": int(len(held)), "patients": len(held_p),
            "images_without_patient_id": int(held["patient_id"].isna().sum()),
            "checked_against": list(train_splits), "shared_images": 0, "shared_patients": 0}
