"""A source adversary for the Keras models: a second head that tries to name each film's source from the model's
features, through a gradient reversal, so the features are pushed to stop carrying it (domain-adversarial
training, Ganin et al. 2016).

Why conditional: in the shared folders a class mostly IS its source (every COVID film is an adult's, every VIRAL
film a child's), so an adversary on the source alone would fight the class itself. The head here sees the
features multiplied by the film's true class (the outer product, as in CDAN, Long et al. 2018), so it only has
to, and only can, tell sources apart WITHIN a class: adults from children among the NORMAL films, one ICU from the
papers' figures among the COVID films. Those are the cues a model should not use.

Training only: the head and the reversal live in a wrapper model around the classifier; what is saved, exported
to ONNX and scored is the classifier alone, unchanged in form (safe-mode loading, the ONNX export and the scoring
path never see this module).
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

DEFAULTS: dict[str, Any] = {
    "enabled": False,
    "weight": 0.3,      # the reversal's strength at the end of the ramp (features get -weight x the head's gradient)
    "hidden": 64,       # units of the head's hidden layer
}


def settings(conf: Mapping[str, Any] | None) -> dict[str, Any]:
    """train.source_adversary with defaults filled in; unknown keys are refused (a typo would silently do nothing)."""
    unknown = set(conf or {}) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"train.source_adversary: unknown keys {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    out = {**DEFAULTS, **(conf or {})}
    if float(out["weight"]) < 0:
        raise ValueError(f"train.source_adversary.weight must be >= 0, got {out['weight']}")
    return out


def ramp(epoch: int, epochs: int, weight: float) -> float:
    """The reversal's strength for an epoch: 0 at the start, rising to `weight` (Ganin et al.'s 2 / (1 + e^-10p) - 1),
    so the head first learns to see the sources before the features are pushed away from them."""
    p = epoch / max(1, epochs - 1)
    return float(weight) * (2.0 / (1.0 + math.exp(-10.0 * p)) - 1.0)


def source_index(train_sources: Sequence[Any]) -> dict[str, int]:
    """Source name -> the head's output index, from the training rows (sorted, so one seed gives one model)."""
    names = sorted({str(s) for s in train_sources if s is not None and str(s) != ""})
    if len(names) < 2:
        raise ValueError("train.source_adversary needs training films from at least two sources (the `source` "
                         f"column); found {names or 'none'}")
    return {name: i for i, name in enumerate(names)}


def source_targets(sources: Sequence[Any], index: Mapping[str, int]) -> tuple[np.ndarray, np.ndarray]:
    """(head target per row, head weight per row): rows of a source the head does not know (validation films of
    an unseen source, rows without one) get weight 0."""
    names = [None if s is None else str(s) for s in sources]
    target = np.array([index.get(n, 0) for n in names], np.int64)
    weight = np.array([1.0 if n in index else 0.0 for n in names], np.float32)
    return target, weight


def wrap(model, n_sources: int, n_classes: int, hidden: int):
    """(training model, reversal strength variable): inputs (image, one-hot class), outputs {"label": the
    classifier's output, "source": the head's}. The features are the input of the classifier's last Dense block
    (its penultimate Dense layer's output)."""
    import keras
    from keras import layers as L
    from keras import ops

    dense = [layer for layer in model.layers if isinstance(layer, L.Dense)]
    if len(dense) < 2:
        raise ValueError(f"train.source_adversary needs a model with a hidden Dense layer; {model.name} has "
                         f"{len(dense)} Dense layers")
    features = dense[-2].output
    strength = keras.Variable(0.0, trainable=False, name="source_reversal", dtype="float32")

    class GradientReversal(L.Layer):
        """Identity forward; the gradient times -strength backward (stop_gradient((1 + s) x) - s x)."""

        def call(self, x):
            s = ops.cast(strength, x.dtype)
            return ops.stop_gradient(x * (1.0 + s)) - x * s

    label_in = keras.Input(shape=(n_classes,), name="label_onehot")
    reversed_ = GradientReversal(name="reverse")(features)
    # the head sees the features standardised per film (no learnt scale): a scale-invariant input, so the
    # classifier cannot beat the head by blowing the features up (measured: without it the losses ran to ~100
    # in the 8th of 12 epochs and the class accuracy fell to 0.45)
    unit = L.LayerNormalization(center=False, scale=False, name="source_standardise")(reversed_)
    joint = L.Flatten()(ops.expand_dims(unit, 2) * ops.expand_dims(label_in, 1))
    h = L.Dense(int(hidden), activation="relu", name="source_hidden")(joint)
    source_out = L.Dense(int(n_sources), activation="softmax", name="source")(h)
    trainer = keras.Model(inputs=[model.inputs[0], label_in], outputs={"label": model.outputs[0], "source": source_out},
                          name=f"{model.name}_with_source_adversary")
    return trainer, strength


HISTORY_KEYS = {"label_loss": "loss", "label_accuracy": "accuracy", "val_label_loss": "val_loss",
                "val_label_accuracy": "val_accuracy", "source_accuracy": "source_accuracy",
                "val_source_accuracy": "val_source_accuracy"}


def history(raw: Mapping[str, Sequence[float]]) -> dict[str, list[float]]:
    """The wrapper's history under the classifier's names (loss is the class loss alone), plus how well the head
    named the sources (what the reversal is fighting)."""
    return {new: [float(v) for v in raw[old]] for old, new in HISTORY_KEYS.items() if old in raw}
