"""Batch inference on the worker side, without Spark: rows in, predicted rows out.

Raw files are opened here (cxr.image.source), not carried through the JVM: the driver decides which files
need reading from their listed size and time, and only those reach a worker. Images go through the model in
fixed-size batches (the last one padded), so that a compiled model sees one input shape only, and the model
is loaded once per Python worker (cxr.models.store.cached_predictor).
"""
from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import numpy as np
import pandas as pd

from cxr import CLASSES
from cxr.evaluate.calibration import apply_temperature, temperature_of
from cxr.image.batch import process_file
from cxr.image.pipeline import PreprocessParams
from cxr.image.source import VANISHED, read_bytes
from cxr.models import store
from cxr.common.manifest import site_source
from cxr.scope.dicom_header import DICOM_COLUMNS, SITE_KEY, with_column_types
from cxr.scope.frontal import FrontalCheck, verdicts
from cxr.score.known import ALREADY_SCORED, contains
from cxr.scope.rules import OOD_STAGE, ScopeGate

PROB_COLUMNS = tuple(f"p_{c.lower()}" for c in CLASSES)
# scope_score: p(frontal chest film) of the frontal check (cxr.scope.frontal); ood_reason: which pixel signal
# put the image out of scope, with its value (None when in scope)
OOD_COLUMNS = ("ood_distance", "in_distribution", "scope_score", "ood_reason")
# what run monitoring (cxr.monitor.stats) needs of each input image beyond the prediction: the decoder's format,
# stored dtype and size, and the mean pixel value of the preprocessed image (what the model saw)
INPUT_COLUMNS = ("source_format", "orig_dtype", "orig_height", "orig_width")
MONITOR_COLUMNS = (*INPUT_COLUMNS, "mean_intensity")
RESULT_COLUMNS = ("path", "sha256", "folder_label", "source", "status", "stage", "reason", "label", *PROB_COLUMNS,
                  *OOD_COLUMNS, "size", "mtime_ms", "decode_warnings", *DICOM_COLUMNS, *MONITOR_COLUMNS)
# columns of a preprocess job's images table that scoring it carries into its results (older tables lack some)
CARRIED_COLUMNS = ("source", "decode_warnings", *DICOM_COLUMNS, *INPUT_COLUMNS)
HASH_COLUMNS = ("path", "sha256", "size", "mtime_ms")

# What must match between the preprocessing a model was trained on and the one it is fed.
MATCHING_PARAMS = ("size", "method", "clip_limit", "tile_grid", "brightness_alpha", "brightness_beta", "resize_mode",
                   "decode_reduction")
# What a run decides for itself, whatever the model's training data had: damaged files, the per-file time limit.
RUN_PARAMS = ("on_damaged", "time_limit_s")
_PARAM_DEFAULTS = PreprocessParams().to_dict()   # params recorded before a key existed meant its default
ENGINES = ("onnx", "keras")


@dataclass(frozen=True)
class Engine:
    """How a worker runs the model: `onnx` (model.onnx in ONNX Runtime) or `keras` (the model's own
    framework: Keras, or cxr.nn for the scratch models)."""
    model_dir: str
    name: str = "onnx"
    batch_size: int = 32
    tf_threads: int = 1
    onnx_threads: int = 1

    @classmethod
    def from_config(cls, model_dir: str, config: Mapping[str, Any], engine: str | None = None,
                    batch_size: int | None = None) -> "Engine":
        inference, score = config.get("inference", {}), config.get("score", {})
        name = engine or inference.get("engine", "onnx")
        if name not in ENGINES:
            raise ValueError(f"unknown inference engine {name!r}: use one of {', '.join(ENGINES)}")
        return cls(model_dir, name, int(batch_size or score.get("batch_size", 32)), int(score.get("tf_threads", 1)),
                   int(inference.get("onnx_threads", 1)))

    def predictor(self):
        return store.cached_predictor(self.model_dir, batch_size=self.batch_size, tf_threads=self.tf_threads,
                                      engine=self.name, onnx_threads=self.onnx_threads)


def model_id(model_dir: str | Path) -> str:
    """sha256 over the model's weight files (model.onnx included): the identity incremental scoring keys on."""
    d = Path(model_dir)
    digest = hashlib.sha256()
    for name in store.weight_files(d):
        digest.update(name.encode())
        digest.update(hashlib.sha256((d / name).read_bytes()).digest())
    return digest.hexdigest()


def params_mismatch(model_params: Mapping[str, Any], data_params: Mapping[str, Any]) -> dict[str, tuple]:
    def value(params, k):
        return params.get(k, _PARAM_DEFAULTS.get(k) if k == "decode_reduction" else None)

    return {k: (value(model_params, k), value(data_params, k)) for k in MATCHING_PARAMS
            if value(model_params, k) != value(data_params, k)}


