"""Training from the Parquet stream: the same weights as training from the split in memory when the shuffle
buffer holds the whole split; flat memory, every row once per epoch, and mixed batches when it does not."""
from __future__ import annotations

import tracemalloc

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cxr import CLASSES
from cxr.data.loader import epoch_order, load_split
from cxr.data.stream import ParquetSplit, as_unit_float, predict_source
from tests.train_data import pre_out  # noqa: F401 (fixture)

CW = {"COVID": 1.0, "NORMAL": 2.0, "VIRAL": 0.5}
CONF = {"batch_size": 16, "verbose": 0, "keras": {"cnn": {"filters": [4, 8], "kernel_size": 3, "dense": 16,
                                                          "dropout": 0.25}},
        "scratch": {"input_size": 16, "dnn": {"hidden": 8}}, "optimizer_config": {}}


def test_full_buffer_batches_equal_the_in_memory_order(pre_out):
    memory = load_split(str(pre_out), "train", dtype="uint8")
    stream = ParquetSplit.open(str(pre_out), "train", buffer=10_000, batch_rows=5)
    assert len(stream) == len(memory) and list(stream.sha256) == list(memory.sha256)
    for epoch in (0, 1):
        got = list(stream.batches(16, epoch=epoch, shuffle=True, seed=42))
        want = list(memory.batches(16, epoch=epoch, shuffle=True, seed=42))
        assert [len(b[0]) for b in got] == [len(b[0]) for b in want]
        assert all(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) for a, b in zip(got, want))
        order = epoch_order(len(memory), 42, epoch)
        assert np.array_equal(np.concatenate([b[0] for b in got]), memory.x[order, :, :, 0])
    # a cross-validation fold streams the same rows as the in-memory subset
    fold = np.arange(len(memory)) % 3 != 0
    got = list(stream.subset(fold).batches(8, epoch=2, shuffle=True, seed=7))
    want = list(memory.subset(fold).batches(8, epoch=2, shuffle=True, seed=7))
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(got, want)) and len(got) == len(want)


