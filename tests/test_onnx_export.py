"""model.onnx for every kind of model: exported at training, equal to the model it came from (<= 1e-5 on real
images), refused when it is not, run by ONNX Runtime without TensorFlow, and chosen by the `inference` engine."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cxr.data.loader import load_split
from cxr.models import store
from cxr.models.onnx_export import OnnxExportError, export_onnx, main as export_main
from tests.conftest import ROOT, SHARED_DATA
from tests.train_data import SIZE, pre_out, train_config, trained  # noqa: F401 (fixtures)

ATOL = 1e-5
SCRATCH_SIZE = 16  # scratch-cnn trains on a downsampled copy: the resize stays outside the graph


@pytest.fixture(scope="module")
def models(trained, pre_out, train_config, tmp_path_factory):
    """All five kinds: cnn-adam and scratch-dnn from the shared fixture, dnn, dwsep and scratch-cnn here."""
    from cxr.train import run

    out, _ = trained
    conf = json.loads(json.dumps(train_config))
    conf["train"]["keras"]["dwsep"] = {"filters": [8, 16, 16], "kernel_size": 3, "dense": 16, "dropout": 0.25}
    conf["train"]["keras"]["dnn"] = {"units": [64, 32], "dropout": 0.25}
    conf["train"]["scratch"] = {"input_size": SCRATCH_SIZE, "cnn": {"filters": 4, "kernel_size": 3, "pool_size": 2,
                                                                   "hidden": 16}}
    more = tmp_path_factory.mktemp("onnx_models")
    run(str(pre_out), str(more), conf, models="dnn,dwsep,scratch-cnn", optimizers="adam", epochs=1)
    return {"cnn-adam": out / "cnn-adam", "scratch-dnn": out / "scratch-dnn",
            **{name: more / name for name in ("dnn", "dwsep", "scratch-cnn")}}


@pytest.fixture(scope="module")
def images(pre_out):
    """float32 (N, SIZE, SIZE, 1) in [0, 1]: the test split, plus real X-rays of ../shared/data/cxr
    preprocessed like training data (when that folder is there)."""
    from cxr.image.pipeline import PreprocessParams, preprocess_bytes

    x = [load_split(str(pre_out), "test").x]
    real = SHARED_DATA / "cxr"
    if real.is_dir():
        params = PreprocessParams(size=SIZE)
        files = [f for d in sorted(p for p in real.iterdir() if p.is_dir())
                 for f in sorted(d.rglob("*.jp*g"))[:8]]
        arrays = [preprocess_bytes(f.read_bytes(), params)[1] for f in files]
        x.append(np.stack(arrays).astype(np.float32)[..., None] / 255.0)
    return np.concatenate(x)


def _without_onnx(model_dir: Path, dest: Path) -> Path:
    shutil.copytree(model_dir, dest,   # as trained before ONNX export (so before OOD and monitoring references)
                    ignore=shutil.ignore_patterns(store.ONNX_FILE, store.OOD_FILE, store.MONITOR_FILE))
    return dest


@pytest.mark.parametrize("name", ["cnn-adam", "dnn", "dwsep", "scratch-cnn", "scratch-dnn"])
def test_exported_at_training_and_equal_to_the_model(models, images, name):
    d = models[name]
    meta = store.read_metadata(d)
    rec = meta["onnx"]
    assert (d / store.ONNX_FILE).is_file() and rec["file"] == store.ONNX_FILE and rec["opset"] == 17
    assert store.ONNX_FILE in meta["files"] and meta["files"][-1] == store.METRICS_FILE
    assert rec["checked_on"] == meta["data"]["val"]["images"] > 0 and rec["checked_with"] == "val split"
    assert 0 <= rec["max_abs_diff"] <= ATOL and meta["timings_s"]["onnx_export"] > 0
    assert store.weight_files(d)[-1] == store.ONNX_FILE
    onnx_p = store.load_predictor(d, engine="onnx", batch_size=7)  # several batches and a short last one
    own_p = store.load_predictor(d, engine="keras")
    assert isinstance(onnx_p, store.OnnxPredictor) and own_p.kind == ("scratch" if "scratch" in name else "keras")
    got, want = onnx_p.predict_proba(images), own_p.predict_proba(images)
    assert got.shape == (len(images), 3) and got.dtype == np.float32
    assert np.max(np.abs(got - want)) <= ATOL, name
    assert np.array_equal(got.argmax(1), want.argmax(1))
    assert np.ptp(want, axis=0).max() > 1e-3  # outputs that depend on the image
    # OOD features: each conv block's pooled activations, the hidden Dense activations, the penultimate last
    layers = {"cnn-adam": [8, 16, 32], "dnn": [64, 32], "dwsep": [8, 16, 16, 16], "scratch-cnn": [4, 16],
              "scratch-dnn": [32]}[name]
    assert onnx_p.feature_layers == [layers] == rec["features_layers"] and rec["features_dims"] == sum(layers)
    f_got, f_want = onnx_p.features(images), own_p.features(images)
    assert f_got.shape == (len(images), sum(layers))
    assert np.max(np.abs(f_got - f_want)) <= 1e-4 * max(1.0, float(np.abs(f_want).max())), name
    with pytest.raises(ValueError, match=f"expects {SIZE}x{SIZE}"):
        onnx_p.predict_proba(np.zeros((2, SIZE * 2, SIZE * 2, 1), np.float32))


def test_keras_model_with_confident_outputs(models, images, tmp_path):
    """Briefly trained models are near the prior: scale the last layer up so probabilities reach 0 and 1."""
    d = models["cnn-adam"]
    model = store.load_keras(d / store.KERAS_FILE)
    kernel, bias = model.layers[-1].get_weights()
    model.layers[-1].set_weights([kernel * 200, bias])
    sharp = store.save_keras(model, tmp_path / "sharp", store.read_metadata(d))
    export_onnx(sharp, images)
    got = store.load_predictor(sharp, engine="onnx").predict_proba(images)
    want = store.load_predictor(sharp).predict_proba(images)
    assert want.max() > 0.99 and np.max(np.abs(got - want)) <= ATOL


def test_keras_model_with_augmentation_layers(images, tmp_path):
    """train.augment's random layers are identity at inference: the export leaves them out of the numbers."""
    from cxr.models.keras_models import build

    model = build("cnn", (SIZE, SIZE, 1), {"filters": [8], "dense": 8}, augment={"enabled": True, "seed": 1})
    d = store.save_keras(model, tmp_path / "augmented", {"name": "augmented", "input": {"data_size": [SIZE, SIZE]}})
    export_onnx(d)  # no images: a seeded random batch
    assert store.read_metadata(d)["onnx"]["max_abs_diff"] <= ATOL
    got = store.load_predictor(d, engine="onnx").predict_proba(images)
    assert np.max(np.abs(got - store.load_predictor(d).predict_proba(images))) <= ATOL


