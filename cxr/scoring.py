"""Batch inference on the worker side, without Spark: rows in, predicted rows out.

Images go through the model in fixed-size batches (the last one padded), so that a compiled model sees
one input shape only, and the model is loaded once per Python worker (cxr.models.store.cached_predictor).
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd

from cxr import CLASSES
from cxr.calibration import apply_temperature, temperature_of
from cxr.image.batch import process_file
from cxr.image.pipeline import PreprocessParams
from cxr.models import store

PROB_COLUMNS = tuple(f"p_{c.lower()}" for c in CLASSES)
RESULT_COLUMNS = ("path", "sha256", "folder_label", "status", "stage", "reason", "label", *PROB_COLUMNS)

# What must match between the preprocessing a model was trained on and the one it is fed.
MATCHING_PARAMS = ("size", "method", "clip_limit", "tile_grid", "brightness_alpha", "brightness_beta", "resize_mode")


def model_id(model_dir: str | Path) -> str:
    """sha256 over the model's weight files: the identity that incremental scoring keys on."""
    d = Path(model_dir)
    files = [store.KERAS_FILE] if store.model_kind(d) == "keras" else list(store.SCRATCH_FILES)
    digest = hashlib.sha256()
    for name in files:
        digest.update(name.encode())
        digest.update(hashlib.sha256((d / name).read_bytes()).digest())
    return digest.hexdigest()


def params_mismatch(model_params: Mapping[str, Any], data_params: Mapping[str, Any]) -> dict[str, tuple]:
    return {k: (model_params.get(k), data_params.get(k)) for k in MATCHING_PARAMS
            if model_params.get(k) != data_params.get(k)}


def predict_fixed_batches(predictor, images: np.ndarray, batch_size: int) -> np.ndarray:
    """(N, H, W) uint8 -> (N, 3) probabilities, calling the model on batch_size rows at a time, last one padded."""
    n = len(images)
    out = np.empty((n, len(CLASSES)), np.float32)
    batch = np.zeros((batch_size, *images.shape[1:], 1), np.float32)
    for start in range(0, n, batch_size):
        chunk = images[start:start + batch_size]
        batch[:len(chunk), ..., 0] = chunk.astype(np.float32) / 255.0
        batch[len(chunk):] = 0.0
        out[start:start + len(chunk)] = predictor.predict_proba(batch)[:len(chunk)]
    return out


def _with_predictions(rows: list[dict], images: list[np.ndarray], predictor, batch_size: int) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=list(RESULT_COLUMNS))
    ok = (frame["status"] == "ok").to_numpy()
    if ok.any():
        proba = predict_fixed_batches(predictor, np.stack(images), batch_size)
        proba = apply_temperature(proba, temperature_of(predictor.metadata))  # None (uncalibrated): unchanged
        for j, col in enumerate(PROB_COLUMNS):
            frame.loc[ok, col] = proba[:, j]
        frame.loc[ok, "label"] = np.asarray(CLASSES)[proba.argmax(axis=1)]
    for col in PROB_COLUMNS:
        frame[col] = frame[col].astype("float32")
    return frame


def _split_skipped(frame: pd.DataFrame) -> tuple[pd.DataFrame, list[dict]]:
    """Rows flagged `already_scored` (same content, same model, an earlier run) become 'skipped' rows, so
    the job can account for every file it read; the rest are returned for scoring."""
    if "already_scored" not in frame.columns:
        return frame, []
    done = frame["already_scored"].fillna(False).astype(bool).to_numpy()
    skipped = []
    for path, sha in zip(frame["path"][done], frame["sha256"][done]):
        row = dict.fromkeys(RESULT_COLUMNS)
        row.update(path=path, sha256=sha, status="skipped")
        skipped.append(row)
    return frame[~done], skipped


def score_raw_frame(frame: pd.DataFrame, root: str, params: PreprocessParams, aliases: Mapping[str, str],
                    model_dir: str, batch_size: int, tf_threads: int = 1) -> pd.DataFrame:
    """Files (path, content) -> predictions: the preprocess job's own per-file function, then the model."""
    predictor = store.cached_predictor(model_dir, batch_size=batch_size, tf_threads=tf_threads)
    frame, rows = _split_skipped(frame)
    images = []
    for path, content in zip(frame["path"], frame["content"]):
        done = process_file(path, content, root, params, aliases)
        row = dict.fromkeys(RESULT_COLUMNS)
        row.update(path=path, sha256=done["sha256"], folder_label=done["label"], status=done["status"],
                   stage=done["stage"], reason=done["reason"])
        if done["status"] == "ok":
            images.append(np.frombuffer(done["image"], np.uint8).reshape(done["height"], done["width"]))
        rows.append(row)
    return _with_predictions(rows, images, predictor, batch_size)


def score_preprocessed_frame(frame: pd.DataFrame, model_dir: str, batch_size: int, tf_threads: int = 1) -> pd.DataFrame:
    """Rows of a preprocess job's images table -> predictions (no image steps: they were done there)."""
    predictor = store.cached_predictor(model_dir, batch_size=batch_size, tf_threads=tf_threads)
    frame, rows = _split_skipped(frame)
    images = []
    for path, sha, label, image, h, w in zip(frame["path"], frame["sha256"], frame["label"], frame["image"],
                                             frame["height"], frame["width"]):
        row = dict.fromkeys(RESULT_COLUMNS)
        row.update(path=path, sha256=sha, folder_label=label, status="ok")
        images.append(np.frombuffer(image, np.uint8).reshape(int(h), int(w)))
        rows.append(row)
    return _with_predictions(rows, images, predictor, batch_size)
