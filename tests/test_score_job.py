"""The score job on a real local[2] session: raw and preprocessed inputs, incremental runs, crash recovery."""
from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest

from cxr.config import load_config
from cxr.image.pipeline import PreprocessParams, preprocess_bytes
from cxr.models import store
from cxr.models.onnx_export import export_onnx
from cxr.score.frames import PROB_COLUMNS, model_id
from cxr.spark import preprocess, score
from tests.conftest import ROOT
from tests.scoring_models import model_metadata, tiny_keras_cnn

SIZE = 32


@pytest.fixture(scope="module")
def small_config():
    return load_config(overrides={"preprocess.size": SIZE, "score.batch_size": 8})


@pytest.fixture(scope="module")
def parquet_config():
    """The Parquet layout (its crash leftovers are whole partitions; Delta's: tests/test_delta_table.py)."""
    return load_config(overrides={"preprocess.size": SIZE, "score.batch_size": 8, "score.table_format": "parquet"})


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    from cxr.datasets.synth import generate_archive

    root = tmp_path_factory.mktemp("score_archive")
    generate_archive(root, per_class=5, size=96, seed=11, broken=True)
    return root


@pytest.fixture(scope="module")
def preprocessed(spark, archive, small_config, tmp_path_factory):
    out = tmp_path_factory.mktemp("score_pre") / "pre"
    result = preprocess.run(spark, str(archive), str(out), small_config)
    return out, result


def _metadata(name, pre_result):
    return model_metadata(name, pre_result["params"], SIZE)


@pytest.fixture(scope="module")
def keras_model(preprocessed, tmp_path_factory):
    return tiny_keras_cnn(tmp_path_factory.mktemp("models") / "cnn-test", preprocessed[1]["params"], SIZE)


@pytest.fixture(scope="module")
def scratch_model(preprocessed, tmp_path_factory):
    from cxr.nn import models

    net = models.dnn((SIZE, SIZE, 1), 3, hidden=8, seed=0)
    d = store.save_scratch(net, tmp_path_factory.mktemp("models") / "scratch-dnn-test",
                           _metadata("scratch-dnn-test", preprocessed[1]))
    export_onnx(d)
    return d


def _predictions(out: Path):
    return pq.read_table(out / "predictions").to_pandas()


def _driver_side(model_dir, paths, params):
    images = np.stack([preprocess_bytes(Path(p.split(":", 1)[1]).read_bytes(), params)[1] for p in paths])
    return store.load_predictor(model_dir).predict_proba(images[..., None].astype(np.float32) / 255.0)


@pytest.mark.parametrize("which", ["keras_model", "scratch_model"])
def test_raw_archive_scores_equal_the_driver_model(spark, archive, small_config, tmp_path, request, which):
    model_dir = request.getfixturevalue(which)
    out = tmp_path / "pred"
    record = score.run(spark, str(archive), str(model_dir), str(out), small_config)
    c = record["counts"]
    assert record["accounted"] and c["input"] == c["scored"] + c["rejected"]
    assert c["skipped_already_scored"] == c["skipped_unchanged"] == 0 and c["scored"] > 10 and c["rejected"] >= 5
    pred = _predictions(out).sort_values("path")
    assert set(pred.model_id) == {model_id(model_dir)} and (pred.run_id == record["run_id"]).all()
    assert set(pred.label) <= {"COVID", "NORMAL", "VIRAL"}
    expected = _driver_side(model_dir, pred.path, PreprocessParams.from_dict(record["params"]))
    np.testing.assert_allclose(pred[list(PROB_COLUMNS)].to_numpy(), expected, atol=1e-5)
    errors = pq.read_table(out / "errors").to_pandas()
    assert len(errors) == c["rejected"] and errors.reason.notna().all()
    assert json.loads((out / "runs" / f"{record['run_id']}.json").read_text())["counts"] == c


