"""The preprocess job end to end on a real local[2] SparkSession and real files."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from cxr.config import load_config
from cxr.image.pipeline import PreprocessParams, preprocess_bytes
from cxr.spark.preprocess import OutputExistsError, run
from tests.conftest import ROOT, shared_data

SIZE = 64


@pytest.fixture(scope="module")
def small_config():
    return load_config(overrides={"preprocess.size": SIZE})


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    from cxr.datasets.synth import generate_archive

    root = tmp_path_factory.mktemp("archive")
    summary = generate_archive(root, per_class=6, size=160, seed=3, broken=True)
    (root / "NOTES.md").write_text("sidecar files are ignored, and counted as such\n")
    masks = root / "VIRAL" / "masks"
    masks.mkdir()
    (masks / "mask_0.png").write_bytes((root / "VIRAL").glob("*.png").__next__().read_bytes())
    return root, summary


@pytest.fixture(scope="module")
def first_run(spark, archive, small_config, tmp_path_factory):
    root, _ = archive
    out = tmp_path_factory.mktemp("pre") / "out"
    result = run(spark, str(root), str(out), small_config, manifest=str(root / "MANIFEST.csv"))
    return out, result


def _table(path: Path) -> pd.DataFrame:
    return pq.read_table(path).to_pandas()


def test_every_file_is_accounted_for(first_run, archive):
    out, result = first_run
    root, _ = archive
    images, errors, dups = _table(out / "images"), _table(out / "errors"), _table(out / "duplicates")
    counts = result["counts"]
    assert counts["input"] == counts["written"] + counts["rejected"] + counts["duplicates"]
    assert (counts["written"], counts["rejected"], counts["duplicates"]) == (len(images), len(errors), len(dups))
    on_disk = {p for p in root.rglob("*") if p.is_file() and p.suffix.lower() not in (".md", ".csv")
               and "masks" not in p.parts and not p.name.startswith(".")}  # Spark skips hidden files
    seen = {p.split(":", 1)[1] for p in pd.concat([images.path, errors.path, dups.path])}
    assert seen == {str(p) for p in on_disk}
    assert counts["ignored"] == {"ignored_extension.md": 1, "ignored_extension.csv": 1, "ignored_dir.png": 1}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"] == counts and manifest["accounted"] is True
    assert manifest["params"]["size"] == SIZE and "pyspark" in manifest["versions"]


def test_images_have_the_contract_columns_and_shapes(first_run):
    out, _ = first_run
    images = _table(out / "images")
    for column in ("path", "sha256", "label", "split", "image", "height", "width", "orig_height", "orig_width",
                   "orig_dtype", "source_format"):
        assert column in images.columns
    assert (images.height == SIZE).all() and (images.width == SIZE).all()
    assert images.image.map(len).eq(SIZE * SIZE).all()
    assert set(images.label) == {"COVID", "NORMAL", "VIRAL"}
    assert {"PNG", "JPEG", "DICOM"} <= set(images.source_format)
    assert "uint16" in set(images.orig_dtype)
    assert images.sha256.is_unique


def test_rows_equal_the_driver_side_function(first_run, small_config):
    out, _ = first_run
    params = PreprocessParams.from_config(small_config["preprocess"])
    for row in _table(out / "images").head(8).itertuples():
        _, expected = preprocess_bytes(Path(row.path.split(":", 1)[1]).read_bytes(), params)
        np.testing.assert_array_equal(np.frombuffer(row.image, np.uint8).reshape(SIZE, SIZE), expected)


def test_broken_files_have_reasons(first_run, archive):
    out, _ = first_run
    _, summary = archive
    errors = _table(out / "errors")
    assert len(errors) >= len(summary["broken"]) > 0
    assert errors.reason.str.len().gt(10).all() and errors.stage.notna().all()
    names = errors.path.str.rsplit("/", n=1).str[-1]
    for broken in summary["broken"]:
        assert Path(broken["path"]).name in set(names)


def test_duplicates_are_written_once(first_run):
    out, _ = first_run
    dups = _table(out / "duplicates")
    images = _table(out / "images")
    assert len(dups) >= 1
    assert set(dups.duplicate_of) <= set(images.path)
    assert not set(dups.path) & set(images.path)


def test_no_patient_in_two_splits(first_run):
    out, result = first_run
    images = _table(out / "images")
    with_patient = images.dropna(subset=["patient_id"])
    assert len(with_patient) > 0.8 * len(images)
    assert with_patient.groupby("patient_id").split.nunique().max() == 1
    assert images.groupby("sha256").split.nunique().max() == 1


def test_rerun_gives_identical_rows_and_refuses_to_overwrite(spark, first_run, archive, small_config, tmp_path):
    out, _ = first_run
    root, _ = archive
    again = tmp_path / "again"
    run(spark, str(root), str(again), small_config, manifest=str(root / "MANIFEST.csv"))
    cols = ["path", "sha256", "label", "split", "image"]
    first = _table(out / "images")[cols].sort_values("path").reset_index(drop=True)
    second = _table(again / "images")[cols].sort_values("path").reset_index(drop=True)
    pd.testing.assert_frame_equal(first, second)
    with pytest.raises(OutputExistsError):
        run(spark, str(root), str(again), small_config)
    run(spark, str(root), str(again), small_config, overwrite=True)
    assert _table(again / "images").patient_id.isna().all()  # no manifest this time: grouped by content hash


def test_bad_input_corpus(spark, small_config, tmp_path):
    from cxr.image.badfiles import write_bad_inputs

    corpus = tmp_path / "bad"
    corpus.mkdir()
    expected = write_bad_inputs(corpus)
    result = run(spark, str(corpus), str(tmp_path / "out"), small_config)
    images, errors = _table(tmp_path / "out" / "images"), _table(tmp_path / "out" / "errors")
    assert result["counts"]["out_of_scope"] == 0   # a DICOM image without its pixels is broken, not out of scope
    stage_of = dict(zip(errors.path.str.rsplit("/", n=1).str[-1], errors.stage))
    written = set(images.path.str.rsplit("/", n=1).str[-1])
    dup_names = set(_table(tmp_path / "out" / "duplicates").path.str.rsplit("/", n=1).str[-1])
    for name, stage in expected.items():
        if stage == "ok":
            assert name in written or name in dup_names, name
        else:
            assert stage_of.get(name) == stage, (name, stage_of.get(name))
    assert result["counts"]["input"] == len(expected)


def test_empty_input_gives_an_empty_valid_output(spark, small_config, tmp_path, caplog):
    (tmp_path / "in").mkdir()
    with caplog.at_level("WARNING", logger="cxr"):
        result = run(spark, str(tmp_path / "in"), str(tmp_path / "out"), small_config)
    assert "no image files under" in caplog.text
    assert result["counts"]["input"] == 0 and result["accounted"]
    for table in ("images", "errors", "duplicates"):
        assert len(_table(tmp_path / "out" / table)) == 0   # valid (readable, schema'd) empty tables
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["counts"]["input"] == 0


def test_missing_input_is_a_clear_error(spark, small_config, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run(spark, str(tmp_path / "nope"), str(tmp_path / "out"), small_config)


def test_spark_submit_entry_point(archive, tmp_path):
    root, _ = archive
    out = tmp_path / "submitted"
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable, "SPARK_LOCAL_IP": "127.0.0.1"}
    submit = Path(sys.executable).parent / "spark-submit"
    cmd = [str(submit), "--master", "local[2]", str(ROOT / "jobs" / "preprocess.py"), "--input", str(root),
           "--output", str(out), "--size", "32", "--method", "he"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "preprocess:" in done.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["params"]["size"] == 32 and manifest["params"]["method"] == "he"
    assert manifest["spark"]["master"] == "local[2]"
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2, again.stderr[-2000:]
    assert "--overwrite" in again.stderr + again.stdout, (again.stdout[-2000:], again.stderr[-2000:])


def test_shared_cxr_sample(spark, tmp_path):
    data = shared_data("cxr")
    config = load_config(overrides={"preprocess.size": 64})
    result = run(spark, str(data), str(tmp_path / "cxr"), config, manifest=str(data / "MANIFEST.csv"))
    counts = result["counts"]
    assert (counts["input"], counts["written"], counts["rejected"], counts["duplicates"]) == (450, 450, 0, 0)
    images = _table(tmp_path / "cxr" / "images")
    assert images.patient_id.notna().all()
    assert images.groupby("patient_id").split.nunique().max() == 1
    assert images.label.value_counts().to_dict() == {"COVID": 150, "NORMAL": 150, "VIRAL": 150}


class _WriteSpy:
    """Records every DataFrame.write.parquet(...) of a run: the target and whether the rows carry pixels."""

    def __init__(self, monkeypatch):
        from pyspark.sql.readwriter import DataFrameWriter

        self.writes: list[tuple[str, bool]] = []
        original = DataFrameWriter.parquet

        def parquet(writer, path, *args, **kwargs):
            self.writes.append((str(path), "image" in writer._df.columns))
            return original(writer, path, *args, **kwargs)

        monkeypatch.setattr(DataFrameWriter, "parquet", parquet)

    def pixel_writes(self) -> list[str]:
        return [path for path, pixels in self.writes if pixels]


def _stages_of(spark, group: str) -> int:
    tracker = spark.sparkContext.statusTracker()
    return sum(len(tracker.getJobInfo(j).stageIds) for j in tracker.getJobIdsForGroup(group))


def _copy_archive(archive, dst: Path, copies: int) -> list[Path]:
    """The archive's image files (no sidecars, no masks, not its own duplicate) under dst, and `copies` exact
    copies of one valid image in other folders. Returns [the image copied, its copies]."""
    import shutil

    src, summary = archive
    broken = {Path(b["path"]).name for b in summary["broken"]}
    files = sorted(p for p in src.rglob("*") if p.is_file() and p.suffix in (".png", ".jpg", ".dcm")
                   and "masks" not in p.parts and "_copy" not in p.stem)
    for f in files:
        (dst / f.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, dst / f.relative_to(src))
    made = []
    original = dst / next(f for f in files if f.name not in broken and f.suffix == ".png").relative_to(src)
    for i, folder in enumerate(["NORMAL", "VIRAL", "zz-extra"][:copies]):
        (dst / folder).mkdir(exist_ok=True)
        made.append(dst / folder / f"copy{i}{original.suffix}")
        shutil.copy2(original, made[-1])
    return [original, *made]


def test_image_rows_are_written_once(spark, archive, small_config, tmp_path, monkeypatch):
    """No staging copy of pixels: the only write carrying image bytes is OUT/images itself, in one Spark stage
    with one task per packed group of files, and a run is a handful of stages (it was ~34)."""
    clean = tmp_path / "clean"
    _copy_archive(archive, clean, copies=0)
    spy = _WriteSpy(monkeypatch)
    spark.sparkContext.setJobGroup("written-once", "preprocess without duplicates")
    try:
        result = run(spark, str(clean), str(tmp_path / "out"), small_config)
    finally:
        spark.sparkContext.setJobGroup("", "")
    out = tmp_path / "out"
    assert spy.pixel_writes() == [f"file:{out}/images"]
    assert result["counts"]["duplicates"] == 0 and result["io"]["files_rewritten_for_duplicates"] == 0
    assert sorted(p.name for p in out.iterdir()) == ["duplicates", "errors", "images", "manifest.json", "out_of_scope"]
    parts = sorted((out / "images").glob("part-*.parquet"))
    assert len(parts) == result["io"]["tasks"] >= 2   # one file per task: no shuffle, no repartition
    assert sum(pq.read_metadata(p).num_rows for p in parts) == result["counts"]["written"]
    stages = _stages_of(spark, "written-once")
    assert 0 < stages <= 10, stages
    for part in parts:   # rows in path order within each file: the layout a rerun repeats
        paths = pq.read_table(part, columns=["path"]).column("path").to_pylist()
        assert paths == sorted(paths)


def test_duplicates_are_written_once_and_listed(spark, archive, small_config, tmp_path, monkeypatch):
    """Three exact copies of one file in other folders: the first path is kept, the copies are listed with
    duplicate_of, only the Parquet files that held a copy are rewritten, and the images table equals the one
    made from the archive without the copies."""
    with_copies, without = tmp_path / "with", tmp_path / "without"
    original, *copies = _copy_archive(archive, with_copies, copies=3)
    _copy_archive(archive, without, copies=0)
    run(spark, str(without), str(tmp_path / "ref"), small_config)
    spy = _WriteSpy(monkeypatch)
    result = run(spark, str(with_copies), str(tmp_path / "out"), small_config)
    out = tmp_path / "out"
    dups = _table(out / "duplicates").sort_values("path")
    first = min([original, *copies], key=str)
    assert sorted(dups.path.str.split(":", n=1).str[1]) == sorted(str(p) for p in [original, *copies] if p != first)
    assert set(dups.duplicate_of) == {f"file:{first}"}
    assert result["counts"]["duplicates"] == 3 and result["accounted"]
    rewritten = result["io"]["files_rewritten_for_duplicates"]
    assert 1 <= rewritten <= 3
    pixel_writes = spy.pixel_writes()
    assert pixel_writes[0] == f"file:{out}/images" and len(pixel_writes) == 1 + rewritten
    assert all("/_rewrite-" in p for p in pixel_writes[1:])
    assert not any(p.name.startswith("_rewrite") for p in out.iterdir())
    cols = ["sha256", "label", "split", "image"]
    rel = lambda frame, base: frame.assign(path=frame.path.str.replace(f"file:{base}", "", regex=False))  # noqa: E731
    got = rel(_table(out / "images"), with_copies).sort_values("path").reset_index(drop=True)
    want = rel(_table(tmp_path / "ref" / "images"), without).sort_values("path").reset_index(drop=True)
    got = got[~got.path.isin([str(p).replace(str(with_copies), "") for p in copies if p != first])]
    pd.testing.assert_frame_equal(got[["path", *cols]].reset_index(drop=True), want[["path", *cols]])


def test_tasks_are_equal_shares_with_the_same_mix_of_folders():
    """Spark's file-source rule for how many tasks (length + open cost per file, maxPartitionBytes per task),
    rounded up to a multiple of the cores; files dealt out in path order to the least loaded task, so that
    every task gets the same mix of folders and no core waits for the one that drew the large images."""
    from cxr.spark.images import pack_tasks

    mb = 1024 * 1024
    lengths = np.r_[np.full(300, 200_000), np.full(300, 2_000_000)]   # a folder of small files, then large ones
    tasks = pack_tasks(lengths, 512 * mb, 4 * mb, cores=2)
    n = tasks.max() + 1
    assert n % 2 == 0 and n == 6 and set(tasks) == set(range(n))   # 600 x (~1 MB + 4 MB) / 512 MB -> 6 tasks
    weight = np.bincount(tasks, weights=lengths + 4 * mb)
    assert weight.max() - weight.min() <= lengths.max() + 4 * mb
    large = np.bincount(tasks[300:], minlength=n)
    assert large.max() - large.min() <= 1                           # each task got its share of the large files
    assert (pack_tasks(lengths, 512 * mb, 4 * mb, cores=2) == tasks).all()   # the same layout on a rerun
    assert list(pack_tasks([10, 10, 10], 10 ** 9, 0, cores=4)) == [0, 1, 2]   # never more tasks than files
    assert len(pack_tasks([], 10, 1, cores=2)) == 0
