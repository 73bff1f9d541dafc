"""Network behaviour the jobs rely on: training learns, repeats with a seed, predicts in batches."""

import numpy as np
import pytest

from cxr.nn import SGD, Adam, Dense, Flatten, Network, ReLU, Softmax, cnn, dnn


def blobs(n=300, seed=0):
    """Three classes told apart by which image quadrant is bright."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    x = rng.random((n, 8, 8, 1), dtype=np.float32) * 0.5
    for c, (r, k) in enumerate([(0, 0), (4, 4), (0, 4)]):
        x[y == c, r:r + 4, k:k + 4] += 0.5
    return x, y


def test_cnn_learns_and_history_is_keras_shaped():
    x, y = blobs()
    net = cnn((8, 8, 1), 3, filters=4, hidden=16, seed=0)
    hist = net.train(x[:200], y[:200], epochs=4, batch_size=16, optimizer=Adam(1e-2), seed=0,
                     validation_data=(x[200:], y[200:]))
    assert set(hist.history) == {"loss", "accuracy", "val_loss", "val_accuracy"}
    assert hist.epoch == [0, 1, 2, 3] and len(hist.times) == 4
    assert hist.history["loss"][-1] < hist.history["loss"][0]
    assert hist.history["val_accuracy"][-1] >= 0.95
    assert net.evaluate(x[200:], y[200:])[1] == pytest.approx(hist.history["val_accuracy"][-1])


def test_same_seed_same_result_other_seed_differs():
    x, y = blobs(120)

    def run(seed, shuffle_seed):
        net = dnn((8, 8, 1), 3, hidden=8, seed=seed)
        net.train(x, y, epochs=2, batch_size=10, optimizer=SGD(0.1), seed=shuffle_seed)
        return np.concatenate([w.ravel() for w in net.get_weights()])

    a, b = run(0, 0), run(0, 0)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, run(1, 0))  # other initial weights
    assert not np.array_equal(a, run(0, 1))  # other shuffling


def test_predict_proba_is_float32_batched_and_consistent():
    x, _ = blobs(37)
    net = cnn((8, 8, 1), 3, filters=2, hidden=4, seed=0)
    p = net.predict_proba(x, batch_size=5)
    assert p.shape == (37, 3) and p.dtype == np.float32
    np.testing.assert_allclose(p.sum(axis=1), 1, rtol=1e-5)
    np.testing.assert_allclose(p, net.predict_proba(x, batch_size=None), rtol=1e-6, atol=1e-7)
    assert np.array_equal(net.predict(x), p.argmax(1))
    assert net.predict_proba(x[:0]).shape == (0, 3)


def test_one_hot_targets_and_input_checks():
    x, y = blobs(20)
    net = dnn((8, 8, 1), 3, hidden=4)
    l1, _ = net.loss_and_grads(x, y)
    l2, _ = net.loss_and_grads(x, np.eye(3)[y])
    assert l1 == pytest.approx(l2)
    with pytest.raises(ValueError, match="network expects"):
        net.predict_proba(np.zeros((2, 7, 8, 1), np.float32))
    with pytest.raises(ValueError, match="labels must lie"):
        net.train(x, np.full(20, 3))


def test_lazy_build_and_initialisers_like_keras():
    net = Network(seed=0)
    for layer in (Flatten(), Dense(300), ReLU(), Dense(2), Softmax()):
        net.add_layer(layer)
    net.predict_proba(np.zeros((1, 10, 20, 1), np.float32))  # builds from the first input
    k = net.layers[1].params["kernel"]
    limit = np.sqrt(6 / (200 + 300))
    assert k.dtype == np.float32 and np.abs(k).max() <= limit
    assert k.std() == pytest.approx(limit / np.sqrt(3), rel=0.05)  # uniform, not normal
    assert not net.layers[1].params["bias"].any()


def test_conv_inference_in_chunks_equals_whole_batch():
    x, _ = blobs(23)
    net = cnn((8, 8, 1), 3, filters=3, hidden=4, padding="same", seed=1)
    whole = net.predict_proba(x, batch_size=None)
    net.layers[0].max_inference_cols_bytes = 3 * 8 * 8 * 9 * 4  # three samples per chunk
    np.testing.assert_allclose(net.predict_proba(x, batch_size=None), whole, rtol=1e-6, atol=1e-7)


def test_class_weight_equals_sample_weight_and_changes_training():
    x, y = blobs(90)

    def run(**kw):
        net = dnn((8, 8, 1), 3, hidden=6, seed=0)
        h = net.train(x, y, epochs=1, batch_size=30, optimizer=SGD(0.5), seed=0, **kw)
        return h.history["loss"][0], net.get_weights()[0]

    cw = {0: 1.0, 1: 3.0, 2: 0.5}
    l_cw, w_cw = run(class_weight=cw)
    l_sw, w_sw = run(sample_weight=np.array([cw[c] for c in y]))
    l_plain, w_plain = run()
    assert l_cw == pytest.approx(l_sw) and np.array_equal(w_cw, w_sw)
    assert not np.allclose(w_cw, w_plain)
