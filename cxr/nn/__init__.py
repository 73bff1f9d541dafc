"""From-scratch NumPy neural networks (NHWC, float32), numerically checked against Keras.

    from cxr.nn import Network, Conv2D, ReLU, MaxPool2D, Flatten, Dense, Softmax, Adam, save, load
    net = Network(input_shape=(14, 14, 1), seed=0)
    for layer in (Conv2D(32, 3), ReLU(), MaxPool2D(2), Flatten(), Dense(128), ReLU(), Dense(5), Softmax()):
        net.add_layer(layer)
    history = net.train(x, y, epochs=10, batch_size=32, optimizer=Adam(1e-3), seed=0)
    probs = net.predict_proba(x_new, batch_size=128)
    save(net, "model_dir"); net2 = load("model_dir")
"""

from .io import ModelFormatError, load, save
from .layers import LAYER_TYPES, Conv2D, Dense, DepthwiseConv2D, Flatten, Layer, MaxPool2D, ReLU, Softmax
from .losses import categorical_crossentropy, one_hot, softmax_cross_entropy
from .models import cnn, dnn
from .network import History, Network
from .optimizers import SGD, Adadelta, Adagrad, Adam, Optimizer, RMSprop

__all__ = [
    "Network", "History", "Layer", "Conv2D", "DepthwiseConv2D", "MaxPool2D", "Flatten", "Dense", "ReLU",
    "Softmax", "LAYER_TYPES", "Optimizer", "SGD", "Adagrad", "Adadelta", "RMSprop", "Adam",
    "softmax_cross_entropy", "categorical_crossentropy", "one_hot", "save", "load", "ModelFormatError",
    "cnn", "dnn",
]
