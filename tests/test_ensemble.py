"""Seed ensembles (train.ensemble: K) as one model: saved, loaded, scored, evaluated, explained and
cross-validated as one model with one model id, predicting the members' mean probability."""
from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from cxr.evaluate.calibration import apply_temperature, temperature_of
from cxr.data.loader import load_split
from cxr.models import store
from cxr.score.frames import PROB_COLUMNS, model_id
from tests.train_data import pre_out, train_config  # noqa: F401 (fixtures)

K = 3


def _conf(train_config, **train):
    return {**train_config, "train": {**train_config["train"], "epochs": 1, **train}}


@pytest.fixture(scope="module")
def ensembles(pre_out, train_config, tmp_path_factory):
    """cnn-adam as a 3-member ensemble and scratch-dnn as a 2-member one, plus cnn-adam alone with seed 42."""
    from cxr.train import run

    out = tmp_path_factory.mktemp("ensembles")
    run(str(pre_out), str(out / "k"), _conf(train_config, ensemble=K), models="cnn", optimizers="adam")
    run(str(pre_out), str(out / "k"), _conf(train_config, ensemble=2), models="scratch-dnn")
    run(str(pre_out), str(out / "single"), _conf(train_config), models="cnn", optimizers="adam")
    return out


def _members_mean(d, x, engine="keras"):
    return np.mean([store.load_predictor(m, engine=engine).predict_proba(x) for m in store.ensemble_members(d)],
                   axis=0)


def test_one_folder_one_model_id_members_inside(ensembles, pre_out):
    d = ensembles / "k" / "cnn-adam"
    assert [p.name for p in store.list_models(ensembles / "k")] == ["cnn-adam", "scratch-dnn"]  # members hidden
    assert store.model_kind(d) == "ensemble"
    members = store.ensemble_members(d)
    assert [m.name for m in members] == ["cnn-adam-seed42", "cnn-adam-seed43", "cnn-adam-seed44"]
    meta = store.read_metadata(d)
    assert meta["kind"] == "ensemble" and meta["training"]["ensemble"]["seeds"] == [42, 43, 44]
    assert [m["seed"] for m in meta["ensemble"]["members"]] == [42, 43, 44]
    assert meta["onnx"]["max_abs_diff"] <= 1e-5 and "calibration" in meta
    files = store.weight_files(d)
    assert files[0] == "ensemble.json" and files[-1] == "model.onnx"
    assert {f"members/{m.name}/model.keras" for m in members} <= set(files)
    before = model_id(d)
    weights = members[1] / "model.keras"
    weights.write_bytes(weights.read_bytes())  # same bytes: same id
    assert model_id(d) == before
    # a member is exactly the single model its seed gives
    single = ensembles / "single" / "cnn-adam"
    x = load_split(str(pre_out), "test").x
    assert np.array_equal(store.load_predictor(members[0]).predict_proba(x),
                          store.load_predictor(single).predict_proba(x))
    assert not np.array_equal(store.load_predictor(members[0]).predict_proba(x),
                              store.load_predictor(members[1]).predict_proba(x))


@pytest.mark.parametrize("name", ["cnn-adam", "scratch-dnn"])
def test_probabilities_are_the_members_mean(ensembles, pre_out, name):
    d = ensembles / "k" / name
    x = load_split(str(pre_out), "test").x
    for engine in ("keras", "onnx"):
        got = store.load_predictor(d, engine=engine, batch_size=7).predict_proba(x)
        assert got.shape == (len(x), 3) and np.allclose(got.sum(axis=1), 1, atol=1e-5)
        assert np.max(np.abs(got - _members_mean(d, x, engine))) <= 1e-6, engine
    onnx = store.load_predictor(d, engine="onnx").predict_proba(x)
    assert np.max(np.abs(onnx - _members_mean(d, x))) <= 1e-5       # the exported graph, against Keras members
    import onnx as onnx_lib

    graph = onnx_lib.load(str(d / "model.onnx")).graph
    assert [n.op_type for n in graph.node][-1] == "Mean" and len(graph.node[-1].input) == len(store.ensemble_members(d))