def scoring_params(model_params: Mapping[str, Any], config: Mapping[str, Any]) -> PreprocessParams:
    """The model's image steps (decode reduction included), with this run's damage policy and time limit."""
    pre = config.get("preprocess", {})
    run = {k: type(_PARAM_DEFAULTS[k])(pre[k]) for k in RUN_PARAMS if pre.get(k) is not None}
    return dataclasses.replace(PreprocessParams.from_dict(model_params), **run)


def predict_fixed_batches(predictor, images: np.ndarray, batch_size: int) -> tuple[np.ndarray, np.ndarray | None]:
    """(N, H, W) uint8 -> ((N, 3) probabilities, (N,) out-of-distribution distances or None when the model has
    no reference), calling the model on batch_size rows at a time. The last batch is padded only for models that
    need one input shape (Keras): padding a 16-row Arrow batch to 32 would double ONNX Runtime's work for
    nothing."""
    n = len(images)
    out = np.empty((n, len(CLASSES)), np.float32)
    dist = np.empty(n, np.float32)
    has_dist = False
    batch = np.zeros((batch_size, *images.shape[1:], 1), np.float32)
    pad = getattr(predictor, "fixed_batch", True)
    for start in range(0, n, batch_size):
        chunk = images[start:start + batch_size]
        batch[:len(chunk), ..., 0] = chunk.astype(np.float32) / 255.0
        batch[len(chunk):] = 0.0
        proba, d = predictor.predict_scored(batch if pad else batch[:len(chunk)])
        out[start:start + len(chunk)] = proba[:len(chunk)]
        if d is not None:
            dist[start:start + len(chunk)], has_dist = d[:len(chunk)], True
    return out, (dist if has_dist else None)


FLOAT_COLUMNS = (*PROB_COLUMNS, "ood_distance", "scope_score", "mean_intensity")
NULLABLE_INTS = {"size": "Int64", "mtime_ms": "Int64", "orig_height": "Int32", "orig_width": "Int32"}


def _with_predictions(rows: list[dict], images: list[np.ndarray], engine: Engine, ood: str = "flag",
                      frontal: FrontalCheck | None = None, framed_sides: np.ndarray | None = None) -> pd.DataFrame:
    """ood: "flag" keeps the probabilities of an image out of scope by its pixels (the frontal check's score
    under its threshold, a mirror-symmetric picture, the model's distance over its threshold, or a uniform
    frame around the raw film: cxr.scope.frontal.verdicts) with in_distribution false and the reason in
    ood_reason; "skip" makes it an out_of_scope row (stage "ood") without them. framed_sides: per image, the
    sides of its raw film a frame runs along (cxr.image.frame; None: not measured, e.g. preprocessed input).

    The columns are filled as arrays and typed once (a pandas .loc per column and batch cost a worker more
    than the frontal check)."""
    n = len(rows)
    col = {c: [r[c] for r in rows] for c in RESULT_COLUMNS}
    num = {c: np.array([np.nan if v is None else v for v in col[c]], np.float32) for c in FLOAT_COLUMNS}
    ok = np.array([s == "ok" for s in col["status"]], bool)
    if ok.any():
        predictor = engine.predictor()
        stack = np.stack(images)
        num["mean_intensity"][ok] = stack.reshape(len(stack), -1).mean(axis=1)
        proba, dist = predict_fixed_batches(predictor, stack, engine.batch_size)
        proba = apply_temperature(proba, temperature_of(predictor.metadata))  # None (uncalibrated): unchanged
        for j, c in enumerate(PROB_COLUMNS):
            num[c][ok] = proba[:, j]
        for c in ("label", "in_distribution", "ood_reason", "status", "stage", "reason"):
            col[c] = np.array(col[c], object)
        col["label"][ok] = np.asarray(CLASSES)[proba.argmax(axis=1)]
        threshold = getattr(predictor, "ood_threshold", None)
        dist = dist if threshold is not None else None
        scope, asym = frontal.assess(stack) if frontal is not None else (None, None)
        if dist is not None:
            num["ood_distance"][ok] = dist
        if scope is not None:
            num["scope_score"][ok] = scope
        if dist is not None or scope is not None or framed_sides is not None:
            inside, reasons = (frontal.verdicts(scope, asym, dist, threshold, framed_sides) if frontal is not None
                               else verdicts(None, None, dist, threshold, framed_sides=framed_sides))
            reasons = np.array(reasons, dtype=object)
            col["in_distribution"][ok], col["ood_reason"][ok] = inside, reasons
            if ood == "skip" and not inside.all():
                away = np.flatnonzero(ok)[~inside]
                col["status"][away], col["stage"][away] = "out_of_scope", OOD_STAGE
                col["reason"][away] = [f"out of distribution: {r} (scope.ood: skip)" for r in reasons[~inside]]
                col["label"][away] = None
                for c in PROB_COLUMNS:
                    num[c][away] = np.nan
    typed = {**num, "in_distribution": pd.array(list(col["in_distribution"]), dtype="boolean"),
             **{c: pd.array(col[c], dtype=kind) for c, kind in NULLABLE_INTS.items()}}
    return with_column_types(pd.DataFrame({c: typed.get(c, col[c]) for c in RESULT_COLUMNS}, index=range(n)))