def test_incremental_runs_score_only_new_files(spark, archive, keras_model, small_config, tmp_path):
    out = tmp_path / "pred"
    first = score.run(spark, str(archive), str(keras_model), str(out), small_config, run_id="night1")
    second = score.run(spark, str(archive), str(keras_model), str(out), small_config, run_id="night2")
    assert second["counts"]["scored"] == 0 and second["accounted"] and second["bytes_read"] == 0
    # nothing changed: every file (scored or rejected) is skipped without being opened
    assert second["counts"]["skipped_unchanged"] == first["counts"]["input"]
    new = archive.parent / "grown"
    if not new.exists():
        import shutil

        shutil.copytree(archive, new)
        from cxr.datasets.synth import render_chest

        import cv2
        cv2.imwrite(str(new / "COVID" / "new_scan.png"), (render_chest("COVID", 96, 5) * 255).astype(np.uint8))
    third = score.run(spark, str(new), str(keras_model), str(out), small_config, run_id="night3")
    assert third["counts"]["scored"] == 1
    pred = _predictions(out)
    assert len(pred) == first["counts"]["scored"] + 1
    assert not pred.duplicated(["path", "sha256", "model_id"]).any()
    full = score.run(spark, str(archive), str(keras_model), str(out), small_config, full=True, run_id="full")
    assert full["counts"]["scored"] == first["counts"]["scored"]


def test_a_file_vanishing_between_listing_and_reading_is_an_errors_row(spark, archive, keras_model, small_config,
                                                                      tmp_path, monkeypatch):
    """A new file, listed (so counted as input) and deleted before the read: an errors row, the run still
    accounts for every file, the rest skipped as unchanged."""
    root = _copy(archive, tmp_path / "in")
    out = tmp_path / "pred"
    score.run(spark, str(root), str(keras_model), str(out), small_config, run_id="first")
    victim = root / "VIRAL" / "late.png"
    shutil.copy(_good_images(root)[0], victim)
    original = score.list_archive

    def list_then_delete(*args, **kwargs):
        listing = original(*args, **kwargs)  # the archive is listed here: the victim with it
        victim.unlink()
        return listing

    monkeypatch.setattr(score, "list_archive", list_then_delete)
    record = score.run(spark, str(root), str(keras_model), str(out), small_config, run_id="second")
    c = record["counts"]
    assert record["accounted"] and c["rejected"] == 1 and c["scored"] == 0
    errors = pq.read_table(next((out / "errors").glob("run_date=*/run_id=second"))).to_pandas()
    assert len(errors) == 1 and errors.path.iloc[0].endswith("late.png") and "vanished" in errors.reason.iloc[0]
    assert c["skipped_unchanged"] == c["input"] - 1


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _good_images(root: Path) -> list[Path]:
    """Files the synthetic archive made valid (a class folder's PNG/JPEG that decodes), in name order."""
    return sorted(p for p in root.glob("*/*.png") if p.stat().st_size > 1000 and "broken" not in p.name)


def _state(out: Path):
    return pq.read_table(out / "state").to_pandas()


def test_unchanged_files_are_not_opened(spark, archive, keras_model, small_config, tmp_path):
    """Bytes overwritten with garbage of the same size, mtime restored: had the run opened the file, it would
    be rejected or rescored; it is neither."""
    root = _copy(archive, tmp_path / "in")
    out = tmp_path / "pred"
    first = score.run(spark, str(root), str(keras_model), str(out), small_config, run_id="first")
    target = _good_images(root)[0]
    st = target.stat()
    target.write_bytes(np.random.default_rng(0).integers(0, 256, st.st_size, dtype=np.uint8).tobytes())
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    second = score.run(spark, str(root), str(keras_model), str(out), small_config, run_id="second")
    c = second["counts"]
    assert c["scored"] == 0 and c["rejected"] == 0 and c["skipped_unchanged"] == first["counts"]["input"]
    assert second["bytes_read"] == 0 and not (out / "errors" / f"run_date={second['run_date']}" / "run_id=second").exists()
    state = _state(out)
    assert set(state.columns) >= {"path", "size", "mtime", "sha256", "status", "seen_at", "model_id", "run_id"}
    assert set(state.run_id) == {"first"}


def test_touched_moved_and_copied_files_get_no_new_prediction(spark, archive, keras_model, small_config, tmp_path):
    root = _copy(archive, tmp_path / "in")
    out = tmp_path / "pred"
    first = score.run(spark, str(root), str(keras_model), str(out), small_config, run_id="first")
    touched, moved, copied = _good_images(root)[:3]
    os.utime(touched, (touched.stat().st_atime + 100, touched.stat().st_mtime + 100))
    moved.rename(moved.with_name("moved_" + moved.name))
    shutil.copy(copied, copied.parent / ("copy_" + copied.name))
    second = score.run(spark, str(root), str(keras_model), str(out), small_config, run_id="second")
    c = second["counts"]
    assert second["accounted"] and c["scored"] == 0 and c["skipped_already_scored"] == 3
    assert c["input"] == first["counts"]["input"] + 1
    assert len(_predictions(out)) == first["counts"]["scored"]
    # their new metadata is remembered: the next night opens nothing
    third = score.run(spark, str(root), str(keras_model), str(out), small_config, run_id="third")
    assert third["counts"]["skipped_unchanged"] == third["counts"]["input"] and third["bytes_read"] == 0


