"""score.table_format: delta on a real local[2] session: rows as in the Parquet layout, incremental nights through
the Delta log, idempotent and concurrent commits, a killed run and its rerun, compaction and vacuum, and the
same on an S3 API server on loopback (moto)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable

from cxr.config import load_config
from cxr.image.pipeline import PreprocessParams
from cxr.score import delta_table
from cxr.score.lease import Lease
from cxr.spark import score
from tests.conftest import ROOT
from tests.scoring_models import tiny_keras_cnn

SIZE = 32
VOLATILE = ["run_id", "run_date", "scored_at", "seen_at"]


def _config(**extra):
    return load_config(overrides={"preprocess.size": SIZE, "score.batch_size": 8, "score.table_format": "delta",
                                  **extra})


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    from cxr.datasets.synth import generate_archive

    root = tmp_path_factory.mktemp("delta_archive")
    generate_archive(root, per_class=4, size=96, seed=21, broken=True)
    return root


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    params = PreprocessParams.from_config(_config()["preprocess"]).to_dict()
    return tiny_keras_cnn(tmp_path_factory.mktemp("delta_models") / "cnn-delta", params, SIZE)


def _rows(frame: pd.DataFrame) -> pd.DataFrame:
    keep = [c for c in frame.columns if c not in VOLATILE]
    return frame[sorted(keep)].sort_values("path").reset_index(drop=True)


def _delta(out, table) -> pd.DataFrame:
    return DeltaTable(str(out / table) if isinstance(out, Path) else f"{out}/{table}").to_pandas()


def test_delta_tables_hold_the_parquet_layout_rows(spark, archive, model, tmp_path):
    parquet = score.run(spark, str(archive), str(model), str(tmp_path / "pq"), _config(**{"score.table_format": "parquet"}))
    delta = score.run(spark, str(archive), str(model), str(tmp_path / "dl"), _config())
    assert delta["counts"] == parquet["counts"] and delta["accounted"] and delta["table_format"] == "delta"
    assert set(delta["delta_versions"]) == {"predictions", "errors", "state"}
    for table in ("predictions", "errors", "state"):
        want = pq.read_table(tmp_path / "pq" / table).to_pandas()
        by_delta = _delta(tmp_path / "dl", table)
        by_arrow = pq.read_table(tmp_path / "dl" / table).to_pandas()   # a plain Parquet reader (no compaction yet)
        assert len(by_delta) == len(want) > 0
        pd.testing.assert_frame_equal(_rows(by_delta), _rows(want), check_dtype=False, check_categorical=False)
        pd.testing.assert_frame_equal(_rows(by_arrow), _rows(want), check_dtype=False, check_categorical=False)
        assert (by_delta.run_id == delta["run_id"]).all()
    log = DeltaTable(str(tmp_path / "dl" / "predictions")).history()
    assert log[0]["operation"] in ("CREATE TABLE", "WRITE", "CREATE OR REPLACE TABLE")


def test_unchanged_night_reads_nothing_and_commits_state_only(spark, archive, model, tmp_path):
    import shutil

    out, archive = tmp_path / "pred", shutil.copytree(archive, tmp_path / "archive")
    first = score.run(spark, str(archive), str(model), str(out), _config(), run_id="n1")
    second = score.run(spark, str(archive), str(model), str(out), _config(), run_id="n2")
    assert second["counts"]["skipped_unchanged"] == first["counts"]["input"] and second["bytes_read"] == 0
    assert second["counts"]["scored"] == 0 and second["accounted"]
    pred = _delta(out, "predictions")
    assert len(pred) == first["counts"]["scored"] and not pred.duplicated(["path", "model_id"]).any()
    # a rescored file (touched: new mtime, same bytes) is hashed, recognised through the Delta table, not decoded
    victim = Path(sorted(pred.path)[0].split(":", 1)[1])
    os.utime(victim, (time.time() + 60, time.time() + 60))
    third = score.run(spark, str(archive), str(model), str(out), _config(), run_id="n3")
    assert third["counts"]["skipped_already_scored"] == 1 and third["counts"]["scored"] == 0
    state = _delta(out, "state")
    assert set(state.run_id) == {"n1", "n3"} and set(state.columns) >= {"model_id", "path", "status", "sha256"}


def _stage(folder: Path, rows: int, start: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"path": [f"file:/x/{i}.png" for i in range(start, start + rows)],
                             "sha256": [f"{i:064x}" for i in range(start, start + rows)],
                             "model_id": ["m"] * rows}),
                   folder / "part-00000-abc-c000.snappy.parquet")
    return folder


def test_a_retried_commit_is_a_no_op(tmp_path):
    out = str(tmp_path / "pred")
    staged = [delta_table.Staged("predictions", str(_stage(tmp_path / "s1" / "predictions", 5)),
                                 {"run_date": "2026-12-04", "run_id": "r1"})]
    first = delta_table.commit_run(out, "r1", staged, delta_table.snapshot(out))
    assert first == {"predictions": 0}
    # the driver died after the commit and the run is retried with the same id: the app transaction says done
    again = [delta_table.Staged("predictions", str(_stage(tmp_path / "s2" / "predictions", 5)),
                                {"run_date": "2026-12-04", "run_id": "r1"})]
    assert delta_table.commit_run(out, "r1", again, delta_table.snapshot(out)) == {"predictions": None}
    table = DeltaTable(f"{out}/predictions")
    assert table.version() == 0 and len(table.to_pandas()) == 5
    assert table.transaction_version(delta_table.app_id("r1")) == 1


def test_a_run_that_started_before_another_commit_fails_and_leaves_nothing(tmp_path):
    out = str(tmp_path / "pred")
    part = {"run_date": "2026-12-04"}
    seed = [delta_table.Staged("predictions", str(_stage(tmp_path / "s0" / "predictions", 3)), {**part, "run_id": "r0"})]
    delta_table.commit_run(out, "r0", seed, delta_table.snapshot(out))
    start_a, start_b = delta_table.snapshot(out), delta_table.snapshot(out)   # both runs start at version 0
    a = [delta_table.Staged("predictions", str(_stage(tmp_path / "sa" / "predictions", 4, 10)), {**part, "run_id": "a"})]
    b = [delta_table.Staged("predictions", str(_stage(tmp_path / "sb" / "predictions", 6, 20)), {**part, "run_id": "b"})]
    assert delta_table.commit_run(out, "a", a, start_a) == {"predictions": 1}
    with pytest.raises(delta_table.ConcurrentRunError, match="another run committed"):
        delta_table.commit_run(out, "b", b, start_b)
    rows = DeltaTable(f"{out}/predictions").to_pandas()
    assert sorted(rows.run_id.unique()) == ["a", "r0"] and len(rows) == 7
    assert not list(Path(out, "predictions").rglob("b_part-*"))   # nothing of b moved in and left behind
    assert len(pq.read_table(f"{out}/predictions").to_pandas()) == 7


def _no_lease(monkeypatch):
    """Both runs believe they hold PRED_DIR, as two runs can on an object store, where the lease is check-then-write."""
    monkeypatch.setattr(Lease, "__enter__", lambda self: self)
    monkeypatch.setattr(Lease, "__exit__", lambda self, *exc: None)
    monkeypatch.setattr(Lease, "check", lambda self: None)


def _overlapping_runs(spark, archive, model, out: str, config, monkeypatch) -> tuple[dict, Exception]:
    """Run B scores; just before B commits, run A scores and commits the same archive; B's commit must fail."""
    _no_lease(monkeypatch)
    real_commit, done = delta_table.commit_run, {}

    def a_commits_first(*args, **kwargs):
        if "a" not in done:   # B's commit: A runs whole (its own commit is the real one), then B commits
            done["a"] = {}
            done["a"] = score.run(spark, str(archive), str(model), out, config, run_id="a")
        return real_commit(*args, **kwargs)

    monkeypatch.setattr(delta_table, "commit_run", a_commits_first)
    with pytest.raises(delta_table.ConcurrentRunError) as failure:
        score.run(spark, str(archive), str(model), out, config, run_id="b")
    monkeypatch.setattr(delta_table, "commit_run", real_commit)
    return done["a"], failure.value


