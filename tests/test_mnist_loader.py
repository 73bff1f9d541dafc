"""The gzip IDX reader, on the real MNIST files when present and on hand-made IDX bytes always."""

import gzip
from pathlib import Path

import numpy as np
import pytest

from cxr.datasets.mnist import IDXError, downsample, load_mnist, parse_idx, read_idx, select_classes

MNIST = Path(__file__).resolve().parents[1].parent / "shared/data/mnist"
needs_mnist = pytest.mark.skipif(not MNIST.is_dir(), reason=f"MNIST files not found at {MNIST}")


def idx_bytes(arr: np.ndarray, code: int) -> bytes:
    head = bytes([0, 0, code, arr.ndim]) + np.array(arr.shape, ">u4").tobytes()
    return head + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


def test_parse_idx_round_trip_and_errors(tmp_path):
    a = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    assert np.array_equal(parse_idx(idx_bytes(a, 0x08)), a)
    f = np.linspace(-1, 1, 6, dtype=np.float32).reshape(3, 2)
    out = parse_idx(idx_bytes(f, 0x0D))
    assert out.dtype == np.float32 and out.dtype.isnative and np.array_equal(out, f)
    p = tmp_path / "x-idx3-ubyte.gz"
    p.write_bytes(gzip.compress(idx_bytes(a, 0x08)))
    assert np.array_equal(read_idx(p), a)
    with pytest.raises(IDXError, match="bad magic"):
        parse_idx(b"\x01\x00\x08\x01" + bytes(8))
    with pytest.raises(IDXError, match="element type"):
        parse_idx(b"\x00\x00\x07\x01" + bytes(8))
    with pytest.raises(IDXError, match="bytes follow"):
        parse_idx(idx_bytes(a, 0x08)[:-1])


def test_select_and_downsample():
    labels = np.array([3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 1])
    images = np.arange(len(labels) * 16, dtype=np.uint8).reshape(-1, 4, 4)
    x, y = select_classes(images, labels, [1, 5], per_class=2)
    assert y.tolist() == [0, 0, 1, 1] and np.array_equal(x, images[[1, 3, 4, 8]])
    x, y = select_classes(images, labels, [5, 1], per_class=2, rng=np.random.default_rng(0))
    assert sorted(y.tolist()) == [0, 0, 1, 1]
    with pytest.raises(ValueError, match="only 1"):
        select_classes(images, labels, [9], per_class=2)
    d = downsample(np.array([[[0, 255, 0, 0], [255, 255, 0, 0], [0, 0, 0, 0], [0, 0, 0, 51]]], np.uint8))
    assert d.dtype == np.float32 and d.shape == (1, 2, 2)
    np.testing.assert_allclose(d[0], [[0.75, 0], [0, 0.05]], rtol=1e-6)


@needs_mnist
def test_real_mnist_files():
    x, y = load_mnist(MNIST, "train")
    assert x.shape == (60000, 28, 28) and x.dtype == np.uint8 and y.shape == (60000,)
    # class counts published in ../shared/data/mnist/SOURCES.md
    assert np.bincount(y).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    xt, yt = load_mnist(MNIST, "test")
    assert xt.shape == (10000, 28, 28) and np.bincount(yt)[:5].sum() == 5139
    assert x.max() == 255 and x.min() == 0 and 30 < x.mean() < 40


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte.gz"):
        load_mnist(tmp_path)
