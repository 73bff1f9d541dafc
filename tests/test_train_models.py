"""Training on the driver: determinism, metrics.json, safe loading, the predictor interface, class weights."""
from __future__ import annotations

import json

import numpy as np
import pytest

from cxr import CLASSES
from cxr.data.loader import load_split, read_manifest
from cxr.models.store import UnsafeModelError, cached_predictor, load_predictor, read_metadata, write_metadata
from cxr.train import OutputExistsError, class_weights, plan, run
from tests.train_data import EPOCHS, MODELS, SIZE, pre_out, train_config, trained  # noqa: F401 (fixtures)

NAMES = ("cnn-adam", "scratch-dnn")


def test_two_runs_with_one_seed_give_the_same_numbers(trained, pre_out, train_config, tmp_path):
    first_dir, _ = trained
    run(str(pre_out), str(tmp_path), train_config, models=MODELS, optimizers="adam")
    x = load_split(str(pre_out), "test").x
    for name in NAMES:
        a, b = read_metadata(first_dir / name), read_metadata(tmp_path / name)
        assert a["history"] == b["history"], name
        assert a["training"]["seeds"] == b["training"]["seeds"] == {
            "seed": 42, "python": 42, "numpy": 42, "tensorflow": 42, "op_determinism": True}
        pa, pb = load_predictor(first_dir / name).predict_proba(x), load_predictor(tmp_path / name).predict_proba(x)
        assert np.array_equal(pa, pb), name


def test_metrics_json_records_what_produced_the_model(trained, pre_out):
    out, result = trained
    manifest, manifest_sha = read_manifest(str(pre_out))
    assert [m["name"] for m in result["models"]] == list(NAMES)
    for name in NAMES:
        meta = json.loads((out / name / "metrics.json").read_text())
        assert meta["schema"] == "cxr.model/1" and meta["name"] == name
        assert meta["kind"] == ("keras" if name.startswith("cnn") else "scratch")
        assert meta["classes"] == list(CLASSES)
        for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
            values = meta["history"][key]
            assert len(values) == EPOCHS and all(isinstance(v, float) and np.isfinite(v) for v in values)
        assert len(meta["epoch_times_s"]) == EPOCHS and meta["timings_s"]["train"] > 0
        assert meta["training"]["epochs"] == EPOCHS and meta["training"]["batch_size"] == 16
        assert meta["training"]["class_weight"]["mode"] == "balanced"
        assert meta["data"]["manifest_sha256"] == manifest_sha
        assert meta["preprocess"] == manifest["params"]  # scoring repeats exactly these
        assert meta["input"]["data_size"] == [SIZE, SIZE]
        counts = meta["data"]["train"]["classes"]
        assert sum(counts.values()) == meta["data"]["train"]["images"] > 0
        assert meta["data"]["split_disjointness"]["shared_patients"] == 0
        assert meta["optimizer"]["name"] == "adam" and meta["optimizer"]["config"]["learning_rate"] == pytest.approx(1e-3)
        assert {"tensorflow-cpu", "numpy", "keras"} <= set(meta["versions"])
        files = {p.name for p in (out / name).iterdir()}
        assert set(meta["files"]) <= files
        assert not any(f.endswith((".pkl", ".pickle", ".h5")) for f in files)


def test_predictor_interface(trained, pre_out):
    out, _ = trained
    test = load_split(str(pre_out), "test")
    for name in NAMES:
        predictor = load_predictor(out / name)
        proba = predictor.predict_proba(test.x)
        assert proba.shape == (len(test), 3) and proba.dtype == np.float32
        assert np.allclose(proba.sum(axis=1), 1, atol=1e-5)
        assert predictor.metadata["preprocess"]["size"] == SIZE
        assert np.allclose(cached_predictor(out / name, tf_threads=None).predict_proba(test.x), proba, atol=1e-6)
        with pytest.raises(ValueError, match=f"expects {SIZE}x{SIZE}"):
            predictor.predict_proba(np.zeros((2, SIZE * 2, SIZE * 2, 1), np.float32))


def test_scratch_model_on_downsampled_inputs_resizes_in_the_predictor(pre_out, train_config, tmp_path):
    conf = {**train_config, "train": {**train_config["train"], "scratch": {"input_size": 16, "dnn": {"hidden": 8}}}}
    run(str(pre_out), str(tmp_path), conf, models="scratch-dnn", epochs=1)
    predictor = load_predictor(tmp_path / "scratch-dnn")
    assert predictor.metadata["input"]["model_size"] == [16, 16]
    assert predictor.metadata["input"]["resize"] == "area"
    x = load_split(str(pre_out), "test").x
    assert predictor.predict_proba(x).shape == (len(x), 3)  # given preprocess-size images, as scoring will