def test_score_job_scores_it_as_one_model(spark, ensembles, pre_out, train_config, tmp_path):
    from cxr.spark import score

    d = ensembles / "k" / "cnn-adam"
    out = tmp_path / "pred"
    record = score.run(spark, str(pre_out), str(d), str(out), train_config)
    assert record["model"]["kind"] == "ensemble" and record["model"]["model_id"] == model_id(d)
    pred = pq.read_table(out / "predictions").to_pandas()
    assert set(pred.model_id) == {model_id(d)} and len(pred) == record["counts"]["scored"] > 0
    data = load_split(str(pre_out), ("train", "val", "test"), labeled_only=False)
    by_sha = dict(zip(data.sha256, range(len(data))))
    x = data.x[[by_sha[s] for s in pred.sha256]]
    want = apply_temperature(_members_mean(d, x, "onnx"), temperature_of(store.read_metadata(d)))
    assert np.max(np.abs(pred[list(PROB_COLUMNS)].to_numpy() - want)) <= 1e-6


def test_evaluate_and_report_show_members_and_ensemble(spark, ensembles, pre_out, train_config):
    from cxr.evaluate.report import write_report
    from cxr.spark.evaluate import run as evaluate

    root = ensembles / "k"
    evaluation = evaluate(spark, str(pre_out), str(root), train_config)
    ev = evaluation["models"]
    assert {"cnn-adam", "cnn-adam-seed42", "cnn-adam-seed43", "cnn-adam-seed44", "scratch-dnn"} <= set(ev)
    assert ev["cnn-adam-seed43"]["member_of"] == "cnn-adam" and "member_of" not in ev["cnn-adam"]
    ens = np.asarray(ev["cnn-adam"]["predictions"]["proba"])
    members = np.mean([ev[f"cnn-adam-seed{s}"]["predictions"]["proba"] for s in (42, 43, 44)], axis=0)
    assert ev["cnn-adam"]["predictions"]["sha256"] == ev["cnn-adam-seed42"]["predictions"]["sha256"]
    assert np.max(np.abs(ens - members)) <= 2e-6  # both rounded to 6 decimals in the evaluation record
    report = write_report(root, evaluation).read_text()
    assert "## Seed ensembles" in report and "| **cnn-adam** (ensemble of 3) |" in report
    assert "| cnn-adam-seed44 | 44 |" in report and "members mean ± sd" in report


def test_gradcam_averages_the_members(ensembles, pre_out):
    from cxr.explain.gradcam import gradcam, load_explainable, shortcut_section

    d = ensembles / "k" / "cnn-adam"
    models = load_explainable(d)
    assert isinstance(models, list) and len(models) == K
    x = load_split(str(pre_out), "test").x[:6]
    cams, proba = gradcam(models, x)
    assert cams.shape == (6, *x.shape[1:3]) and cams.min() >= 0 and cams.max() <= 1
    assert np.max(np.abs(proba - _members_mean(d, x))) <= 1e-5
    cls = proba.argmax(axis=1)
    own = np.mean([gradcam(m, x, class_index=cls)[0] for m in models], axis=0)
    top = own.reshape(6, -1).max(axis=1)[:, None, None]
    assert np.allclose(cams, np.where(top > 0, own / np.maximum(top, 1e-12), 0), atol=1e-6)
    md, result = shortcut_section(d, pre_out, "test")
    assert result is not None and "Shortcut check: cnn-adam" in md
    md, result = shortcut_section(ensembles / "k" / "scratch-dnn", pre_out, "test")
    assert result is None and "not run" in md


