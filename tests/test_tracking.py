"""MLflow tracking and the model registry, on the real jobs (in-process, on the test session) and a real MLflow
store in a temp dir: train logs params, per-epoch metrics and the model; score by models:/NAME@ALIAS equals score
by folder; the logged model runs in mlflow.pyfunc.spark_udf; --no-tracking writes nothing."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from cxr.score.frames import PROB_COLUMNS, model_id
from cxr.spark import preprocess
from tests.conftest import ROOT, load_job as job

SIZE = 32
NAME = "cxr-test"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    conf = root / "small.yaml"
    conf.write_text(yaml.safe_dump({
        "preprocess": {"size": SIZE}, "score": {"batch_size": 8},
        "train": {"verbose": 0, "batch_size": 8},
        "tracking": {"model_cache": str(root / "cache")}}))
    return {"uri": f"sqlite:///{root}/mlflow.db", "conf": str(conf), "root": root}


@pytest.fixture(scope="module")
def client(store):
    import mlflow

    mlflow.set_tracking_uri(store["uri"])
    return mlflow.MlflowClient(store["uri"])


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    from cxr.datasets.synth import generate_archive

    root = tmp_path_factory.mktemp("tracking_archive")
    generate_archive(root, per_class=10, size=96, seed=3)
    return root


@pytest.fixture(scope="module")
def pre_out(spark, archive, store, tmp_path_factory):
    from cxr.config import load_config

    out = tmp_path_factory.mktemp("tracking_pre") / "pre"
    preprocess.run(spark, str(archive), str(out), load_config(store["conf"]))
    return out


@pytest.fixture(scope="module")
def trained(spark, pre_out, store, tmp_path_factory):
    models = tmp_path_factory.mktemp("tracking_models") / "models"
    code = job("train")(["--conf", store["conf"], "--data", str(pre_out), "--out", str(models), "--models", "cnn",
                         "--optimizers", "adam", "--epochs", "2", "--ensemble", "2", "--tracking-uri", store["uri"],
                         "--register", NAME, "--alias", "champion"])
    assert code == 0
    return models


def _runs(client, job_name: str):
    experiment = client.get_experiment_by_name("cxr-spark")
    return client.search_runs([experiment.experiment_id], f"tags.`cxr.job` = '{job_name}'",
                              order_by=["attributes.start_time DESC"])


def test_train_logs_params_metrics_per_epoch_and_the_model(trained, pre_out, client, tmp_path):
    meta = json.loads((trained / "cnn-adam" / "metrics.json").read_text())
    runs = _runs(client, "train")
    child = next(r for r in runs if r.data.tags.get("cxr.model") == "cnn-adam")
    parent = next(r for r in runs if r.info.run_id == child.data.tags["mlflow.parentRunId"])
    manifest_sha = meta["data"]["manifest_sha256"]
    assert child.data.params["optimizer"] == "adam" and child.data.params["epochs"] == "2"
    assert child.data.params["preprocess.size"] == str(SIZE) and child.data.params["manifest_sha256"] == manifest_sha
    assert child.data.params["seed"] == str(meta["training"]["seeds"]["seed"])
    assert child.data.params["ensemble"] == "2"    # a seed ensemble, logged and registered as one model
    loss = client.get_metric_history(child.info.run_id, "loss")
    assert [m.step for m in sorted(loss, key=lambda m: m.step)] == [0, 1]
    np.testing.assert_allclose([m.value for m in sorted(loss, key=lambda m: m.step)], meta["history"]["loss"])
    evaluation = json.loads((trained / "evaluation_test.json").read_text())["models"]["cnn-adam"]
    assert child.data.metrics["test.macro_f1"] == pytest.approx(evaluation["macro_f1"])
    assert child.data.tags["cxr.model_id"] == model_id(str(trained / "cnn-adam"))
    assert (trained / "cnn-adam" / "monitor_reference.json").is_file()   # run monitoring's reference, in the id
    parent_files = {f.path for f in client.list_artifacts(parent.info.run_id)}
    assert {"report.md", "evaluation_test.json", "plots"} <= parent_files
    assert "metrics.json" in {f.path for f in client.list_artifacts(child.info.run_id)}
    # the model: ONNX flavour with a signature and one real input image, and the cxr folder beside it
    import mlflow

    version = client.get_model_version_by_alias(NAME, "champion")
    info = mlflow.models.get_model_info(f"models:/{NAME}/{version.version}")
    assert "onnx" in info.flavors and info.signature is not None
    assert info.signature.inputs.inputs[0].shape == (-1, SIZE, SIZE, 1)
    local = mlflow.artifacts.download_artifacts(f"models:/{NAME}/{version.version}", dst_path=str(tmp_path))
    example = np.asarray(mlflow.models.Model.load(local).load_input_example(local)["image"])
    assert example.shape == (1, SIZE, SIZE, 1) and 0 < float(example.max()) <= 1
    # a rendered synthetic chest, not a patient's image (tracking.log_input_example: synthetic by default)
    from cxr.tracking.mirror import example_input

    np.testing.assert_allclose(example, example_input(str(pre_out), (SIZE, SIZE), "synthetic"), atol=1e-6)
    assert not np.allclose(example, example_input(str(pre_out), (SIZE, SIZE), "real"), atol=1e-2)
    assert (Path(local) / "cxr" / "metrics.json").is_file() and (Path(local) / "cxr" / "model.onnx").is_file()


def _score(store, archive, model, out, *extra) -> int:
    return job("score")(["--conf", store["conf"], "--input", str(archive), "--model", str(model),
                         "--output", str(out), "--tracking-uri", store["uri"], *extra])


def test_score_by_registry_alias_equals_score_by_folder(trained, archive, store, client, tmp_path):
    assert _score(store, archive, f"models:/{NAME}@champion", tmp_path / "by_alias", "--run-id", "alias") == 0
    assert _score(store, archive, trained / "cnn-adam", tmp_path / "by_folder", "--run-id", "folder") == 0
    by_alias = pq.read_table(tmp_path / "by_alias" / "predictions").to_pandas().sort_values("path")
    by_folder = pq.read_table(tmp_path / "by_folder" / "predictions").to_pandas().sort_values("path")
    assert len(by_alias) >= 30 and list(by_alias.path) == list(by_folder.path)
    np.testing.assert_allclose(by_alias[list(PROB_COLUMNS)].to_numpy(), by_folder[list(PROB_COLUMNS)].to_numpy(),
                               atol=1e-6)
    assert set(by_alias.model_id) == set(by_folder.model_id) == {model_id(str(trained / "cnn-adam"))}
    version = int(client.get_model_version_by_alias(NAME, "champion").version)
    assert set(by_alias.registered_model) == {NAME} and set(by_alias.registered_version) == {version}
    assert by_folder.registered_model.isna().all() and by_folder.registered_version.isna().all()
    record = json.loads((tmp_path / "by_alias" / "runs" / "alias.json").read_text())["model"]
    assert (record["registered_model"], record["registered_version"]) == (NAME, version)
    assert record["uri"] == f"models:/{NAME}@champion" and record["model_id"] == by_alias.model_id.iloc[0]
    logged = [r for r in _runs(client, "score") if r.data.tags.get("cxr.run_id") == "alias"]
    assert len(logged) == 1 and logged[0].data.metrics["counts.scored"] == len(by_alias)
    assert logged[0].data.params["model.registered_version"] == str(version)


def test_promoting_another_version_changes_what_the_alias_scores(trained, store, client):
    from cxr.tracking.registry import main as registry_main, resolve
    from cxr.tracking.settings import TrackingSettings

    first = int(client.get_model_version_by_alias(NAME, "champion").version)
    second = client.create_model_version(NAME, client.get_model_version(NAME, str(first)).source).version
    settings = TrackingSettings(True, store["uri"], "cxr-spark", store["root"] / "cache")
    assert resolve(f"models:/{NAME}@champion", settings).version == first
    assert registry_main(["promote", NAME, str(second), "--tracking-uri", store["uri"]]) == 0
    assert resolve(f"models:/{NAME}@champion", settings).version == int(second)
    assert registry_main(["promote", NAME, str(first), "--tracking-uri", store["uri"]]) == 0


@pytest.mark.parametrize("uri, says", [(f"models:/{NAME}@nobody", "no model 'cxr-test' with alias 'nobody'"),
                                       ("models:/no-such-model@champion", "no model 'no-such-model'"),
                                       (f"models:/{NAME}/99", "with version 99")])
def test_a_missing_alias_or_model_exits_2_with_one_line(trained, archive, store, tmp_path, caplog, uri, says):
    with caplog.at_level(logging.ERROR, logger="cxr"):
        assert _score(store, archive, uri, tmp_path / "pred") == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and says in errors[0] and "\n" not in errors[0]
    assert not (tmp_path / "pred").exists()


def test_no_tracking_writes_nothing_to_the_store(trained, pre_out, archive, store, tmp_path):
    uri = f"sqlite:///{tmp_path}/untouched.db"
    default_store = Path.cwd() / "mlflow.db"      # MLflow's default store (make demo may have made one here)

    def stat(path):
        return (path.stat().st_mtime_ns, path.stat().st_size) if path.exists() else None

    before = stat(default_store)
    assert _score(store, archive, trained / "cnn-adam", tmp_path / "pred", "--no-tracking",
                  "--tracking-uri", uri) == 0
    assert job("train")(["--conf", store["conf"], "--data", str(pre_out), "--out", str(tmp_path / "models"),
                         "--models", "dnn", "--epochs", "1", "--no-evaluate", "--no-tracking",
                         "--tracking-uri", uri]) == 0
    assert (tmp_path / "pred" / "predictions").is_dir() and (tmp_path / "models" / "dnn" / "model.onnx").is_file()
    assert not (tmp_path / "untouched.db").exists() and not (tmp_path / "mlruns").exists()
    assert stat(default_store) == before


def test_logged_model_in_pyfunc_spark_udf_equals_the_score_job(spark, trained, pre_out, archive, store, tmp_path):
    """A model train logged, used outside the project's jobs: MLflow's own Spark UDF on the preprocessed images."""
    import mlflow
    import pandas as pd

    assert _score(store, archive, trained / "cnn-adam", tmp_path / "pred", "--no-tracking") == 0
    scored = pq.read_table(tmp_path / "pred" / "predictions").to_pandas().drop_duplicates("sha256") \
        .set_index("sha256")    # the archive holds one file twice: the preprocess job keeps one of them
    images = pq.read_table(pre_out / "images", columns=["sha256", "image"]).to_pandas()
    flat = [(np.frombuffer(b, np.uint8).astype(np.float32) / 255.0).tolist() for b in images.image]
    frame = spark.createDataFrame(pd.DataFrame({"sha256": images.sha256, "x": flat}))
    udf = mlflow.pyfunc.spark_udf(spark, f"models:/{NAME}@champion", result_type="proba array<float>",
                                  env_manager="local")
    out = frame.select("sha256", udf("x").proba.alias("p")).toPandas().set_index("sha256")
    assert sorted(out.index) == sorted(scored.index) and len(out) >= 30
    np.testing.assert_allclose(np.stack(out.loc[scored.index, "p"].to_numpy()),
                               scored[list(PROB_COLUMNS)].to_numpy(), atol=1e-5)


def test_crossval_logs_the_spread_over_folds(pre_out, store, client, tmp_path):
    out = tmp_path / "cv"
    assert job("crossval")(["--conf", store["conf"], "--data", str(pre_out), "--out", str(out), "--folds", "2",
                            "--seeds", "1", "--epochs", "1", "--no-probes", "--tracking-uri", store["uri"]]) == 0
    result = json.loads((out / "crossval.json").read_text())
    run = _runs(client, "crossval")[0]
    assert run.data.params["folds"] == "2" and run.data.params["data.manifest_sha256"] == \
        result["data"]["manifest_sha256"]
    assert run.data.metrics["cnn-adam.macro_f1.mean"] == pytest.approx(result["summary"]["cnn-adam"]["macro_f1"]
                                                                        ["mean"])
    assert {"crossval.md", "crossval.json"} <= {f.path for f in client.list_artifacts(run.info.run_id)}


def test_jobs_starting_together_on_a_new_store_all_get_it(tmp_path):
    """MLflow creates a new sqlite store's tables by migrations that must not run twice at once (unlocked, three
    processes all failed here and left the store half-built)."""
    import subprocess
    import sys

    code = ("import sys; from pathlib import Path; from cxr.tracking.settings import TrackingSettings; "
            "TrackingSettings(True, sys.argv[1], 'cxr-spark', Path(sys.argv[2])).activate()")
    uri = f"sqlite:///{tmp_path}/new.db"
    procs = [subprocess.Popen([sys.executable, "-c", code, uri, str(tmp_path / "cache")], cwd=ROOT,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert [code for code, _ in results] == [0, 0, 0], [err[-500:] for _, err in results]
