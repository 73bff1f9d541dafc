"""Distributed evaluation (mapInPandas on a real local[2] session) against the same rows evaluated on the
driver; refusal of leaked test sets; the report."""
from __future__ import annotations

import numpy as np
import pytest

from cxr.data.loader import SplitLeakError, load_split
from cxr.evaluate.metrics import summarize
from cxr.models.store import load_predictor
from cxr.evaluate.report import write_report
from cxr.spark import evaluate
from tests.train_data import SIZE, pre_out, train_config, trained, write_pre_out  # noqa: F401 (fixtures)


@pytest.fixture(scope="module")
def distributed(spark, trained, pre_out, train_config):
    out, _ = trained
    return evaluate.run(spark, str(pre_out), str(out), train_config, split="test")


def test_distributed_result_equals_the_driver_on_the_same_rows(distributed, trained, pre_out):
    out, _ = trained
    test = load_split(str(pre_out), "test")
    order = np.argsort(test.sha256.astype(str), kind="stable")
    assert distributed["partitions"] == 3
    assert set(distributed["models"]) == {"cnn-adam", "scratch-dnn"}
    for name, got in distributed["models"].items():
        proba = load_predictor(out / name).predict_proba(test.x)
        want = summarize(test.y, proba)
        assert got["n"] == want["n"] == len(test)
        assert got["partitions"] > 1  # the rows really were spread over several tasks
        assert got["confusion"] == want["confusion"], name
        assert got["accuracy"] == want["accuracy"] and got["macro_f1"] == want["macro_f1"]
        assert got["per_class"] == want["per_class"]
        assert got["normal_vs_viral"]["confusion"] == want["normal_vs_viral"]["confusion"]
        assert got["roc_auc"]["macro"] == pytest.approx(want["roc_auc"]["macro"], abs=1e-6)
        assert got["predictions"]["sha256"] == list(test.sha256[order])
        assert got["predictions"]["y"] == test.y[order].tolist()
        assert np.allclose(np.asarray(got["predictions"]["proba"]), proba[order], atol=1e-5)


def test_split_counts_and_small_test_warning(distributed, pre_out):
    test = load_split(str(pre_out), "test")
    data = distributed["data"]
    assert data["images"] == len(test) and data["patients"] == test.n_patients()
    assert data["shared_images"] == 0 and data["shared_patients"] == 0
    assert any("< 100" in w for w in distributed["warnings"])


def test_a_leaked_test_split_is_refused(spark, trained, train_config, tmp_path):
    out, _ = trained
    leaky = write_pre_out(tmp_path / "leaky", per_class=10, leak=True)
    with pytest.raises(SplitLeakError, match="1 patients"):
        evaluate.run(spark, str(leaky), str(out), train_config, write=False)


def test_report_has_the_study_table_evaluation_and_plots(distributed, trained):
    out, _ = trained
    path = write_report(out, distributed)
    text = path.read_text()
    assert "| Accuracy (first epoch), study | 0.9983 | 0.9286 | 0.9939 | 0.9817 | 0.9904 |" in text
    assert "| Loss (final epoch), study | 2.3842e-07 | 0.6931 | 1.0417e-06 | 2.3842e-07 | 2.3842e-07 |" in text
    assert "labeled images from" in text and "Warning" in text and "NORMAL vs VIRAL" in text
    assert "Source confounding" in text
    assert "## Shortcut probes (test split)" in text and "| metadata only |" in text
    for name in ("cnn-adam", "scratch-dnn"):
        assert f"| {name} | border only |" in text and f"| {name} | lungs only |" in text
    for png in ("curves_cnn_optimizers.png", "curves_other_models.png", "confusion_matrices.png", "roc_curves.png"):
        f = out / "plots" / png
        assert f.is_file() and f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"plots/{png}" in text


def test_models_trained_at_another_size_are_refused_before_any_task(spark, trained, train_config, tmp_path):
    out, _ = trained
    other = write_pre_out(tmp_path / "small", per_class=6, size=SIZE // 2)
    with pytest.raises(ValueError, match=f"trained on {SIZE}x{SIZE} images"):
        evaluate.run(spark, str(other), str(out), train_config, write=False)
