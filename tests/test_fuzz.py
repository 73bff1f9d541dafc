"""Fuzz: 1,000 mutated copies of the shared X-rays and DICOM samples through the real preprocess job.

Every file must end in exactly one of images / errors / duplicates, the job must finish without a failed
task (in local mode one dead Python worker fails the job), no file may take more than a few seconds in the
worker's per-file function, and the damage the codecs can see must not pass as a whole image.
"""
from __future__ import annotations

import time
from collections import Counter

import pandas as pd
import pyarrow.parquet as pq
import pytest

from cxr.config import load_config
from cxr.scope.rules import ScopeGate
from cxr.image.batch import process_file
from cxr.image.pipeline import PreprocessParams
from cxr.quality.fuzz import MUTATIONS, sources_from, write_corpus
from tests.conftest import shared_data

N_FILES = 1000
SIZE = 32
MAX_SECONDS_PER_FILE = 3.0


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    sources = sources_from(shared_data("cxr"), shared_data("dicom"), n_images=10, side=160)
    assert {s.name.rsplit(".", 1)[-1] for s in sources} == {"jpg", "png", "dcm"}
    root = tmp_path_factory.mktemp("fuzz")
    records = write_corpus(root, sources, n=N_FILES, seed=14)
    assert len(records) == N_FILES and {r["mutation"] for r in records} == set(MUTATIONS)
    return root, pd.DataFrame(records)


@pytest.mark.slow
def test_fuzzed_corpus_is_fully_accounted(spark, corpus, tmp_path):
    from cxr.spark.preprocess import run

    root, records = corpus
    config = load_config(overrides={"preprocess.size": SIZE})
    # the worker's own function, file by file in this process: a crash would take pytest down with it
    params = PreprocessParams.from_config(config["preprocess"])
    gate = ScopeGate.from_config(config)
    seconds, status = {}, {}
    for name in records.name:
        started = time.perf_counter()
        row = process_file(str(root / name), (root / name).read_bytes(), str(root), params, {}, gate)
        seconds[name], status[name] = time.perf_counter() - started, row["status"]
    slowest = max(seconds, key=seconds.get)
    assert seconds[slowest] < MAX_SECONDS_PER_FILE, (slowest, seconds[slowest])

    sc = spark.sparkContext
    sc.setJobGroup("fuzz", "preprocess of the fuzz corpus")
    try:
        result = run(spark, str(root), str(tmp_path / "out"), config)
    finally:
        sc.setJobGroup("", "")
    tracker = sc.statusTracker()
    stages = [s for j in tracker.getJobIdsForGroup("fuzz") if (info := tracker.getJobInfo(j))
              for s in info.stageIds]
    failed = {s: tracker.getStageInfo(s).numFailedTasks for s in stages if tracker.getStageInfo(s)}
    assert stages and not any(failed.values()), failed

    tables = {t: pq.read_table(tmp_path / "out" / t).to_pandas() for t in ("images", "errors", "out_of_scope",
                                                                           "duplicates")}
    ended = pd.concat([tables[t].path.str.rsplit("/", n=1).str[-1].to_frame("name").assign(table=t)
                       for t in tables])
    assert not ended.name.duplicated().any(), ended[ended.name.duplicated(keep=False)]
    assert set(ended.name) == set(records.name)
    counts = result["counts"]
    assert result["accounted"] and counts["input"] == N_FILES
    assert (counts["written"], counts["rejected"], counts["out_of_scope"], counts["duplicates"]) == tuple(
        len(tables[t]) for t in tables)
    assert tables["errors"].reason.str.len().gt(10).all()

    # the Spark workers and the plain function agree on every file (images or duplicates = decoded)
    table_of = dict(zip(ended.name, ended.table))
    assert {n for n, s in status.items() if s == "error"} == {n for n, t in table_of.items() if t == "errors"}
    assert {n for n, s in status.items() if s == "out_of_scope"} == {n for n, t in table_of.items()
                                                                      if t == "out_of_scope"}

    by = records.assign(table=records.name.map(table_of), ext=records.source.str.rsplit(".", n=1).str[-1])
    summary = Counter(zip(by.mutation, by.ext, by.table))
    print("\nfuzz outcome (mutation, format, table): count\n" + "\n".join(f"{k}: {v}" for k, v in sorted(summary.items())))
    assert (by[by.mutation == "truncate"].table == "errors").all()
    zeroed_jpegs = by[(by.mutation == "zero_run") & (by.ext == "jpg")]
    assert len(zeroed_jpegs) > 30 and (zeroed_jpegs.table == "errors").mean() >= 0.9
    reasons = tables["errors"].reason
    assert reasons.str.startswith("damaged: corrupt JPEG data").sum() > 20
    assert reasons.str.contains("fails its CRC check").sum() > 5
