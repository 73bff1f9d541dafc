"""Saving and loading both kinds of model behind one interface: `load_predictor(model_dir, engine=...)`.

A model directory holds the weights (model.keras for Keras, model.npz + model.json for cxr.nn), usually
model.onnx (the same network exported by cxr.models.onnx_export and checked against it) and metrics.json:
how it was trained and on what data, including the preprocess params that scoring must repeat on raw
images. Nothing is ever unpickled: Keras models load with safe_mode=True (a Lambda layer or any other
arbitrary code is refused), cxr.nn reads .npz with allow_pickle=False, and ONNX files hold operators only.

A seed ensemble (train.ensemble: K) is one model folder too: ensemble.json names its members, each a model
folder of its own under members/, and model.onnx is one graph averaging the members' probabilities. Every job
reads it as one model (EnsemblePredictor: the mean of the members' probabilities) with one model id.

Every model.onnx also returns "features" (FEATURE_RULE: each conv block's activations averaged over the image,
then the hidden Dense activations, the penultimate last; for an ensemble the members' concatenated; the block
sizes in the graph's metadata FEATURE_LAYERS_KEY) and, once cxr.scope.ood has fitted a reference (ood.npz),
"ood_distance": the sum over those layers of the Mahalanobis distance from the training data's, each in units of
its own typical distance. `predict_scored(x)` gives (probabilities,
distances or None) with either engine; `ood_threshold` is the distance above which an image is out of
distribution (metrics.json "ood").

Two engines run a model: "keras" (its own framework: Keras or cxr.nn) and "onnx" (model.onnx in ONNX
Runtime, no TensorFlow needed). Spark workers import this module: TensorFlow is imported only when a Keras
model is actually loaded with the keras engine.
"""
from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from cxr import CLASSES
from cxr.models.tf_console import quiet_tensorflow_import
from cxr.scope import reference

METRICS_FILE = "metrics.json"
KERAS_FILE = "model.keras"
SCRATCH_FILES = ("model.json", "model.npz")
ONNX_FILE = "model.onnx"
OOD_FILE = reference.OOD_FILE   # the OOD reference (fitted by cxr.scope.ood): part of the model id
MONITOR_FILE = "monitor_reference.json"   # run statistics of the training data (cxr.monitor.reference): part of it too
CARD_FILE = "model_card.json"   # the model card (cxr.models.card): part of the model id
ENSEMBLE_FILE = "ensemble.json"   # {"members": [relative folder, ...], "combine": "mean"}
MEMBERS_DIR = "members"
SCHEMA = "cxr.model/1"
PROBA_OUTPUT = "proba"              # model.onnx outputs: probabilities (always first), ...
FEATURES_OUTPUT = "features"        # ... the OOD features (N, D): pooled conv blocks, hidden activations ...
DISTANCE_OUTPUT = "ood_distance"    # ... and, once an OOD reference is fitted, its distance (N,)
FEATURE_LAYERS_KEY = "cxr_feature_layers"   # model.onnx metadata: JSON [[block sizes of member 0], ...]
ENGINES = ("onnx", "keras")   # keras = the model's own framework (Keras or cxr.nn)


class UnsafeModelError(ValueError):
    """A model file that cannot be loaded without running code it carries (or is not a model at all)."""


def write_metadata(model_dir: str | Path, metadata: Mapping[str, Any]) -> Path:
    path = Path(model_dir) / METRICS_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(metadata, indent=2, sort_keys=True, default=_json_default) + "\n")
    os.replace(tmp, path)
    return path


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def read_metadata(model_dir: str | Path) -> dict:
    path = Path(model_dir) / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: not a model directory written by cxr")
    return json.loads(path.read_text())


def model_kind(model_dir: str | Path) -> str:
    d = Path(model_dir)
    if (d / ENSEMBLE_FILE).is_file():
        return "ensemble"
    if (d / KERAS_FILE).is_file():
        return "keras"
    if all((d / f).is_file() for f in SCRATCH_FILES):
        return "scratch"
    raise FileNotFoundError(f"{d} holds neither {KERAS_FILE} nor {' + '.join(SCRATCH_FILES)} nor {ENSEMBLE_FILE}")


