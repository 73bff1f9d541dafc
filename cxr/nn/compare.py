"""Train one architecture three ways (cxr.nn, Keras, PyTorch) under one protocol, and time it.

The MNIST study and the benchmark both need "the same model, the same data, the same
hyper-parameters, in each framework"; this keeps that in one place. Keras and PyTorch are
imported only when their runner is called, and PyTorch is optional.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np

from .network import Network
from .optimizers import Adam


@dataclass
class RunResult:
    framework: str
    test_accuracy: float
    test_loss: float
    loss: list[float] = field(default_factory=list)  # per epoch, mean over the epoch's batches
    accuracy: list[float] = field(default_factory=list)
    epoch_seconds: list[float] = field(default_factory=list)
    n_params: int = 0

    @property
    def train_seconds(self) -> float:
        return float(sum(self.epoch_seconds))

    def to_dict(self):
        return {**asdict(self), "train_seconds": self.train_seconds}


def train_scratch(net: Network, x, y, x_test, y_test, epochs=10, batch_size=32, learning_rate=1e-3,
                  seed=0) -> RunResult:
    hist = net.train(x, y, epochs=epochs, batch_size=batch_size, optimizer=Adam(learning_rate), seed=seed)
    test_loss, test_acc = net.evaluate(x_test, y_test)
    return RunResult("cxr.nn", test_acc, test_loss, hist.history["loss"], hist.history["accuracy"],
                     hist.times, net.count_params())


def keras_threads(n: int | None):
    """Pin TF's thread pools (must run before TF executes anything); None keeps TF's default."""
    import tensorflow as tf

    if n:
        tf.config.threading.set_intra_op_parallelism_threads(n)
        tf.config.threading.set_inter_op_parallelism_threads(n)


def keras_fit(model, x, y, epochs=1, batch_size=32, learning_rate=1e-3, shuffle=True, compile=True):
    """model.fit with Adam + categorical cross-entropy; returns (History, wall seconds per epoch)."""
    import keras

    if compile:
        model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss="categorical_crossentropy",
                      metrics=["accuracy"])
    n_classes = model.output_shape[-1]
    targets = np.eye(n_classes, dtype=np.float32)[np.asarray(y)]
    times = []

    class _Timer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.t0 = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            times.append(time.perf_counter() - self.t0)

    hist = model.fit(np.asarray(x, np.float32), targets, epochs=epochs, batch_size=batch_size,
                     shuffle=shuffle, verbose=0, callbacks=[_Timer()])
    return hist, times


def train_keras(net: Network, x, y, x_test, y_test, epochs=10, batch_size=32, learning_rate=1e-3,
                seed=0) -> RunResult:
    """The same architecture as ``net`` in Keras, with Keras' own (seeded) initialisation."""
    import keras

    from .keras_compat import to_keras

    keras.utils.set_random_seed(seed)
    model = to_keras(net, copy_weights=False)
    hist, times = keras_fit(model, x, y, epochs, batch_size, learning_rate)
    n_classes = model.output_shape[-1]
    test_loss, test_acc = model.evaluate(np.asarray(x_test, np.float32),
                                         np.eye(n_classes, dtype=np.float32)[np.asarray(y_test)],
                                         batch_size=256, verbose=0)
    return RunResult("keras", float(test_acc), float(test_loss), [float(v) for v in hist.history["loss"]],
                     [float(v) for v in hist.history["accuracy"]], times, int(model.count_params()))


def torch_available() -> tuple[bool, str]:
    try:
        import torch  # noqa: F401
    except ImportError as e:
        return False, f"PyTorch not importable ({e}); install the optional extra: pip install torch==2.13.0"
    return True, ""


def train_torch_dnn(input_shape, n_classes, x, y, x_test, y_test, hidden=128, epochs=10, batch_size=32,
                    learning_rate=1e-3, seed=0, threads: int | None = None) -> RunResult:
    """Flatten -> Linear -> ReLU -> Linear, Glorot-uniform weights and zero biases, Adam with Keras' eps.

    threads: torch.set_num_threads (None keeps PyTorch's default); on a busy 2-core machine the
    default OpenMP pool spins and is many times slower than one thread for a model this small.
    """
    import torch

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    n_in = int(np.prod(input_shape))
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(n_in, hidden), torch.nn.ReLU(),
                                torch.nn.Linear(hidden, n_classes))
    for m in model:
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.xavier_uniform_(m.weight, generator=gen)
            torch.nn.init.zeros_(m.bias)
    opt = torch.optim.Adam(model.parameters(), lr=learning_rate, betas=(0.9, 0.999), eps=1e-7)
    lossf = torch.nn.CrossEntropyLoss()
    xt = torch.from_numpy(np.ascontiguousarray(x, np.float32))
    yt = torch.from_numpy(np.asarray(y, np.int64))
    n = len(xt)
    res = RunResult("torch", 0.0, 0.0, n_params=sum(p.numel() for p in model.parameters()))
    for _ in range(epochs):
        t0 = time.perf_counter()
        model.train()
        order = torch.randperm(n, generator=gen)
        loss_sum, correct = 0.0, 0
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            out = model(xt[idx])
            loss = lossf(out, yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            loss_sum += loss.item() * len(idx)
            correct += int((out.argmax(1) == yt[idx]).sum())
        res.epoch_seconds.append(time.perf_counter() - t0)
        res.loss.append(loss_sum / n)
        res.accuracy.append(correct / n)
    model.eval()
    with torch.no_grad():
        out = model(torch.from_numpy(np.ascontiguousarray(x_test, np.float32)))
        res.test_loss = float(lossf(out, torch.from_numpy(np.asarray(y_test, np.int64))))
        res.test_accuracy = float((out.argmax(1).numpy() == np.asarray(y_test)).mean())
    return res
