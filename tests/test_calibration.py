"""Temperature scaling: recovers a known over-confidence, lowers ECE, never changes a call, and is recorded in
metrics.json by calibrate_model / scripts/calibrate.py."""
from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from cxr.evaluate import calibration as cal
from cxr.models import store
from tests.conftest import ROOT
from tests.train_data import write_pre_out


def _softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def overconfident(n=3000, sharpen=3.0, seed=0):
    """Labels drawn from softmax(z) (a calibrated model's output) and an over-confident model softmax(3 z)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 1.2, (n, 3))
    true_p = _softmax(z)
    y = np.array([rng.choice(3, p=p) for p in true_p])
    return _softmax(sharpen * z).astype(np.float32), y


def test_temperature_recovers_the_over_confidence_and_lowers_ece():
    proba, y = overconfident()
    t = cal.fit_temperature(proba, y)
    assert t == pytest.approx(3.0, rel=0.12)
    after = cal.apply_temperature(proba, t)
    assert cal.ece(after, y) < 0.5 * cal.ece(proba, y)
    assert cal.nll(proba, y, t) < cal.nll(proba, y)
    assert (after.argmax(axis=1) == proba.argmax(axis=1)).all()  # calls unchanged
    np.testing.assert_allclose(after.sum(axis=1), 1.0, atol=1e-5)


def test_apply_temperature_edge_cases():
    p = np.array([[0.7, 0.2, 0.1], [0.0, 1.0, 0.0]], np.float32)  # an exact 0 from float32 underflow
    np.testing.assert_array_equal(cal.apply_temperature(p, 1.0), p)
    np.testing.assert_array_equal(cal.apply_temperature(p, None), p)
    soft = cal.apply_temperature(p, 2.0)
    assert np.isfinite(soft).all() and soft[0, 0] < 0.7 and soft[0].argmax() == 0
    with pytest.raises(ValueError):
        cal.apply_temperature(p, 0.0)


def test_ece_of_a_perfectly_calibrated_toy_is_zero_and_bounds_are_reported():
    proba = np.array([[1.0, 0.0, 0.0]] * 4, np.float32)
    assert cal.ece(proba, np.zeros(4, int)) == pytest.approx(0.0)
    rec = cal.fit_report(np.array([[0.9, 0.05, 0.05]] * 10, np.float32), np.zeros(10, int))
    assert rec["temperature"] == cal.T_MIN and len(rec["warnings"]) == 3  # separable, tiny, not applied
    assert not rec["applied"] and cal.temperature_of({"calibration": rec}) is None
    proba, y = overconfident(200)
    assert cal.fit_report(proba, y)["applied"] and cal.temperature_of({}) is None


@pytest.fixture(scope="module")
def overconfident_model(tmp_path_factory):
    """A Keras Flatten->Dense softmax with huge random weights on PRE_OUT-shaped data: near-certain, ~1/3 right."""
    import keras

    pre = write_pre_out(tmp_path_factory.mktemp("cal_pre"), per_class=20, size=16, files=1)
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((16, 16, 1)), keras.layers.Flatten(),
                              keras.layers.Dense(3, activation="softmax")])
    w, b = model.layers[-1].get_weights()
    model.layers[-1].set_weights([np.random.default_rng(0).normal(0, 3.0, w.shape).astype(np.float32), b])
    meta = {"name": "overconfident", "family": "dnn", "input": {"data_size": [16, 16], "model_size": [16, 16]}}
    return pre, store.save_keras(model, tmp_path_factory.mktemp("cal_models") / "overconfident", meta)


def test_calibrate_model_records_temperature_in_metrics_json(overconfident_model):
    pre, model_dir = overconfident_model
    rec = cal.calibrate_model(model_dir, pre)
    meta = store.read_metadata(model_dir)
    assert meta["calibration"]["temperature"] == pytest.approx(rec["temperature"])
    for key in ("temperature", "ece_before", "ece_after", "n_val", "nll_before", "nll_after", "manifest_sha256"):
        assert key in meta["calibration"], key
    assert rec["temperature"] > 1.5 and rec["ece_after"] < rec["ece_before"]
    assert rec["n_val"] == 12  # write_pre_out: 20 per class, patient p % 5 == 1 -> val
    assert not rec["applied"] and cal.temperature_of(meta) is None  # 12 val images: recorded, not applied
    forced = cal.calibrate_model(model_dir, pre, force=True)
    assert cal.temperature_of(store.read_metadata(model_dir)) == pytest.approx(forced["temperature"])
    assert meta["name"] == "overconfident" and "files" in meta  # the rest of metrics.json is kept


def test_calibrate_script_and_report_section(overconfident_model, tmp_path, capsys):
    pre, model_dir = overconfident_model
    spec = importlib.util.spec_from_file_location("calibrate_script", ROOT / "scripts" / "calibrate.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    before = (model_dir / "metrics.json").read_text()
    plot = tmp_path / "rel.png"
    assert script.main(["--data", str(pre), "--model", str(model_dir), "--dry-run", "--plot", str(plot)]) == 0
    assert "T = " in capsys.readouterr().out and plot.read_bytes()[:4] == b"\x89PNG"
    assert (model_dir / "metrics.json").read_text() == before  # --dry-run writes nothing
    assert script.main(["--data", str(pre), "--model", str(model_dir), "--split", "test"]) == 2

    proba, y = overconfident(300)
    meta = {"overconfident": {"calibration": cal.fit_report(proba, y)}, "uncalibrated": {}}
    evaluation = {"split": "test", "models": {"overconfident": {"predictions": {"y": y.tolist(),
                                                                                 "proba": proba.tolist()}}}}
    plots = tmp_path / "plots"
    plots.mkdir()
    md = cal.calibration_section(evaluation, meta, plots)
    assert "| overconfident |" in md and "uncalibrated" not in md
    assert "![Reliability, overconfident](plots/reliability_overconfident.png)" in md
    assert (plots / "reliability_overconfident.png").read_bytes()[:4] == b"\x89PNG"
    assert cal.calibration_section(None, {"m": {}}, plots) == ""
    json.dumps(meta["overconfident"]["calibration"])  # the record is JSON-safe