def ensemble_members(model_dir: str | Path) -> list[Path]:
    """The member folders of an ensemble, in order ([] for a single model). Members must lie inside it."""
    d = Path(model_dir)
    if not (d / ENSEMBLE_FILE).is_file():
        return []
    spec = json.loads((d / ENSEMBLE_FILE).read_text())
    members = [d / m for m in spec.get("members") or []]
    root = d.resolve()
    for m in members:
        if root not in m.resolve().parents:
            raise UnsafeModelError(f"{d}/{ENSEMBLE_FILE} names a member outside the model folder: {m}")
        if model_kind(m) == "ensemble":
            raise ValueError(f"{m}: an ensemble member cannot be an ensemble itself")
    if not members:
        raise ValueError(f"{d}/{ENSEMBLE_FILE} names no members")
    return members


def weight_files(model_dir: str | Path) -> list[str]:
    """Names (relative to the folder) of the files that identify a model: its weights (model.keras, or
    model.json + model.npz; for an ensemble ensemble.json and every member's files), ood.npz (the
    out-of-distribution reference), monitor_reference.json (what run monitoring compares with), model_card.json
    (what it was trained on) and model.onnx when present. A change to any of them is a different model."""
    d = Path(model_dir)
    kind = model_kind(d)
    if kind == "ensemble":
        files = [ENSEMBLE_FILE] + [f"{m.relative_to(d).as_posix()}/{f}" for m in ensemble_members(d)
                                   for f in weight_files(m)]
    else:
        files = [KERAS_FILE] if kind == "keras" else list(SCRATCH_FILES)
    if (d / OOD_FILE).is_file():
        files.append(OOD_FILE)
    if (d / MONITOR_FILE).is_file():
        files.append(MONITOR_FILE)
    if (d / CARD_FILE).is_file():
        files.append(CARD_FILE)
    if (d / ONNX_FILE).is_file():
        files.append(ONNX_FILE)
    return files


def save_ensemble(model_dir: str | Path, members: list[str | Path], metadata: Mapping[str, Any]) -> Path:
    """Write ensemble.json (members relative to model_dir, which must hold them) and metrics.json."""
    d = Path(model_dir)
    rel = [Path(m).resolve().relative_to(d.resolve()).as_posix() for m in members]
    (d / ENSEMBLE_FILE).write_text(json.dumps({"members": rel, "combine": "mean of probabilities"}, indent=1) + "\n")
    write_metadata(d, {**metadata, "kind": "ensemble", "files": [ENSEMBLE_FILE, METRICS_FILE]})
    return d


def check_engine(engine: str) -> str:
    if engine not in ENGINES:
        raise ValueError(f"unknown inference engine {engine!r}; known: {', '.join(ENGINES)} "
                         "(inference.engine in conf, --engine on the jobs)")
    return engine


def inference_settings(config: Mapping[str, Any]) -> dict:
    """{"engine", "onnx_threads"} from a job's config (its `inference` section), engine checked."""
    conf = config.get("inference") or {}
    return {"engine": check_engine(str(conf.get("engine", "onnx"))),
            "onnx_threads": int(conf.get("onnx_threads", 1))}


def save_keras(model, model_dir: str | Path, metadata: Mapping[str, Any]) -> Path:
    d = Path(model_dir)
    d.mkdir(parents=True, exist_ok=True)
    model.save(d / KERAS_FILE)
    write_metadata(d, {**metadata, "kind": "keras", "files": [KERAS_FILE, METRICS_FILE]})
    return d


def save_scratch(net, model_dir: str | Path, metadata: Mapping[str, Any]) -> Path:
    from cxr.nn.io import save

    d = Path(model_dir)
    save(net, d, metadata={"name": metadata.get("name"), "classes": list(CLASSES), "input": metadata.get("input")})
    write_metadata(d, {**metadata, "kind": "scratch", "files": [*SCRATCH_FILES, METRICS_FILE]})
    return d