def test_keras_streamed_fit_equals_in_memory_fit(pre_out):
    """Two epochs of the CNN from Parquet (buffer >= split) against Keras' own fit on the float32 array that
    load_split gives (today's in-memory path) in the same per-epoch order: identical weights and curves."""
    import keras

    from cxr.models.keras_models import build, optimizer
    from cxr.train import set_seeds
    from cxr.train.keras_fit import train_keras

    spec = {"name": "cnn-adam", "family": "cnn", "optimizer": "adam"}
    train = ParquetSplit.open(str(pre_out), "train", buffer=10_000, batch_rows=5)
    val = ParquetSplit.open(str(pre_out), "val", buffer=10_000)
    set_seeds(42)
    streamed, history, _, _ = train_keras(spec, train, val, CONF, CW, 2, 42)

    x, xv = load_split(str(pre_out), "train"), load_split(str(pre_out), "val")
    set_seeds(42)
    model = build("cnn", (*x.image_size, 1), CONF["keras"]["cnn"], augment={"enabled": False})
    model.compile(optimizer=optimizer("adam"), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    losses, train_losses = [], []
    for epoch in range(2):
        o = epoch_order(len(x), 42, epoch)
        h = model.fit(x.x[o], x.y[o].astype(np.int64), batch_size=16, epochs=epoch + 1, initial_epoch=epoch,
                      shuffle=False, class_weight={i: CW[c] for i, c in enumerate(CLASSES)}, verbose=0,
                      validation_data=(xv.x, xv.y.astype(np.int64)))
        losses += h.history["val_loss"]
        train_losses += h.history["loss"]
    for a, b in zip(streamed.get_weights(), model.get_weights()):
        assert np.array_equal(a, b)
    assert history["val_loss"] == pytest.approx(losses, abs=1e-7)
    assert history["loss"] == pytest.approx(train_losses, abs=1e-7)     # the training loss, epoch by epoch
    probs = predict_source(lambda t: streamed(t, training=False).numpy(), val)
    assert np.array_equal(probs, model.predict(xv.x, batch_size=256, verbose=0))
    keras.backend.clear_session()


def test_scratch_streamed_fit_equals_network_train(pre_out):
    """The scratch DNN from Parquet (area-resized to 16 px per batch) against cxr.nn's Network.train on the
    in-memory array, epoch by epoch in the same order with the same optimizer object: identical weights."""
    from cxr.models.store import resize_batch
    from cxr.nn import models as nn_models
    from cxr.nn import optimizers as nn_opt
    from cxr.train.scratch_fit import fit_scratch

    train = ParquetSplit.open(str(pre_out), "train", buffer=10_000, batch_rows=5)
    cw = np.asarray([CW[c] for c in CLASSES], np.float32)
    net = nn_models.dnn((16, 16, 1), 3, hidden=8, seed=3)
    opt = nn_opt.get("adam")
    history, _ = fit_scratch(net, opt, train, 2, 16, 42, (16, 16), cw)

    memory = load_split(str(pre_out), "train")
    x = resize_batch(memory.x, (16, 16))
    ref = nn_models.dnn((16, 16, 1), 3, hidden=8, seed=3)
    ref_opt = nn_opt.get("adam")
    losses = []
    for epoch in range(2):
        o = epoch_order(len(memory), 42, epoch)
        h = ref.train(x[o], memory.y[o].astype(np.int64), epochs=1, batch_size=16, optimizer=ref_opt,
                      shuffle=False, class_weight=dict(enumerate(cw)))
        losses += h.history["loss"]
    for a, b in zip(net.get_weights(), ref.get_weights()):
        assert np.array_equal(a, b)
    assert history["loss"] == pytest.approx(losses, rel=1e-6)


def _write_sorted(root, n: int, side: int, row_group: int) -> None:
    """n images written class by class (the worst order for a shuffle buffer), several row groups per file."""
    rng = np.random.default_rng(0)
    images = root / "images"
    images.mkdir(parents=True)
    labels = [CLASSES[i * 3 // n] for i in range(n)]
    for f, part in enumerate(np.array_split(np.arange(n), 2)):
        table = pa.table({
            "path": [f"p{i}" for i in part], "sha256": [f"{i:064x}" for i in part],
            "label": [labels[i] for i in part], "split": ["train"] * len(part),
            "patient_id": [f"pat{i}" for i in part],
            "image": [rng.integers(0, 256, side * side, dtype=np.uint8).tobytes() for _ in part],
            "height": [side] * len(part), "width": [side] * len(part)})
        pq.write_table(table, images / f"part-{f}.parquet", row_group_size=row_group,
                       use_dictionary=["path", "sha256", "label", "split", "patient_id"])
    (root / "manifest.json").write_text('{"params": {"size": %d}}' % side)


def _row_ids(batches) -> np.ndarray:
    """Which row each streamed image is, by its first 8 random pixels (_write_sorted's rows are random)."""
    return np.concatenate([images.reshape(len(images), -1)[:, :8].copy() for images, _ in batches])


def test_a_split_that_fits_the_buffer_is_a_full_permutation_every_epoch(tmp_path):
    """A fold that fits the shuffle buffer (as every cross-validation fold of the 450 shared X-rays does) from
    class-sorted files: every row exactly once per epoch, in epoch_order (a permutation of the whole fold, not a
    local shuffle: the first and the last row of the files swap places in about half the epochs), a new order
    every epoch, and the first minibatch already holds every class."""
    n, side = 120, 8
    _write_sorted(tmp_path, n, side, row_group=16)
    whole = ParquetSplit.open(str(tmp_path), "train", buffer=4096, batch_rows=8)
    fold = whole.subset(np.arange(n) % 5 != 0)                 # a training fold: 4 of every 5 rows
    file_order = _row_ids([(load_split(str(tmp_path), "train", dtype="uint8").x[np.arange(n) % 5 != 0, :, :, 0],
                            None)])
    position = {bytes(r): i for i, r in enumerate(file_order)}
    orders, swapped = [], 0
    for epoch in range(200):
        got = [position[bytes(r)] for r in _row_ids(fold.batches(32, epoch=epoch, shuffle=True, seed=3))]
        assert sorted(got) == list(range(len(fold)))            # every row once
        if epoch < 3:
            assert got == epoch_order(len(fold), 3, epoch).tolist()
            first_batch = next(iter(fold.batches(32, epoch=epoch, shuffle=True, seed=3)))[1]
            assert set(first_batch.tolist()) == {0, 1, 2}
        orders.append(tuple(got))
        swapped += got.index(len(fold) - 1) < got.index(0)
    assert len(set(orders)) == 200                              # a new order every epoch
    assert 0.35 < swapped / 200 < 0.65                          # far-apart rows mix as in a uniform permutation


def test_balanced_class_weights_make_every_class_weigh_the_same_in_the_loss(pre_out):
    """class_weight 'balanced' gives each class the same total weight (n / 3), and the loss Keras reports for a
    streamed epoch is the class-weighted mean cross-entropy over the split (sum of w[y] * CE over n): with the
    learning rate at 0 the model does not move, so the reported loss equals that mean computed from its
    predictions."""
    import keras

    from cxr.train import class_weights, set_seeds
    from cxr.train.keras_fit import train_keras

    train = ParquetSplit.open(str(pre_out), "train", buffer=10_000, batch_rows=5)
    y = np.r_[train.y, train.y[train.y == 0]]                   # unbalanced: COVID twice
    cw = class_weights(y, "balanced")["weights"]
    totals = [cw[c] * (y == i).sum() for i, c in enumerate(CLASSES)]
    assert totals == pytest.approx([len(y) / 3] * 3)

    conf = {**CONF, "keras": {"cnn": {**CONF["keras"]["cnn"], "dropout": 0.0}},
            "optimizer_config": {"adam": {"learning_rate": 0.0}}}
    weights = CW                                                # far from 1, so the weighting shows
    spec = {"name": "cnn-adam", "family": "cnn", "optimizer": "adam"}
    set_seeds(42)
    model, history, _, _ = train_keras(spec, train, train.subset(np.zeros(len(train), bool)), conf, weights, 1, 42)
    memory = load_split(str(pre_out), "train")
    p = model.predict(memory.x, batch_size=64, verbose=0)
    ce = -np.log(p[np.arange(len(memory)), memory.y])
    w = np.asarray([weights[c] for c in CLASSES])[memory.y]
    assert history["loss"][0] == pytest.approx(float((w * ce).mean()), rel=1e-4)
    assert history["loss"][0] != pytest.approx(float(ce.mean()), rel=1e-2)   # not the unweighted mean
    keras.backend.clear_session()


def test_larger_than_the_buffer_memory_stays_flat_and_every_row_comes_once(tmp_path):
    """6000 images of 64 px (24.6 MB of pixels) through a 256-image buffer (1 MB): Python-side peak while
    iterating an epoch stays at the buffer, the open record batches and the row ids, far below the split;
    every row comes exactly once per epoch, epochs differ, and batches mix the classes although the files
    hold them class by class."""
    n, side, buffer = 6000, 64, 256
    _write_sorted(tmp_path, n, side, row_group=500)
    split_bytes = n * side * side
    stream = ParquetSplit(ParquetSplit.open(str(tmp_path), "train").index, buffer=buffer, batch_rows=32, cycle=4)

    tracemalloc.start()
    seen, mixed, batches = [], 0, 0
    for images, labels in stream.batches(32, epoch=0, shuffle=True, seed=1):
        seen.append(images[:, 0, :8].copy())  # 8 bytes a row identify it (random pixels)
        mixed += len(set(labels.tolist())) > 1
        batches += 1
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # buffer + 4 open record batches (32 rows each) + the metadata of 6000 rows (~300 bytes a row) + 1 MB
    bound = buffer * side * side + 4 * 32 * side * side + 300 * n + (1 << 20)
    assert peak < bound < split_bytes / 5, f"peak {peak / 1e6:.1f} MB, bound {bound / 1e6:.1f} MB"
    assert stream.stats["buffer_bytes"] == buffer * side * side

    got = np.concatenate(seen)
    want = load_split(str(tmp_path), "train", dtype="uint8").x[:, 0, :8, 0]
    as_rows = (lambda a: sorted(map(bytes, a)))
    assert as_rows(got) == as_rows(want)                      # every row exactly once
    assert not np.array_equal(got, want)                      # not file order
    assert mixed / batches > 0.9                              # class-sorted files still give mixed batches
    again = np.concatenate([b[0][:, 0, :8] for b in stream.batches(32, epoch=1, shuffle=True, seed=1)])
    assert as_rows(again) == as_rows(want) and not np.array_equal(again, got)
    same = np.concatenate([b[0][:, 0, :8] for b in stream.batches(32, epoch=0, shuffle=True, seed=1)])
    assert np.array_equal(same, got)                          # one (seed, epoch), one order


def test_as_unit_float_is_the_loader_scaling(pre_out):
    u8 = load_split(str(pre_out), "val", dtype="uint8").x[..., 0]
    assert np.array_equal(as_unit_float(u8), load_split(str(pre_out), "val").x)


def test_run_with_a_buffer_smaller_than_the_split(pre_out, tmp_path):
    """jobs/train.py's code with an 8-image buffer (the split holds ~36): both kinds of model train, and
    metrics.json says how the order was drawn."""
    from cxr.config import load_config
    from cxr.models.store import load_predictor, read_metadata
    from cxr.train import run

    config = load_config(overrides={"train.epochs": 1, "train.batch_size": 8, "train.verbose": 0,
                                    "train.shuffle_buffer": 8, "train.shuffle_cycle": 2,
                                    "train.keras.cnn": {"filters": [4], "kernel_size": 3, "dense": 8, "dropout": 0.0},
                                    "train.scratch.input_size": 16, "train.scratch.dnn": {"hidden": 8}})
    result = run(str(pre_out), str(tmp_path), config, models="cnn,scratch-dnn", optimizers="adam")
    assert [m["name"] for m in result["models"]] == ["cnn-adam", "scratch-dnn"]
    x = load_split(str(pre_out), "test").x
    for name in ("cnn-adam", "scratch-dnn"):
        meta = read_metadata(tmp_path / name)
        assert meta["data"]["loader"]["shuffle_buffer"] == 8 and meta["data"]["loader"]["buffer_bytes"] == 8 * 32 * 32
        assert "8-image shuffle buffer" in meta["training"]["shuffle"]["order"]
        assert np.isfinite(meta["history"]["loss"][0]) and load_predictor(tmp_path / name).predict_proba(x).shape[1] == 3