def test_crossval_trains_ensembles_per_fold(spark, pre_out, train_config, tmp_path):
    from cxr.evaluate.crossval import run

    conf = {**_conf(train_config, ensemble=2), "crossval": {**train_config["crossval"], "keep_models": True}}
    result = run(spark, str(pre_out), str(tmp_path), conf, folds=2, seeds=1, epochs=1, models="scratch-dnn",
                 probes=False)
    assert result["summary"]["scratch-dnn"]["runs"] == 2
    fold_model = tmp_path / "models" / "seed42" / "fold0" / "scratch-dnn"
    assert store.model_kind(fold_model) == "ensemble" and len(store.ensemble_members(fold_model)) == 2
    assert json.loads((tmp_path / "crossval.json").read_text())["summary"]["scratch-dnn"]["accuracy"]["n"] == 2


def test_train_job_with_a_profile_and_the_ensemble_flag(spark, pre_out, tmp_path):
    """jobs/train.py end to end with a profile as conf/recommended.yaml would be (ensemble, augmentation,
    epochs) and --ensemble on top: one ensemble model folder, evaluated and reported with its members."""
    from tests.conftest import load_job

    profile = tmp_path / "recommended.yaml"
    profile.write_text("train:\n  ensemble: 3\n  epochs: 1\n  batch_size: 16\n  verbose: 0\n  models: [cnn]\n"
                       "  optimizers: [adam]\n  augment: {enabled: true}\n"
                       "  keras:\n    cnn: {filters: [4, 8], kernel_size: 3, dense: 16, dropout: 0.25}\n"
                       "evaluate:\n  partitions: 2\n")
    out = tmp_path / "models"
    assert load_job("train")(["--data", str(pre_out), "--out", str(out), "--conf", str(profile), "--ensemble", "2",
                     "--no-tracking"]) == 0
    d = out / "cnn-adam"
    meta = store.read_metadata(d)
    assert meta["training"]["ensemble"]["seeds"] == [42, 43] and meta["training"]["augment"]["enabled"]
    assert [p.name for p in store.list_models(out)] == ["cnn-adam"]
    evaluation = json.loads((out / "evaluation_test.json").read_text())
    assert {"cnn-adam", "cnn-adam-seed42", "cnn-adam-seed43"} <= set(evaluation["models"])
    assert "| **cnn-adam** (ensemble of 2) |" in (out / "report.md").read_text()


def test_the_recommended_profile_runs_end_to_end(spark, tmp_path):
    """`--conf recommended` as the README's quick start runs it (one epoch instead of twenty): preprocess at its size
    and resize mode, its seed ensemble trained, evaluated and reported, then the raw archive scored with it."""
    from cxr.config import load_config
    from cxr.datasets.synth import generate_archive
    from tests.conftest import load_job as job

    profile = load_config("recommended")
    archive, pre, models, pred = (tmp_path / n for n in ("archive", "pre", "models", "pred"))
    generate_archive(archive, per_class=8, size=128, seed=21)
    assert job("preprocess")(["--conf", "recommended", "--input", str(archive), "--output", str(pre)]) == 0
    params = json.loads((pre / "manifest.json").read_text())["params"]
    assert (params["size"], params["resize_mode"], params["decode_reduction"]) == \
        (profile["preprocess"]["size"], "pad", profile["preprocess"]["decode_reduction"])
    assert job("train")(["--conf", "recommended", "--data", str(pre), "--out", str(models), "--epochs", "1",
                         "--no-tracking"]) == 0
    meta = store.read_metadata(models / "cnn-adam")
    assert [p.name for p in store.list_models(models)] == ["cnn-adam"]
    seeds = list(range(42, 42 + profile["train"]["ensemble"]))
    assert meta["training"]["ensemble"]["seeds"] == seeds and (models / "report.md").is_file()
    assert job("score")(["--conf", "recommended", "--input", str(archive), "--model", str(models / "cnn-adam"),
                         "--output", str(pred), "--no-tracking"]) == 0
    predictions = pq.read_table(pred / "predictions").to_pandas()
    assert len(predictions) >= 20 and set(predictions.model_id) == {model_id(str(models / "cnn-adam"))}