def list_models(models_dir: str | Path) -> list[Path]:
    """Model directories directly under models_dir (those with metrics.json and weights), by name."""
    root = Path(models_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"models folder does not exist: {models_dir}")
    found = []
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        try:
            model_kind(d)
        except FileNotFoundError:
            continue
        if (d / METRICS_FILE).is_file():
            found.append(d)
    return found


def expand_model_dirs(paths) -> list[Path]:
    """Command-line arguments -> model folders: each a model folder, or a folder of models (as jobs/train.py --out
    writes). Raises FileNotFoundError naming the first that is neither."""
    dirs: list[Path] = []
    for arg in paths:
        p = Path(arg)
        try:
            model_kind(p)
            dirs.append(p)
        except FileNotFoundError:
            found = list_models(p) if p.is_dir() else []
            if not found:
                raise FileNotFoundError(f"{p}: not a model folder, nor a folder of models") from None
            dirs.extend(found)
    return dirs


_TF_LIMITED = False


def limit_tf_threads(threads: int = 1) -> None:
    """One TF thread per Python worker: Spark already runs one worker per core (only works before TF starts)."""
    global _TF_LIMITED
    if _TF_LIMITED:
        return
    quiet_tensorflow_import()
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    except RuntimeError:  # TF already initialised in this process (e.g. the driver): keep its pools
        pass
    _TF_LIMITED = True


class Predictor:
    """`.predict_proba(x)` on float32 (N, H, W, 1) in [0, 1] at the preprocess size -> (N, 3) probabilities
    in cxr.CLASSES order; `.metadata` is the model's metrics.json (with the preprocess params).

    `.features(x)` -> (N, D) float32 OOD features (FEATURE_RULE: pooled conv blocks, hidden activations, the
    penultimate last; an ensemble's members' concatenated); `.predict_scored(x)` -> (probabilities,
    out-of-distribution distances (N,) float32, or None for a model without an OOD reference); `.ood_threshold` the
    distance above which an image is out of distribution (metrics.json "ood"), None without a reference."""

    kind = "?"
    fixed_batch = False   # True: every call must have the same batch size (a compiled graph retraces otherwise)

    def __init__(self, model_dir: Path, metadata: dict, batch_size: int = 64):
        self.model_dir = Path(model_dir)
        self.metadata = metadata
        self.name = metadata.get("name", self.model_dir.name)
        self.batch_size = int(batch_size)
        inp = metadata.get("input") or {}
        self.input_size = tuple(inp.get("data_size") or ())  # (H, W) the preprocess job wrote
        self.model_size = tuple(inp.get("model_size") or self.input_size)

    def _check(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x)
        if x.ndim == 3:
            x = x[..., None]
        if x.ndim != 4 or x.shape[-1] != 1:
            raise ValueError(f"expected images (N, H, W, 1), got shape {x.shape}")
        if self.input_size and tuple(x.shape[1:3]) != self.input_size:
            raise ValueError(f"model {self.name} expects {self.input_size[0]}x{self.input_size[1]} images "
                             f"(preprocess.size={self.metadata.get('preprocess', {}).get('size')}), got "
                             f"{x.shape[1]}x{x.shape[2]}")
        return x.astype(np.float32, copy=False)

    def _resize(self, x: np.ndarray) -> np.ndarray:
        """Scratch models may train on a smaller copy of each image (area averaging): same here."""
        if not self.model_size or tuple(x.shape[1:3]) == self.model_size:
            return x
        return resize_batch(x, self.model_size)

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def features(self, x: np.ndarray) -> np.ndarray:
        return self._proba_and_features(x)[1]

    def _proba_and_features(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(probabilities (N, 3), features (N, D)) from one forward pass, both float32."""
        raise NotImplementedError

    # ------------------------------------------------------------ out-of-distribution distance
    @property
    def ood_reference(self):
        """cxr.scope.reference.Reference from ood.npz (None when the model has none), loaded once."""
        if not hasattr(self, "_ood_reference"):
            self._ood_reference = reference.load_reference(self.model_dir)
        return self._ood_reference

    def has_ood(self) -> bool:
        return self.ood_reference is not None

    @property
    def ood_threshold(self) -> float | None:
        threshold = (self.metadata.get("ood") or {}).get("threshold")
        return float(threshold) if threshold is not None and self.has_ood() else None

    def predict_scored(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(probabilities (N, 3) float32, ood distances (N,) float32 or None without a reference). In the model's
        own framework: features and probabilities from one pass, the distance in NumPy (cxr.scope.reference)."""
        if not self.has_ood():
            return self.predict_proba(x), None
        proba, feats = self._proba_and_features(x)
        return proba, reference.distances(feats, self.ood_reference).astype(np.float32)


def keras_feature_layer(model):
    """The model's final Dense (its input is the penultimate activations, the last block of the OOD features)."""
    import keras

    dense = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)]
    if not dense:
        raise ValueError(f"Keras model {model.name}: no Dense layer, so no penultimate features")
    return dense[-1]