def grouped(frames: Iterable[pd.DataFrame], rows: int) -> Iterator[pd.DataFrame]:
    """Consecutive frames joined into frames of at least `rows` rows (the last one shorter): result rows hold no
    image, and a frame per model batch of 32 would cost pyspark's Arrow conversion and the JVM's reader their
    per-batch set-up 8 times as often."""
    held, n = [], 0
    for frame in frames:
        held.append(frame)
        n += len(frame)
        if n >= rows:
            yield pd.concat(held, ignore_index=True)
            held, n = [], 0
    if held:
        yield pd.concat(held, ignore_index=True)


def read_error(exc: BaseException) -> str:
    if isinstance(exc, FileNotFoundError):
        return VANISHED
    return f"could not read the file: {type(exc).__name__}: {exc}"


def _read(path: str, max_bytes: int | None) -> tuple[bytes | None, str | None]:
    try:
        return read_bytes(path, max_bytes), None
    except (OSError, ValueError) as exc:
        return None, read_error(exc)


def hash_frame(frame: pd.DataFrame, max_bytes: int | None = None) -> pd.DataFrame:
    """Files (path, size, mtime_ms) -> their sha256 (None when unreadable): to learn whether a changed file's
    content was already scored before decoding it."""
    shas = []
    for path in frame["path"]:
        data, _ = _read(path, max_bytes)
        shas.append(None if data is None else hashlib.sha256(data).hexdigest())
    return pd.DataFrame({"path": frame["path"], "sha256": shas, "size": frame["size"], "mtime_ms": frame["mtime_ms"]})


def score_raw_frame(frame: pd.DataFrame, root: str, params: PreprocessParams, aliases: Mapping[str, str],
                    engine: Engine, max_bytes: int | None = None, gate: ScopeGate | None = None,
                    source: str | None = None, known: np.ndarray | None = None) -> pd.DataFrame:
    """Files (path, size, mtime_ms) -> predictions: read here (once), the preprocess job's own per-file function
    (with the scope gate: DICOM columns, out-of-scope files not decoded), then the model. `source`: the run's
    source (score.source), for files whose DICOM header names no site. known: the digests of the content this
    model already scored (cxr.score.known): such a file is hashed, not decoded, and its row says already_scored."""
    rows, images, sides = [], [], []
    measure_frame = bool(gate and gate.frame)
    for path, size, mtime in zip(frame["path"], frame["size"], frame["mtime_ms"]):
        row = dict.fromkeys(RESULT_COLUMNS)
        row.update(path=path, size=size, mtime_ms=mtime, source=source)
        content, problem = _read(path, max_bytes)
        if problem:
            row.update(status="error", stage="read", reason=problem)
        else:
            sha = hashlib.sha256(content).hexdigest()
            if contains(known, sha):
                row.update(sha256=sha, status=ALREADY_SCORED)
                rows.append(row)
                continue
            done = process_file(path, content, root, params, aliases, gate, sha256=sha, frame=measure_frame)
            row.update({c: done[c] for c in DICOM_COLUMNS})
            row.update(source=site_source(done.get(SITE_KEY)) or source)
            row.update(sha256=done["sha256"], folder_label=done["label"], status=done["status"],
                       stage=done["stage"], reason=done["reason"], decode_warnings=done["decode_warnings"],
                       **{c: done[c] for c in INPUT_COLUMNS})
            if done["status"] == "ok":
                images.append(np.frombuffer(done["image"], np.uint8).reshape(done["height"], done["width"]))
                sides.append(done.get("framed_sides", 0))
        rows.append(row)
    return _with_predictions(rows, images, engine, gate.rules.ood if gate else "flag", gate.frontal if gate else None,
                             np.array(sides, int) if measure_frame else None)


def score_preprocessed_frame(frame: pd.DataFrame, engine: Engine, ood: str = "flag",
                             frontal: FrontalCheck | None = None) -> pd.DataFrame:
    """Rows of a preprocess job's images table -> predictions (no image steps: they were done there; DICOM
    columns carried over where the table has them)."""
    rows, images = [], []
    carried = [c for c in CARRIED_COLUMNS if c in frame]   # older tables lack some
    for i, (path, sha, label, image, h, w) in enumerate(zip(frame["path"], frame["sha256"], frame["label"],
                                                            frame["image"], frame["height"], frame["width"])):
        row = dict.fromkeys(RESULT_COLUMNS)
        row.update(path=path, sha256=sha, folder_label=label, status="ok")
        row.update({c: frame[c].iat[i] for c in carried})
        images.append(np.frombuffer(image, np.uint8).reshape(int(h), int(w)))
        rows.append(row)
    return _with_predictions(rows, images, engine, ood, frontal)
