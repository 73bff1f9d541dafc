"""The Keras models' fit, fed by a tf.data pipeline over a training source (cxr.data.stream.ParquetSplit, or
in-memory cxr.data.loader.SplitData): Keras never sees more than a prefetched minibatch, so the driver's
memory is the source's shuffle buffer, not the split."""
from __future__ import annotations

import time
from typing import Any, Mapping

import numpy as np

from cxr import CLASSES
from cxr.data.stream import as_unit_float


def tf_dataset(source, batch_size: int, shuffle: bool = False, seed: int = 0, one_hot: bool = False,
               row_weights: np.ndarray | None = None, augment: Mapping | None = None,
               sources: tuple[np.ndarray, np.ndarray] | None = None, framing: Mapping | None = None):
    """A tf.data.Dataset of (float32 (b, H, W, 1) in [0, 1], int64 labels) minibatches (float32 one-hot
    labels with `one_hot`, which label smoothing needs), plus float32 sample weights when `row_weights` (one per
    row of the source) is given. With `sources` ((target, weight) per row for cxr.train.source_adversary's head)
    the inputs are (images, one-hot labels) and the targets and weights {"label", "source"} dicts. Each iteration
    (one per epoch: Keras starts a new iterator every epoch) reads the source again, epoch number e shuffled with
    (seed, e) as the source defines, and, with `augment` (cxr.train.site_augment settings, enabled), augmented
    with (seed, e); the cardinality is known, so Keras shows steps and needs no first pass."""
    import tensorflow as tf

    from cxr.train.site_augment import active, augment_batch, epoch_rng

    h, w = source.image_size
    started = {"epochs": 0}
    eye = np.eye(len(CLASSES), dtype=np.float32)
    weighted, adversary = row_weights is not None, sources is not None
    augmenting = active(augment, framing)
    # the source hands each batch its rows' positions in the split (as per-row "weights"): they pick the rows'
    # weights and source targets
    positions = np.arange(len(source), dtype=np.float32) if weighted or adversary else None
    by_position = np.asarray(row_weights, np.float32) if weighted else None

    def generate():
        epoch = started["epochs"]
        started["epochs"] += 1
        rng = epoch_rng(seed, epoch) if augmenting else None
        for batch in source.batches(batch_size, epoch=epoch, shuffle=shuffle, seed=seed, weights=positions):
            images, labels = batch[0], batch[1].astype(np.int64)
            if augmenting:
                images = augment_batch(images, rng, augment or {}, framing)
            x, y = as_unit_float(images), (eye[labels] if one_hot else labels)
            pos = None if positions is None else batch[2].astype(np.int64)
            rows_w = by_position[pos] if weighted else None
            if adversary:
                yield ((x, eye[labels]), {"label": y, "source": sources[0][pos]},
                       {"label": np.ones(len(labels), np.float32) if rows_w is None else rows_w,
                        "source": sources[1][pos]})
            else:
                yield (x, y) + ((rows_w,) if weighted else ())

    label_spec = tf.TensorSpec((None, len(CLASSES)), tf.float32) if one_hot else tf.TensorSpec((None,), tf.int64)
    image_spec, row_spec = tf.TensorSpec((None, h, w, 1), tf.float32), tf.TensorSpec((None,), tf.float32)
    if adversary:
        spec = ((image_spec, tf.TensorSpec((None, len(CLASSES)), tf.float32)),
                {"label": label_spec, "source": tf.TensorSpec((None,), tf.int64)}, {"label": row_spec, "source": row_spec})
    else:
        spec = (image_spec, label_spec) + ((row_spec,) if weighted else ())
    ds = tf.data.Dataset.from_generator(generate, output_signature=spec)
    n_batches = -(-len(source) // int(batch_size))
    ds = ds.apply(tf.data.experimental.assert_cardinality(n_batches))
    return ds.prefetch(1)  # one minibatch ahead: reading overlaps the step, memory stays one batch


def label_smoothing(conf: Mapping) -> float:
    """train.label_smoothing: the target mass moved from the true class to all classes evenly (0 = plain
    cross-entropy). Softer targets keep a small training set from driving the logits to extremes; on the shared
    X-rays it measured no better than 0 (docs/recommended_profile.md), so it is off unless asked for."""
    value = float(conf.get("label_smoothing") or 0.0)
    if not 0.0 <= value < 1.0:
        raise ValueError(f"train.label_smoothing must be in [0, 1), got {value}")
    return value


LR_SCHEDULES = ("constant", "cosine")


def lr_schedule(conf: Mapping) -> str:
    """train.lr_schedule, checked: `constant` (the optimizer's learning rate throughout) or `cosine`."""
    name = str(conf.get("lr_schedule") or "constant")
    if name not in LR_SCHEDULES:
        raise ValueError(f"train.lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {name!r}")
    return name


def learning_rate(conf: Mapping, overrides: Mapping | None, epochs: int, steps_per_epoch: int) -> dict:
    """The optimizer's settings with train.lr_schedule applied: `cosine` decays the configured (or Keras'
    default 0.001) learning rate to 0 over the whole fit, so the last epochs take small steps instead of
    bouncing around at full size; `constant` leaves it as configured."""
    settings = dict(overrides or {})
    if lr_schedule(conf) == "cosine":
        import keras

        start = float(settings.get("learning_rate", 0.001))
        settings["learning_rate"] = keras.optimizers.schedules.CosineDecay(
            start, decay_steps=max(1, int(epochs) * int(steps_per_epoch)))
    return settings


def train_keras(spec: dict, train, val, conf: Mapping, weights: dict | None, epochs: int,
                seed: int, row_weights: np.ndarray | None = None) -> tuple[Any, dict, list[float], dict]:
    """Build, compile and fit one Keras model on the train source (val for the curves). row_weights (one per
    train row: train.class_weight balanced_by_source) replace the per-class `weights`. With
    train.source_adversary on, the fit runs on cxr.train.source_adversary's wrapper; the classifier inside it
    is what is returned."""
    import keras

    from cxr.models.keras_models import architecture, augmentation, build, optimizer, optimizer_config
    from cxr.train import source_adversary
    from cxr.train.history import history_dict
    from cxr.train.site_augment import framing_settings, settings as site_settings

    family = spec["family"]
    arch = architecture(family, (conf.get("keras") or {}).get(family))
    aug = augmentation(conf.get("augment"))
    model = build(family, (*train.image_size, 1), arch, augment={**aug, "seed": seed})
    bs = int(conf["batch_size"])
    steps = -(-len(train) // bs)
    opt = optimizer(spec["optimizer"], learning_rate(
        conf, (conf.get("optimizer_config") or {}).get(spec["optimizer"]), epochs, steps))
    smoothing = label_smoothing(conf)
    loss = (keras.losses.CategoricalCrossentropy(label_smoothing=smoothing) if smoothing
            else "sparse_categorical_crossentropy")
    times: list[float] = []
    cpu: list[float] = []

    class EpochTimer(keras.callbacks.Callback):
        """Wall and CPU seconds (all threads of this process) per epoch: on a shared machine the CPU time says
        what an epoch costs, the wall time also what the neighbours took."""

        def on_epoch_begin(self, epoch, logs=None):
            self._t, self._c = time.perf_counter(), time.process_time()

        def on_epoch_end(self, epoch, logs=None):
            times.append(round(time.perf_counter() - self._t, 3))
            cpu.append(round(time.process_time() - self._c, 3))

    one_hot = bool(smoothing)
    site = site_settings(conf.get("site_augment"))
    framing = framing_settings(conf.get("framing"))
    adv = source_adversary.settings(conf.get("source_adversary"))
    callbacks: list = [EpochTimer()]
    train_sources = val_sources = None
    if adv["enabled"]:
        index = source_adversary.source_index(train.source)
        train_sources = source_adversary.source_targets(train.source, index)
        val_sources = source_adversary.source_targets(val.source, index)
        if row_weights is None and weights:  # class_weight does not reach a model with two outputs: row weights do
            row_weights = np.array([weights[CLASSES[int(y)]] for y in train.y], np.float32)
        fitted, strength = source_adversary.wrap(model, len(index), len(CLASSES), adv["hidden"])
        fitted.compile(optimizer=opt, loss={"label": loss, "source": "sparse_categorical_crossentropy"},
                       metrics={"label": ["accuracy"], "source": ["accuracy"]})

        class Ramp(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                strength.assign(source_adversary.ramp(epoch, epochs, adv["weight"]))

        callbacks.append(Ramp())
    else:
        fitted = model
        fitted.compile(optimizer=opt, loss=loss, metrics=["accuracy"])
    cw = {i: weights[c] for i, c in enumerate(CLASSES)} if weights and row_weights is None else None
    history = fitted.fit(tf_dataset(train, bs, shuffle=True, seed=seed, one_hot=one_hot, row_weights=row_weights,
                                    augment=site, sources=train_sources, framing=framing), epochs=epochs,
                         validation_data=tf_dataset(val, bs, one_hot=one_hot, sources=val_sources) if len(val) else None,
                         class_weight=cw, shuffle=False,  # the dataset shuffles (cxr.data.stream)
                         verbose=int(conf.get("verbose", 2)), callbacks=callbacks)
    details = {"architecture": {"family": family, **arch, "params": int(model.count_params())},
               "optimizer": {"name": spec["optimizer"], "config": optimizer_config(opt)},
               "augment": {**aug, "seed": seed} if aug["enabled"] else {"enabled": False}, "epoch_cpu_s": cpu,
               "site_augment": {**site, "seed": seed} if site["enabled"] else {"enabled": False},
               "framing": {**framing, "seed": seed} if framing["p"] > 0 else {"p": 0.0},
               "source_adversary": ({**adv, "sources": list(index)} if adv["enabled"] else {"enabled": False}),
               "label_smoothing": smoothing, "lr_schedule": lr_schedule(conf)}
    hist = source_adversary.history(history.history) if adv["enabled"] else history_dict(history.history)
    return model, hist, times, details
