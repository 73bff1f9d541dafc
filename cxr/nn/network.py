"""A sequential network: add_layer, train, predict, predict_proba, evaluate."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from . import optimizers as _opt
from .layers import Layer, Softmax, softmax
from .losses import categorical_crossentropy, one_hot, softmax_cross_entropy


@dataclass
class History:
    """Per-epoch record shaped like keras.callbacks.History (``history.history['loss']``)."""

    history: dict[str, list[float]] = field(default_factory=dict)
    epoch: list[int] = field(default_factory=list)
    times: list[float] = field(default_factory=list)  # wall seconds of each epoch's training pass
    params: dict = field(default_factory=dict)

    def _log(self, epoch, seconds, **metrics):
        self.epoch.append(epoch)
        self.times.append(seconds)
        for k, v in metrics.items():
            self.history.setdefault(k, []).append(float(v))


class Network:
    """Layers in a row. Built lazily from the first input unless ``input_shape`` is given.

    The last layer is normally Softmax: training then uses the fused softmax/cross-entropy
    gradient on the logits, and predict_proba returns its output directly.
    """

    def __init__(self, input_shape=None, seed: int | None = 0, dtype=np.float32):
        self.layers: list[Layer] = []
        self.input_shape = tuple(int(s) for s in input_shape) if input_shape is not None else None
        self.dtype = np.dtype(dtype)
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        self.built = False
        self.optimizer: _opt.Optimizer | None = None

    # ------------------------------------------------------------------ structure
    def add_layer(self, layer: Layer) -> "Network":
        if not isinstance(layer, Layer):
            raise TypeError(f"expected a cxr.nn Layer, got {type(layer).__name__}")
        if self.built:
            layer.build(self.layers[-1].output_shape if self.layers else self.input_shape,
                        self.rng, self.dtype)
        self.layers.append(layer)
        return self

    add = add_layer

    def build(self, input_shape=None) -> "Network":
        """Create every layer's weights (Glorot uniform kernels, zero biases) from the seeded rng."""
        if input_shape is not None:
            self.input_shape = tuple(int(s) for s in input_shape)
        if self.input_shape is None:
            raise ValueError("input_shape unknown: pass it to Network(...) or build(), or call with data")
        shape = self.input_shape
        for layer in self.layers:
            shape = layer.build(shape, self.rng, self.dtype)
        self.built = True
        return self

    @property
    def output_shape(self):
        self._ensure_built()
        return self.layers[-1].output_shape if self.layers else self.input_shape

    def _ensure_built(self, x=None):
        if not self.built:
            self.build(None if x is None or self.input_shape is not None else x.shape[1:])
        if x is not None and tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"input samples have shape {tuple(x.shape[1:])}, network expects {self.input_shape}")

    def parameters(self):
        """(key, param, grad) triples in layer order; keys like '0_Conv2D/kernel'."""
        for i, layer in enumerate(self.layers):
            for name, p in layer.params.items():
                yield f"{i}_{type(layer).__name__}/{name}", p, layer.grads[name]

    def get_weights(self) -> list[np.ndarray]:
        """Keras order: for each layer with weights, kernel then bias."""
        return [p for layer in self.layers for p in layer.params.values()]

    def set_weights(self, weights) -> None:
        self._ensure_built()
        weights = list(weights)
        slots = [(layer, name) for layer in self.layers for name in layer.params]
        if len(weights) != len(slots):
            raise ValueError(f"expected {len(slots)} arrays, got {len(weights)}")
        for (layer, name), w in zip(slots, weights):
            w = np.asarray(w)
            if w.shape != layer.params[name].shape:
                raise ValueError(f"{type(layer).__name__}.{name}: shape {w.shape} != {layer.params[name].shape}")
            layer.params[name][...] = w

    def count_params(self) -> int:
        self._ensure_built()
        return int(sum(p.size for p in self.get_weights()))

    def summary(self) -> str:
        self._ensure_built()
        lines = [f"input {self.input_shape}"]
        for i, layer in enumerate(self.layers):
            n = sum(p.size for p in layer.params.values())
            lines.append(f"{i:2d} {layer!r:<55} -> {layer.output_shape}  params={n}")
        lines.append(f"total params {self.count_params()}")
        return "\n".join(lines)

    # ------------------------------------------------------------------ passes
    def _fused(self) -> bool:
        return bool(self.layers) and isinstance(self.layers[-1], Softmax)

    def forward(self, x: np.ndarray, training: bool = False, upto: int | None = None) -> np.ndarray:
        x = np.asarray(x, dtype=self.dtype)
        self._ensure_built(x)
        for layer in self.layers[:upto]:
            x = layer.forward(x, training=training)
        return x

    def backward(self, dy: np.ndarray, upto: int | None = None, need_input_grad: bool = True):
        """Backpropagate from the output of layers[:upto], filling every layer's grads.

        Returns dL/dinput, or None with need_input_grad=False, which skips the first layer's
        input gradient (training never uses it, and for a first conv layer it is the dearest part).
        """
        layers = self.layers[:upto]
        for i in range(len(layers) - 1, -1, -1):
            dy = layers[i].backward(dy, need_dx=need_input_grad or i > 0)
        return dy

    def loss_and_grads(self, x, targets, sample_weight=None):
        """Mean cross-entropy of a batch and all parameter gradients (in layer.grads).

        targets: integer labels (N,) or one-hot/soft targets (N, K); sample_weight: (N,) or None.
        """
        x = np.asarray(x, dtype=self.dtype)
        self._ensure_built(x)
        targets = self._targets(targets)
        if not self._fused():
            raise ValueError("training needs a Softmax as the last layer (cross-entropy on its logits)")
        logits = self.forward(x, training=True, upto=-1)
        loss, dlogits, probs = softmax_cross_entropy(logits, targets, sample_weight)
        self.backward(dlogits, upto=-1, need_input_grad=False)
        return loss, probs

    def _targets(self, y):
        y = np.asarray(y)
        k = self.output_shape[-1]
        if y.ndim == 1:
            return one_hot(y, k, self.dtype)
        if y.ndim != 2 or y.shape[1] != k:
            raise ValueError(f"targets must be labels (N,) or one-hot (N, {k}), got {y.shape}")
        return y.astype(self.dtype, copy=False)

    # ------------------------------------------------------------------ training
    def train(self, x, y, epochs: int = 1, batch_size: int = 32, optimizer="adam",
              validation_data=None, shuffle: bool = True, seed: int | None = None,
              verbose: int = 0, callback=None, class_weight=None, sample_weight=None) -> History:
        """Minibatch training on mean categorical cross-entropy; returns a Keras-like History.

        optimizer: an Optimizer or a name; the same object keeps its state across calls.
        seed: seeds the shuffling generator (default: the network's generator), so runs repeat.
        class_weight ({class index: weight}) / sample_weight ((N,)) weight each sample's loss as Keras
        does (sum(w * ce) / batch size); accuracy is then weighted too.
        Loss/accuracy per epoch are the mean over the epoch's samples of the batch values, as Keras logs.
        """
        x = np.asarray(x, dtype=self.dtype)
        self._ensure_built(x)
        targets = self._targets(y)
        if len(x) != len(targets):
            raise ValueError(f"{len(x)} inputs but {len(targets)} targets")
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.optimizer = _opt.get(optimizer)
        rng = np.random.default_rng(seed) if seed is not None else self.rng
        labels = targets.argmax(axis=1)
        n = len(x)
        weights = None
        if class_weight is not None or sample_weight is not None:
            weights = np.ones(n, self.dtype)
            if class_weight is not None:
                cw = np.ones(targets.shape[1], self.dtype)
                for c, w in dict(class_weight).items():
                    cw[int(c)] = w
                weights *= cw[labels]
            if sample_weight is not None:
                sw = np.asarray(sample_weight, self.dtype)
                if sw.shape != (n,):
                    raise ValueError(f"sample_weight must have shape ({n},), got {sw.shape}")
                weights *= sw
        hist = History(params={"epochs": epochs, "batch_size": batch_size, "samples": n,
                               "optimizer": repr(self.optimizer)})
        for epoch in range(epochs):
            t0 = time.perf_counter()
            order = rng.permutation(n) if shuffle else np.arange(n)
            loss_sum, correct, seen = 0.0, 0.0, 0.0
            for start in range(0, n, batch_size):
                idx = order[start:start + batch_size]
                wb = None if weights is None else weights[idx]
                loss, probs = self.loss_and_grads(x[idx], targets[idx], wb)
                self.optimizer.step(self.parameters())
                loss_sum += loss * len(idx)
                hits = probs.argmax(axis=1) == labels[idx]
                correct += float(hits.sum() if wb is None else (wb * hits).sum())
                seen += len(idx) if wb is None else float(wb.sum())
            seconds = time.perf_counter() - t0
            metrics = {"loss": loss_sum / n, "accuracy": correct / seen if seen else 0.0}
            if validation_data is not None:
                vl, va = self.evaluate(*validation_data, batch_size=max(batch_size, 256))
                metrics.update(val_loss=vl, val_accuracy=va)
            hist._log(epoch, seconds, **metrics)
            if verbose:
                shown = " ".join(f"{k}={v:.4f}" for k, v in metrics.items())
                print(f"epoch {epoch + 1}/{epochs} {seconds:.2f}s {shown}", flush=True)
            if callback is not None:
                callback(epoch, metrics)
        return hist

    # ------------------------------------------------------------------ inference
    def _batched(self, x, batch_size, upto=None):
        x = np.asarray(x)
        self._ensure_built(x)
        bs = len(x) if not batch_size else int(batch_size)
        outs = [self.forward(x[i:i + bs], upto=upto) for i in range(0, len(x), bs)]
        if not outs:
            return np.zeros((0, *self.output_shape), self.dtype)
        return np.concatenate(outs)

    def predict_proba(self, x, batch_size: int | None = 128) -> np.ndarray:
        """Class probabilities (N, K) float32, computed batch by batch to bound memory."""
        out = self._batched(x, batch_size)
        if not self._fused():
            out = softmax(out)
        return out.astype(np.float32, copy=False)

    def predict(self, x, batch_size: int | None = 128) -> np.ndarray:
        """Predicted class indices (N,)."""
        return self.predict_proba(x, batch_size).argmax(axis=1)

    def evaluate(self, x, y, batch_size: int | None = 256):
        """(mean cross-entropy, accuracy), in the network's dtype, on data it does not train on."""
        t = self._targets(y)
        if self._fused():
            loss, _, p = softmax_cross_entropy(self._batched(x, batch_size, upto=-1), t)
        else:
            p = self._batched(x, batch_size)
            loss = categorical_crossentropy(p, t)
        return loss, float((p.argmax(1) == t.argmax(1)).mean())

    def __repr__(self):
        return f"Network(input_shape={self.input_shape}, layers={self.layers!r})"
