"""Training data streamed from the preprocess job's Parquet each epoch, in memory bounded by a shuffle buffer.

Why: a split held as one float32 array costs 200 KB per 224 px image (4.2 GB for 21,000 images) on the driver.
Here the image column is read record batch by record batch every epoch (cxr.data.loader.SplitIndex.blocks),
pixels stay uint8 until a minibatch is scaled, and the rows go through a shuffle buffer of `buffer` images:
driver memory is buffer x H x W bytes plus `cycle` record batches, whatever the number of images.

How the shuffle works, per epoch e with seed s:
- When the buffer holds the whole split (or the fold), every row is read into it (in file order) and then
  emitted in the order `epoch_order(n, s, e)` (cxr.data.loader): a NumPy permutation of the rows in file order.
  In-memory data (cxr.data.loader.SplitData.batches) uses the same order, so training from Parquet and from an
  array gives the same weights (tests/test_streaming.py).
- When the split is larger than the buffer: the row groups are visited in a random order, `cycle` of them
  read at once, each next record batch taken from a random one of those (so a file written class by class
  still mixes); each row then enters the buffer and, once the buffer is full, pushes out a uniformly chosen
  row (tf.data's shuffle). At the end the buffer is emitted in a random order. Every row is seen exactly once
  per epoch, but a row can only leave the buffer after the row groups before it began to be read, so the order
  is "locally" random: two rows far apart in the files are less likely to share a batch than in a full
  permutation. A larger buffer (train.shuffle_buffer) or smaller row groups make it closer to a permutation.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np

from cxr import CLASSES
from cxr.data.loader import SplitIndex, scan_split, to_unit_float

DEFAULT_BUFFER = 4096      # images (~205 MB at 224 px, 17 MB at 64 px)
DEFAULT_CYCLE = 4          # row groups read at once when the split is larger than the buffer


def as_unit_float(images: np.ndarray) -> np.ndarray:
    """A batch (b, H, W) -> float32 (b, H, W, 1) in [0, 1]: uint8 scaled here (the one scaling of training,
    evaluation and scoring), float32 (already scaled in-memory data) passed through."""
    x = images if images.dtype != np.uint8 else to_unit_float(images)
    return np.asarray(x, dtype=np.float32)[..., None]


class ParquetSplit:
    """Rows of one or more splits of a preprocess output, read from Parquet each time they are iterated.

    Offers what training needs of cxr.data.loader.SplitData (len, y, identities, class_counts, subset,
    batches, head) without holding the pixels: `batches()` yields (uint8 images (b, H, W), labels (b,))."""

    def __init__(self, index: SplitIndex, rows: np.ndarray | None = None, buffer: int = DEFAULT_BUFFER,
                 batch_rows: int = 64, cycle: int = DEFAULT_CYCLE):
        self.index = index
        n_all = len(index)
        self.rows = np.arange(n_all) if rows is None else np.asarray(rows, dtype=np.int64)
        self.selected = np.zeros(n_all, bool)
        self.selected[self.rows] = True
        sizes = index.group_sizes()
        self.offsets = np.concatenate([[0], np.cumsum(sizes)])[:-1]
        self.group_has = np.asarray([bool(self.selected[o:o + s].any()) for o, s in zip(self.offsets, sizes)], bool)
        self.buffer = max(1, int(buffer))
        self.batch_rows = max(1, int(batch_rows))
        self.cycle = max(1, int(cycle))
        self.stats: dict = {"batches": 0, "max_batch_bytes": 0}

    @classmethod
    def open(cls, data_dir: str, splits: str | Sequence[str], buffer: int = DEFAULT_BUFFER, batch_rows: int = 64,
             cycle: int = DEFAULT_CYCLE, labeled_only: bool = True) -> "ParquetSplit":
        return cls(scan_split(data_dir, splits, labeled_only), buffer=buffer, batch_rows=batch_rows, cycle=cycle)

    # ---------------------------------------------------------------- what SplitData also offers
    def __len__(self) -> int:
        return int(len(self.rows))

    @property
    def y(self) -> np.ndarray:
        return self.index.y[self.rows]

    @property
    def sha256(self) -> np.ndarray:
        return self.index.sha256[self.rows]

    @property
    def patient_id(self) -> np.ndarray:
        return self.index.patient_id[self.rows]

    @property
    def path(self) -> np.ndarray:
        return self.index.path[self.rows]

    @property
    def source(self) -> np.ndarray:
        return self.index.source[self.rows]

    @property
    def splits(self) -> tuple[str, ...]:
        return self.index.splits

    @property
    def image_size(self) -> tuple[int, int]:
        return self.index.height, self.index.width

    def class_counts(self) -> dict[str, int]:
        y = self.y
        return {c: int((y == i).sum()) for i, c in enumerate(CLASSES)}

    def n_patients(self) -> int:
        ids = [p for p in self.patient_id]
        return len({p for p in ids if p is not None}) + int(sum(p is None for p in ids))

    def subset(self, rows: np.ndarray) -> "ParquetSplit":
        """The given rows (a boolean mask or indices into this split), e.g. a cross-validation fold."""
        rows = np.asarray(rows)
        picked = self.rows[np.flatnonzero(rows) if rows.dtype == bool else rows]
        return ParquetSplit(self.index, np.sort(picked), self.buffer, self.batch_rows, self.cycle)

    def head(self, k: int) -> np.ndarray:
        """The first k rows (file order) as uint8 (k, H, W); reads no further than needed."""
        k = min(int(k), len(self))
        out = np.empty((k, *self.image_size), np.uint8)
        filled = 0
        for _, block in self._in_order():
            take = min(len(block), k - filled)
            out[filled:filled + take] = block[:take]
            filled += take
            if filled >= k:
                break
        return out

    def batches(self, batch_size: int, epoch: int = 0, shuffle: bool = False, seed: int = 0,
                weights: np.ndarray | None = None) -> Iterator[tuple[np.ndarray, ...]]:
        """(uint8 images (b, H, W), labels int8 (b,)) per minibatch of one epoch, plus the rows' weights (b,) when
        `weights` (one per row of this split, in its order) is given; the last one may be short."""
        bs = int(batch_size)
        h, w = self.image_size
        by_row = None
        if weights is not None:
            by_row = np.zeros(len(self.index), np.float32)
            by_row[self.rows] = np.asarray(weights, np.float32)
        xb, ib, fill = np.empty((bs, h, w), np.uint8), np.empty(bs, np.int64), 0

        def batch(k):
            return (xb[:k], self.index.y[ib[:k]]) + (() if by_row is None else (by_row[ib[:k]],))

        for gi, image in self._rows(epoch, shuffle, seed):
            xb[fill] = image
            ib[fill] = gi
            fill += 1
            if fill == bs:
                yield batch(bs)
                xb, ib, fill = np.empty((bs, h, w), np.uint8), np.empty(bs, np.int64), 0
        if fill:
            yield batch(fill)

    # ---------------------------------------------------------------- reading
    def _group(self, g: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(global row indices, uint8 images) of the selected rows of plan entry g, one record batch at a time."""
        pos = int(self.offsets[g])
        for block in self.index.blocks(g, self.batch_rows, self.stats):
            gidx = np.arange(pos, pos + len(block))
            pos += len(block)
            keep = self.selected[gidx]
            if keep.all():
                yield gidx, block
            elif keep.any():
                yield gidx[keep], block[keep]

    def _in_order(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for g in np.flatnonzero(self.group_has):
            yield from self._group(int(g))

    def _interleaved(self, rng: np.random.Generator) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Row groups in a random order, `cycle` open at once, each next block from a random open one."""
        todo = [int(g) for g in rng.permutation(len(self.group_has)) if self.group_has[g]]
        live: list = []
        while live or todo:
            while len(live) < self.cycle and todo:
                live.append(self._group(todo.pop(0)))
            i = int(rng.integers(len(live)))
            try:
                yield next(live[i])
            except StopIteration:
                live.pop(i)

    def _rows(self, epoch: int, shuffle: bool, seed: int) -> Iterator[tuple[int, np.ndarray]]:
        """(global row index, image view) one row at a time; the view is valid until the next row is asked for."""
        if not shuffle:
            for gidx, block in self._in_order():
                for i in range(len(gidx)):
                    yield int(gidx[i]), block[i]
            return
        n = len(self)
        cap = min(self.buffer, n)
        whole = self.buffer >= n
        pick = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch), 1])
        source = self._in_order() if whole else self._interleaved(
            np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch), 0]))
        buf = np.empty((cap, *self.image_size), np.uint8)
        bidx = np.empty(cap, np.int64)
        fill = 0
        self.stats["buffer_rows"] = cap
        self.stats["buffer_bytes"] = int(buf.nbytes)
        for gidx, block in source:
            for i in range(len(gidx)):
                if fill < cap:
                    buf[fill] = block[i]
                    bidx[fill] = gidx[i]
                    fill += 1
                    continue
                j = int(pick.integers(cap))
                yield int(bidx[j]), buf[j]
                buf[j] = block[i]
                bidx[j] = gidx[i]
        # what is left, in file order, then permuted: with a buffer holding everything this is epoch_order
        rest = np.argsort(bidx[:fill], kind="stable")
        for j in rest[pick.permutation(fill)]:
            yield int(bidx[j]), buf[j]


def open_training_split(data_dir: str, splits: str | Sequence[str], conf) -> ParquetSplit:
    """A ParquetSplit sized by the train section of conf (shuffle_buffer, shuffle_cycle, loader_batch_rows)."""
    return ParquetSplit.open(data_dir, splits, buffer=int(conf.get("shuffle_buffer") or DEFAULT_BUFFER),
                             batch_rows=int(conf.get("loader_batch_rows", 64)),
                             cycle=int(conf.get("shuffle_cycle") or DEFAULT_CYCLE))


def predict_source(predict_proba, source, batch_size: int = 256) -> np.ndarray:
    """(N, classes) probabilities of a model (its predict_proba on float32 (b, H, W, 1)) over a source in
    its own row order (that of source.y), batch by batch: memory is one batch of images."""
    parts = [np.asarray(predict_proba(as_unit_float(images)), np.float32)
             for images, _ in source.batches(batch_size)]
    return np.concatenate(parts) if parts else np.zeros((0, len(CLASSES)), np.float32)
