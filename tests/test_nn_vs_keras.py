"""A whole small CNN, forward and backward, against TensorFlow/Keras with the same weights."""

import os

import numpy as np
import pytest

from cxr.nn import Adam, Conv2D, Dense, DepthwiseConv2D, Flatten, MaxPool2D, Network, ReLU, Softmax
from cxr.nn.keras_compat import to_keras
from cxr.nn.losses import one_hot, softmax_cross_entropy

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")
try:
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
except RuntimeError:
    pass

N_CLASSES = 4


def small_cnn(seed=0):
    net = Network(input_shape=(9, 8, 2), seed=seed)
    for layer in (Conv2D(6, 3, padding="same"), ReLU(), DepthwiseConv2D((2, 3), depth_multiplier=2), ReLU(),
                  MaxPool2D(2), Conv2D(5, 2, padding="valid"), ReLU(), Flatten(), Dense(7), ReLU(),
                  Dense(N_CLASSES), Softmax()):
        net.add_layer(layer)
    return net


def data(n=6, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.random((n, 9, 8, 2), dtype=np.float32)
    y = rng.integers(0, N_CLASSES, n)
    return x, y


def randomise_biases(net, seed=2):
    # Keras-style zero biases would hide bias-gradient or bias-broadcast mistakes.
    rng = np.random.default_rng(seed)
    for layer in net.layers:
        if "bias" in layer.params:
            layer.params["bias"][...] = rng.normal(0, 0.1, layer.params["bias"].shape)


def keras_loss_and_grads(model, x, y):
    xt = tf.constant(x)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(xt)
        probs = model(xt, training=True)
        loss = keras.losses.CategoricalCrossentropy()(tf.one_hot(y, N_CLASSES), probs)
    grads = tape.gradient(loss, model.trainable_weights)
    dx = tape.gradient(loss, xt)
    return float(loss), probs.numpy(), [g.numpy() for g in grads], dx.numpy()


def test_weights_copy_straight_across_in_keras_order():
    net = small_cnn()
    model = to_keras(net)
    assert [tuple(w.shape) for w in model.get_weights()] == [w.shape for w in net.get_weights()]
    assert model.output_shape[1:] == net.output_shape


def test_forward_and_backward_match_keras():
    net = small_cnn()
    randomise_biases(net)
    model = to_keras(net)
    x, y = data()

    probs = net.predict_proba(x)
    k_loss, k_probs, k_grads, k_dx = keras_loss_and_grads(model, x, y)
    np.testing.assert_allclose(probs, k_probs, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.predict(x, verbose=0), probs, rtol=1e-5, atol=1e-6)

    loss, _ = net.loss_and_grads(x, y)
    assert loss == pytest.approx(k_loss, rel=1e-5)
    ours = [g for _, _, g in net.parameters()]
    assert len(ours) == len(k_grads) == 10
    for (key, _, g), kg in zip(net.parameters(), k_grads):
        scale = np.abs(kg).max()
        assert scale > 0, key
        np.testing.assert_allclose(g, kg, rtol=1e-4, atol=1e-5 * scale, err_msg=key)

    # gradient with respect to the input goes through every layer's dx path
    _, dlogits, _ = softmax_cross_entropy(net.forward(x, training=True, upto=-1), one_hot(y, N_CLASSES))
    dx = net.backward(dlogits, upto=-1)
    np.testing.assert_allclose(dx, k_dx, rtol=1e-4, atol=1e-5 * np.abs(k_dx).max())


def test_training_steps_match_keras_adam():
    net = small_cnn(seed=3)
    model = to_keras(net)
    x, y = data(n=8, seed=4)
    kopt = keras.optimizers.Adam(learning_rate=0.01)
    opt = Adam(learning_rate=0.01)
    losses = []
    for _ in range(4):
        with tf.GradientTape() as tape:
            k_loss = keras.losses.CategoricalCrossentropy()(tf.one_hot(y, N_CLASSES), model(x, training=True))
        kopt.apply_gradients(zip(tape.gradient(k_loss, model.trainable_weights), model.trainable_weights))
        hist = net.train(x, y, epochs=1, batch_size=len(x), optimizer=opt, shuffle=False)
        losses.append((hist.history["loss"][0], float(k_loss)))
    for ours, theirs in losses:
        assert ours == pytest.approx(theirs, rel=1e-4)
    assert losses[-1][0] < losses[0][0]  # it did learn something
    for w, kw in zip(net.get_weights(), model.get_weights()):
        np.testing.assert_allclose(w, kw, rtol=1e-4, atol=1e-5)


def test_weighted_loss_and_gradients_match_keras_sample_weight():
    net = small_cnn(seed=5)
    model = to_keras(net)
    x, y = data(n=7, seed=6)
    w = np.array([0.5, 2.0, 1.0, 3.0, 0.25, 1.5, 1.0], np.float32)
    with tf.GradientTape() as tape:
        k_loss = keras.losses.CategoricalCrossentropy()(tf.one_hot(y, N_CLASSES), model(x, training=True),
                                                        sample_weight=tf.constant(w))
    k_grads = tape.gradient(k_loss, model.trainable_weights)
    loss, _ = net.loss_and_grads(x, y, sample_weight=w)
    assert loss == pytest.approx(float(k_loss), rel=1e-5)
    for (key, _, g), kg in zip(net.parameters(), k_grads):
        np.testing.assert_allclose(g, kg.numpy(), rtol=1e-4, atol=1e-5 * np.abs(kg.numpy()).max(), err_msg=key)