def test_overlapping_runs_one_commits_one_fails_rows_exact(spark, archive, model, tmp_path, monkeypatch):
    out = str(tmp_path / "pred")
    a, _ = _overlapping_runs(spark, archive, model, out, _config(), monkeypatch)
    pred = _delta(Path(out), "predictions")
    assert set(pred.run_id) == {"a"} and len(pred) == a["counts"]["scored"]
    assert set(_delta(Path(out), "state").run_id) == {"a"}
    assert not [p for p in Path(out).rglob("b_part-*")]
    rerun = score.run(spark, str(archive), str(model), out, _config(), run_id="c")
    assert rerun["counts"]["skipped_unchanged"] == rerun["counts"]["input"]


def test_the_job_exits_3_when_its_commit_loses(spark, archive, model, tmp_path, monkeypatch):
    from tests.conftest import load_job

    _no_lease(monkeypatch)
    out = tmp_path / "pred"
    real_commit, done = delta_table.commit_run, []

    def other_commits_first(*args, **kwargs):
        if not done:
            done.append("other")
            score.run(spark, str(archive), str(model), str(out), _config(), run_id="other")
        return real_commit(*args, **kwargs)

    monkeypatch.setattr(delta_table, "commit_run", other_commits_first)
    code = load_job("score")(["--input", str(archive), "--model", str(model), "--output", str(out),
                              "--table-format", "delta", "--run-id", "late", "--no-tracking"])
    assert code == 3 and set(_delta(out, "predictions").run_id) == {"other"}


