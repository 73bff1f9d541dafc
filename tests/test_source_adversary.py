"""The source adversary (cxr.train.source_adversary): the gradient reversal against a hand-built head without
it, the head's targets, and a fit that returns the plain classifier (what is saved, exported and scored)."""
from __future__ import annotations

import numpy as np
import pytest

from cxr import CLASSES
from cxr.train import source_adversary as adv


def test_ramp_targets_and_settings():
    assert adv.ramp(0, 12, 0.3) == 0.0
    assert adv.ramp(11, 12, 0.3) == pytest.approx(0.3, rel=1e-3)
    assert 0 < adv.ramp(3, 12, 0.3) < adv.ramp(6, 12, 0.3) < 0.3
    index = adv.source_index(["b", "a", None, "b"])
    assert index == {"a": 0, "b": 1}
    target, weight = adv.source_targets(["b", "c", None, "a"], index)
    assert target.tolist()[::3] == [1, 0] and weight.tolist() == [1.0, 0.0, 0.0, 1.0]   # unknown sources weigh 0
    with pytest.raises(ValueError, match="at least two sources"):
        adv.source_index(["a", None, "a"])
    with pytest.raises(ValueError, match="unknown keys"):
        adv.settings({"wieght": 1})


def test_reversal_is_identity_forward_and_flips_the_source_gradient():
    """Against the same head called on the features directly (no reversal): the classifier's output is unchanged,
    the head's own weights get the same gradient, the classifier's get -strength times it."""
    import keras
    import tensorflow as tf
    from keras import ops

    from cxr.models.keras_models import build

    keras.utils.set_random_seed(0)
    model = build("cnn", (20, 20, 1), {"filters": [4], "kernel_size": 3, "dense": 8, "dropout": 0.0})
    trainer, strength = adv.wrap(model, n_sources=3, n_classes=len(CLASSES), hidden=5)
    strength.assign(0.4)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (6, 20, 20, 1)).astype(np.float32)
    onehot = np.eye(len(CLASSES), dtype=np.float32)[rng.integers(0, len(CLASSES), 6)]
    target = rng.integers(0, 3, 6)
    features = keras.Model(model.inputs, [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)][-2].output)
    hidden, head = trainer.get_layer("source_hidden"), trainer.get_layer("source")
    loss = keras.losses.SparseCategoricalCrossentropy()

    with tf.GradientTape(persistent=True) as tape:
        out = trainer([x, onehot], training=False)
        reversed_loss = loss(target, out["source"])
        f = features(x, training=False)
        centred = f - ops.mean(f, axis=-1, keepdims=True)
        unit = centred / ops.sqrt(ops.mean(centred * centred, axis=-1, keepdims=True) + 1e-3)  # Keras' epsilon
        plain = head(hidden(ops.reshape(unit[:, :, None] * onehot[:, None, :], (6, -1))))
        plain_loss = loss(target, plain)
    as_np = ops.convert_to_numpy
    np.testing.assert_allclose(as_np(out["label"]), as_np(model(x, training=False)), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(as_np(out["source"]), as_np(plain), rtol=1e-5, atol=1e-7)
    for w in hidden.trainable_weights + head.trainable_weights:
        np.testing.assert_allclose(as_np(tape.gradient(reversed_loss, w)), as_np(tape.gradient(plain_loss, w)),
                                   rtol=1e-4, atol=1e-7)
    for w in model.trainable_weights[:-2]:   # everything below the class output
        g_plain = as_np(tape.gradient(plain_loss, w))
        assert np.abs(g_plain).max() > 0
        np.testing.assert_allclose(as_np(tape.gradient(reversed_loss, w)), -0.4 * g_plain, rtol=1e-4, atol=1e-7)
    keras.backend.clear_session()


def _two_source_split(n: int = 48, seed: int = 0):
    from cxr.data.loader import SplitData

    rng = np.random.default_rng(seed)
    y = np.arange(n) % len(CLASSES)
    source = np.array(["site-a", "site-b"] * (n // 2), dtype=object)
    x = rng.integers(0, 255, (n, 24, 24, 1), dtype=np.uint8)
    x[source == "site-b", :3] = 255       # a source cue: a bright band at the top
    x[y == 0, 10:14, 10:14] = 0           # a class cue
    ids = np.array([f"p{i}" for i in range(n)], dtype=object)
    return SplitData(x=x, y=y.astype(np.int64), sha256=ids, patient_id=ids, path=ids, source=source)


def test_fit_with_the_adversary_returns_the_plain_classifier_seeded(tmp_path):
    import keras

    from cxr.models import store
    from cxr.train import set_seeds
    from cxr.train.keras_fit import train_keras
    from tests.train_data import TINY_CNN

    data = _two_source_split()
    train, val = data.subset(np.arange(36)), data.subset(np.arange(36, 48))
    conf = {**TINY_CNN, "source_adversary": {"enabled": True, "weight": 0.5, "hidden": 8}}
    spec = {"name": "cnn-adam", "family": "cnn", "optimizer": "adam"}
    weights = {"COVID": 1.0, "NORMAL": 2.0, "VIRAL": 1.0}
    runs = []
    for _ in range(2):
        set_seeds(7)
        model, history, _, details = train_keras(spec, train, val, conf, weights, 2, 7)
        runs.append([w.copy() for w in model.get_weights()])
        keras.backend.clear_session()
    assert all(np.array_equal(a, b) for a, b in zip(*runs))                 # one seed, one model
    assert isinstance(model, keras.Sequential) and model.output_shape == (None, len(CLASSES))
    assert not any("source" in layer.name or "reverse" in layer.name for layer in model.layers)
    assert set(history) >= {"loss", "accuracy", "val_loss", "val_accuracy", "source_accuracy"}
    assert details["source_adversary"]["sources"] == ["site-a", "site-b"]
    store.save_keras(model, tmp_path / "m", {"name": "cnn-adam", "family": "cnn"})
    loaded = keras.models.load_model(tmp_path / "m" / store.KERAS_FILE, safe_mode=True)
    np.testing.assert_allclose(loaded.predict(data.x[:4] / 255.0, verbose=0),
                               model.predict(data.x[:4] / 255.0, verbose=0), rtol=1e-6)
    with pytest.raises(ValueError, match="at least two sources"):
        one = data.subset(np.flatnonzero(data.source == "site-a"))
        train_keras(spec, one, one.subset(np.zeros(len(one), bool)), conf, weights, 1, 7)
    keras.backend.clear_session()
