"""Layers for the from-scratch network, NHWC like Keras so weights copy across unchanged.

Every layer works on a whole batch at once: convolutions are im2col + one matmul, pooling is a
reshape. The only Python loops are over kernel offsets (9 for a 3x3 kernel), never over samples
or pixels. A layer keeps what backward needs only when forward is called with ``training=True``,
and inference leaves the layer untouched, so threads can share one network for prediction.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


# --------------------------------------------------------------------------- initialisers
def glorot_uniform(shape, fan_in, fan_out, rng, dtype):
    """Keras' default kernel initialiser: U(-l, l), l = sqrt(6 / (fan_in + fan_out))."""
    limit = np.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-limit, limit, size=shape).astype(dtype)


def _keras_fans(shape):
    """Fans exactly as keras.initializers compute them (conv kernels count the receptive field)."""
    if len(shape) == 2:
        return shape[0], shape[1]
    receptive = int(np.prod(shape[:-2]))
    return shape[-2] * receptive, shape[-1] * receptive


def _pair(v):
    if isinstance(v, (tuple, list)):
        if len(v) != 2:
            raise ValueError(f"expected an int or a pair, got {v!r}")
        return int(v[0]), int(v[1])
    return int(v), int(v)


def _same_pads(k):
    """TF/Keras 'same' at stride 1: the odd pixel of an even kernel goes at the end."""
    before = (k - 1) // 2
    return before, k - 1 - before


# --------------------------------------------------------------------------- base class
class Layer:
    """A batch-in, batch-out block with forward/backward and named params/grads."""

    trainable = False

    def __init__(self):
        self.params: dict[str, np.ndarray] = {}
        self.grads: dict[str, np.ndarray] = {}
        self.input_shape: tuple | None = None  # per sample, without the batch axis
        self.output_shape: tuple | None = None
        self.dtype = np.dtype(np.float32)
        self._cache = None

    # The architecture JSON stores type(layer).__name__ + get_config(); from_config rebuilds.
    def get_config(self) -> dict:
        return {}

    @classmethod
    def from_config(cls, config: dict) -> "Layer":
        return cls(**config)

    def build(self, input_shape, rng=None, dtype=np.float32) -> tuple:
        """Create parameters for a per-sample input shape; returns the per-sample output shape."""
        self.input_shape = tuple(int(s) for s in input_shape)
        self.dtype = np.dtype(dtype)
        self.output_shape = self.compute_output_shape(self.input_shape)
        self._init_params(rng if rng is not None else np.random.default_rng(), self.dtype)
        self.grads = {k: np.zeros_like(v) for k, v in self.params.items()}
        return self.output_shape

    def param_shapes(self) -> dict[str, tuple]:
        return {k: tuple(v.shape) for k, v in self.params.items()}

    def compute_output_shape(self, input_shape) -> tuple:
        return tuple(input_shape)

    def _init_params(self, rng, dtype):
        pass

    def forward(self, x: np.ndarray, training: bool = False) -> np.ndarray:
        raise NotImplementedError

    def backward(self, dy: np.ndarray, need_dx: bool = True) -> np.ndarray | None:
        """Fill self.grads from the upstream gradient; return dL/dx unless need_dx is False."""
        raise NotImplementedError

    def __repr__(self):
        cfg = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({cfg})"

    def _need_cache(self):
        if self._cache is None:
            raise RuntimeError(f"{type(self).__name__}.backward called without forward(training=True)")
        return self._cache


# --------------------------------------------------------------------------- convolutions
def _pad_input(x, kh, kw, padding):
    if padding == "valid":
        return x
    (t, b), (l, r) = _same_pads(kh), _same_pads(kw)
    return np.pad(x, ((0, 0), (t, b), (l, r), (0, 0)))


def _out_hw(h, w, kh, kw, padding):
    if padding == "same":
        return h, w
    return h - kh + 1, w - kw + 1


def _unpad(dxp, kh, kw, padding, h, w):
    if padding == "valid":
        return dxp
    t, l = _same_pads(kh)[0], _same_pads(kw)[0]
    return dxp[:, t:t + h, l:l + w, :]


