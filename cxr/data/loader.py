"""The preprocess job's Parquet images: the metadata pass (scan_split) and, for evaluation helpers on the
driver, one preallocated NumPy array streamed batch by batch (load_split).

Training does not load a split: cxr.data.stream reads the same record batches each epoch through a bounded
shuffle buffer. What must never happen is holding a split twice (a collect() into Python rows, or a whole
Arrow table beside the array). load_split counts the rows first, allocates the array once, and copies Arrow
record batches of `batch_rows` rows into it: peak memory is the array plus one bounded batch (Parquet pages
are streamed, not whole row groups).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from cxr import CLASSES
from cxr.common.storage import filesystem

META_COLUMNS = ["path", "sha256", "label", "split", "patient_id", "source", "height", "width"]
OPTIONAL_META = ("source",)   # columns tables written before they existed lack (read as null)


class SplitLeakError(ValueError):
    """An image (by content hash) or a patient appears in the evaluation split and in a training split."""


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The order of epoch `epoch` when the whole split fits in the buffer (and of in-memory data): the same for
    SplitData and cxr.data.stream.ParquetSplit, so that streaming and in-memory training see one order."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch), 1]).permutation(int(n))


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
    source: np.ndarray | None = None   # the image's source (site, dataset), None where unknown

    def __post_init__(self):
        if self.source is None:
            self.source = np.full(len(self.y), None, dtype=object)

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def class_counts(self) -> dict[str, int]:
        return {c: int((self.y == i).sum()) for i, c in enumerate(CLASSES)}

    def subset(self, rows: np.ndarray) -> "SplitData":
        """The given rows (a boolean mask or indices), e.g. one cross-validation fold."""
        return SplitData(x=self.x[rows], y=self.y[rows], sha256=self.sha256[rows], patient_id=self.patient_id[rows],
                         path=self.path[rows], splits=self.splits, source=self.source[rows])

    def n_patients(self) -> int:
        """Distinct patients; an image without a patient id counts as its own patient."""
        ids = {p for p in self.patient_id if p is not None}
        return len(ids) + int(sum(p is None for p in self.patient_id))

    # The training-source interface cxr.data.stream.ParquetSplit also has: training code takes either.
    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.x.shape[1]), int(self.x.shape[2])

    def head(self, k: int) -> np.ndarray:
        """The first k images (N, H, W) as stored (uint8 or float32)."""
        return self.x[:k, :, :, 0]

    def batches(self, batch_size: int, epoch: int = 0, shuffle: bool = False, seed: int = 0,
                weights: np.ndarray | None = None):
        """(images (b, H, W) as stored, labels (b,)) per batch, plus the rows' weights (b,) when `weights` (one
        per row) is given; shuffled in the order a ParquetSplit whose buffer holds the whole split gives
        (epoch_order)."""
        order = epoch_order(len(self), seed, epoch) if shuffle else np.arange(len(self))
        for start in range(0, len(self), int(batch_size)):
            idx = order[start:start + int(batch_size)]
            if weights is None:
                yield self.x[idx, :, :, 0], self.y[idx]
            else:
                yield self.x[idx, :, :, 0], self.y[idx], np.asarray(weights)[idx]


def parquet_files(data_dir: str, table: str = "images") -> tuple[pafs.FileSystem, list[str]]:
    """PRE_OUT/images/*.parquet (or another table's) in sorted order (so every scan sees rows in the same order)."""
    fs, root, _ = filesystem(str(data_dir).rstrip("/"))
    root = f"{root}/{table}"
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        raise FileNotFoundError(f"no {table}/ folder in {data_dir} (is it the preprocess job's output?)")
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


def side_table(data_dir: str, name: str) -> ds.Dataset | None:
    """PRE_OUT/errors or PRE_OUT/out_of_scope as a pyarrow dataset; None when the run had no such rows."""
    try:
        fs, files = parquet_files(data_dir, name)
    except FileNotFoundError:
        return None
    return ds.dataset(files, format="parquet", filesystem=fs)


def read_manifest(data_dir: str) -> tuple[dict, str]:
    """The preprocess manifest.json and the sha256 of its bytes (recorded with every model)."""
    fs, root, _ = filesystem(str(data_dir).rstrip("/"))
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


@dataclass
class SplitIndex:
    """What the metadata pass of a split found: which rows of which row groups are wanted, their labels and
    identities, and the one image size. No pixels: the image column is read later, by load_split (into one
    array) or cxr.data.stream (batch by batch)."""

    fs: pafs.FileSystem
    plan: list  # (file path, row group, keep mask over the row group's rows)
    y: np.ndarray
    sha256: np.ndarray
    patient_id: np.ndarray
    path: np.ndarray
    height: int
    width: int
    splits: tuple[str, ...] = ()
    source: np.ndarray | None = None

    def __len__(self) -> int:
        return int(len(self.y))

    def blocks(self, group: int, batch_rows: int = 64, stats: dict | None = None):
        """The kept images of plan[group] as (k, h, w) uint8 blocks, `batch_rows` Parquet rows at a time
        (k <= batch_rows), streamed through a small buffer: memory is one record batch, not the row group."""
        path, rg, keep = self.plan[group]
        h, w = self.height, self.width
        with self.fs.open_input_file(path) as handle:
            pf = pq.ParquetFile(handle, buffer_size=STREAM_BUFFER, pre_buffer=False)
            pos = 0
            for batch in pf.iter_batches(batch_size=batch_rows, row_groups=[rg], columns=["image"],
                                         use_threads=False):
                m = batch.num_rows
                block = _image_rows(batch.column(0), keep[pos:pos + m], h, w)
                pos += m
                if stats is not None:
                    stats["batches"] = stats.get("batches", 0) + 1
                    stats["max_batch_bytes"] = max(stats.get("max_batch_bytes", 0), int(batch.nbytes))
                del batch
                if len(block):
                    yield block

    def group_sizes(self) -> np.ndarray:
        """Kept rows per plan entry (their global indices are consecutive, in plan order)."""
        return np.asarray([int(keep.sum()) for _, _, keep in self.plan], dtype=np.int64)


def scan_split(data_dir: str, splits: str | Sequence[str], labeled_only: bool = True) -> SplitIndex:
    """The metadata pass: the small columns of every row group (which rows, how many, what size), no pixels.
    All images must share one size (the preprocess job guarantees it); anything else is refused."""
    splits = (splits,) if isinstance(splits, str) else tuple(splits)
    fs, files = parquet_files(data_dir)
    labels = pa.array(CLASSES)
    plan, meta = [], {k: [] for k in ("y", "sha256", "patient_id", "path", "source")}
    sizes = set()
    for path in files:
        with fs.open_input_file(path) as handle:
            pf = pq.ParquetFile(handle)
            for rg in range(pf.num_row_groups):
                have = set(pf.schema_arrow.names)
                t = pf.read_row_group(rg, columns=[c for c in META_COLUMNS if c in have])
                for c in OPTIONAL_META:
                    if c not in have:
                        t = t.append_column(c, pa.nulls(t.num_rows, pa.string()))
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
                for k in ("sha256", "patient_id", "path", "source"):
                    meta[k].append(np.asarray(t.column(k).to_pylist(), dtype=object)[keep])
    if len(sizes) > 1:
        raise ValueError(f"images of different sizes in {data_dir}: {sorted(sizes)[:4]} "
                         "(was it written by one preprocess run?)")
    h, w = next(iter(sizes)) if sizes else (0, 0)
    cat = (lambda parts, dt: np.concatenate(parts) if parts else np.zeros(0, dtype=dt))
    return SplitIndex(fs=fs, plan=plan, y=cat(meta["y"], np.int8), sha256=cat(meta["sha256"], object),
                      patient_id=cat(meta["patient_id"], object), path=cat(meta["path"], object),
                      source=cat(meta["source"], object),
                      height=int(h), width=int(w), splits=splits)


def load_split(data_dir: str, splits: str | Sequence[str], *, dtype: str = "float32", batch_rows: int = 64,
               labeled_only: bool = True, limit: int | None = None) -> SplitData:
    """Rows of the given split(s) as x (N, H, W, 1): float32 scaled to [0, 1], or raw uint8.

    Two passes: the small columns first (scan_split: which rows, how many, what size), then the image column
    streamed `batch_rows` at a time from only the row groups that hold wanted rows, straight into the array.
    `limit` keeps the first rows only (and reads no further). Training does not use this (it streams, see
    cxr.data.stream); evaluation helpers on the driver (probes, Grad-CAM checks, the ONNX check) do.
    """
    dtype = np.dtype(dtype)
    if dtype not in (np.dtype(np.float32), np.dtype(np.uint8)):
        raise ValueError("dtype must be float32 or uint8")
    index = scan_split(data_dir, splits, labeled_only)
    n = len(index) if limit is None else min(len(index), int(limit))
    h, w = index.height, index.width
    x = np.empty((n, h, w, 1), dtype=dtype)
    filled, arrow_peak, stats = 0, 0, {"batches": 0, "max_batch_bytes": 0}
    arrow_base = pa.total_allocated_bytes()
    groups = 0
    for g in range(len(index.plan)):
        if filled >= n:
            break
        groups += 1
        for block in index.blocks(g, batch_rows, stats):
            k = min(len(block), n - filled)
            target = x[filled:filled + k, :, :, 0]
            if dtype == np.uint8:
                target[...] = block[:k]
            else:
                to_unit_float(block[:k], out=target)
            filled += k
            arrow_peak = max(arrow_peak, pa.total_allocated_bytes() - arrow_base)
            del block
            if filled >= n:
                break
    if filled != n:
        raise RuntimeError(f"read {filled} images, {n} expected: the dataset changed while being read")
    return SplitData(x=x, y=index.y[:n], sha256=index.sha256[:n], patient_id=index.patient_id[:n],
                     path=index.path[:n], splits=index.splits, source=index.source[:n],
                     stats={"rows": n, "batches": stats["batches"], "batch_rows": batch_rows, "row_groups": groups,
                            "max_batch_bytes": int(stats["max_batch_bytes"]), "arrow_peak_bytes": int(arrow_peak),
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