def _feature_taps(layers, is_pool, is_dense) -> list[tuple[str, Any]]:
    """[("gap" | "flat", layer), ...] in layer order: the OOD features are, per layer, the input of every
    max-pooling layer (a convolution block's activations) averaged over height and width ("gap"), and the input of
    every Dense layer but the first (hidden activations, the last being the penultimate: "flat"); a network with a
    single Dense gets that Dense's input. The same rule in every exporter and oracle (FEATURE_RULE)."""
    dense = [layer for layer in layers if is_dense(layer)]
    if not dense:
        raise ValueError("no Dense layer, so no penultimate features")
    keep = {id(layer) for layer in (dense[1:] or dense)}
    return [("gap", layer) if is_pool(layer) else ("flat", layer) for layer in layers
            if is_pool(layer) or id(layer) in keep]


FEATURE_RULE = ("global-average-pooled input of every max-pooling layer (conv block activations) and input of every "
                "Dense but the first (hidden activations; the last is the penultimate)")


def keras_feature_taps(model) -> list[tuple[str, Any]]:
    import keras

    return _feature_taps(model.layers, lambda layer: isinstance(layer, keras.layers.MaxPooling2D),
                         lambda layer: isinstance(layer, keras.layers.Dense))


def keras_feature_layers(model) -> list[int]:
    """Sizes of the feature blocks (keras_feature_taps order): channels of a pooled block, width of a Dense input."""
    return [int(layer.input.shape[-1]) for _, layer in keras_feature_taps(model)]


def keras_outputs_model(model):
    """keras.Model(inputs, [probabilities, features]): features = the layers of keras_feature_taps concatenated
    (pooled blocks averaged over H and W), both from one call (dropout and augmentation inactive with
    training=False)."""
    import keras

    inputs = model.inputs[0] if len(model.inputs) == 1 else model.inputs
    parts = [keras.ops.mean(layer.input, axis=(1, 2)) if kind == "gap" else layer.input
             for kind, layer in keras_feature_taps(model)]
    feats = parts[0] if len(parts) == 1 else keras.ops.concatenate(parts, axis=1)
    return keras.Model(inputs, [model.outputs[0], feats])


def keras_outputs(model, x: np.ndarray, batch_size: int = 64, both=None) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities, features) of a Keras model on x, batch by batch (both: a keras_outputs_model to reuse)."""
    both = both if both is not None else keras_outputs_model(model)
    probs, feats = [], []
    for start in range(0, x.shape[0], int(batch_size)):
        p, f = both(x[start:start + int(batch_size)], training=False)
        probs.append(np.asarray(p, np.float32))
        feats.append(np.asarray(f, np.float32))
    if not probs:
        return np.zeros((0, len(CLASSES)), np.float32), np.zeros((0, int(both.outputs[1].shape[-1])), np.float32)
    return np.concatenate(probs), np.concatenate(feats)


def scratch_feature_taps(net) -> list[tuple[str, int]]:
    """[("gap" | "flat", layer index), ...] of a cxr.nn network: keras_feature_taps' rule."""
    from cxr.nn.layers import Dense, MaxPool2D

    index = {id(layer): i for i, layer in enumerate(net.layers)}
    try:
        taps = _feature_taps(net.layers, lambda layer: isinstance(layer, MaxPool2D),
                             lambda layer: isinstance(layer, Dense))
    except ValueError:
        raise ValueError("cxr.nn network without a Dense layer: no penultimate features") from None
    return [(kind, index[id(layer)]) for kind, layer in taps]