class Conv2D(Layer):
    """2-D convolution, stride 1, kernel (kh, kw, in, out) as in keras.layers.Conv2D."""

    trainable = True

    def __init__(self, filters: int, kernel_size=3, padding: str = "valid", use_bias: bool = True):
        super().__init__()
        if padding not in ("valid", "same"):
            raise ValueError(f"padding must be 'valid' or 'same', got {padding!r}")
        self.filters = int(filters)
        self.kernel_size = _pair(kernel_size)
        self.padding = padding
        self.use_bias = bool(use_bias)

    def get_config(self):
        return {"filters": self.filters, "kernel_size": list(self.kernel_size),
                "padding": self.padding, "use_bias": self.use_bias}

    def compute_output_shape(self, input_shape):
        if len(input_shape) != 3:
            raise ValueError(f"Conv2D needs (H, W, C) inputs, got {input_shape}")
        h, w, _ = input_shape
        kh, kw = self.kernel_size
        ho, wo = _out_hw(h, w, kh, kw, self.padding)
        if ho < 1 or wo < 1:
            raise ValueError(f"kernel {self.kernel_size} larger than input {input_shape}")
        return (ho, wo, self.filters)

    def _init_params(self, rng, dtype):
        kh, kw = self.kernel_size
        shape = (kh, kw, self.input_shape[-1], self.filters)
        self.params = {"kernel": glorot_uniform(shape, *_keras_fans(shape), rng, dtype)}
        if self.use_bias:
            self.params["bias"] = np.zeros(self.filters, dtype)

    def _im2col(self, x):
        kh, kw = self.kernel_size
        xp = _pad_input(x, kh, kw, self.padding)
        n, _, _, c = xp.shape
        ho, wo = xp.shape[1] - kh + 1, xp.shape[2] - kw + 1
        # (N*Ho*Wo, kh*kw*C), columns ordered like the reshaped kernel. One strided block copy per
        # kernel offset is about twice as fast as copying a transposed sliding_window_view.
        cols = np.empty((n, ho, wo, kh * kw, c), dtype=x.dtype)
        for i in range(kh):
            for j in range(kw):
                cols[:, :, :, i * kw + j, :] = xp[:, i:i + ho, j:j + wo, :]
        return cols.reshape(n * ho * wo, kh * kw * c), (n, ho, wo)

    # Inference on big images goes through im2col in sample chunks so the column matrix stays
    # below this size; training keeps the whole batch's columns for the kernel gradient.
    max_inference_cols_bytes = 64 * 2**20

    def forward(self, x, training=False):
        kh, kw = self.kernel_size
        per_sample = np.prod(self.compute_output_shape(x.shape[1:])[:2]) * kh * kw * x.shape[3] * x.itemsize
        chunk = max(1, int(self.max_inference_cols_bytes // max(per_sample, 1)))
        if not training and x.shape[0] > chunk:
            return np.concatenate([self._forward(x[i:i + chunk], False) for i in range(0, x.shape[0], chunk)])
        return self._forward(x, training)

    def _forward(self, x, training):
        cols, (n, ho, wo) = self._im2col(x)
        k = self.params["kernel"]
        y = cols @ k.reshape(-1, self.filters)
        if self.use_bias:
            y += self.params["bias"]
        if training:
            self._cache = (x.shape, cols)
        return y.reshape(n, ho, wo, self.filters)

    def backward(self, dy, need_dx=True):
        x_shape, cols = self._need_cache()
        kh, kw = self.kernel_size
        k = self.params["kernel"]
        dy2 = dy.reshape(-1, self.filters)
        # Gradients go into the arrays allocated at build time: the optimizer holds references
        # to them, and rewriting big arrays in place avoids a fresh allocation every step.
        np.matmul(cols.T, dy2, out=self.grads["kernel"].reshape(-1, self.filters))
        if self.use_bias:
            np.sum(dy2, axis=0, out=self.grads["bias"])
        if not need_dx:
            return None
        n, h, w, c = x_shape
        ho, wo = dy.shape[1], dy.shape[2]
        dcols = (dy2 @ k.reshape(-1, self.filters).T).reshape(n, ho, wo, kh, kw, c)
        hp, wp = ho + kh - 1, wo + kw - 1
        dxp = np.zeros((n, hp, wp, c), dtype=dy.dtype)
        for i in range(kh):  # col2im: one strided add per kernel offset
            for j in range(kw):
                dxp[:, i:i + ho, j:j + wo, :] += dcols[:, :, :, i, j, :]
        return _unpad(dxp, kh, kw, self.padding, h, w)


class DepthwiseConv2D(Layer):
    """Per-channel convolution, kernel (kh, kw, C, depth_multiplier) as in Keras.

    Output channel c * depth_multiplier + m comes from input channel c, the order TF uses.
    """

    trainable = True

    def __init__(self, kernel_size=3, padding: str = "valid", depth_multiplier: int = 1,
                 use_bias: bool = True):
        super().__init__()
        if padding not in ("valid", "same"):
            raise ValueError(f"padding must be 'valid' or 'same', got {padding!r}")
        self.kernel_size = _pair(kernel_size)
        self.padding = padding
        self.depth_multiplier = int(depth_multiplier)
        self.use_bias = bool(use_bias)

    def get_config(self):
        return {"kernel_size": list(self.kernel_size), "padding": self.padding,
                "depth_multiplier": self.depth_multiplier, "use_bias": self.use_bias}

    def compute_output_shape(self, input_shape):
        if len(input_shape) != 3:
            raise ValueError(f"DepthwiseConv2D needs (H, W, C) inputs, got {input_shape}")
        h, w, c = input_shape
        kh, kw = self.kernel_size
        ho, wo = _out_hw(h, w, kh, kw, self.padding)
        if ho < 1 or wo < 1:
            raise ValueError(f"kernel {self.kernel_size} larger than input {input_shape}")
        return (ho, wo, c * self.depth_multiplier)

    def _init_params(self, rng, dtype):
        kh, kw = self.kernel_size
        c = self.input_shape[-1]
        shape = (kh, kw, c, self.depth_multiplier)
        self.params = {"kernel": glorot_uniform(shape, *_keras_fans(shape), rng, dtype)}
        if self.use_bias:
            self.params["bias"] = np.zeros(c * self.depth_multiplier, dtype)

    def forward(self, x, training=False):
        kh, kw = self.kernel_size
        xp = _pad_input(x, kh, kw, self.padding)
        win = sliding_window_view(xp, (kh, kw), axis=(1, 2))  # (N, Ho, Wo, C, kh, kw)
        y = np.einsum("nhwcij,ijcm->nhwcm", win, self.params["kernel"], optimize=True)
        n, ho, wo, c, m = y.shape
        y = y.reshape(n, ho, wo, c * m)
        if self.use_bias:
            y += self.params["bias"]
        if training:
            self._cache = (x.shape, xp)
        return y

    def backward(self, dy, need_dx=True):
        x_shape, xp = self._need_cache()
        kh, kw = self.kernel_size
        k = self.params["kernel"]
        n, ho, wo, _ = dy.shape
        c, m = k.shape[2], k.shape[3]
        dy5 = dy.reshape(n, ho, wo, c, m)
        win = sliding_window_view(xp, (kh, kw), axis=(1, 2))
        self.grads["kernel"][...] = np.einsum("nhwcij,nhwcm->ijcm", win, dy5, optimize=True)
        if self.use_bias:
            np.sum(dy.reshape(-1, c * m), axis=0, out=self.grads["bias"])
        if not need_dx:
            return None
        dxp = np.zeros(xp.shape, dtype=dy.dtype)
        for i in range(kh):
            for j in range(kw):
                dxp[:, i:i + ho, j:j + wo, :] += np.einsum("nhwcm,cm->nhwc", dy5, k[i, j])
        return _unpad(dxp, kh, kw, self.padding, x_shape[1], x_shape[2])


# --------------------------------------------------------------------------- pooling / reshaping
class MaxPool2D(Layer):
    """Non-overlapping max pooling (strides = pool size, 'valid'), Keras' default setting.

    The gradient goes to the first maximum of each window, as TF's MaxPoolGrad does.
    """

    def __init__(self, pool_size=2):
        super().__init__()
        self.pool_size = _pair(pool_size)

    def get_config(self):
        return {"pool_size": list(self.pool_size)}

    def compute_output_shape(self, input_shape):
        if len(input_shape) != 3:
            raise ValueError(f"MaxPool2D needs (H, W, C) inputs, got {input_shape}")
        h, w, c = input_shape
        ph, pw = self.pool_size
        if h < ph or w < pw:
            raise ValueError(f"pool {self.pool_size} larger than input {input_shape}")
        return (h // ph, w // pw, c)

    def forward(self, x, training=False):
        n, h, w, c = x.shape
        ph, pw = self.pool_size
        ho, wo = h // ph, w // pw
        # Pairwise maxima of reshaped views: several times faster than .max(axis=(2, 4)).
        rows = x[:, :ho * ph, :wo * pw, :].reshape(n, ho, ph, wo * pw * c)
        y = rows[:, :, 0]
        for a in range(1, ph):
            y = np.maximum(y, rows[:, :, a])
        cols = y.reshape(n, ho, wo, pw, c)
        y = cols[:, :, :, 0]
        for b in range(1, pw):
            y = np.maximum(y, cols[:, :, :, b])
        y = np.ascontiguousarray(y)
        if training:
            self._cache = (x, y)
        return y

    def backward(self, dy, need_dx=True):
        x, y = self._need_cache()
        if not need_dx:
            return None
        ph, pw = self.pool_size
        ho, wo = y.shape[1], y.shape[2]
        dx = np.zeros(x.shape, dtype=dy.dtype)
        taken = None
        for a in range(ph):  # window offsets in row-major order, so the first maximum wins
            for b in range(pw):
                hit = x[:, a:ho * ph:ph, b:wo * pw:pw, :] == y
                if taken is None:
                    taken = hit
                else:
                    np.greater(hit, taken, out=hit)  # a maximum here, and none at an earlier offset
                    taken |= hit
                np.multiply(dy, hit, out=dx[:, a:ho * ph:ph, b:wo * pw:pw, :])
        return dx


class Flatten(Layer):
    """Row-major flatten of (H, W, C): the same feature order as keras.layers.Flatten on NHWC."""

    def compute_output_shape(self, input_shape):
        return (int(np.prod(input_shape)),)

    def forward(self, x, training=False):
        if training:
            self._cache = x.shape
        return x.reshape(x.shape[0], -1)

    def backward(self, dy, need_dx=True):
        shape = self._need_cache()
        return dy.reshape(shape) if need_dx else None


# --------------------------------------------------------------------------- dense / activations
class Dense(Layer):
    """Fully connected layer, kernel (in, out) as in keras.layers.Dense; no built-in activation."""

    trainable = True

    def __init__(self, units: int, use_bias: bool = True):
        super().__init__()
        self.units = int(units)
        self.use_bias = bool(use_bias)

    def get_config(self):
        return {"units": self.units, "use_bias": self.use_bias}

    def compute_output_shape(self, input_shape):
        if len(input_shape) != 1:
            raise ValueError(f"Dense needs flat inputs (add Flatten first), got {input_shape}")
        return (self.units,)

    def _init_params(self, rng, dtype):
        shape = (self.input_shape[0], self.units)
        self.params = {"kernel": glorot_uniform(shape, *shape, rng, dtype)}
        if self.use_bias:
            self.params["bias"] = np.zeros(self.units, dtype)

    def forward(self, x, training=False):
        y = x @ self.params["kernel"]
        if self.use_bias:
            y += self.params["bias"]
        if training:
            self._cache = x
        return y

    def backward(self, dy, need_dx=True):
        x = self._need_cache()
        np.matmul(x.T, dy, out=self.grads["kernel"])
        if self.use_bias:
            np.sum(dy, axis=0, out=self.grads["bias"])
        return dy @ self.params["kernel"].T if need_dx else None


class ReLU(Layer):
    """max(x, 0); the gradient at exactly 0 is 0, as in TensorFlow."""

    def forward(self, x, training=False):
        y = np.maximum(x, 0)
        if training:
            self._cache = y
        return y

    def backward(self, dy, need_dx=True):
        y = self._need_cache()
        return dy * (y > 0) if need_dx else None


def softmax(z: np.ndarray) -> np.ndarray:
    """Row softmax that cannot overflow: shift by the row max first."""
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    e /= e.sum(axis=-1, keepdims=True)
    return e


class Softmax(Layer):
    """Probabilities over the last axis.

    Network.train skips this layer's backward and uses the fused softmax-cross-entropy gradient
    (p - y) / N, which is exact and stable; backward here is the general Jacobian product.
    """

    def forward(self, x, training=False):
        y = softmax(x)
        if training:
            self._cache = y
        return y

    def backward(self, dy, need_dx=True):
        y = self._need_cache()
        if not need_dx:
            return None
        return y * (dy - (dy * y).sum(axis=-1, keepdims=True))


LAYER_TYPES: dict[str, type[Layer]] = {
    cls.__name__: cls
    for cls in (Conv2D, DepthwiseConv2D, MaxPool2D, Flatten, Dense, ReLU, Softmax)
}
