"""MNIST from its four original gzip IDX files, read with gzip + np.frombuffer (no download).

Also the pieces of the study protocol that are not specific to one script: keep some digits,
take n examples per digit, and downsample by block averaging.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
# IDX type codes -> big-endian numpy dtypes (http://yann.lecun.com/exdb/mnist/ "THE IDX FILE FORMAT")
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class IDXError(ValueError):
    """A file that is not a well-formed IDX array."""


def parse_idx(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Decode raw (already decompressed) IDX bytes: magic 0 0 <type> <ndim>, big-endian dims, data."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise IDXError(f"{name}: not an IDX file (bad magic {data[:4].hex()})")
    code, ndim = data[2], data[3]
    if code not in _IDX_DTYPES:
        raise IDXError(f"{name}: unknown IDX element type 0x{code:02x}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise IDXError(f"{name}: truncated header")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[code])
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(data) - header != expected:
        raise IDXError(f"{name}: header says {dims} ({expected} bytes) but {len(data) - header} bytes follow")
    arr = np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="))  # native byte order, writable copy


def read_idx(path) -> np.ndarray:
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        return parse_idx(f.read(), str(path))


def load_mnist(directory, split: str = "train"):
    """(images uint8 (N, 28, 28), labels uint8 (N,)) of the 'train' or 'test' split."""
    if split not in FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    d = Path(directory)
    img_name, lab_name = FILES[split]
    for name in (img_name, lab_name):
        if not (d / name).is_file():
            raise FileNotFoundError(f"{d / name} not found (expected the four original MNIST .gz files in {d})")
    images, labels = read_idx(d / img_name), read_idx(d / lab_name)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise IDXError(f"{d}: images {images.shape} and labels {labels.shape} do not pair up")
    return images, labels


def select_classes(images, labels, classes, per_class: int | None = None, rng=None):
    """Keep only ``classes``; with per_class, take that many of each (random if rng, else first ones).

    Labels are re-indexed to 0..len(classes)-1 in the order given.
    """
    classes = list(classes)
    picked = []
    for c in classes:
        idx = np.flatnonzero(labels == c)
        if per_class is not None:
            if len(idx) < per_class:
                raise ValueError(f"class {c} has only {len(idx)} examples, {per_class} requested")
            idx = np.sort(rng.choice(idx, per_class, replace=False)) if rng is not None else idx[:per_class]
        picked.append(idx)
    idx = np.sort(np.concatenate(picked))
    remap = np.full(int(labels.max()) + 1, -1, dtype=np.int64)
    remap[classes] = np.arange(len(classes))
    return images[idx], remap[labels[idx]]


def downsample(images: np.ndarray, factor: int = 2) -> np.ndarray:
    """Block-average (N, H, W) by ``factor`` (28x28 -> 14x14 for factor 2), returned as float32 in [0, 1]."""
    n, h, w = images.shape
    if h % factor or w % factor:
        raise ValueError(f"{h}x{w} is not divisible by {factor}")
    x = images.astype(np.float32).reshape(n, h // factor, factor, w // factor, factor).mean(axis=(2, 4))
    if images.dtype == np.uint8:
        x /= 255.0
    return x