def scratch_feature_layers(net) -> list[int]:
    """Sizes of a (built) cxr.nn network's feature blocks, scratch_feature_taps order."""
    return [int(net.layers[i].input_shape[-1]) if kind == "gap" else int(np.prod(net.layers[i].input_shape))
            for kind, i in scratch_feature_taps(net)]


def scratch_outputs(net, x: np.ndarray, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities, features) of a cxr.nn network, batch by batch: forward layer by layer, taking the features
    (scratch_feature_taps) on the way, then a softmax where the network lacks one, exactly as
    Network.predict_proba computes it."""
    from cxr.nn.layers import softmax

    taps = dict((i, kind) for kind, i in scratch_feature_taps(net))
    x = np.asarray(x)
    net._ensure_built(x)
    bs = len(x) if not batch_size else int(batch_size)
    probs, feats = [], []
    for start in range(0, len(x), bs):
        out, parts = np.asarray(x[start:start + bs], dtype=net.dtype), []
        for i, layer in enumerate(net.layers):
            if i in taps:
                parts.append(out.mean(axis=(1, 2)) if taps[i] == "gap" else out.reshape(len(out), -1))
            out = layer.forward(out, training=False)
        if not net._fused():
            out = softmax(out)
        probs.append(out.astype(np.float32, copy=False))
        feats.append(np.concatenate(parts, axis=1).astype(np.float32, copy=False))
    if not probs:
        return np.zeros((0, len(CLASSES)), np.float32), np.zeros((0, sum(scratch_feature_layers(net))), np.float32)
    return np.concatenate(probs), np.concatenate(feats)


def features_of(model, x: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """OOD features (N, D) float32 (FEATURE_RULE: pooled conv blocks and hidden activations, the penultimate last)
    of a predictor (either engine), a Keras model or a cxr.nn network on float32 (N, H, W, 1) images as that model
    takes them: the oracle model.onnx's "features" is checked against."""
    if isinstance(model, Predictor):
        return model.features(x)
    from cxr.nn.network import Network

    x = np.asarray(x, np.float32)
    if isinstance(model, Network):
        return scratch_outputs(model, x, batch_size)[1]
    return keras_outputs(model, x, batch_size)[1]