def test_scratch_model_input_resize_stays_outside_the_graph(models):
    import onnxruntime as ort

    d = models["scratch-cnn"]
    assert store.read_metadata(d)["input"]["model_size"] == [SCRATCH_SIZE, SCRATCH_SIZE]
    shape = ort.InferenceSession(str(d / store.ONNX_FILE)).get_inputs()[0].shape
    assert shape[1:] == [SCRATCH_SIZE, SCRATCH_SIZE, 1]


def test_scratch_layers_beyond_the_study_nets(images, tmp_path):
    """'same' padding with an even kernel, depthwise convolution, no bias, no final Softmax: the layout and
    padding bookkeeping of the hand-built graph."""
    from cxr.nn.layers import Conv2D, DepthwiseConv2D, Dense, Flatten, MaxPool2D, ReLU
    from cxr.nn.network import Network

    net = Network(input_shape=(SIZE, SIZE, 1), seed=3)
    for layer in (Conv2D(4, 4, padding="same"), ReLU(), DepthwiseConv2D(3, padding="same", depth_multiplier=2),
                  ReLU(), MaxPool2D(3), Conv2D(5, (2, 3), use_bias=False), Flatten(), Dense(12), ReLU(),
                  Dense(3, use_bias=False)):
        net.add_layer(layer)
    net.build()
    rng = np.random.default_rng(0)
    net.set_weights([rng.normal(0, 0.6, w.shape).astype(np.float32) for w in net.get_weights()])
    d = store.save_scratch(net, tmp_path / "odd", {"name": "odd", "input": {"data_size": [SIZE, SIZE]}})
    export_onnx(d, images)
    got = store.load_predictor(d, engine="onnx").predict_proba(images)
    want = store.load_predictor(d).predict_proba(images)
    assert np.max(np.abs(got - want)) <= ATOL
    assert want.max() > 0.9  # large weights: the check is not on near-uniform outputs


def test_a_failed_check_raises_and_leaves_no_model_onnx(models, pre_out, tmp_path):
    """A real mismatch: the tolerance below the difference this export actually has on the val images."""
    d = _without_onnx(models["cnn-adam"], tmp_path / "cnn-adam")
    diff = store.read_metadata(d)["onnx"]["max_abs_diff"]
    assert diff > 0
    val = load_split(str(pre_out), "val").x
    before = json.loads((d / store.METRICS_FILE).read_text())
    with pytest.raises(OnnxExportError, match=r"max \|diff\| = .* > atol") as err:
        export_onnx(d, val, atol=diff / 2)
    assert isinstance(err.value, ValueError)
    assert not any(p.name.startswith(store.ONNX_FILE) for p in d.iterdir())  # nor a temp file
    assert json.loads((d / store.METRICS_FILE).read_text()) == before
    export_onnx(d, val, atol=diff)  # the same export at its own difference passes
    assert store.read_metadata(d)["onnx"]["max_abs_diff"] == diff


