"""The jobs on a real Spark standalone cluster (master + 2 one-core workers on 127.0.0.1, scripts/cluster.sh),
submitted with spark-submit and the packed executor environment, and the faults they must survive.

Inputs are tiny (about 40 files, 32x32 outputs) in many small tasks (2-3 files each, via
spark.sql.files.maxPartitionBytes) so that a fault can be injected while a stage is half done. Every wait is
bounded.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from tests.scoring_models import tiny_keras_cnn
from tests.cluster_fixtures import ROOT, TIMINGS, VENV_BIN, cluster, slim_env, spark_home  # noqa: F401  (fixtures)

pytestmark = pytest.mark.slow

SIZE = 32


@pytest.fixture(scope="module")
def job_conf(cluster, tmp_path_factory) -> Path:
    """Layered over conf/default.yaml: small images, one file per task (many small tasks to kill mid-way),
    event logs into the cluster's state dir (the YAML's spark.conf wins over spark-submit's --conf)."""
    path = tmp_path_factory.mktemp("cluster_conf") / "cluster-test.yaml"
    path.write_text(yaml.safe_dump({
        "preprocess": {"size": SIZE},
        "score": {"batch_size": 8, "files_per_task": 1},   # one file per score task too
        # Spark packs files into a read task by length + openCostInBytes (4 MB): 12 MB -> 2-3 small files a task
        "spark": {"conf": {"spark.sql.files.maxPartitionBytes": 12 * 1024 * 1024, "spark.sql.shuffle.partitions": 4,
                           "spark.ui.showConsoleProgress": False,
                           "spark.eventLog.dir": f"file://{cluster.event_dir}"}},
    }))
    return path


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """The synthetic archive (3 classes, broken files, a duplicate) plus the bad-input corpus under bad/."""
    from cxr.image.badfiles import write_bad_inputs
    from cxr.datasets.synth import generate_archive

    root = tmp_path_factory.mktemp("cluster_archive")
    generate_archive(root, per_class=6, size=96, seed=5, broken=True)
    expected_bad = write_bad_inputs(root / "bad")
    return root, expected_bad


def _table(path: Path):
    return pq.read_table(path).to_pandas()


def _preprocess_args(root: Path, out: Path, conf: Path) -> list[str]:
    return ["--input", str(root), "--output", str(out), "--conf", str(conf)]


@pytest.fixture(scope="module")
def clean_preprocess(cluster, archive, job_conf, tmp_path_factory):
    root, _ = archive
    out = tmp_path_factory.mktemp("cluster_pre") / "out"
    rc, log, seconds = cluster.run(ROOT / "jobs" / "preprocess.py", *_preprocess_args(root, out, job_conf),
                                   log=out.parent / "preprocess.log")
    TIMINGS["clean preprocess (spark-submit)"] = round(seconds, 1)
    assert rc == 0, log[-4000:]
    return out, json.loads((out / "manifest.json").read_text()), log


@pytest.fixture(scope="module")
def model_dir(clean_preprocess, tmp_path_factory):
    """A Keras CNN with its model.onnx: the slim executor environment has no TensorFlow, so the cluster scores it
    with ONNX Runtime (the default engine); the local session's Keras run is the reference."""
    _, manifest, _ = clean_preprocess
    return tiny_keras_cnn(tmp_path_factory.mktemp("cluster_models") / "cnn-cluster", manifest["params"], SIZE)


def _score_args(root: Path, model: Path, out: Path, conf: Path, run_id: str) -> list[str]:
    return ["--input", str(root), "--model", str(model), "--output", str(out), "--conf", str(conf),
            "--run-id", run_id]


@pytest.fixture(scope="module")
def clean_score(clean_preprocess):
    """What a clean score run of the raw archive must count, from the clean preprocess run (same per-file
    function, same params): every decodable file is scored (duplicates too), every rejected one rejected.
    (Saves a spark-submit; the faulty runs below are compared with it.)"""
    _, manifest, _ = clean_preprocess
    c = manifest["counts"]
    return {"input": c["input"], "scored": c["written"] + c["duplicates"], "rejected": c["rejected"],
            "out_of_scope": c["out_of_scope"], "skipped_already_scored": 0, "skipped_unchanged": 0}