def resize_batch(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    import cv2

    h, w = size
    out = np.empty((x.shape[0], h, w, 1), np.float32)
    for i in range(x.shape[0]):
        out[i, :, :, 0] = cv2.resize(x[i, :, :, 0], (w, h), interpolation=cv2.INTER_AREA)
    return out


class KerasPredictor(Predictor):
    kind = "keras"
    fixed_batch = True

    def __init__(self, model_dir: Path, metadata: dict, batch_size: int = 64):
        super().__init__(model_dir, metadata, batch_size)
        self.model = load_keras(Path(model_dir) / KERAS_FILE)

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        x = self._resize(self._check(x))
        out = np.empty((x.shape[0], len(CLASSES)), np.float32)
        for start in range(0, x.shape[0], self.batch_size):
            chunk = x[start:start + self.batch_size]
            out[start:start + len(chunk)] = self.model(chunk, training=False).numpy()  # TF backend tensor
        return out

    def _proba_and_features(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if getattr(self, "_both", None) is None:
            self._both = keras_outputs_model(self.model)
        return keras_outputs(self.model, self._resize(self._check(x)), self.batch_size, self._both)


class ScratchPredictor(Predictor):
    kind = "scratch"

    def __init__(self, model_dir: Path, metadata: dict, batch_size: int = 64):
        super().__init__(model_dir, metadata, batch_size)
        from cxr.nn.io import load

        self.model = load(model_dir)

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        x = self._resize(self._check(x))
        return np.asarray(self.model.predict_proba(x, batch_size=self.batch_size), dtype=np.float32)

    def _proba_and_features(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return scratch_outputs(self.model, self._resize(self._check(x)), self.batch_size)


class EnsemblePredictor(Predictor):
    """The mean of the members' probabilities, each member run in its own framework (Keras or cxr.nn); the
    members resize their inputs themselves. `.members` are their predictors, `.model` their Keras models
    (for Grad-CAM, which averages the members' heatmaps: cxr.explain.gradcam)."""

    kind = "ensemble"

    def __init__(self, model_dir: Path, metadata: dict, batch_size: int = 64):
        super().__init__(model_dir, metadata, batch_size)
        self.members = [load_predictor(m, batch_size=batch_size, engine="keras") for m in ensemble_members(model_dir)]
        self.fixed_batch = any(m.fixed_batch for m in self.members)
        self.model = [m.model for m in self.members]

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        x = self._check(x)
        total = np.zeros((x.shape[0], len(CLASSES)), np.float32)
        for m in self.members:
            total += m.predict_proba(x)
        return total / np.float32(len(self.members))

    def _proba_and_features(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The members' mean probability (as predict_proba) and their features concatenated in member order
        (as the ensemble's model.onnx)."""
        x = self._check(x)
        total = np.zeros((x.shape[0], len(CLASSES)), np.float32)
        feats = []
        for m in self.members:
            p, f = m._proba_and_features(x)
            total += p
            feats.append(f)
        return total / np.float32(len(self.members)), np.concatenate(feats, axis=1)


class OnnxPredictor(Predictor):
    """model.onnx in ONNX Runtime on the CPU: the same contract as the other predictors, without TensorFlow.
    Scratch models' input resize stays outside the graph (Predictor._resize), as in ScratchPredictor."""

    kind = "onnx"

    def __init__(self, model_dir: Path, metadata: dict, batch_size: int = 64, threads: int = 1,
                 onnx_path: str | Path | None = None):
        super().__init__(model_dir, metadata, batch_size)
        self.onnx_path = Path(onnx_path) if onnx_path else Path(model_dir) / ONNX_FILE
        if not self.onnx_path.is_file():
            raise FileNotFoundError(missing_onnx_message(model_dir))
        self.session = onnx_session(self.onnx_path, threads)
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(self._resize(self._check(x)))
        out = np.empty((x.shape[0], len(CLASSES)), np.float32)
        for start in range(0, x.shape[0], self.batch_size):
            chunk = x[start:start + self.batch_size]
            out[start:start + len(chunk)] = self.session.run([self.output_name], {self.input_name: chunk})[0]
        return out

    def run_outputs(self, x: np.ndarray, names: list[str]) -> list[np.ndarray]:
        """The named graph outputs on x, batch by batch, all from one session.run per batch."""
        missing = [n for n in names if n not in self.output_names]
        if missing:
            raise ValueError(f"{self.onnx_path} has no output {', '.join(missing)} (outputs: "
                             f"{', '.join(self.output_names)}): exported before it existed? Re-export it with "
                             "`python -m cxr.models.onnx_export MODEL_DIR`")
        x = np.ascontiguousarray(self._resize(self._check(x)))
        parts: list[list[np.ndarray]] = [[] for _ in names]
        for start in range(0, x.shape[0], self.batch_size):
            outs = self.session.run(list(names), {self.input_name: x[start:start + self.batch_size]})
            for part, out in zip(parts, outs):
                part.append(out)
        if not x.shape[0]:
            return list(self.session.run(list(names), {self.input_name: x}))
        return [np.concatenate(part) for part in parts]

    def _proba_and_features(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        proba, feats = self.run_outputs(x, [self.output_name, FEATURES_OUTPUT])
        return proba, feats

    def has_ood(self) -> bool:
        return DISTANCE_OUTPUT in self.output_names

    @property
    def feature_layers(self) -> list[list[int]] | None:
        """The graph's feature block sizes, one list per member (FEATURE_LAYERS_KEY); None for a graph exported
        before them (its features: one block)."""
        raw = self.session.get_modelmeta().custom_metadata_map.get(FEATURE_LAYERS_KEY)
        return json.loads(raw) if raw else None

    def predict_scored(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(probabilities, model.onnx's "ood_distance") from one session.run per batch; (probabilities, None)
        for a graph without that output (a model without an OOD reference, or exported before it existed)."""
        if not self.has_ood():
            return self.predict_proba(x), None
        proba, dist = self.run_outputs(x, [self.output_name, DISTANCE_OUTPUT])
        return proba, dist.astype(np.float32, copy=False)


def onnx_session(path: str | Path, threads: int = 1):
    """A CPU InferenceSession with `threads` intra-op threads and no inter-op pool: Spark already runs one
    Python worker per core, so more threads per worker would only fight over the same cores."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, int(threads))
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3  # errors only: workers' stderr ends up in Spark's logs
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def missing_onnx_message(model_dir: str | Path) -> str:
    return (f"{Path(model_dir) / ONNX_FILE} is missing (model trained before ONNX export, or its export "
            f"failed): run `python -m cxr.models.onnx_export {model_dir}` to export it, or use --engine keras "
            "(inference.engine: keras) to run the model in its own framework")


def load_keras(path: str | Path):
    """keras.saving.load_model with safe_mode=True: refuses Lambda layers and other embedded code."""
    quiet_tensorflow_import()
    import keras

    try:
        return keras.saving.load_model(path, compile=False, safe_mode=True)
    except ValueError as exc:
        if "safe_mode" in str(exc) or "lambda" in str(exc).lower():
            raise UnsafeModelError(f"{path}: refused to load, it would run embedded code: {exc}") from exc
        raise


def load_predictor(model_dir: str | Path, batch_size: int = 64, engine: str = "keras",
                   onnx_threads: int = 1) -> Predictor:
    """The model in model_dir (either kind) behind Predictor's interface, run by `engine`: "keras" (the
    model's own framework: Keras or cxr.nn) or "onnx" (its model.onnx in ONNX Runtime)."""
    check_engine(engine)
    d = Path(model_dir)
    metadata = read_metadata(d)
    kind = model_kind(d)
    if metadata.get("kind") not in (None, kind):
        raise ValueError(f"{d}: metrics.json says kind={metadata.get('kind')!r} but the files are {kind}")
    if engine == "onnx":
        if not (d / ONNX_FILE).is_file():
            raise FileNotFoundError(missing_onnx_message(d))
        return OnnxPredictor(d, metadata, batch_size=batch_size, threads=onnx_threads)
    cls = {"keras": KerasPredictor, "scratch": ScratchPredictor, "ensemble": EnsemblePredictor}[kind]
    return cls(d, metadata, batch_size=batch_size)


_CACHE: "OrderedDict[tuple, Predictor]" = OrderedDict()
_CACHE_LOCK = threading.Lock()
CACHE_MODELS = 8   # most recently used models a worker keeps (cross-validation evaluates dozens)


def cached_predictor(model_dir: str | Path, batch_size: int = 64, tf_threads: int | None = 1,
                     engine: str = "keras", onnx_threads: int = 1) -> Predictor:
    """For Spark workers: load each model once per Python worker (reused across tasks), keyed by path, engine
    and modification times (weights, model.onnx, metrics.json) so a model rewritten in place is not served
    stale."""
    check_engine(engine)
    d = Path(model_dir).resolve()
    kind = model_kind(d)
    if engine == "onnx" and not (d / ONNX_FILE).is_file():
        raise FileNotFoundError(missing_onnx_message(d))
    stamp = max((d / f).stat().st_mtime_ns for f in weight_files(d))
    onnx_stamp = (d / ONNX_FILE).stat().st_mtime_ns if engine == "onnx" else None
    key = (str(d), engine, stamp, onnx_stamp, (d / METRICS_FILE).stat().st_mtime_ns, batch_size,
           int(onnx_threads) if engine == "onnx" else None)
    with _CACHE_LOCK:
        if key not in _CACHE:
            uses_tf = kind == "keras" or (kind == "ensemble" and any(model_kind(m) == "keras"
                                                                     for m in ensemble_members(d)))
            if engine == "keras" and uses_tf and tf_threads:
                limit_tf_threads(tf_threads)
            _CACHE[key] = load_predictor(d, batch_size=batch_size, engine=engine, onnx_threads=onnx_threads)
            while len(_CACHE) > CACHE_MODELS:
                _CACHE.popitem(last=False)
        _CACHE.move_to_end(key)
        return _CACHE[key]
