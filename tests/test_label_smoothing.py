"""train.label_smoothing: the Keras fit's loss is the class-weighted cross-entropy against smoothed targets,
checked against the same sum in NumPy on the model's own predictions."""
from __future__ import annotations

import numpy as np
import pytest

from cxr import CLASSES
from cxr.data.loader import load_split
from tests.train_data import fit_tiny_cnn, pre_out  # noqa: F401 (fixture)

CW = {"COVID": 1.0, "NORMAL": 2.0, "VIRAL": 0.5}
FROZEN = {"optimizer_config": {"adam": {"learning_rate": 0.0}}}    # the model does not move: one fixed p


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_reported_loss_is_the_weighted_cross_entropy_against_smoothed_targets(pre_out, smoothing):
    import keras

    model, history, _, details = fit_tiny_cnn(pre_out, {**FROZEN, "label_smoothing": smoothing}, CW, 1)
    assert details["label_smoothing"] == smoothing
    memory = load_split(str(pre_out), "train")
    p = model.predict(memory.x, batch_size=64, verbose=0).astype(np.float64)
    k = len(CLASSES)
    target = np.eye(k)[memory.y] * (1.0 - smoothing) + smoothing / k
    ce = -(target * np.log(p)).sum(axis=1)
    w = np.asarray([CW[c] for c in CLASSES])[memory.y]
    assert history["loss"][0] == pytest.approx(float((w * ce).mean()), rel=1e-4)
    if smoothing:                                              # not the plain cross-entropy
        plain = -np.log(p[np.arange(len(p)), memory.y])
        assert history["loss"][0] != pytest.approx(float((w * plain).mean()), rel=1e-3)
    keras.backend.clear_session()


def test_label_smoothing_out_of_range_is_refused():
    from cxr.train.keras_fit import label_smoothing

    assert label_smoothing({}) == 0.0
    with pytest.raises(ValueError, match="label_smoothing"):
        label_smoothing({"label_smoothing": 1.0})