def _wait_for(predicate, seconds: float) -> bool:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def test_a_killed_run_and_its_rerun_leave_each_file_once(spark, archive, model, tmp_path):
    out = tmp_path / "pred"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    job = subprocess.Popen([sys.executable, str(ROOT / "jobs" / "score.py"), "--input", str(archive), "--model",
                            str(model), "--output", str(out), "--table-format", "delta", "--run-id", "killed",
                            "--no-tracking"],
                           env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert _wait_for(lambda: (out / "_staging" / "killed").exists(), 180), "the job never started staging"
    finally:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()
    # what a kill between moving files in and committing leaves: files of a run the log does not know
    leftover = out / "predictions" / "run_date=2026-01-01" / "run_id=killed"
    leftover.mkdir(parents=True)
    _stage(tmp_path / "junk", 3)
    os.replace(tmp_path / "junk" / "part-00000-abc-c000.snappy.parquet", leftover / "killed_part-00000-x.parquet")
    rerun = score.run(spark, str(archive), str(model), str(out), _config(), run_id="rerun")
    assert rerun["accounted"] and rerun["counts"]["skipped_unchanged"] == 0
    pred = _delta(out, "predictions")
    assert set(pred.run_id) == {"rerun"} and len(pred) == rerun["counts"]["scored"]
    assert not pred.duplicated("path").any() and not list(out.rglob("killed_part-*"))
    assert not (out / "_staging").exists()
    assert len(pq.read_table(out / "predictions").to_pandas()) == len(pred)


def test_compaction_bounds_the_state_table_and_vacuum_clears_the_rest(spark, archive, model, tmp_path):
    import shutil

    out, archive = tmp_path / "pred", shutil.copytree(archive, tmp_path / "archive")
    for night in range(4):   # each night one file is touched: a state row (and a state file) a night
        score.run(spark, str(archive), str(model), str(out), _config(), run_id=f"night{night}")
        scored = sorted(_delta(out, "predictions").path)
        os.utime(scored[0].split(":", 1)[1], (time.time() + 60 * (night + 1),) * 2)
    state = DeltaTable(str(out / "state"))
    assert len(state.file_uris()) == 4
    def every_row(table):
        frame = table.to_pandas()
        return frame[sorted(frame.columns)].sort_values(["run_id", "path"]).reset_index(drop=True)

    rows_before = every_row(state)
    from cxr.score.maintain import main as maintain_main

    assert maintain_main([str(out), "--retention-hours", "0"]) == 0
    state = DeltaTable(str(out / "state"))
    assert len(state.file_uris()) == 1
    pd.testing.assert_frame_equal(every_row(state), rows_before)
    on_disk = [p for p in (out / "state").rglob("*.parquet") if "_delta_log" not in str(p)]
    assert len(on_disk) == 1   # the replaced files are vacuumed: a plain Parquet reader sees each row once
    after = score.run(spark, str(archive), str(model), str(out), _config(), run_id="night4")   # reads the compacted state
    c = after["counts"]
    assert c["skipped_unchanged"] == c["input"] - 1 and c["skipped_already_scored"] == 1   # the file touched last


# ------------------------------------------------------------------ an S3 API server on loopback (moto)

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server on a free 127.0.0.1 port, with a bucket; the AWS_* variables pyarrow and delta-rs read."""
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ACCESS_KEY_ID": "cxr-test", "AWS_SECRET_ACCESS_KEY": "cxr-test", "AWS_REGION": "us-east-1",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint, "AWS_ALLOW_HTTP": "true",
           "AWS_EC2_METADATA_DISABLED": "true"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        def up():
            try:
                urllib.request.urlopen(urllib.request.Request(f"{endpoint}/cxr", method="PUT"), timeout=2).read()
                return True
            except OSError:
                return False

        assert _wait_for(up, 30), "moto's S3 server did not start"
        yield "s3://cxr"
    finally:
        server.terminate()
        server.wait()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_s3_runs_commit_incrementally_and_overlapping_runs_fail_cleanly(spark, archive, model, s3, tmp_path,
                                                                        monkeypatch):
    out = f"{s3}/pred"
    config = _config(**{"score.staging_dir": str(tmp_path / "staging")})
    first = score.run(spark, str(archive), str(model), out, config, run_id="s3-n1")
    local = score.run(spark, str(archive), str(model), str(tmp_path / "local"), _config())
    for table in ("predictions", "errors", "state"):
        pd.testing.assert_frame_equal(_rows(_delta(out, table)), _rows(_delta(tmp_path / "local", table)),
                                      check_dtype=False)
    assert first["counts"] == local["counts"]
    second = score.run(spark, str(archive), str(model), out, config, run_id="s3-n2")
    assert second["counts"]["skipped_unchanged"] == first["counts"]["input"]
    # two runs that both believe they hold the lease (check-then-write on S3): one commits, one fails
    overlap = f"{s3}/overlap"
    a, _ = _overlapping_runs(spark, archive, model, overlap, config, monkeypatch)
    pred = _delta(overlap, "predictions")
    assert set(pred.run_id) == {"a"} and len(pred) == a["counts"]["scored"]
    import pyarrow.fs as pafs

    fs, _ = pafs.FileSystem.from_uri(overlap)
    names = [i.base_name for i in fs.get_file_info(pafs.FileSelector("cxr/overlap", recursive=True))]
    assert not [n for n in names if n.startswith("b_part-")]