def test_changed_bytes_give_a_new_row(spark, archive, keras_model, small_config, tmp_path):
    root = _copy(archive, tmp_path / "in")
    out = tmp_path / "pred"
    score.run(spark, str(root), str(keras_model), str(out), small_config, run_id="first")
    a, b = _good_images(root)[:2]
    cv2.imwrite(str(a), cv2.imread(str(b), cv2.IMREAD_GRAYSCALE)[::-1])   # an other image at the same path
    second = score.run(spark, str(root), str(keras_model), str(out), small_config, run_id="second")
    assert second["counts"]["scored"] == 1 and second["accounted"]
    pred = _predictions(out)
    rows = pred[pred.path.str.endswith("/" + a.name)]
    assert len(rows) == 2 and rows.sha256.nunique() == 2


def test_rejected_files_are_retried_only_when_changed_or_asked(spark, archive, keras_model, small_config, tmp_path):
    root = _copy(archive, tmp_path / "in")
    out = tmp_path / "pred"
    first = score.run(spark, str(root), str(keras_model), str(out), small_config, run_id="first")
    rejected = first["counts"]["rejected"]
    assert rejected >= 5
    second = score.run(spark, str(root), str(keras_model), str(out), small_config, run_id="second")
    assert second["counts"]["rejected"] == 0 and second["counts"]["skipped_unchanged"] == first["counts"]["input"]
    errors = pq.read_table(out / "errors").to_pandas()
    bad = Path(errors[errors.reason.str.contains("decod|truncat|corrupt", case=False)].path.iloc[0].split(":", 1)[1])
    bad.write_bytes(bad.read_bytes() + b"more")   # changed: read again (and still rejected)
    third = score.run(spark, str(root), str(keras_model), str(out), small_config, run_id="third")
    assert third["counts"]["rejected"] == 1 and third["counts"]["scored"] == 0
    retry = score.run(spark, str(root), str(keras_model), str(out), small_config, run_id="retry", retry_errors=True)
    assert retry["counts"]["rejected"] == rejected and retry["counts"]["scored"] == 0 and retry["accounted"]


def test_a_live_lease_refuses_the_run_and_a_stale_one_is_taken_over(spark, archive, keras_model, parquet_config,
                                                                    tmp_path):
    small_config = parquet_config
    from cxr.score.lease import LeaseHeldError

    out = tmp_path / "pred"
    out.mkdir()
    live = {"run_id": "other", "host": socket.gethostname(), "pid": os.getpid(), "started": "now",
            "expires": "later", "expires_unix": time.time() + 3600}
    (out / "_lease").write_text(json.dumps(live))
    with pytest.raises(LeaseHeldError, match="run other .*pid %d" % os.getpid()):
        score.run(spark, str(archive), str(keras_model), str(out), small_config, run_id="refused")
    assert sorted(p.name for p in out.iterdir()) == ["_lease"]
    # the holder is gone past its expiry: its leftovers are removed, the run commits
    (out / "_lease").write_text(json.dumps({**live, "host": "elsewhere", "expires_unix": time.time() - 1}))
    leftover = out / "predictions" / "run_date=2026-01-01" / "run_id=other"
    leftover.mkdir(parents=True)
    (leftover / "part-0.parquet").write_bytes(b"half written")
    record = score.run(spark, str(archive), str(keras_model), str(out), small_config, run_id="taker")
    assert record["lease_taken_over"]["run_id"] == "other" and not leftover.exists()
    assert not (out / "_lease").exists() and record["counts"]["scored"] > 10


def test_a_crashed_run_leaves_nothing_visible(spark, archive, keras_model, parquet_config, tmp_path):
    small_config = parquet_config
    out = tmp_path / "pred"
    score.run(spark, str(archive), str(keras_model), str(out), small_config, run_id="ok1")
    # a run that died after moving its predictions but before writing runs/<id>.json
    crashed = out / "predictions" / "run_date=2026-01-01" / "run_id=crashed"
    crashed.parent.mkdir(parents=True)
    import shutil

    shutil.copytree(next((out / "predictions").glob("run_date=*/run_id=ok1")), crashed)
    (out / "_staging" / "half").mkdir(parents=True)
    rerun = score.run(spark, str(archive), str(keras_model), str(out), small_config, run_id="rerun")
    assert not crashed.exists() and not (out / "_staging").exists()
    assert rerun["counts"]["scored"] == 0
    assert not _predictions(out).duplicated(["path", "sha256", "model_id"]).any()


