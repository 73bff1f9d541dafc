"""Keras twins of a Network: same layers, same shapes, optionally the same weights.

Used by the tests (outputs and gradients must agree), the MNIST study and the benchmark (Keras
trains the identical architecture). TensorFlow is imported only when a twin is asked for.
"""

from __future__ import annotations

from .layers import Conv2D, Dense, DepthwiseConv2D, Flatten, MaxPool2D, ReLU, Softmax
from .network import Network


def _keras_layer(layer, keras):
    L = keras.layers
    if isinstance(layer, Conv2D):
        return L.Conv2D(layer.filters, tuple(layer.kernel_size), padding=layer.padding, use_bias=layer.use_bias)
    if isinstance(layer, DepthwiseConv2D):
        return L.DepthwiseConv2D(tuple(layer.kernel_size), padding=layer.padding,
                                 depth_multiplier=layer.depth_multiplier, use_bias=layer.use_bias)
    if isinstance(layer, MaxPool2D):
        return L.MaxPooling2D(tuple(layer.pool_size))
    if isinstance(layer, Flatten):
        return L.Flatten()
    if isinstance(layer, Dense):
        return L.Dense(layer.units, use_bias=layer.use_bias)
    if isinstance(layer, ReLU):
        return L.ReLU()
    if isinstance(layer, Softmax):
        return L.Softmax()
    raise TypeError(f"no Keras equivalent for {type(layer).__name__}")


def to_keras(network: Network, copy_weights: bool = True):
    """A keras.Sequential with the same layers; copy_weights=False keeps Keras' own initialisation."""
    import keras

    network._ensure_built()
    model = keras.Sequential([keras.Input(shape=network.input_shape, dtype=network.dtype.name)]
                             + [_keras_layer(layer, keras) for layer in network.layers])
    if copy_weights:
        model.set_weights(network.get_weights())
    return model
