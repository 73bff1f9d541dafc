"""The jobs over Spark Connect: a real server (scripts/connect.sh, local[2], a free loopback port) for the module.

The Connect side runs the jobs' own entry points as subprocesses (`python jobs/X.py --remote sc://...`: a
process holds either a classic or a Connect session, never both); the classic side runs in this process on
the session of tests/conftest.py. Their outputs must be equal.
"""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from cxr.config import load_config
from cxr.models import store
from cxr.score.frames import PROB_COLUMNS
from cxr.spark import fs, preprocess, score
from tests.conftest import ROOT
from tests.scoring_models import tiny_keras_cnn

SIZE = 32
CONNECT_SH = ROOT / "scripts" / "connect.sh"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("SPARK_REMOTE", "SPARK_CONNECT_MODE_ENABLED")}
    return {**env, "PYSPARK_PYTHON": sys.executable, "SPARK_LOCAL_IP": "127.0.0.1", "TF_CPP_MIN_LOG_LEVEL": "2",
            **extra}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and b"SparkConnectServer" in Path(f"/proc/{pid}/cmdline").read_bytes()


@pytest.fixture(scope="module")
def connect_server(tmp_path_factory):
    """A Spark Connect server for this module, started in the background (`connect` waits for it) and stopped
    after the module's last test, then checked gone. CXR_CONNECT_TESTS=0 switches the Connect tests off."""
    if os.environ.get("CXR_CONNECT_TESTS") == "0":
        pytest.skip("CXR_CONNECT_TESTS=0: Spark Connect tests switched off for this run")
    state = tmp_path_factory.mktemp("connect")
    port = _free_port()
    env = _env(CXR_CONNECT_DIR=str(state), CXR_CONNECT_PORT=str(port), CXR_CONNECT_DRIVER_MEMORY="1g")
    up = subprocess.Popen(["bash", str(CONNECT_SH), "up"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
    server = {"up": up, "env": env, "url": f"sc://127.0.0.1:{port}", "ready": None}
    try:
        yield server
    finally:
        if up.poll() is None:
            up.communicate(timeout=300)
        pidfiles = list(state.glob("*.pid"))
        pid = int(pidfiles[0].read_text()) if pidfiles else None
        down = subprocess.run(["bash", str(CONNECT_SH), "down"], env=env, capture_output=True, text=True,
                              timeout=120)
        assert down.returncode == 0, down.stdout + down.stderr
        assert pid is None or not _alive(pid), f"Spark Connect server pid {pid} still running"
        after = subprocess.run(["bash", str(CONNECT_SH), "status"], env=env, capture_output=True, text=True)
        assert after.returncode == 3 and "not started" in after.stdout, after.stdout


def _ready(server: dict) -> str:
    if server["ready"] is None:
        out, _ = server["up"].communicate(timeout=300)
        server["ready"] = server["up"].returncode == 0
        server["log"] = out
    assert server["ready"], server["log"]
    status = subprocess.run(["bash", str(CONNECT_SH), "status"], env=server["env"], capture_output=True, text=True)
    assert status.returncode == 0 and "running" in status.stdout, status.stdout
    return server["url"]


@pytest.fixture(scope="module")
def connect(connect_server):
    """sc://127.0.0.1:PORT of the module's server, once it listens."""
    return _ready(connect_server)


def _start_job(connect: str, name: str, *args: str) -> subprocess.Popen:
    """`python jobs/NAME.py --remote URL ARGS...`: the job's own entry point as a Spark Connect client."""
    cmd = [sys.executable, str(ROOT / "jobs" / f"{name}.py"), "--remote", connect, *args]
    return subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish_job(proc: subprocess.Popen, expect: int = 0) -> subprocess.CompletedProcess:
    try:
        out, err = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    assert proc.returncode == expect, (proc.returncode, out[-2000:], err[-4000:])
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _job(connect: str, name: str, *args: str, expect: int = 0) -> subprocess.CompletedProcess:
    return _finish_job(_start_job(connect, name, *args), expect)


@pytest.fixture(scope="module")
def small_config():
    return load_config(overrides={"preprocess.size": SIZE, "score.batch_size": 8})


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    from cxr.datasets.synth import generate_archive

    root = tmp_path_factory.mktemp("connect_archive")
    generate_archive(root, per_class=4, size=96, seed=17, broken=True)
    return root


@pytest.fixture(scope="module")
def preprocessed(connect_server, spark, archive, small_config, tmp_path_factory):
    """(classic output, its result, Connect output) of the preprocess job on one archive. The server starts
    while the classic session does; the Connect job runs beside the classic one."""
    base = tmp_path_factory.mktemp("connect_pre")
    remote = _start_job(_ready(connect_server), "preprocess", "--input", str(archive), "--output",
                        str(base / "connect"), "--size", str(SIZE))
    classic = preprocess.run(spark, str(archive), str(base / "classic"), small_config)
    _finish_job(remote)
    return base / "classic", classic, base / "connect"


@pytest.fixture(scope="module")
def model(preprocessed, tmp_path_factory):
    return tiny_keras_cnn(tmp_path_factory.mktemp("connect_models") / "cnn-connect", preprocessed[1]["params"], SIZE)


def _rows(path: Path, drop=()) -> pd.DataFrame:
    frame = pq.read_table(path).to_pandas()
    return frame.drop(columns=[c for c in drop if c in frame]).sort_values("path").reset_index(drop=True)


def test_preprocess_over_connect_equals_classic(preprocessed):
    classic, _, remote = preprocessed
    for table in ("images", "errors", "duplicates"):
        a, b = _rows(classic / table), _rows(remote / table)
        assert len(a) == len(b) > 0, table
        pd.testing.assert_frame_equal(a, b, check_like=True)
    m_classic = json.loads((classic / "manifest.json").read_text())
    m_remote = json.loads((remote / "manifest.json").read_text())
    for key in ("counts", "accounted", "by_split_and_label", "params"):
        assert m_classic[key] == m_remote[key], key
    assert m_remote["accounted"] and m_remote["spark"]["master"] == "local[2]"


def _score_equal(classic_out: Path, remote_out: Path, classic_rec: dict, remote_rec: dict) -> None:
    assert classic_rec["counts"] == remote_rec["counts"] and remote_rec["accounted"]
    a = _rows(classic_out / "predictions", drop=("run_id", "run_date", "scored_at"))
    b = _rows(remote_out / "predictions", drop=("run_id", "run_date", "scored_at"))
    assert len(a) == len(b) == classic_rec["counts"]["scored"] > 0
    assert (a.path == b.path).all() and (a.sha256 == b.sha256).all() and (a.label == b.label).all()
    np.testing.assert_allclose(a[list(PROB_COLUMNS)].to_numpy(), b[list(PROB_COLUMNS)].to_numpy(), atol=1e-6)
    if classic_rec["counts"]["rejected"]:
        ea = _rows(classic_out / "errors", drop=("run_id", "run_date"))
        eb = _rows(remote_out / "errors", drop=("run_id", "run_date"))
        pd.testing.assert_frame_equal(ea, eb, check_like=True)


def test_score_raw_over_connect_equals_classic_and_reruns_incrementally(spark, connect, archive, model,
                                                                         small_config, tmp_path):
    remote_out = tmp_path / "connect"
    args = ("--input", str(archive), "--model", str(model), "--output", str(remote_out), "--batch-size", "8")
    first = _start_job(connect, "score", *args, "--run-id", "c1")
    classic_rec = score.run(spark, str(archive), str(model), str(tmp_path / "classic"), small_config)
    _finish_job(first)
    remote_rec = json.loads((remote_out / "runs" / "c1.json").read_text())
    assert remote_rec["mode"] == "raw" and remote_rec["spark"]["master"] == "local[2]"
    _score_equal(tmp_path / "classic", remote_out, classic_rec, remote_rec)
    assert remote_rec["counts"]["rejected"] > 0

    done = _job(connect, "score", *args, "--run-id", "c2")
    again = json.loads((remote_out / "runs" / "c2.json").read_text())
    assert again["counts"]["scored"] == 0 and again["bytes_read"] == 0 and again["accounted"], done.stdout
    assert again["counts"]["skipped_unchanged"] == remote_rec["counts"]["input"]
    assert not (remote_out / "_lease").exists() and not (remote_out / "_staging").exists()


def test_score_preprocessed_over_connect_equals_classic(spark, connect, preprocessed, model, small_config, tmp_path):
    classic_pre, _, remote_pre = preprocessed
    remote = _start_job(connect, "score", "--input", str(remote_pre), "--model", str(model), "--output",
                        str(tmp_path / "connect"), "--batch-size", "8", "--run-id", "p1")
    classic_rec = score.run(spark, str(classic_pre), str(model), str(tmp_path / "classic"), small_config)
    _finish_job(remote)
    remote_rec = json.loads((tmp_path / "connect" / "runs" / "p1.json").read_text())
    assert remote_rec["mode"] == "preprocessed"
    _score_equal(tmp_path / "classic", tmp_path / "connect", classic_rec, remote_rec)


TRAIN_CONF = """
train:
  verbose: 0
  scratch: {input_size: null, dnn: {hidden: 16}}
evaluate:
  partitions: 2
  batch_size: 8
"""


def test_train_and_distributed_evaluation_over_connect(spark, connect, preprocessed, tmp_path):
    """jobs/train.py over Connect (training on the driver, evaluation in mapInPandas on the server's workers)
    gives the evaluation the classic session gives for the same models on the same rows."""
    import shutil

    from cxr.spark import evaluate

    classic_pre, _, remote_pre = preprocessed
    conf = tmp_path / "train.yaml"
    conf.write_text(TRAIN_CONF)
    models = tmp_path / "models"
    done = _job(connect, "train", "--conf", str(conf), "--data", str(remote_pre), "--out", str(models),
                "--models", "scratch-dnn", "--epochs", "2", "--split", "train")
    assert "report:" in done.stdout and (models / "report.md").is_file()
    remote = json.loads((models / "evaluation_train.json").read_text())
    assert remote["spark"]["master"] == "local[2]" and remote["partitions"] == 2
    copy = tmp_path / "models-classic"
    shutil.copytree(models, copy)
    classic = evaluate.run(spark, str(classic_pre), str(copy), load_config(str(conf)), split="train", write=False)
    got, want = remote["models"]["scratch-dnn"], classic["models"]["scratch-dnn"]
    assert got["n"] == want["n"] > 0 and got["confusion"] == want["confusion"]
    assert got["predictions"]["sha256"] == want["predictions"]["sha256"]
    assert got["predictions"]["y"] == want["predictions"]["y"]
    np.testing.assert_allclose(np.asarray(got["predictions"]["proba"]), np.asarray(want["predictions"]["proba"]),
                               atol=1e-6)


_NEEDS_JVM = """
import sys
from cxr.cli import base_parser, run_job
args = base_parser("t").parse_args(sys.argv[1:])
sys.exit(run_job(args, {}, lambda spark, config: spark.sparkContext.defaultParallelism))
"""


def test_a_connect_only_failure_names_the_feature(connect):
    done = subprocess.run([sys.executable, "-c", _NEEDS_JVM, "--remote", connect], env=_env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "not available over Spark Connect: " in done.stderr and "Traceback" not in done.stderr


def test_spark_remote_environment_variable_is_honoured(connect, tmp_path):
    """SPARK_REMOTE alone (no --remote) makes a job run over Connect."""
    code = ("from cxr.config import load_config; from cxr.spark.session import get_spark, is_connect, "
            "default_parallelism; s = get_spark(load_config()); print(is_connect(s), default_parallelism(s)); s.stop()")
    done = subprocess.run([sys.executable, "-c", code], env=_env(SPARK_REMOTE=connect), cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["True", "2"]


@pytest.mark.parametrize("where", ["job flag", "spark-submit flag"])
def test_spark_submit_with_remote_runs_over_connect(connect, archive, preprocessed, tmp_path, where):
    """`spark-submit jobs/preprocess.py --remote URL` (spark-submit starts a classic driver JVM and sets MASTER) and
    `spark-submit --remote URL jobs/preprocess.py` (spark-submit hands the URL over in PYSPARK_REMOTE_INIT_CONF_*)
    both run the job over Connect, with the same rows as the classic run."""
    submit = str(Path(sys.executable).with_name("spark-submit"))
    out = tmp_path / "out"
    job = [str(ROOT / "jobs" / "preprocess.py"), "--input", str(archive), "--output", str(out), "--size", "32"]
    cmd = [submit, *job, "--remote", connect] if where == "job flag" else [submit, "--remote", connect, *job]
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    said = done.stdout + done.stderr
    assert "over Spark Connect at " + connect in said and "Traceback" not in said
    classic_out, _, _ = preprocessed
    pd.testing.assert_frame_equal(_rows(out / "images"), _rows(classic_out / "images"), check_like=True)


def test_no_jvm_handles_in_cxr_or_jobs():
    pattern = re.compile(r"sparkContext|_jvm|_jsc")
    offenders = [f"{p.relative_to(ROOT)}:{n}" for top in ("cxr", "jobs") for p in sorted((ROOT / top).rglob("*.py"))
                 for n, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    # the one guarded accessor (None over Connect), which the features of a classic session go through
    allowed = [f"cxr/spark/session.py:{n}" for n, line in
               enumerate((ROOT / "cxr/spark/session.py").read_text().splitlines(), 1)
               if "return None if is_connect(spark) else spark.sparkContext" in line]
    assert len(allowed) == 1 and offenders == allowed


def test_session_helpers_on_the_classic_session(spark):
    from cxr.spark.session import default_parallelism, is_connect, master_url

    assert master_url(spark) == "local[2]" and default_parallelism(spark) == 2 and not is_connect(spark)


def test_fs_on_local_paths(tmp_path):
    root = tmp_path / "out"
    assert fs.qualified(None, f"{root}/") == f"file:{root}" == fs.qualified(None, f"file://{root}")
    assert not fs.exists(None, str(root)) and fs.list_names(None, str(root)) == set()
    assert fs.list_dirs(None, str(root)) == [] and not fs.is_nonempty_dir(None, str(root))
    fs.write_text(None, f"file:{root}/a/b/x.json", "{}")
    assert fs.read_text(None, str(root / "a" / "b" / "x.json")) == "{}" and fs.is_nonempty_dir(None, str(root))
    fs.rename(None, f"file:{root}/a/b", f"file:{root}/c/d/b")
    assert fs.list_dirs(None, f"file:{root}") == [f"file:{root}/a", f"file:{root}/c"]
    assert fs.list_names(None, str(root / "c" / "d" / "b")) == {"x.json"}
    with pytest.raises(OSError):
        fs.rename(None, str(root / "c"), str(root / "a"))   # never into an existing folder
    fs.delete(None, str(root / "c"))
    fs.delete(None, str(root / "c"))   # absent: nothing
    assert fs.list_names(None, str(root)) == {"a"}
    lease = fs.FsLeaseFiles()
    assert lease.create_new(str(root / "_lease"), "1") and not lease.create_new(str(root / "_lease"), "2")
    assert lease.read_text_or_none(str(root / "_lease")) == "1" and lease.read_text_or_none(str(root / "no")) is None
    assert lease.rename_if_exists(str(root / "_lease"), str(root / "_old")) and not lease.rename_if_exists(
        str(root / "_lease"), str(root / "_older"))


class _Conf:
    def __init__(self, values):
        self.values = values

    def get(self, key, default=None):
        return self.values.get(key, default)


class _Session:
    def __init__(self, **values):
        self.conf = _Conf({k.replace("_", "."): v for k, v in values.items()})


@pytest.mark.parametrize("values, want", [
    ({"spark_master": "local[3]"}, 3), ({"spark_master": "local"}, 1), ({"spark_master": "local[*]"}, os.cpu_count()),
    ({"spark_master": "local[2,4]"}, 2), ({"spark_master": "local-cluster[2,3,1024]"}, 6),
    ({"spark_master": "spark://h:7077", "spark_default_parallelism": "12"}, 12),
    ({"spark_master": "spark://h:7077", "spark_cores_max": "8"}, 8), ({"spark_master": "yarn"}, 2),
    ({"spark_master": "yarn", "spark_executor_instances": "3", "spark_executor_cores": "4"}, 12),
])
def test_default_parallelism_without_a_spark_context(values, want):
    from cxr.spark.session import default_parallelism

    assert default_parallelism(_Session(**values)) == want


def test_master_and_remote_together_are_refused(monkeypatch):
    from cxr.spark.session import _resolve_remote

    with pytest.raises(ValueError, match="not both"):
        _resolve_remote("local[2]", "sc://127.0.0.1:1")
    monkeypatch.setenv("SPARK_REMOTE", "sc://127.0.0.1:1")
    assert _resolve_remote(None, None) == "sc://127.0.0.1:1"
    assert _resolve_remote("local[2]", None) is None and "SPARK_REMOTE" not in os.environ
    done = subprocess.run([sys.executable, str(ROOT / "jobs" / "score.py"), "--remote", "sc://127.0.0.1:1", "--master",
                           "local[2]", "--input", "in", "--model", "m", "--output", "out"], env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "not both" in done.stderr and "Traceback" not in done.stderr, done.stderr[-2000:]