def test_preprocessed_input_skips_the_image_steps(spark, preprocessed, keras_model, small_config, tmp_path):
    pre_out, pre_result = preprocessed
    out = tmp_path / "pred"
    record = score.run(spark, str(pre_out), str(keras_model), str(out), small_config)
    assert record["mode"] == "preprocessed"
    assert record["counts"]["scored"] == pre_result["counts"]["written"]
    images = pq.read_table(pre_out / "images").to_pandas().sort_values("path")
    pred = _predictions(out).sort_values("path")
    x = np.stack([np.frombuffer(b, np.uint8).reshape(SIZE, SIZE) for b in images.image])
    expected = store.load_predictor(keras_model).predict_proba(x[..., None].astype(np.float32) / 255.0)
    np.testing.assert_allclose(pred[list(PROB_COLUMNS)].to_numpy(), expected, atol=1e-5)


def test_differently_preprocessed_data_is_refused(spark, preprocessed, keras_model, tmp_path):
    pre_out, pre_result = preprocessed
    other = tmp_path / "other-model"
    meta = store.read_metadata(keras_model)
    import shutil

    shutil.copytree(keras_model, other)
    store.write_metadata(other, {**meta, "preprocess": {**meta["preprocess"], "clip_limit": 4.0}})
    with pytest.raises(ValueError, match="clip_limit"):
        score.run(spark, str(pre_out), str(other), str(tmp_path / "pred"), load_config())


def test_two_concurrent_spark_submits_one_scores_the_other_exits_3(archive, keras_model, preprocessed, tmp_path):
    """Real spark-submits started together on one PRED_DIR: whichever takes the lease scores (Keras engine:
    its workers spend seconds importing TensorFlow, so it still holds the lease when the other checks), the
    other exits 3 naming the holder and writes nothing; no row is lost or duplicated."""
    import subprocess
    import sys

    out = tmp_path / "pred"
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable,
           "SPARK_LOCAL_IP": "127.0.0.1"}
    procs = {}
    for run_id in ("cron", "manual"):
        cmd = ["bash", str(ROOT / "scripts" / "submit.sh"), "--master", "local[1]", "--conf", "spark.ui.enabled=false",
               str(ROOT / "jobs" / "score.py"), "--input", str(archive), "--model", str(keras_model),
               "--output", str(out), "--run-id", run_id, "--engine", "keras"]
        procs[run_id] = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                         text=True)
    results = {run_id: (p.wait(timeout=600), p.stdout.read()) for run_id, p in procs.items()}
    codes = sorted(rc for rc, _ in results.values())
    assert codes == [0, 3], {k: (rc, text[-2000:]) for k, (rc, text) in results.items()}
    winner = next(k for k, (rc, _) in results.items() if rc == 0)
    loser = next(k for k in results if k != winner)
    held = [line for line in results[loser][1].splitlines() if "in use by" in line]
    assert len(held) == 1 and f"run {winner}" in held[0]
    assert not (out / "runs" / f"{loser}.json").exists() and not (out / "_lease").exists()
    record = json.loads((out / "runs" / f"{winner}.json").read_text())
    pred = _predictions(out)
    assert len(pred) == record["counts"]["scored"] > 10 and not pred.duplicated(["path"]).any()


def test_result_frames_are_grouped_without_losing_a_row_or_a_type():
    """The scoring pass hands Spark result rows 256 at a time, not one model batch (32) at a time."""
    import pandas as pd

    from cxr.score.frames import grouped

    frames = [pd.DataFrame({"path": [f"f{i}-{j}" for j in range(n)], "p": np.arange(n, dtype=np.float32),
                            "h": pd.array([None] * n, dtype="Int32")}) for i, n in enumerate([32, 32, 0, 32, 7])]
    out = list(grouped(iter(frames), 64))
    assert [len(f) for f in out] == [64, 39]
    joined = pd.concat(out, ignore_index=True)
    assert list(joined["path"]) == [p for f in frames for p in f["path"]]
    assert joined["p"].dtype == np.float32 and str(joined["h"].dtype) == "Int32"
    assert list(grouped(iter([]), 64)) == []
