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
    from cxr.synth import generate_archive

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
