"""Fixtures shared by the train/evaluate tests: a small PRE_OUT written straight to the preprocess job's output
contract (Parquet + manifest.json) from cxr.datasets.synth's in-memory chests, and models trained on it once per session.

Writing the contract directly (not running the preprocess job) keeps these tests at seconds; the preprocess job
has its own tests proving it writes this contract.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cxr import CLASSES

SIZE = 32
EPOCHS = 2
MODELS = "cnn,scratch-dnn"


def split_of_patient(ci: int, p: int) -> str:
    return {0: "test", 1: "val"}.get(p % 5, "train")


def write_pre_out(root: Path, per_class: int = 30, size: int = SIZE, seed: int = 0, leak: bool = False,
                  files: int = 2) -> Path:
    """PRE_OUT/images/*.parquet + manifest.json; two images per patient, split by patient (60/20/20).
    leak=True puts one training patient's second image in test (for the refusal tests)."""
    from cxr.datasets.synth import sample_dataset

    x, y = sample_dataset(per_class=per_class, size=64, seed=seed)
    rows = []
    for i, (img, label) in enumerate(zip(x, y)):
        small = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)
        u8 = np.clip(np.round(small * 255), 0, 255).astype(np.uint8)
        idx = i % per_class
        patient = idx // 2
        split = split_of_patient(int(label), patient)
        if leak and idx == per_class - 1 and split == "train" and label == 0:
            split = "test"
        data = u8.tobytes()
        rows.append({"path": f"file:/synthetic/{CLASSES[label]}/{idx:03d}.png",
                     "sha256": hashlib.sha256(data + bytes([label])).hexdigest(), "label": CLASSES[label],
                     "split": split, "patient_id": f"P{label}-{patient:03d}", "image": data, "height": size,
                     "width": size, "orig_height": 64, "orig_width": 64, "orig_dtype": "uint8",
                     "source_format": "png", "color_mode": "gray"})
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    schema = pa.schema([("path", pa.string()), ("sha256", pa.string()), ("label", pa.string()),
                        ("split", pa.string()), ("patient_id", pa.string()), ("image", pa.binary()),
                        ("height", pa.int32()), ("width", pa.int32()), ("orig_height", pa.int32()),
                        ("orig_width", pa.int32()), ("orig_dtype", pa.string()), ("source_format", pa.string()),
                        ("color_mode", pa.string())])
    for f in range(files):
        part = rows[f::files]
        pq.write_table(pa.Table.from_pylist(part, schema=schema), images / f"part-{f:05d}.parquet",
                       row_group_size=16)
    (images / "_SUCCESS").write_text("")
    params = {"size": size, "method": "clahe", "clip_limit": 2.0, "tile_grid": 8, "brightness_alpha": 1.0,
              "brightness_beta": 10.0, "resize_mode": "stretch", "min_side": 64, "max_pixels": 100000000}
    manifest = {"job": "preprocess", "counts": {"input": len(rows), "written": len(rows), "rejected": 0,
                                                "duplicates": 0}, "params": params}
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return root


TINY_CNN = {"batch_size": 16, "verbose": 0,
            "keras": {"cnn": {"filters": [4, 8], "kernel_size": 3, "dense": 16, "dropout": 0.0}}}


def fit_tiny_cnn(pre_out: Path, conf: dict, weights: dict | None, epochs: int):
    """train_keras on PRE_OUT's train split (no val) with a tiny CNN, seed 42: (model, history, train source,
    details), for the tests of one fit option."""
    from cxr.data.stream import ParquetSplit
    from cxr.train import set_seeds
    from cxr.train.keras_fit import train_keras

    train = ParquetSplit.open(str(pre_out), "train", buffer=10_000, batch_rows=5)
    set_seeds(42)
    model, history, _, details = train_keras({"name": "cnn-adam", "family": "cnn", "optimizer": "adam"}, train,
                                             train.subset(np.zeros(len(train), bool)), {**TINY_CNN, **conf},
                                             weights, epochs, 42)
    return model, history, train, details


@pytest.fixture(scope="session")
def pre_out(tmp_path_factory) -> Path:
    return write_pre_out(tmp_path_factory.mktemp("pre_out"))


@pytest.fixture(scope="session")
def train_config():
    from cxr.config import load_config

    return load_config(overrides={
        "train.epochs": EPOCHS, "train.batch_size": 16, "train.verbose": 0,
        "train.keras.cnn": {"filters": [8, 16], "kernel_size": 3, "dense": 32, "dropout": 0.25},
        "train.scratch.input_size": None, "train.scratch.dnn": {"hidden": 32},
        "evaluate.partitions": 3, "evaluate.batch_size": 8,
    })


@pytest.fixture(scope="session")
def trained(pre_out, train_config, tmp_path_factory):
    """cnn-adam (Keras) and scratch-dnn (cxr.nn), trained once for all tests that need models."""
    from cxr.train import run

    out = tmp_path_factory.mktemp("models")
    result = run(str(pre_out), str(out), train_config, models=MODELS, optimizers="adam")
    return out, result
