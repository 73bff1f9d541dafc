"""cxr.nn's scratch models trained from a training source (cxr.data.stream.ParquetSplit or in-memory SplitData),
minibatch by minibatch: the same step as cxr.nn.Network.train (loss_and_grads, then the optimizer's step;
class weights as Keras applies them), without the whole split as one array."""
from __future__ import annotations

import logging
import time
from typing import Any, Mapping

import numpy as np

from cxr import CLASSES
from cxr.data.stream import as_unit_float

log = logging.getLogger(__name__)


def _inputs(images: np.ndarray, model_size: tuple[int, int]) -> np.ndarray:
    """A source batch -> the network's float32 input, area-resized when the model is smaller than the data."""
    from cxr.models import store

    x = as_unit_float(images)
    return x if tuple(x.shape[1:3]) == tuple(model_size) else store.resize_batch(x, model_size)


def evaluate_source(net, source, model_size: tuple[int, int], batch_size: int) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) over a source, as Network.evaluate computes them on an array: the
    logits (N x classes, small) are gathered batch by batch, the loss taken over all of them at once."""
    from cxr.nn.losses import one_hot, softmax_cross_entropy

    logits, labels = [], []
    for images, y in source.batches(batch_size):
        logits.append(net.forward(_inputs(images, model_size), upto=-1))
        labels.append(y.astype(np.int64))
    z, y = np.concatenate(logits), np.concatenate(labels)
    t = one_hot(y, net.output_shape[-1], net.dtype)
    loss, _, p = softmax_cross_entropy(z, t)
    return loss, float((p.argmax(1) == y).mean())


def fit_scratch(net, optimizer, train, epochs: int, batch_size: int, seed: int, model_size: tuple[int, int],
                class_weight: np.ndarray | None = None, val=None, callback=None) -> tuple[dict, list[float]]:
    """Train net in place; returns (history {loss, accuracy[, val_loss, val_accuracy]: per epoch}, epoch seconds).
    Loss and accuracy per epoch are the sample-weighted means of the batches', as Network.train logs them."""
    history: dict[str, list[float]] = {}
    times = []
    for epoch in range(epochs):
        t0 = time.perf_counter()
        loss_sum, correct, seen, n = 0.0, 0.0, 0.0, 0
        for images, labels in train.batches(batch_size, epoch=epoch, shuffle=True, seed=seed):
            y = labels.astype(np.int64)
            wb = None if class_weight is None else class_weight[y]
            loss, probs = net.loss_and_grads(_inputs(images, model_size), y, wb)
            optimizer.step(net.parameters())
            loss_sum += loss * len(y)
            n += len(y)
            hits = probs.argmax(axis=1) == y
            correct += float(hits.sum() if wb is None else (wb * hits).sum())
            seen += len(y) if wb is None else float(wb.sum())
        times.append(time.perf_counter() - t0)
        metrics = {"loss": loss_sum / max(n, 1), "accuracy": correct / seen if seen else 0.0}
        if val is not None and len(val):
            metrics["val_loss"], metrics["val_accuracy"] = evaluate_source(net, val, model_size,
                                                                           max(batch_size, 256))
        for k, v in metrics.items():
            history.setdefault(k, []).append(float(v))
        if callback is not None:
            callback(epoch, metrics)
    return history, times


def train_scratch(spec: dict, train, val, conf: Mapping, weights: dict | None, epochs: int,
                  seed: int) -> tuple[Any, dict, list[float], dict]:
    """Build one cxr.nn network (scratch-cnn or scratch-dnn) from conf and fit it on the train source."""
    from cxr.nn import models as nn_models
    from cxr.nn import optimizers as nn_opt
    from cxr.train.history import history_dict

    sconf = conf.get("scratch") or {}
    family = spec["family"].split("-", 1)[1]
    arch = dict((sconf.get(family) or {}))
    model_size = tuple(train.image_size)
    size = sconf.get("input_size")
    if size and int(size) != model_size[0]:
        model_size = (int(size), int(size))
    builder = nn_models.cnn if family == "cnn" else nn_models.dnn
    net = builder((*model_size, 1), len(CLASSES), seed=seed, **arch)
    opt = nn_opt.get(spec["optimizer"], **((conf.get("optimizer_config") or {}).get(spec["optimizer"]) or {}))
    cw = None
    if weights:
        cw = np.ones(len(CLASSES), net.dtype)
        for i, c in enumerate(CLASSES):
            cw[i] = weights[c]

    def progress(epoch, metrics):
        log.info("%s epoch %d/%d %s", spec["name"], epoch + 1, epochs,
                 " ".join(f"{k} {v:.4f}" for k, v in metrics.items()))

    history, times = fit_scratch(net, opt, train, epochs, int(conf["batch_size"]), seed, model_size, cw, val,
                                 progress)
    details = {"architecture": {"family": spec["family"], **arch, "input_size": int(model_size[0]),
                                "params": int(net.count_params())},
               "optimizer": {"name": spec["optimizer"], "config": opt.get_config()},
               "model_size": [int(model_size[0]), int(model_size[1])]}
    return net, history_dict(history), [round(t, 3) for t in times], details
