"""The study's Keras models, sized from the data: a CNN (conv + max-pool blocks, dense, softmax), a DNN on the
flattened image, and a depthwise-separable CNN. Only built-in layers, so models load with safe_mode=True.

Architecture settings come from conf (train.keras.<family>); optimizers are Keras' own with Keras defaults
unless conf (train.optimizer_config.<name>) says otherwise.
"""
from __future__ import annotations

from typing import Any, Mapping

from cxr import CLASSES

FAMILIES = ("cnn", "dnn", "dwsep")
OPTIMIZERS = ("rmsprop", "sgd", "adadelta", "adagrad", "adam")
_OPTIMIZER_CLASSES = {"rmsprop": "RMSprop", "sgd": "SGD", "adadelta": "Adadelta", "adagrad": "Adagrad", "adam": "Adam"}

DEFAULTS: dict[str, dict[str, Any]] = {
    "cnn": {"filters": [32, 64, 128], "kernel_size": 3, "dense": 128, "dropout": 0.25},
    "dnn": {"units": [256, 128], "dropout": 0.25},
    "dwsep": {"filters": [32, 64, 128], "kernel_size": 3, "dense": 128, "dropout": 0.25},
}


def architecture(family: str, conf: Mapping[str, Any] | None = None) -> dict[str, Any]:
    if family not in DEFAULTS:
        raise ValueError(f"unknown Keras model family {family!r}; known: {', '.join(FAMILIES)}")
    unknown = set(conf or {}) - set(DEFAULTS[family])
    if unknown:
        raise ValueError(f"train.keras.{family}: unknown keys {sorted(unknown)}; known: {sorted(DEFAULTS[family])}")
    return {**DEFAULTS[family], **(conf or {})}


AUGMENT_DEFAULTS = {"enabled": False, "translate": 0.05, "rotate_deg": 5.0, "zoom": 0.05, "seed": 0}


def augmentation(conf: Mapping[str, Any] | None) -> dict[str, Any]:
    """Effective augmentation settings: small shifts, rotations and zooms (what a re-positioned patient or
    a different detector distance does); no flips, since the heart is on one side."""
    unknown = set(conf or {}) - set(AUGMENT_DEFAULTS)
    if unknown:
        raise ValueError(f"train.augment: unknown keys {sorted(unknown)}; known: {sorted(AUGMENT_DEFAULTS)}")
    return {**AUGMENT_DEFAULTS, **(conf or {})}


def _augment_layers(aug: Mapping[str, Any]) -> list:
    """Keras' random layers: active in fit, identity in predict, built-in (so safe_mode loading still works)."""
    from keras import layers as L

    if not aug.get("enabled"):
        return []
    seed = int(aug.get("seed", 0))
    t, z = float(aug["translate"]), float(aug["zoom"])
    return [L.RandomTranslation(t, t, fill_mode="nearest", seed=seed),
            L.RandomRotation(float(aug["rotate_deg"]) / 360.0, fill_mode="nearest", seed=seed + 1),
            L.RandomZoom(z, z, fill_mode="nearest", seed=seed + 2)]


def build(family: str, input_shape: tuple[int, int, int], conf: Mapping[str, Any] | None = None,
          augment: Mapping[str, Any] | None = None):
    """An uncompiled keras.Sequential for (H, W, 1) inputs already scaled to [0, 1], with the augmentation
    layers in front when `augment` is enabled."""
    import keras
    from keras import layers as L

    arch = architecture(family, conf)
    n = len(CLASSES)
    body: list = _augment_layers(augmentation(augment))
    if family == "cnn":
        for f in arch["filters"]:
            body += [L.Conv2D(int(f), arch["kernel_size"], activation="relu"), L.MaxPooling2D(2)]
        body += [L.Flatten(), L.Dense(int(arch["dense"]), activation="relu")]
    elif family == "dwsep":
        body += [L.Conv2D(int(arch["filters"][0]), arch["kernel_size"], activation="relu"), L.MaxPooling2D(2)]
        for f in arch["filters"][1:]:
            body += [L.SeparableConv2D(int(f), arch["kernel_size"], activation="relu"), L.MaxPooling2D(2)]
        body += [L.GlobalAveragePooling2D(), L.Dense(int(arch["dense"]), activation="relu")]
    else:
        body += [L.Flatten()]
        for u in arch["units"]:
            body += [L.Dense(int(u), activation="relu")]
    if arch.get("dropout"):
        body.append(L.Dropout(float(arch["dropout"])))
    body.append(L.Dense(n, activation="softmax"))
    return keras.Sequential([keras.Input(shape=tuple(input_shape))] + body, name=family)


def optimizer(name: str, overrides: Mapping[str, Any] | None = None):
    """keras.optimizers.<Name>(**overrides): Keras defaults unless conf sets e.g. learning_rate."""
    import keras

    key = name.lower()
    if key not in _OPTIMIZER_CLASSES:
        raise ValueError(f"unknown optimizer {name!r}; known: {', '.join(OPTIMIZERS)}")
    return getattr(keras.optimizers, _OPTIMIZER_CLASSES[key])(**dict(overrides or {}))


def optimizer_config(opt) -> dict[str, Any]:
    """The optimizer's effective settings (defaults included), JSON-safe, for metrics.json."""
    cfg = opt.get_config()
    return {k: (v if isinstance(v, (int, float, str, bool, type(None))) else repr(v)) for k, v in cfg.items()}
