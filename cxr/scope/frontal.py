"""Is this a frontal chest radiograph? A small network's answer, the second pixel signal of the scope gate.

Why: the out-of-distribution distance (cxr.scope.ood) asks "do this model's features look familiar?", and a
lateral chest film, a pelvis or a knee has the grey levels and textures of the training films: on real files an
independent check found 17 of 40 laterals scored as in distribution. This check asks the question the gate is
about, with its own small network (cxr.scope.frontal_train: a 4-block CNN trained with outlier exposure on the
shared frontal films' train splits against re-framed films, rendered radiographs of other body parts and
pictures), independent of the model being scored: every model, single, ensemble or scratch, gets the same
check.

It sees what the model sees: the model's preprocessed image (any size, any resize mode) resized to
INPUT_SIDE px (INTER_AREA). It runs in ONNX Runtime (frontal.onnx, one session per Python worker) and returns
p(frontal chest film) in [0, 1]; an image scoring below the threshold (frontal.json, set on frontal films of both
shared folders the network never saw: out of fold and val; never on out-of-scope material) is "not a frontal
chest film".

Beside the network, one anatomical prior: the heart and the mediastinum make every frontal chest film
lopsided, so an image whose halves mirror each other (asymmetry under its own threshold in frontal.json, a low
quantile of the shared frontal films' own asymmetry) is not one, whatever the network says. The network is
weakest exactly there: a film's half mirrored into a symmetric picture has two lungs either side of a spine.

The shipped model lives in cxr/scope/frontal_model/ (frontal.onnx: one graph, the mean of a few members
trained from different seeds, which narrows the tail of frontal films scored low; frontal.weights.npz: the
members' Keras weights, plain arrays; frontal.json: threshold, seeds, data and the export check). conf
`scope.frontal`: "builtin" (that folder), a folder with the same three files, or "off".
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import cv2
import numpy as np

from cxr.image import frame

BUILTIN_DIR = Path(__file__).resolve().parent / "frontal_model"
ONNX_FILE, WEIGHTS_FILE, META_FILE = "frontal.onnx", "frontal.weights.npz", "frontal.json"
INPUT_SIDE = 64          # the network's input: the model's preprocessed image resized to 64 x 64
FRONTAL_CLASS = 1        # output column of "frontal chest film" in the graph's (N, 2) softmax
OFF = ("off", "none", "", "false")
# the words a reason starts with, one per signal: run records and run pages count reasons by them
NOT_FRONTAL = "not a frontal chest film"
UNLIKE_TRAINING = "unlike the training films"


def scope_input(images: np.ndarray) -> np.ndarray:
    """(N, H, W) uint8 (or (N, H, W, 1) float in [0, 1]) -> (N, INPUT_SIDE, INPUT_SIDE, 1) float32 in [0, 1]."""
    x = np.asarray(images)
    if x.ndim == 4:
        x = x[..., 0]
    if x.dtype != np.uint8:
        x = np.clip(np.round(x.astype(np.float32) * 255.0), 0, 255).astype(np.uint8)
    out = np.empty((len(x), INPUT_SIDE, INPUT_SIDE, 1), np.float32)
    for i, img in enumerate(x):
        if img.shape != (INPUT_SIDE, INPUT_SIDE):
            shrink = img.shape[0] * img.shape[1] >= INPUT_SIDE * INPUT_SIDE
            img = cv2.resize(img, (INPUT_SIDE, INPUT_SIDE),
                             interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
        out[i, ..., 0] = img
    return out / np.float32(255.0)


def asymmetry(x: np.ndarray) -> np.ndarray:
    """(N, 64, 64, 1) scope_input images -> (N,) float32: mean |image - its mirror image| over mean |image - its
    mean|. The shared frontal films score 0.20 and up, a film's half mirrored into a whole picture under 0.16."""
    img = np.asarray(x, np.float32)[..., 0]
    diff = np.abs(img - img[:, :, ::-1]).mean(axis=(1, 2))
    spread = np.abs(img - img.mean(axis=(1, 2), keepdims=True)).mean(axis=(1, 2))
    return (diff / np.maximum(spread, np.float32(1e-6))).astype(np.float32)


