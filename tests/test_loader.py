"""The streaming Parquet -> NumPy loader: same rows as a plain read, bounded memory, refusals."""
from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cxr import CLASSES
from cxr.data.loader import SplitLeakError, check_disjoint, load_metadata, load_split, read_manifest
from tests.train_data import write_pre_out

SCHEMA = pa.schema([("path", pa.string()), ("sha256", pa.string()), ("label", pa.string()), ("split", pa.string()),
                    ("patient_id", pa.string()), ("image", pa.binary()), ("height", pa.int32()),
                    ("width", pa.int32())])


def _write_big(root: Path, n: int, side: int, files: int = 3, row_group_size: int = 512) -> None:
    """n random side x side images over several files, labels and splits cycling; some unlabeled."""
    rng = np.random.default_rng(1)
    images = root / "images"
    images.mkdir(parents=True)
    per = -(-n // files)
    for f in range(files):
        ids = range(f * per, min(n, (f + 1) * per))
        table = pa.table({
            "path": [f"p{i}" for i in ids], "sha256": [f"{i:064x}" for i in ids],
            "label": [None if i % 17 == 0 else CLASSES[i % 3] for i in ids],
            "split": ["train" if i % 4 else "test" for i in ids], "patient_id": [f"pat{i}" for i in ids],
            "image": [rng.integers(0, 256, side * side, dtype=np.uint8).tobytes() for i in ids],
            "height": [side] * len(ids), "width": [side] * len(ids)}, schema=SCHEMA)
        # no dictionary for the pixels, as Spark writes them (unique values would bloat a dictionary page)
        pq.write_table(table, images / f"part-{f}.parquet", row_group_size=row_group_size,
                       use_dictionary=["path", "sha256", "label", "split", "patient_id"])
    (root / "manifest.json").write_text('{"params": {"size": %d}}' % side)


def _oracle(root: Path, split: str):
    table = pq.read_table(root / "images").to_pandas()
    table = table.sort_values("path", key=lambda s: s.map(lambda p: int(p[1:])))
    keep = table[(table["split"] == split) & table["label"].isin(CLASSES)]
    x = np.stack([np.frombuffer(b, np.uint8) for b in keep["image"]]).reshape(len(keep), 16, 16)
    return keep, x


def test_same_rows_as_a_plain_read(tmp_path):
    _write_big(tmp_path, 300, 16)
    data = load_split(str(tmp_path), "train", dtype="uint8", batch_rows=7)
    keep, x = _oracle(tmp_path, "train")
    assert len(data) == len(keep) and data.x.shape == (len(keep), 16, 16, 1)
    assert list(data.sha256) == list(keep["sha256"])  # files in sorted order, rows in file order
    assert np.array_equal(data.x[..., 0], x)
    assert list(data.y) == [CLASSES.index(c) for c in keep["label"]]
    scaled = load_split(str(tmp_path), "train", batch_rows=64)
    assert scaled.x.dtype == np.float32 and np.allclose(scaled.x[..., 0], x / 255.0)
    assert scaled.x.max() <= 1.0


def test_unlabeled_rows_on_request(tmp_path):
    _write_big(tmp_path, 120, 8)
    everything = load_split(str(tmp_path), "train", dtype="uint8", labeled_only=False)
    labeled = load_split(str(tmp_path), "train", dtype="uint8")
    assert (everything.y == -1).sum() == len(everything) - len(labeled) > 0


def test_memory_is_the_array_plus_a_bounded_buffer(tmp_path):
    """A 6000-row table (25 MB of pixels in one row group, as Spark writes small outputs) read through 32-row
    batches: Python-side peak stays at the output array plus the row ids and a megabyte, Arrow's own allocations stay
    at a few pages, and a collect-style read of the same table (what this loader exists to avoid) blows
    through the same bound."""
    n, side, batch = 6000, 64, 32
    _write_big(tmp_path, n, side, files=1, row_group_size=1 << 20)  # one 25 MB row group
    n_train = pq.read_table(tmp_path / "images", columns=["split", "label"]).to_pandas().query(
        "split == 'train' and label == label").shape[0]
    array_bytes = n_train * side * side
    # plus the row identities kept beside the array (sha256, patient id, path: ~300 bytes a row, against
    # 4096 bytes of pixels) and 1 MB of buffer
    slack = (1 << 20) + 300 * n

    tracemalloc.start()
    data = load_split(str(tmp_path), "train", dtype="uint8", batch_rows=batch)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert data.x.nbytes == array_bytes
    assert peak < array_bytes + slack, f"peak {peak / 1e6:.1f} MB for a {array_bytes / 1e6:.1f} MB array"
    assert data.stats["max_batch_bytes"] <= batch * (side * side + 512)
    # Arrow's own allocations (outside tracemalloc's view), sampled at every batch: a few pages (~5 MB, the
    # same for 100 MB row groups), not the 25 MB row group
    assert data.stats["arrow_peak_bytes"] < 8 * (1 << 20), data.stats

    tracemalloc.start()
    rows = pq.read_table(tmp_path / "images", filters=[("split", "=", "train")]).to_pylist()
    _, naive_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del rows
    assert naive_peak > array_bytes + slack  # the bound above is tight enough to catch a collect


def test_mixed_image_sizes_are_refused(tmp_path):
    _write_big(tmp_path / "a", 40, 8, files=1)
    other = tmp_path / "a" / "images" / "part-9.parquet"
    pq.write_table(pa.table({"path": ["z"], "sha256": ["f" * 64], "label": ["COVID"], "split": ["train"],
                             "patient_id": ["z"], "image": [bytes(100)], "height": [10], "width": [10]},
                            schema=SCHEMA), other)
    with pytest.raises(ValueError, match="different sizes"):
        load_split(str(tmp_path / "a"), "train", dtype="uint8")


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="images/"):
        load_split(str(tmp_path), "train")


def test_disjointness_check(tmp_path):
    clean = write_pre_out(tmp_path / "clean", per_class=10)
    info = check_disjoint(load_metadata(str(clean)))
    assert info["images"] > 0 and info["shared_patients"] == 0
    leaky = write_pre_out(tmp_path / "leaky", per_class=10, leak=True)
    with pytest.raises(SplitLeakError, match="1 patients"):
        check_disjoint(load_metadata(str(leaky)))
    manifest, sha = read_manifest(str(clean))
    assert manifest["params"]["size"] == 32 and len(sha) == 64


def test_limit_reads_only_the_first_rows(tmp_path):
    _write_big(tmp_path, 300, 16)
    full = load_split(str(tmp_path), "train", dtype="uint8", batch_rows=7)
    first = load_split(str(tmp_path), "train", dtype="uint8", batch_rows=7, limit=20)
    assert len(first) == 20 and np.array_equal(first.x, full.x[:20]) and list(first.sha256) == list(full.sha256[:20])
    assert first.stats["batches"] < full.stats["batches"]  # stopped reading once it had them
