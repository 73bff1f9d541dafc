"""Every layer's backward pass against central differences in float64."""

import numpy as np
import pytest

from cxr.nn import (Conv2D, Dense, DepthwiseConv2D, Flatten, MaxPool2D, Network, ReLU, Softmax,
                    softmax_cross_entropy)

EPS = 1e-6


def numeric_grad(f, arr):
    """d f / d arr by central differences, perturbing arr in place."""
    g = np.zeros_like(arr)
    it = np.nditer(arr, flags=["multi_index"])
    for _ in it:
        i = it.multi_index
        old = arr[i]
        arr[i] = old + EPS
        fp = f()
        arr[i] = old - EPS
        fm = f()
        arr[i] = old
        g[i] = (fp - fm) / (2 * EPS)
    return g


def away_from_kinks(rng, shape):
    """Distinct values spaced >= 1e-2 apart and >= 5e-3 from zero: no ReLU kink or max-pool tie within EPS."""
    n = int(np.prod(shape))
    vals = (rng.permutation(n) - n / 2 + 0.5) * 1e-2
    return vals.reshape(shape) + rng.uniform(-1e-3, 1e-3, shape)


def check_layer(layer, in_shape, x=None, seed=0, batch=3, rtol=1e-5, atol=1e-7):
    rng = np.random.default_rng(seed)
    layer.build(in_shape, rng, np.float64)
    for p in layer.params.values():  # non-zero biases so their gradients matter too
        p[...] = rng.normal(size=p.shape)
    if x is None:
        x = rng.normal(size=(batch, *in_shape))
    y = layer.forward(x, training=True)
    assert y.shape == (x.shape[0], *layer.output_shape)
    assert y.dtype == np.float64
    r = rng.normal(size=y.shape)

    def f():
        return float((r * layer.forward(x)).sum())

    dx = layer.backward(r)
    assert dx.shape == x.shape
    np.testing.assert_allclose(dx, numeric_grad(f, x), rtol=rtol, atol=atol, err_msg="dL/dx")
    for name, p in layer.params.items():
        np.testing.assert_allclose(layer.grads[name], numeric_grad(f, p), rtol=rtol, atol=atol,
                                   err_msg=f"dL/d{name}")
    return layer


@pytest.mark.parametrize("padding", ["valid", "same"])
@pytest.mark.parametrize("kernel", [3, (2, 3), 1])
def test_conv2d(padding, kernel):
    check_layer(Conv2D(3, kernel, padding=padding), (5, 6, 2))


def test_conv2d_without_bias_and_without_dx():
    layer = check_layer(Conv2D(2, 2, use_bias=False), (4, 4, 1))
    assert set(layer.grads) == {"kernel"}
    layer.forward(np.ones((1, 4, 4, 1)), training=True)
    assert layer.backward(np.ones((1, 3, 3, 2)), need_dx=False) is None


@pytest.mark.parametrize("padding", ["valid", "same"])
@pytest.mark.parametrize("multiplier", [1, 2])
def test_depthwise_conv2d(padding, multiplier):
    check_layer(DepthwiseConv2D((3, 2), padding=padding, depth_multiplier=multiplier), (5, 4, 3))


@pytest.mark.parametrize("in_shape,pool", [((4, 6, 2), 2), ((5, 7, 3), 2), ((6, 6, 1), (3, 2))])
def test_maxpool2d(in_shape, pool):
    rng = np.random.default_rng(1)
    check_layer(MaxPool2D(pool), in_shape, x=away_from_kinks(rng, (2, *in_shape)))


def test_maxpool2d_ties_go_to_first_maximum_like_tensorflow():
    layer = MaxPool2D(2)
    layer.build((2, 2, 1))
    x = np.zeros((1, 2, 2, 1))
    layer.forward(x, training=True)
    dx = layer.backward(np.ones((1, 1, 1, 1)))
    assert dx[0, :, :, 0].tolist() == [[1, 0], [0, 0]]


def test_dense():
    check_layer(Dense(4), (7,))


def test_flatten_matches_row_major_nhwc_order():
    layer = check_layer(Flatten(), (2, 3, 4))
    x = np.arange(24.0).reshape(1, 2, 3, 4)
    assert layer.forward(x)[0].tolist() == list(range(24))


def test_relu():
    rng = np.random.default_rng(2)
    check_layer(ReLU(), (4, 5), x=away_from_kinks(rng, (3, 4, 5)))


def test_relu_gradient_at_zero_is_zero():
    layer = ReLU()
    layer.build((3,))
    layer.forward(np.array([[-1.0, 0.0, 2.0]]), training=True)
    assert layer.backward(np.ones((1, 3))).tolist() == [[0, 0, 1]]


def test_softmax():
    layer = check_layer(Softmax(), (5,))
    p = layer.forward(np.array([[1000.0, 0.0, -1000.0, 1000.0, 3.0]]))
    assert np.all(np.isfinite(p)) and p.sum() == pytest.approx(1.0)


def test_fused_softmax_cross_entropy():
    rng = np.random.default_rng(3)
    z = rng.normal(size=(4, 5))
    t = np.eye(5)[[0, 3, 3, 1]]
    loss, grad, p = softmax_cross_entropy(z, t)
    num = numeric_grad(lambda: softmax_cross_entropy(z, t)[0], z)
    np.testing.assert_allclose(grad, num, rtol=1e-6, atol=1e-9)
    ref = -np.mean(np.log((np.exp(z) / np.exp(z).sum(1, keepdims=True))[np.arange(4), [0, 3, 3, 1]]))
    assert loss == pytest.approx(ref, rel=1e-12)
    # stable where the naive formula overflows / takes log(0)
    big = np.array([[1e4, -1e4, 0.0]])
    loss, grad, _ = softmax_cross_entropy(big, np.array([[0.0, 1.0, 0.0]]))
    assert loss == pytest.approx(2e4) and np.all(np.isfinite(grad))


def test_whole_network_parameter_gradients():
    net = Network(input_shape=(6, 6, 2), seed=4, dtype=np.float64)
    for layer in (Conv2D(3, 3, padding="same"), ReLU(), DepthwiseConv2D(2), MaxPool2D(2), Flatten(),
                  Dense(5), ReLU(), Dense(3), Softmax()):
        net.add_layer(layer)
    rng = np.random.default_rng(5)
    x = rng.normal(size=(4, 6, 6, 2))
    y = np.array([0, 2, 1, 2])
    loss, _ = net.loss_and_grads(x, y)
    assert loss == pytest.approx(net.evaluate(x, y)[0], rel=1e-9)
    for key, p, g in net.parameters():
        num = numeric_grad(lambda: net.loss_and_grads(x, y)[0], p)
        net.loss_and_grads(x, y)
        np.testing.assert_allclose(g, num, rtol=1e-5, atol=1e-8, err_msg=key)


def test_weighted_softmax_cross_entropy():
    rng = np.random.default_rng(6)
    z = rng.normal(size=(5, 3))
    t = np.eye(3)[[0, 1, 2, 2, 1]]
    w = np.array([1.0, 0.5, 2.0, 0.0, 3.0])
    loss, grad, _ = softmax_cross_entropy(z, t, w)
    np.testing.assert_allclose(grad, numeric_grad(lambda: softmax_cross_entropy(z, t, w)[0], z), rtol=1e-6, atol=1e-9)
    unweighted = softmax_cross_entropy(z, t)[0]
    assert loss != pytest.approx(unweighted)
    assert not grad[3].any()  # a zero-weight sample contributes nothing
