"""The study's two architectures, so the scripts, jobs and tests build exactly the same nets."""

from __future__ import annotations

from .layers import Conv2D, Dense, Flatten, MaxPool2D, ReLU, Softmax
from .network import Network


def dnn(input_shape, n_classes: int, hidden: int = 128, seed: int | None = 0) -> Network:
    """Flatten -> Dense(hidden) -> ReLU -> Dense(n_classes) -> Softmax."""
    net = Network(input_shape=input_shape, seed=seed)
    for layer in (Flatten(), Dense(hidden), ReLU(), Dense(n_classes), Softmax()):
        net.add_layer(layer)
    return net.build()


def cnn(input_shape, n_classes: int, filters: int = 32, kernel_size: int = 3, pool_size: int = 2,
        hidden: int = 128, padding: str = "valid", seed: int | None = 0) -> Network:
    """Conv2D -> ReLU -> MaxPool2D -> Flatten -> Dense(hidden) -> ReLU -> Dense(n_classes) -> Softmax."""
    net = Network(input_shape=input_shape, seed=seed)
    for layer in (Conv2D(filters, kernel_size, padding=padding), ReLU(), MaxPool2D(pool_size), Flatten(),
                  Dense(hidden), ReLU(), Dense(n_classes), Softmax()):
        net.add_layer(layer)
    return net.build()
