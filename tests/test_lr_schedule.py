"""train.lr_schedule: cosine decays the configured learning rate to 0 over exactly the fit's steps."""
from __future__ import annotations

import math

import numpy as np
import pytest

from tests.train_data import fit_tiny_cnn, pre_out  # noqa: F401 (fixture)


def test_cosine_follows_the_half_cosine_over_all_steps():
    from cxr.train.keras_fit import learning_rate

    schedule = learning_rate({"lr_schedule": "cosine"}, {"learning_rate": 0.01, "beta_1": 0.8}, 3, 5)
    assert schedule["beta_1"] == 0.8                                  # other settings pass through
    for step in (0, 4, 7.5, 11, 15):
        want = 0.5 * 0.01 * (1 + math.cos(math.pi * step / 15))
        assert float(schedule["learning_rate"](step)) == pytest.approx(want, abs=1e-9)
    assert learning_rate({}, {"learning_rate": 0.01}, 3, 5) == {"learning_rate": 0.01}
    with pytest.raises(ValueError, match="lr_schedule"):
        learning_rate({"lr_schedule": "step"}, None, 3, 5)


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_fit_ends_at_zero_learning_rate_only_with_cosine(pre_out, schedule, tmp_path):
    import keras

    model, _, train, details = fit_tiny_cnn(pre_out, {"lr_schedule": schedule}, None, 2)
    assert details["lr_schedule"] == schedule
    opt = model.optimizer
    assert int(opt.iterations.numpy()) == 2 * -(-len(train) // 16)
    assert float(keras.ops.convert_to_numpy(opt.learning_rate)) == pytest.approx(0.0 if schedule == "cosine" else 0.001, abs=1e-9)
    from cxr.models import store                                      # the schedule saves and loads safely
    store.save_keras(model, tmp_path / "m", {"name": "cnn-adam"})
    x = np.random.default_rng(0).random((2, *train.image_size, 1), dtype=np.float32)
    again = store.load_keras(tmp_path / "m" / store.KERAS_FILE)
    np.testing.assert_allclose(again.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6)
    keras.backend.clear_session()