def test_preprocess_on_the_cluster_accounts_for_every_file(clean_preprocess, archive, cluster):
    out, manifest, log = clean_preprocess
    _, expected_bad = archive
    counts = manifest["counts"]
    assert manifest["accounted"] and manifest["spark"]["master"] == cluster.url
    assert counts["input"] == counts["written"] + counts["rejected"] + counts["out_of_scope"] + counts["duplicates"]
    images, errors, dups = _table(out / "images"), _table(out / "errors"), _table(out / "duplicates")
    scope = _table(out / "out_of_scope")
    assert (len(images), len(errors), len(scope), len(dups)) == (counts["written"], counts["rejected"],
                                                                 counts["out_of_scope"], counts["duplicates"])
    assert counts["written"] >= 15 and (images.height == SIZE).all()
    # the bad-input corpus: every file ends where badfiles.py says it must
    in_bad = lambda s: s.str.contains("/bad/", regex=False)  # noqa: E731
    stage_of = dict(zip(errors.path[in_bad(errors.path)].str.rsplit("/", n=1).str[-1], errors.stage[in_bad(errors.path)]))
    ok_names = set(pd_names(images.path[in_bad(images.path)])) | set(pd_names(dups.path[in_bad(dups.path)]))
    for name, stage in expected_bad.items():
        if stage == "ok":
            assert name in ok_names, name
        else:
            assert stage_of.get(name) == stage, (name, stage_of.get(name))
    # the one-line summary, and an event log for the history server
    assert re.search(r"preprocess: \d+ files -> \d+ images, \d+ rejected, \d+ out of scope, \d+ duplicates in "
                     r"[\d.]+s \([\d.]+ files/s\)", log), log[-2000:]
    assert list(cluster.event_dir.glob("*app-*")), "no Spark event log written"  # eventlog_v2_app-... (rolling)


def pd_names(paths):
    return paths.str.rsplit("/", n=1).str[-1]


@pytest.fixture(scope="module")
def killed_preprocess(cluster, archive, job_conf, tmp_path_factory):
    """A preprocess run whose Python workers are inspected mid-stage, then one executor JVM is SIGKILLed."""
    root, _ = archive
    out = tmp_path_factory.mktemp("killed_pre") / "out"
    job = cluster.submit(ROOT / "jobs" / "preprocess.py", *_preprocess_args(root, out, job_conf),
                         log=out.parent / "log")
    app, _ = job.wait_for_stage("parquet", min_tasks=8, min_done=2)
    workers = cluster.python_workers(app)
    killed = cluster.kill_one_executor(app)
    rc, log, seconds = job.wait()
    TIMINGS["preprocess with a killed executor"] = round(seconds, 1)
    return {"out": out, "rc": rc, "log": log, "workers": workers, "killed": killed, "app": app}


def test_executors_run_the_packed_environment_not_the_driver_venv(cluster, killed_preprocess):
    """The job's own Python workers, seen from /proc: started as ./environment/bin/python inside the unpacked
    --archives copy, every extension module they loaded from it, no driver-venv site-packages on PYTHONPATH."""
    workers = killed_preprocess["workers"]
    assert workers, "no Python worker of the preprocess job found"
    venv = VENV_BIN.parent.resolve()
    work = (cluster.state_dir / "work").resolve()
    spark_files = Path(spark_home()).resolve()
    for w in workers:
        exe = Path(w["executable"])
        assert exe.parts[-3:] == ("environment", "bin", "python"), exe
        assert exe.is_relative_to(work) and not exe.resolve().is_relative_to(venv), exe
        environment = exe.parent.parent.resolve()
        for lib in w["libraries"]:
            assert Path(lib).resolve().is_relative_to(environment), lib
        # only Spark's own files (pyspark.zip, py4j zip, jars) may come from the pip pyspark in the driver's venv
        for entry in filter(None, w["pythonpath"].split(":")):
            p = Path(entry).resolve()
            assert not p.is_relative_to(venv) or (p.is_relative_to(spark_files) and entry.endswith((".zip", ".jar"))), \
                entry
    loaded = [lib for w in workers for lib in w["libraries"]]   # the workers decoding images have OpenCV loaded
    assert any("/cv2/" in lib for lib in loaded) and any("/numpy/" in lib for lib in loaded), loaded


