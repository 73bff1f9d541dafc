"""Training on the driver (a package; `from cxr.train import run` etc. as before).

    core        run() and train_and_save(): plan, seeds, class weights, metrics.json, ONNX export, calibration
    keras_fit   the Keras models' fit from a tf.data pipeline over a streamed split
    scratch_fit cxr.nn's scratch models trained minibatch by minibatch from the same stream
    ensemble    seed ensembles saved as one model (train.ensemble)
"""
from cxr.train.core import (ALL_MODELS, SCRATCH_FAMILIES, OutputExistsError, _as_list,  # noqa: F401
                            class_weights, plan, run, set_seeds, train_and_save)
