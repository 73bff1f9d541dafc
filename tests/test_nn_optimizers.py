"""Each optimizer, several steps, against keras.optimizers from the same weights and gradients."""

import os

import numpy as np
import pytest

from cxr.nn import SGD, Adadelta, Adagrad, Adam, RMSprop
from cxr.nn import optimizers as opt_mod

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")
try:
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
except RuntimeError:  # TF already initialised by another test module: keep its setting
    pass

STEPS = 6
CASES = [
    ("SGD", {}),
    ("SGD", {"learning_rate": 0.1, "momentum": 0.9}),
    ("SGD", {"learning_rate": 0.1, "momentum": 0.9, "nesterov": True}),
    ("Adagrad", {}),
    ("Adagrad", {"learning_rate": 0.1, "initial_accumulator_value": 0.5}),
    ("Adadelta", {}),
    ("Adadelta", {"learning_rate": 1.0, "rho": 0.9}),
    ("RMSprop", {}),
    ("RMSprop", {"learning_rate": 0.01, "momentum": 0.5, "centered": True}),
    ("Adam", {}),
    ("Adam", {"learning_rate": 0.01, "amsgrad": True}),
]


@pytest.mark.parametrize("name,kwargs", CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_steps_match_keras(name, kwargs):
    rng = np.random.default_rng(len(kwargs) * 7 + len(name))
    w0 = [rng.normal(size=(3, 4)).astype(np.float32), rng.normal(size=(5,)).astype(np.float32)]
    ours = [w.copy() for w in w0]
    theirs = [tf.Variable(w) for w in w0]
    opt = getattr(opt_mod, name)(**kwargs)
    kopt = getattr(keras.optimizers, name)(**kwargs)
    for _ in range(STEPS):
        grads = [rng.normal(size=w.shape).astype(np.float32) * 0.5 for w in w0]
        opt.step((f"w{i}", w, g) for i, (w, g) in enumerate(zip(ours, grads)))
        kopt.apply_gradients([(tf.constant(g), v) for g, v in zip(grads, theirs)])
        for i, (w, v) in enumerate(zip(ours, theirs)):
            kw = v.numpy()
            assert w.dtype == np.float32
            np.testing.assert_allclose(w, kw, rtol=1e-5, atol=1e-7, err_msg=f"{name} weights {i}")
            # The weights could agree just because steps are small: the accumulated change must agree too.
            np.testing.assert_allclose(w - w0[i], kw - w0[i], rtol=2e-3, atol=2e-6, err_msg=f"{name} delta {i}")
    assert opt.iterations == STEPS == int(kopt.iterations.numpy())
    assert all(not np.allclose(w, w_init) for w, w_init in zip(ours, w0))


def test_defaults_are_keras_defaults():
    for ours in (SGD(), Adagrad(), Adadelta(), RMSprop(), Adam()):
        theirs = getattr(keras.optimizers, type(ours).__name__)().get_config()
        for key, value in ours.get_config().items():
            assert theirs[key] == pytest.approx(value), (type(ours).__name__, key)


def test_state_is_kept_per_parameter_and_shapes_checked():
    opt = Adam()
    a, b = np.ones(3, np.float32), np.ones(3, np.float32)
    opt.step([("a", a, np.ones(3, np.float32)), ("b", b, -np.ones(3, np.float32))])
    assert set(opt.state) == {"a", "b"}
    assert np.all(a < 1) and np.all(b > 1)
    with pytest.raises(ValueError, match="gradient shape"):
        opt.step([("a", a, np.ones(4, np.float32))])
    with pytest.raises(ValueError, match="unknown optimizer"):
        opt_mod.get("lbfgs")
    assert isinstance(opt_mod.get("rmsprop", learning_rate=0.1), RMSprop)