def test_preprocess_survives_a_killed_executor(cluster, clean_preprocess, killed_preprocess):
    clean_out, clean_manifest, _ = clean_preprocess
    out, rc, log = killed_preprocess["out"], killed_preprocess["rc"], killed_preprocess["log"]
    assert rc == 0, log[-4000:]
    assert killed_preprocess["killed"] not in cluster.executor_pids(killed_preprocess["app"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"] == clean_manifest["counts"]
    cols = ["path", "sha256", "split", "image"]
    got = _table(out / "images")[cols].sort_values("path").reset_index(drop=True)
    want = _table(clean_out / "images")[cols].sort_values("path").reset_index(drop=True)
    assert got.equals(want)
    assert len(_table(out / "errors")) == len(_table(clean_out / "errors"))


def test_score_survives_a_killed_executor(cluster, spark, clean_score, archive, model_dir, job_conf, tmp_path):
    """Also the plain 'score runs on the cluster' test: the counts equal the clean preprocess run's, and the
    slim environment's ONNX Runtime gives the local Keras run's probabilities."""
    root, _ = archive
    out = tmp_path / "pred"
    job = cluster.submit(ROOT / "jobs" / "score.py", *_score_args(root, model_dir, out, job_conf, "r1"),
                         log=tmp_path / "log")
    app, _ = job.wait_for_stage("parquet", min_tasks=8, min_done=2)
    cluster.kill_one_executor(app)
    rc, log, seconds = job.wait()
    TIMINGS["score with a killed executor"] = round(seconds, 1)
    assert rc == 0, log[-4000:]
    record = json.loads((out / "runs" / "r1.json").read_text())
    assert record["counts"] == clean_score and record["spark"]["master"] == cluster.url
    pred = _table(out / "predictions")
    assert len(pred) == clean_score["scored"] and not pred.duplicated(["path", "model_id"]).any()
    assert set(pred.label) <= {"COVID", "NORMAL", "VIRAL"}
    assert re.search(r"score: run r1: \d+ files -> \d+ scored, \d+ rejected, \d+ out of scope, \d+ unchanged \(not read\), "
                     r"\d+ already scored; [\d.]+ images/s", log), log[-2000:]
    assert record["engine"]["name"] == "onnx"
    from cxr.config import load_config
    from cxr.score.frames import PROB_COLUMNS
    from cxr.spark import score

    local = tmp_path / "pred-keras"
    score.run(spark, str(root), str(model_dir), str(local), load_config(job_conf), engine="keras", run_id="keras")
    want = _table(local / "predictions").sort_values("path").reset_index(drop=True)
    got = pred.sort_values("path").reset_index(drop=True)
    assert list(got.path) == list(want.path)
    assert (got[list(PROB_COLUMNS)] - want[list(PROB_COLUMNS)]).abs().to_numpy().max() <= 1e-5


def test_a_killed_driver_leaves_nothing_visible_and_the_rerun_has_no_duplicates(
        cluster, spark, clean_score, archive, model_dir, job_conf, tmp_path):
    root, _ = archive
    out = tmp_path / "pred"
    job = cluster.submit(ROOT / "jobs" / "score.py", *_score_args(root, model_dir, out, job_conf, "crashed"),
                         log=tmp_path / "crashed.log")
    job.wait_for_stage("parquet", min_tasks=8, min_done=2)
    job.kill_driver()
    # nothing of the crashed run is visible to readers: no run record, no prediction rows
    assert not list((out / "runs").glob("*.json")) if (out / "runs").exists() else True
    if (out / "predictions").exists() and list((out / "predictions").rglob("*.parquet")):
        assert len(_table(out / "predictions")) == 0
    # the rerun is a new driver: the shared local[2] session (a third spark-submit would add a minute and
    # test nothing more: what the rerun must do is clean up and commit what the killed run left behind)
    from cxr.config import load_config
    from cxr.spark import score

    config = load_config(job_conf)
    score.run(spark, str(root), str(model_dir), str(out), config, run_id="rerun")
    record = json.loads((out / "runs" / "rerun.json").read_text())
    assert record["counts"] == clean_score
    pred = _table(out / "predictions")
    assert len(pred) == clean_score["scored"]
    assert not pred.duplicated(["path", "model_id"]).any() and set(pred.run_id) == {"rerun"}
    assert [p.name for p in (out / "runs").glob("*.json")] == ["rerun.json"]
    assert not (out / "_staging").exists()


# --- File-system faults. They concern the file listing, not the cluster, so they run on the shared local[2]
# session (conftest's `spark`): seconds instead of a spark-submit each.

@pytest.fixture(scope="module")
def small_archive(tmp_path_factory):
    from cxr.datasets.synth import generate_archive

    root = tmp_path_factory.mktemp("fs_faults")
    generate_archive(root, per_class=2, size=96, seed=1, broken=False)
    return root


def _readable_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in (".png", ".jpg", ".dcm"))


def test_a_dangling_symlink_does_not_fail_the_job(spark, small_archive, tmp_path):
    """Hadoop's local listing drops entries it cannot stat, so a dangling symlink is never listed: it is not an
    input file (like a file deleted before the job started) and the job runs through."""
    from cxr.config import load_config
    from cxr.spark.preprocess import run

    root = tmp_path / "in"
    import shutil

    shutil.copytree(small_archive, root)
    (root / "COVID" / "dangling.png").symlink_to(tmp_path / "does-not-exist.png")
    config = load_config(overrides={"preprocess.size": SIZE})
    result = run(spark, str(root), str(tmp_path / "out"), config)
    assert result["accounted"] and result["counts"]["input"] == len(_readable_files(root))
    assert "dangling.png" not in " ".join(_table(tmp_path / "out" / "errors").path)


def test_a_file_vanishing_between_listing_and_reading_is_an_errors_row(spark, small_archive, tmp_path, monkeypatch):
    """The file is listed (and counted), then deleted before the read stage runs: one errors row, not a failed job.
    (Unreadable files: the tests run as root, for whom chmod 000 does not stop reading, so the permission case
    is checked only when not root; a Java FileNotFoundException '(Permission denied)' takes the same path.)"""
    import os
    import shutil

    from cxr.config import load_config
    from cxr.spark import preprocess

    root = tmp_path / "in"
    shutil.copytree(small_archive, root)
    victim = _readable_files(root)[0]
    unreadable = None
    if os.geteuid() != 0:
        unreadable = _readable_files(root)[1]
        unreadable.chmod(0)
    original = preprocess.read_contents

    def list_then_delete(*args, **kwargs):
        frame = original(*args, **kwargs)  # the file index is built here: the victim is listed
        victim.unlink()
        return frame

    monkeypatch.setattr(preprocess, "read_contents", list_then_delete)
    config = load_config(overrides={"preprocess.size": SIZE})
    spark.conf.set("spark.sql.files.ignoreMissingFiles", "true")
    try:
        result = preprocess.run(spark, str(root), str(tmp_path / "out"), config)
    finally:
        spark.conf.unset("spark.sql.files.ignoreMissingFiles")
    assert result["accounted"]
    errors = _table(tmp_path / "out" / "errors")
    gone = errors[errors.path.str.endswith(victim.name)]
    assert len(gone) == 1 and "vanished" in gone.reason.iloc[0]
    if unreadable is not None:
        assert (errors.path.str.endswith(unreadable.name)).sum() == 1