def test_engine_onnx_without_model_onnx_says_what_to_do(models, tmp_path):
    d = _without_onnx(models["scratch-dnn"], tmp_path / "old-model")
    assert store.weight_files(d) == [*store.SCRATCH_FILES, store.CARD_FILE]
    for load in (lambda: store.load_predictor(d, engine="onnx"),
                 lambda: store.cached_predictor(d, engine="onnx", tf_threads=None)):
        with pytest.raises(FileNotFoundError, match="model.onnx is missing") as err:
            load()
        assert str(d) in str(err.value) and "--engine keras" in str(err.value)
        assert f"python -m cxr.models.onnx_export {d}" in str(err.value)
    assert store.load_predictor(d, engine="keras").kind == "scratch"
    with pytest.raises(ValueError, match="unknown inference engine 'tensorrt'"):
        store.load_predictor(d, engine="tensorrt")
    with pytest.raises(ValueError, match="unknown inference engine"):
        store.inference_settings({"inference": {"engine": "torch"}})


def test_cli_exports_models_trained_before_onnx(models, tmp_path, capsys):
    folder = tmp_path / "models"
    for name in ("cnn-adam", "scratch-cnn"):
        d = _without_onnx(models[name], folder / name)
        meta = store.read_metadata(d)
        del meta["onnx"]
        meta["files"] = [f for f in meta["files"] if f != store.ONNX_FILE]
        store.write_metadata(d, meta)
    assert export_main([str(folder)]) == 0  # a folder of models is expanded
    for name in ("cnn-adam", "scratch-cnn"):
        rec = store.read_metadata(folder / name)["onnx"]
        assert (folder / name / store.ONNX_FILE).is_file() and rec["max_abs_diff"] <= ATOL
        assert rec["checked_with"].startswith("seeded uniform random batch") and rec["checked_on"] == 16
    assert "max |diff|" in capsys.readouterr().out
    assert export_main([str(tmp_path / "nothing-here")]) == 2


def test_cached_predictor_keys_on_the_engine(models, images):
    d = models["cnn-adam"]
    a = store.cached_predictor(d, engine="onnx", tf_threads=None)
    assert store.cached_predictor(d, engine="onnx", tf_threads=None) is a
    b = store.cached_predictor(d, engine="keras", tf_threads=None)
    assert isinstance(a, store.OnnxPredictor) and isinstance(b, store.KerasPredictor)
    assert np.max(np.abs(a.predict_proba(images) - b.predict_proba(images))) <= ATOL


def test_onnx_engine_does_not_import_tensorflow(models, images, tmp_path):
    np.save(tmp_path / "x.npy", images)
    code = (
        "import sys, numpy as np\n"
        "from cxr.models import store\n"
        "x = np.load(sys.argv[1])\n"
        "for d in sys.argv[2:]:\n"
        "    p = store.cached_predictor(d, engine='onnx', onnx_threads=1)\n"
        "    assert p.predict_proba(x).shape == (len(x), 3)\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras', 'tf2onnx', 'onnx')]\n"
        "assert not bad, bad\n"
        "print('ok')\n")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "x.npy"), str(models["cnn-adam"]),
                           str(models["dwsep"]), str(models["scratch-cnn"])],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_evaluate_with_the_keras_engine_on_the_executors(spark, models, pre_out, train_config):
    """conf inference.engine: keras reaches the executors (tests/test_evaluate.py runs the default, onnx, against
    the models on the driver). A scratch model keeps TensorFlow out of the workers, which would cost ~30 s here;
    Keras in the workers is exercised by the Grad-CAM and score tests."""
    from cxr.spark import evaluate

    out = models["scratch-dnn"].parent
    config = {**train_config, "inference": {"engine": "keras", "onnx_threads": 1}}
    result = evaluate.run(spark, str(pre_out), str(out), config, models=["scratch-dnn"], write=False)
    assert result["inference"] == {"engine": "keras", "onnx_threads": 1}
    test = load_split(str(pre_out), "test")
    order = np.argsort(test.sha256.astype(str), kind="stable")
    got = np.asarray(result["models"]["scratch-dnn"]["predictions"]["proba"])
    want = store.load_predictor(out / "scratch-dnn", engine="onnx").predict_proba(test.x)[order]
    assert got.shape == want.shape and np.max(np.abs(got - want)) <= ATOL
