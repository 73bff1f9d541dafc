"""The tiny scoring models several test files share: saved as jobs/train.py saves them, model.onnx included."""
from __future__ import annotations

from pathlib import Path

from cxr import CLASSES

TINY_CNN = {"filters": [4, 8], "kernel_size": 3, "dense": 8, "dropout": 0.0}


def model_metadata(name: str, preprocess_params: dict, size: int) -> dict:
    return {"name": name, "classes": list(CLASSES), "preprocess": preprocess_params,
            "input": {"data_size": [size, size], "model_size": [size, size]}}


def tiny_keras_cnn(model_dir: Path, preprocess_params: dict, size: int, seed: int = 0) -> Path:
    """A random-init study-shaped CNN (weights from seed) with its checked model.onnx."""
    import keras

    from cxr.models import store
    from cxr.models.keras_models import build
    from cxr.models.onnx_export import export_onnx

    keras.utils.set_random_seed(seed)
    model = build("cnn", (size, size, 1), TINY_CNN)
    d = store.save_keras(model, model_dir, model_metadata(Path(model_dir).name, preprocess_params, size))
    export_onnx(d)
    return d
