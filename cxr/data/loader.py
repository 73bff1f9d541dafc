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
from typing import Sequence
from urllib.parse import urlparse

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

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

    def subset(self, rows: np.ndarray) -> "SplitData":
        """The given rows (a boolean mask or indices), e.g. one cross-validation fold."""
        return SplitData(x=self.x[rows], y=self.y[rows], sha256=self.sha256[rows], patient_id=self.patient_id[rows],
                         path=self.path[rows], splits=self.splits)

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


def parquet_files(data_dir: str) -> tuple[pafs.FileSystem, list[str]]:
    """PRE_OUT/images/*.parquet in sorted order (so every scan sees rows in the same order)."""
    fs, root = _filesystem(str(data_dir).rstrip("/"))
    root = f"{root}/images"
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        raise FileNotFoundError(f"no images/ folder in {data_dir} (is it the preprocess job's output?)")
    files = sorted(f.path for f in fs.get_file_info(pafs.FileSelector(root, recursive=True))
                   if f.type == pafs.FileType.File and f.path.endswith(".parquet")
                   and not os.path.basename(f.path).startswith(("_", ".")))
    if not files:
        raise FileNotFoundError(f"{root} holds no Parquet files")
    return fs, files


def images_dataset(data_dir: str) -> ds.Dataset:
    """PRE_OUT/images as a pyarrow dataset (for metadata-only scans)."""
    fs, files = parquet_files(data_dir)
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


# Parquet pages are read through a small buffered stream, not whole column chunks: Spark writes row groups of
# up to 128 MB, which would otherwise be the unit of memory.
STREAM_BUFFER = 1 << 20


def _image_rows(column: pa.Array, keep: np.ndarray, h: int, w: int) -> np.ndarray:
    """The kept rows of a binary column of images as (k, h, w) uint8, read from Arrow's buffer without
    creating a Python object per row."""
    n = len(column)
    offset_type = np.int64 if pa.types.is_large_binary(column.type) else np.int32
    _, offsets_buf, data_buf = column.buffers()
    offsets = np.frombuffer(offsets_buf, dtype=offset_type)[column.offset:column.offset + n + 1].astype(np.int64)
    data = np.frombuffer(data_buf, dtype=np.uint8) if data_buf is not None else np.zeros(0, np.uint8)
    lengths = np.diff(offsets)
    bad = keep & ((lengths != h * w) | np.asarray(column.is_null().to_numpy(zero_copy_only=False), bool))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"an image holds {int(lengths[i])} bytes, expected {h}x{w}={h * w}")
    if n and np.all(lengths == h * w):  # the usual case: one contiguous block
        return data[int(offsets[0]):int(offsets[-1])].reshape(n, h, w)[keep]
    rows = np.flatnonzero(keep)
    out = np.empty((len(rows), h, w), np.uint8)
    for j, i in enumerate(rows):
        out[j] = data[int(offsets[i]):int(offsets[i + 1])].reshape(h, w)
    return out


def to_unit_float(images_u8: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """uint8 pixels -> float32 in [0, 1]: the one scaling used for training, evaluation and scoring."""
    return np.divide(images_u8, np.float32(255), out=out, dtype=np.float32, casting="unsafe")


def load_split(data_dir: str, splits: str | Sequence[str], *, dtype: str = "float32", batch_rows: int = 64,
               labeled_only: bool = True) -> SplitData:
    """Rows of the given split(s) as x (N, H, W, 1): float32 scaled to [0, 1], or raw uint8.

    Two passes: the small columns first (which rows, how many, what size), then the image column streamed
    `batch_rows` at a time from only the row groups that hold wanted rows, straight into the array.
    All images must share one size (the preprocess job guarantees it); anything else is refused.
    """
    splits = (splits,) if isinstance(splits, str) else tuple(splits)
    dtype = np.dtype(dtype)
    if dtype not in (np.dtype(np.float32), np.dtype(np.uint8)):
        raise ValueError("dtype must be float32 or uint8")
    fs, files = parquet_files(data_dir)
    labels = pa.array(CLASSES)
    plan, meta = [], {k: [] for k in ("y", "sha256", "patient_id", "path")}
    sizes = set()
    for path in files:
        with fs.open_input_file(path) as handle:
            pf = pq.ParquetFile(handle)
            for rg in range(pf.num_row_groups):
                t = pf.read_row_group(rg, columns=META_COLUMNS)
                keep = pc.is_in(t.column("split"), value_set=pa.array(splits)).fill_null(False)
                y = pc.index_in(t.column("label"), value_set=labels).fill_null(-1)
                if labeled_only:
                    keep = pc.and_(keep, pc.greater_equal(y, 0))
                keep = np.asarray(keep.to_numpy(zero_copy_only=False), dtype=bool)
                if not keep.any():
                    continue
                plan.append((path, rg, keep))
                sizes |= set(zip(t.column("height").to_numpy()[keep].tolist(), t.column("width").to_numpy()[keep].tolist()))
                meta["y"].append(y.to_numpy(zero_copy_only=False)[keep].astype(np.int8))
                for k in ("sha256", "patient_id", "path"):
                    meta[k].append(np.asarray(t.column(k).to_pylist(), dtype=object)[keep])
    if len(sizes) > 1:
        raise ValueError(f"images of different sizes in {data_dir}: {sorted(sizes)[:4]} "
                         "(was it written by one preprocess run?)")
    h, w = next(iter(sizes)) if sizes else (0, 0)
    n = int(sum(len(k) for k in meta["y"]))
    x = np.empty((n, h, w, 1), dtype=dtype)
    filled, max_batch_bytes, n_batches, arrow_peak = 0, 0, 0, 0
    arrow_base = pa.total_allocated_bytes()
    for path, rg, keep in plan:
        with fs.open_input_file(path) as handle:
            pf = pq.ParquetFile(handle, buffer_size=STREAM_BUFFER, pre_buffer=False)
            pos = 0
            for batch in pf.iter_batches(batch_size=batch_rows, row_groups=[rg], columns=["image"],
                                         use_threads=False):
                m = batch.num_rows
                block = _image_rows(batch.column(0), keep[pos:pos + m], h, w)
                k = len(block)
                if filled + k > n:
                    raise RuntimeError("the dataset changed while being read")
                target = x[filled:filled + k, :, :, 0]
                if dtype == np.uint8:
                    target[...] = block
                else:
                    to_unit_float(block, out=target)
                filled += k
                pos += m
                n_batches += 1
                max_batch_bytes = max(max_batch_bytes, batch.nbytes)
                arrow_peak = max(arrow_peak, pa.total_allocated_bytes() - arrow_base)
                del batch, block
    if filled != n:
        raise RuntimeError(f"read {filled} images, {n} expected: the dataset changed while being read")
    cat = (lambda parts, dt: np.concatenate(parts) if parts else np.zeros(0, dtype=dt))
    return SplitData(x=x, y=cat(meta["y"], np.int8), sha256=cat(meta["sha256"], object),
                     patient_id=cat(meta["patient_id"], object), path=cat(meta["path"], object), splits=splits,
                     stats={"rows": n, "batches": n_batches, "batch_rows": batch_rows, "row_groups": len(plan),
                            "max_batch_bytes": int(max_batch_bytes), "arrow_peak_bytes": int(arrow_peak),
                            "array_bytes": int(x.nbytes)})


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