def test_safe_loading_refuses_a_lambda_layer(trained, tmp_path):
    import keras

    out, _ = trained
    model = keras.Sequential([keras.Input((SIZE, SIZE, 1)), keras.layers.Lambda(lambda t: t * 2.0),
                              keras.layers.Flatten(), keras.layers.Dense(3, activation="softmax")])
    bad = tmp_path / "evil"
    bad.mkdir()
    model.save(bad / "model.keras")
    write_metadata(bad, {**read_metadata(out / "cnn-adam"), "name": "evil"})
    with pytest.raises(UnsafeModelError, match="refused"):
        load_predictor(bad)
    with pytest.raises(UnsafeModelError):
        cached_predictor(bad, tf_threads=None)


def test_existing_models_are_not_overwritten_silently(trained, pre_out, train_config):
    out, _ = trained
    with pytest.raises(OutputExistsError, match="cnn-adam"):
        run(str(pre_out), str(out), train_config, models="cnn", optimizers="adam")


def test_class_weights():
    y = np.array([0] * 10 + [1] * 20 + [2] * 30)
    balanced = class_weights(y, "balanced")
    assert balanced["weights"] == pytest.approx({"COVID": 2.0, "NORMAL": 1.0, "VIRAL": 60 / 90})
    assert balanced["train_counts"] == {"COVID": 10, "NORMAL": 20, "VIRAL": 30}
    # balanced weights make every class carry the same total weight
    totals = [balanced["weights"][c] * n for c, n in balanced["train_counts"].items()]
    assert totals == pytest.approx([20.0] * 3)
    assert class_weights(y, "none")["weights"] is None
    assert class_weights(y, {"NORMAL": 3})["weights"] == {"COVID": 1.0, "NORMAL": 3.0, "VIRAL": 1.0}
    with pytest.raises(ValueError, match="unknown classes"):
        class_weights(y, {"FLU": 1.0})
    with pytest.raises(ValueError):
        class_weights(y, "sometimes")


def test_plan_trains_the_cnn_once_per_optimizer():
    names = [p["name"] for p in plan(["cnn", "dnn", "scratch-cnn"], ["rmsprop", "sgd"], "adam")]
    assert names == ["cnn-rmsprop", "cnn-sgd", "dnn", "scratch-cnn"]
    with pytest.raises(ValueError, match="unknown optimizer"):
        plan(["cnn"], ["nesterov"], "adam")
    with pytest.raises(ValueError, match="unknown model"):
        plan(["resnet"], ["adam"], "adam")


def test_metrics_json_records_the_streamed_shuffle(trained):
    out, result = trained
    meta = read_metadata(out / "cnn-adam")
    assert meta["data"]["loader"]["mode"] == "stream" and meta["data"]["loader"]["shuffle_buffer"] == 4096
    shuffle = meta["training"]["shuffle"]
    assert shuffle["source"] == "parquet stream" and shuffle["rows"] == meta["data"]["train"]["images"]
    assert "permutation of the split per epoch" in shuffle["order"]  # the buffer holds this small split


@pytest.mark.parametrize("family", ["cnn", "dnn", "dwsep"])
def test_keras_models_export_without_tf2onnx(family):
    """The study's Keras families (augmentation layers included) are written directly, one copy of the weights:
    tf2onnx held ~60 (+2.9 GB for the CNN at 224 px). The graph reproduces Keras to 1e-5."""
    import onnxruntime as ort

    from cxr.models.keras_models import build
    from cxr.models.onnx_export import keras_sequential_to_onnx

    model = build(family, (SIZE, SIZE, 1), {"cnn": {"filters": [4, 8], "dense": 8}, "dnn": {"units": [8]},
                                           "dwsep": {"filters": [4, 8, 8], "dense": 8}}[family],
                  augment={"enabled": True, "seed": 3})
    proto = keras_sequential_to_onnx(model)
    assert "cxr.models.onnx_export" == proto.producer_name
    x = np.random.default_rng(0).random((5, SIZE, SIZE, 1), dtype=np.float32)
    got = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]
    assert np.max(np.abs(got - model(x, training=False).numpy())) <= 1e-5