def build_keras(seed: int = 0, classes: int = 2):
    """The network: 4 conv blocks (8-16-32-32 channels, 3x3, ReLU, 2x2 max-pooling) keep where things are
    (64 -> 4 px), Flatten keeps the layout (a sideways film differs from an upright one only there), a hidden
    Dense of 32, softmax over (other, frontal). 32 k weights; written to ONNX layer by layer
    (cxr.models.onnx_export.keras_sequential_to_onnx)."""
    import keras

    init = lambda k: keras.initializers.GlorotUniform(seed=seed * 100 + k)  # noqa: E731
    layers = [keras.Input((INPUT_SIDE, INPUT_SIDE, 1))]
    for k, ch in enumerate((8, 16, 32, 32)):
        layers += [keras.layers.Conv2D(ch, 3, padding="same", activation="relu", kernel_initializer=init(k)),
                   keras.layers.MaxPooling2D(2)]
    layers += [keras.layers.Flatten(), keras.layers.Dropout(0.3, seed=seed),
               keras.layers.Dense(32, activation="relu", kernel_initializer=init(10)),
               keras.layers.Dense(classes, activation="softmax", kernel_initializer=init(11))]
    return keras.Sequential(layers, name="frontal_check")


def load_keras_members(model_dir: str | Path = BUILTIN_DIR) -> list:
    """The Keras networks frontal.onnx was exported from (architecture here, weights from the .npz, keyed
    m<k>_w<i>: no pickle); the check's score is the mean of their p(frontal)."""
    with np.load(Path(model_dir) / WEIGHTS_FILE, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    members = []
    while f"m{len(members)}_w0" in arrays:
        model, k = build_keras(), len(members)
        model.set_weights([arrays[f"m{k}_w{i}"] for i in range(len(model.weights))])
        members.append(model)
    return members


def keras_scores(members: list, images: np.ndarray) -> np.ndarray:
    """Mean p(frontal) of the Keras members on (N, 64, 64) uint8 images: the oracle of the ONNX graph."""
    x = scope_input(images)
    return np.mean([m.predict(x, batch_size=256, verbose=0)[:, FRONTAL_CLASS] for m in members], axis=0)


@functools.lru_cache(maxsize=4)
def _session(path: str, stamp: int):
    from cxr.models.store import onnx_session

    return onnx_session(path, 1)


@dataclass(frozen=True)
class FrontalCheck:
    """What a worker needs (picklable: a path and a threshold); the ONNX session is made once per process."""
    model_dir: str
    threshold: float
    batch_size: int = 64
    asymmetry_threshold: float | None = None   # None: the mirror prior is off (a model folder without it)

    @classmethod
    def load(cls, model_dir: str | Path = BUILTIN_DIR) -> "FrontalCheck":
        d = Path(model_dir)
        meta = read_meta(d)
        asym = meta.get("asymmetry_threshold")
        return cls(str(d.resolve()), float(meta["threshold"]),
                   asymmetry_threshold=None if asym is None else float(asym))

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "FrontalCheck | None":
        """conf scope.frontal: "builtin" (default), a model folder, or "off" (None: no check)."""
        where = (config.get("scope") or {}).get("frontal", "builtin")
        if where is None or where is False or str(where).strip().lower() in OFF:
            return None
        return cls.load(BUILTIN_DIR if str(where) == "builtin" else Path(str(where)))

    def scores(self, images: np.ndarray) -> np.ndarray:
        """(N,) float32 p(frontal chest film) of (N, H, W) uint8 images (the model's preprocessed images)."""
        return self._network(scope_input(images))

    def assess(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(p(frontal), asymmetry) of (N, H, W) uint8 images, from one resize to the check's input."""
        x = scope_input(images)
        return self._network(x), asymmetry(x)

    def _network(self, x: np.ndarray) -> np.ndarray:
        if len(x) == 0:
            return np.zeros(0, np.float32)
        path = Path(self.model_dir) / ONNX_FILE
        sess = _session(str(path), path.stat().st_mtime_ns)
        feed, out = sess.get_inputs()[0].name, sess.get_outputs()[0].name
        return np.concatenate([sess.run([out], {feed: x[i:i + self.batch_size]})[0][:, FRONTAL_CLASS]
                               for i in range(0, len(x), self.batch_size)]).astype(np.float32)

    def verdicts(self, scores: np.ndarray, asym: np.ndarray, distance: np.ndarray | None = None,
                 distance_threshold: float | None = None,
                 framed_sides: np.ndarray | None = None) -> tuple[np.ndarray, list[str | None]]:
        return verdicts(scores, self.threshold, distance, distance_threshold, asym, self.asymmetry_threshold,
                        framed_sides)

    def summary(self) -> dict:
        meta = read_meta(self.model_dir)
        return {"model": self.model_dir, "threshold": self.threshold, "threshold_on": meta.get("threshold_on"),
                "asymmetry_threshold": self.asymmetry_threshold, "onnx_sha256": meta.get("onnx_sha256")}


def read_meta(model_dir: str | Path) -> dict:
    path = Path(model_dir) / META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the frontal-film check needs {ONNX_FILE} and {META_FILE} "
                                "(python -m cxr.scope.frontal_train writes them), or set scope.frontal: off")
    return json.loads(path.read_text())


def verdicts(scope: np.ndarray | None, scope_threshold: float | None, distance: np.ndarray | None,
             distance_threshold: float | None, asym: np.ndarray | None = None,
             asym_threshold: float | None = None,
             framed_sides: np.ndarray | None = None) -> tuple[np.ndarray, list[str | None]]:
    """Combine the pixel signals: (in scope, bool (N,); reason per image, None when in scope). Any signal firing
    puts an image out; its reason names each that fired, with its value. framed_sides: the sides of each raw
    film a uniform frame runs along (cxr.image.frame): from frame.SIDES on, the film is unlike the training
    films (the models were measured to misread framed films)."""
    n = next((len(a) for a in (scope, distance, asym, framed_sides) if a is not None), 0)
    inside = np.ones(n, bool)
    reasons: list[list[str]] = [[] for _ in range(n)]
    if scope is not None and scope_threshold is not None:
        low = np.asarray(scope) < scope_threshold
        inside &= ~low
        for i in np.flatnonzero(low):
            reasons[i].append(f"{NOT_FRONTAL} (scope {scope[i]:.2f} under {scope_threshold:.2f})")
    if asym is not None and asym_threshold is not None:
        mirrored = np.asarray(asym) < asym_threshold
        inside &= ~mirrored
        for i in np.flatnonzero(mirrored):
            reasons[i].append(f"{NOT_FRONTAL} (mirror-symmetric: asymmetry {asym[i]:.2f} under {asym_threshold:.2f})")
    if distance is not None and distance_threshold is not None:
        far = np.asarray(distance) > distance_threshold
        inside &= ~far
        for i in np.flatnonzero(far):
            reasons[i].append(f"{UNLIKE_TRAINING} (distance {distance[i]:.2f} over {distance_threshold:.2f})")
    if framed_sides is not None:
        boxed = np.asarray(framed_sides) >= frame.SIDES
        inside &= ~boxed
        for i in np.flatnonzero(boxed):
            reasons[i].append(f"{UNLIKE_TRAINING} (a uniform frame along {framed_sides[i]} sides, "
                              f"{frame.DEPTH:.0%} deep or more)")
    return inside, ["; ".join(r) if r else None for r in reasons]
