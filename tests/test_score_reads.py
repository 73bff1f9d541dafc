"""What a score run opens and how many Spark jobs it starts, counted from outside the job: the kernel's own
inotify events for every open of a file under the archive (by any process: driver, JVM or Python worker),
and Spark's job ids on both sides of the run; and what a worker does per file and per task (the read, the heap)."""
from __future__ import annotations

import ctypes
import json
import os
import shutil
import struct
import uuid
from collections import Counter
from pathlib import Path

import pytest

from cxr.config import load_config
from cxr.spark import score
from tests.scoring_models import tiny_keras_cnn

SIZE = 32
IN_OPEN, IN_Q_OVERFLOW, IN_ISDIR, IN_NONBLOCK = 0x20, 0x4000, 0x40000000, 0o4000


class Opens:
    """Counts the opens of the files in every folder under root (Linux inotify through libc: IN_OPEN)."""

    def __init__(self, root: Path):
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.inotify_init1(IN_NONBLOCK)
        assert self.fd >= 0, f"inotify_init1 failed: errno {ctypes.get_errno()}"
        self.folders = {}
        for folder in [root, *(p for p in root.rglob("*") if p.is_dir())]:
            wd = self.libc.inotify_add_watch(self.fd, str(folder).encode(), IN_OPEN)
            assert wd >= 0, f"inotify_add_watch {folder} failed: errno {ctypes.get_errno()}"
            self.folders[wd] = folder

    def take(self) -> Counter:
        """{file: opens} since the last call."""
        counts = Counter()
        while True:
            try:
                buf = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                return counts
            i = 0
            while i < len(buf):
                wd, mask, _, length = struct.unpack_from("iIII", buf, i)
                name = buf[i + 16:i + 16 + length].rstrip(b"\0").decode()
                i += 16 + length
                assert not mask & IN_Q_OVERFLOW, "inotify queue overflowed: opens were lost"
                if name and not mask & IN_ISDIR:
                    counts[self.folders[wd] / name] += 1

    def close(self):
        os.close(self.fd)


@pytest.fixture(scope="module")
def read_config():
    # no thumbnails: the run page reads its chosen images again on the driver (monitor.thumbnails, 6 + 6 files)
    return load_config(overrides={"preprocess.size": SIZE, "score.batch_size": 8, "monitor.thumbnails": 0})


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    from cxr.datasets.synth import generate_archive

    root = tmp_path_factory.mktemp("reads_archive")
    generate_archive(root, per_class=5, size=96, seed=12, broken=True)
    return root


@pytest.fixture(scope="module")
def model(spark, archive, read_config, tmp_path_factory):
    from cxr.spark import preprocess

    pre = preprocess.run(spark, str(archive), str(tmp_path_factory.mktemp("reads_pre") / "pre"), read_config)
    return tiny_keras_cnn(tmp_path_factory.mktemp("models") / "cnn-reads", pre["params"], SIZE)


def _readable(root: Path, config) -> set[Path]:
    """The files a run must read: an image extension, not empty (independent of the job's own listing)."""
    exts = {"." + e for e in config["preprocess"]["extensions"]}
    return {p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in exts and p.stat().st_size > 0}


def test_a_first_run_opens_every_file_once_and_an_unchanged_night_none(spark, archive, model, read_config, tmp_path):
    root = shutil.copytree(archive, tmp_path / "in")
    out = tmp_path / "pred"
    opens = Opens(root)
    try:
        first = score.run(spark, str(root), str(model), str(out), read_config, run_id="first")
        at_first = opens.take()
        second = score.run(spark, str(root), str(model), str(out), read_config, run_id="second")
        at_second = opens.take()
        touched, moved, copied = sorted(p for p in root.glob("*/*.png")
                                        if p.stat().st_size > 1000 and "broken" not in p.name)[:3]
        os.utime(touched, (touched.stat().st_atime + 100, touched.stat().st_mtime + 100))
        moved = moved.rename(moved.with_name("moved_" + moved.name))
        copy = Path(shutil.copy(copied, copied.parent / ("copy_" + copied.name)))
        opens.take()   # the test's own copy
        third = score.run(spark, str(root), str(model), str(out), read_config, run_id="third")
        at_third = opens.take()
    finally:
        opens.close()
    expected = _readable(archive, read_config)
    assert len(expected) > 10 and first["counts"]["scored"] > 10 and first["counts"]["rejected"] >= 3
    assert at_first == Counter({root / p.relative_to(archive): 1 for p in expected})
    assert first["read_passes"] == 1 and first["accounted"]
    assert at_second == Counter() and second["counts"]["skipped_unchanged"] == second["counts"]["input"]
    # changed paths whose content is already scored: each opened once (hashed), none decoded or scored again
    assert at_third == Counter({touched: 1, moved: 1, copy: 1})
    assert third["counts"]["skipped_already_scored"] == 3 and third["counts"]["scored"] == 0 and third["accounted"]


def _probe(spark) -> int:
    """The id of a job started now (job ids count up within a SparkContext)."""
    group = f"probe-{uuid.uuid4().hex}"
    sc = spark.sparkContext
    sc.setLocalProperty("spark.jobGroup.id", group)
    try:
        sc.parallelize([1], 1).count()
    finally:
        sc.setLocalProperty("spark.jobGroup.id", None)
    (job,) = sc.statusTracker().getJobIdsForGroup(group)
    return job


def test_the_run_record_counts_the_spark_jobs_of_the_run(spark, archive, model, read_config, tmp_path):
    out = tmp_path / "pred"
    records, started = [], []
    for run_id, full in (("first", False), ("unchanged", False), ("full", True)):
        before = _probe(spark)
        records.append(score.run(spark, str(archive), str(model), str(out), read_config, run_id=run_id, full=full))
        started.append(_probe(spark) - before - 1)
    assert [r["spark_jobs"] for r in records] == started
    assert started[1] == 0   # an unchanged night starts no Spark job at all
    assert 0 < started[0] <= 8, records[0]["timings_s"]
    assert json.loads((out / "runs" / "first.json").read_text())["spark_jobs"] == started[0]


def test_the_summaries_read_by_spark_equal_the_local_read(spark, archive, model, read_config, tmp_path,
                                                            monkeypatch):
    """The task summaries are read with pyarrow when the staging is on a local disk; on any other file system
    (HDFS, S3: no local path) by a Spark job. Both give the run the same counts, statistics and page rows."""
    local = score.run(spark, str(archive), str(model), str(tmp_path / "a"), read_config, run_id="local")
    monkeypatch.setattr(score, "local_path", lambda uri: None)
    remote = score.run(spark, str(archive), str(model), str(tmp_path / "b"), read_config, run_id="remote")
    assert remote["counts"] == local["counts"] and remote["accounted"]
    assert remote["spark_jobs"] == local["spark_jobs"] + 1   # the one job the local read saves
    watched = [json.loads((tmp_path / d / "runs" / f"{r}.json").read_text())["monitoring"]
               for d, r in (("a", "local"), ("b", "remote"))]
    assert watched[0]["stats"] == watched[1]["stats"] and watched[0]["stats"]


def test_spark_actions_run_together_carry_the_job_group_and_raise_the_first_error(spark):
    from cxr.spark.jobs import JobCount, together

    one_job = spark.sparkContext.parallelize(range(10), 1).count   # one Spark job each
    with JobCount(spark, f"together-{uuid.uuid4().hex}") as jobs:
        together(spark, [one_job, one_job, one_job])
    assert jobs.count() == 3   # every thread's job under the caller's group

    def broken():
        raise RuntimeError("the second table could not be written")

    with pytest.raises(RuntimeError, match="could not be written"):
        together(spark, [one_job, broken])


def test_a_capped_read_returns_the_file_and_stops_one_byte_past_the_cap(tmp_path):
    """read_bytes(max_bytes) sizes its buffer by the file, and a file longer than its stat said (a pipe says 0)
    is still read on to the cap, so a file that grew after the listing is rejected, never cut short."""
    from cxr.image.source import read_bytes

    f = tmp_path / "a.png"
    f.write_bytes(bytes(range(256)) * 40)
    assert read_bytes(str(f), 10_240) == f.read_bytes() == read_bytes(f"file:{f}", 10**9)
    with pytest.raises(ValueError, match="grew past 10239 bytes"):
        read_bytes(str(f), 10_239)
    fifo = tmp_path / "growing.png"
    os.mkfifo(fifo)
    pid = os.fork()
    if pid == 0:   # the writer: 10,240 bytes the reader's fstat cannot see
        with open(fifo, "wb") as w:
            w.write(f.read_bytes())
        os._exit(0)
    try:
        assert read_bytes(str(fifo), 20_000) == f.read_bytes()
    finally:
        os.waitpid(pid, 0)


def test_a_worker_task_starts_with_the_live_heap_frozen():
    """pyspark's daemon collects garbage after every task; what lived before the task (modules, the cached
    model) is frozen first, so that walk covers only the task's own objects. The task's output is unchanged."""
    import gc

    from cxr.spark.worker import with_frozen_heap

    gc.unfreeze()
    alive = len(gc.get_objects())
    seen = []

    def task(batches):
        seen.append(gc.get_freeze_count())
        yield from (b * 2 for b in batches)

    try:
        assert list(with_frozen_heap(task)(iter([1, 2, 3]))) == [2, 4, 6]
        assert seen and seen[0] >= 0.9 * alive
    finally:
        gc.unfreeze()
