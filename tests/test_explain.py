"""Grad-CAM: on a tiny CNN trained to decide the class from a bright blob in one corner, the heatmap sits in
that corner; the shortcut check flags such classes; the score job's explain pass writes overlay PNGs."""
from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from cxr import CLASSES
from cxr.explain import gradcam as explain

SIZE = 32


def blob_images(n: int, seed: int = 0, size: int = SIZE):
    """Noise plus a bright distractor blob somewhere central in every image; COVID adds a blob in the top-left
    corner, VIRAL one in the bottom-right, NORMAL none. Only the corner decides the class."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]

    def blob(cx, cy):
        return 0.5 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / 8.0)

    x, y = np.empty((n, size, size, 1), np.float32), np.arange(n) % 3
    for i in range(n):
        img = 0.35 + 0.05 * rng.standard_normal((size, size)) + blob(*rng.uniform(12, 20, 2))
        if y[i] != 1:
            lo, hi = (3, 8) if y[i] == 0 else (size - 9, size - 4)
            img += blob(*rng.uniform(lo, hi, 2))
        x[i, :, :, 0] = np.clip(img, 0, 1)
    return x, y


@pytest.fixture(scope="module")
def blob_model():
    import keras

    from cxr.models.keras_models import build

    x, y = blob_images(240)
    keras.utils.set_random_seed(0)
    model = build("cnn", (SIZE, SIZE, 1), {"filters": [8, 16], "kernel_size": 3, "dense": 16, "dropout": 0.0})
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="sparse_categorical_crossentropy")
    model.fit(x, y, epochs=8, batch_size=32, verbose=0)
    return model


def _quadrant_share(cams, top: bool, left: bool):
    h = cams.shape[1] // 2
    q = cams[:, :h] if top else cams[:, h:]
    q = q[:, :, :h] if left else q[:, :, h:]
    return q.sum(axis=(1, 2)) / np.maximum(cams.sum(axis=(1, 2)), 1e-12)


def test_heatmap_concentrates_in_the_deciding_corner(blob_model):
    x, y = blob_images(45, seed=1)
    cams, proba = explain.gradcam(blob_model, x)
    assert cams.shape == (45, SIZE, SIZE) and cams.min() >= 0 and cams.max() <= 1
    assert (proba.argmax(axis=1) == y).mean() > 0.9
    covid, viral = y == 0, y == 2
    tl, br = _quadrant_share(cams[covid], True, True), _quadrant_share(cams[viral], False, False)
    assert tl.mean() > 0.6 and br.mean() > 0.6, (tl.mean(), br.mean())  # a uniform map: 0.25
    peaks = np.array([np.unravel_index(c.argmax(), c.shape) for c in cams])
    assert (peaks[covid] < SIZE // 2).all(axis=1).mean() >= 0.8
    assert (peaks[viral] >= SIZE // 2).all(axis=1).mean() >= 0.8
    # uint8 input gives the same maps as [0, 1] floats, and an explicit class index is honoured
    u8 = np.round(x[:3] * 255).astype(np.uint8)
    c8, _ = explain.gradcam(blob_model, u8, class_index=[0, 0, 0])
    assert c8.shape == (3, SIZE, SIZE)
    classic, _ = explain.gradcam(blob_model, x[:6], method="gradcam")
    assert classic.shape == (6, SIZE, SIZE) and classic.max() <= 1


def test_shortcut_check_warns_when_a_class_relies_on_the_border(monkeypatch):
    """The warning logic with default thresholds, on heatmaps made to order: COVID's evidence in a corner
    strip, VIRAL's outside the lung box but off the border, NORMAL's in the lungs."""
    h = w = 50
    maps = {0: np.zeros((h, w)), 1: np.zeros((h, w)), 2: np.zeros((h, w))}
    maps[0][:2, :10] = 1.0
    maps[1][20:30, 15:35] = 1.0
    maps[2][5:44, 3:5] = 1.0  # a strip between the border band (3 px) and the lung box (x0 = 5 px)
    y = np.array([0, 1, 2] * 4)
    cams = np.stack([maps[int(c)] for c in y]).astype(np.float32)
    monkeypatch.setattr(explain, "gradcam", lambda model, x, class_index, batch_size, method: (
        cams, np.eye(3, dtype=np.float32)[np.asarray(class_index)]))
    result = explain.shortcut_check(None, np.zeros((12, h, w), np.float32), [CLASSES[c] for c in y])
    pc = result["per_class"]
    assert pc["COVID"]["border_fraction"] == pytest.approx(1.0) and pc["COVID"]["peak_on_border"] == 1.0
    assert pc["NORMAL"]["border_fraction"] == 0 and pc["NORMAL"]["outside_lung_fraction"] == 0
    assert pc["VIRAL"]["border_fraction"] == 0 and pc["VIRAL"]["outside_lung_fraction"] == pytest.approx(1.0)
    assert len(result["warnings"]) == 2
    assert result["warnings"][0].startswith("COVID relies on the image border")
    assert result["warnings"][1].startswith("VIRAL: 100% of its Grad-CAM mass lies outside the central lung box")
    md = explain.shortcut_markdown(result, "m", "plots/x.png", "test")
    assert "| COVID | 4 | 100% | 100% | 100% |" in md and md.count("> **Warning:**") == 2


def test_shortcut_check_on_the_blob_model_sees_the_corners(blob_model):
    x, y = blob_images(30, seed=2)
    result = explain.shortcut_check(blob_model, x, y, border=0.25)
    pc = result["per_class"]
    assert result["mean_cam"]["COVID"].shape == (SIZE, SIZE) and pc["COVID"]["n"] == 10
    assert pc["COVID"]["peak_on_border"] >= 0.8 and pc["VIRAL"]["peak_on_border"] >= 0.8
    peak = {c: np.unravel_index(result["mean_cam"][c].argmax(), (SIZE, SIZE)) for c in ("COVID", "VIRAL")}
    assert max(peak["COVID"]) < SIZE // 2 and min(peak["VIRAL"]) >= SIZE // 2


def test_cam_fractions_and_masks():
    band, outside = explain.region_masks(50, 50, 0.1, (0.2, 0.2, 0.8, 0.8))
    assert band.sum() == 50 * 50 - 40 * 40 and outside.sum() == 50 * 50 - 30 * 30
    cams = np.stack([np.ones((50, 50)), np.zeros((50, 50))])
    fr = explain.cam_fractions(cams, 0.1, (0.2, 0.2, 0.8, 0.8))
    assert fr["border"][0] == pytest.approx(band.mean()) and fr["outside_lung"][0] == pytest.approx(outside.mean())
    assert fr["empty"].tolist() == [False, True] and np.isnan(fr["border"][1])


def test_separable_cnn_is_explained_and_the_dnn_refused(tmp_path):
    from cxr.models import store
    from cxr.models.keras_models import build

    dwsep = build("dwsep", (SIZE, SIZE, 1), {"filters": [4, 8], "kernel_size": 3, "dense": 8, "dropout": 0.0})
    cams, proba = explain.gradcam(dwsep, blob_images(4)[0])
    assert cams.shape == (4, SIZE, SIZE) and proba.shape == (4, 3)
    dnn = build("dnn", (SIZE, SIZE, 1), {"units": [8], "dropout": 0.0})
    with pytest.raises(explain.NotExplainable, match="no convolutional layer"):
        explain.gradcam(dnn, blob_images(2)[0])
    saved = store.save_keras(dnn, tmp_path / "dnn", {"name": "dnn", "family": "dnn"})
    with pytest.raises(explain.NotExplainable):
        explain.check_explainable(saved)
    rgb = explain.overlay((blob_images(1)[0][0, :, :, 0] * 255).astype(np.uint8), cams[0], "COVID p=0.99")
    assert rgb.dtype == np.uint8 and rgb.shape[2] == 3 and explain.png_bytes(rgb)[:4] == b"\x89PNG"


def test_explain_frame_on_preprocessed_rows(blob_model, tmp_path):
    """The worker function alone (no Spark): stored images in, PNGs and fractions out, bad rows reported."""
    import pandas as pd

    from cxr.models import store
    from cxr.spark.explain import explain_frame

    model_dir = store.save_keras(blob_model, tmp_path / "cnn-blob", {"name": "cnn-blob", "family": "cnn"})
    x, _ = blob_images(2, seed=3)
    u8 = (x[..., 0] * 255).astype(np.uint8)
    frame = pd.DataFrame({"path": ["file:/a/x.png", "file:/a/y.png", "file:/a/z.png"], "sha256": ["a1", "b2", "c3"],
                          "label": ["COVID", "VIRAL", "NORMAL"], "p_label": [0.9, 0.8, 0.7],
                          "image": [u8[0].tobytes(), u8[1].tobytes(), b"short"], "height": [SIZE] * 3,
                          "width": [SIZE] * 3})
    out = explain_frame(frame, str(model_dir), f"file:{tmp_path}/png", None, batch_size=4)
    assert out["explain_png"].tolist()[:2] == [f"file:{tmp_path}/png/a1.png", f"file:{tmp_path}/png/b2.png"]
    assert out["explain_png"].iat[2] is None and "cannot get the image again" in out["explain_error"].iat[2]
    assert (tmp_path / "png" / "a1.png").read_bytes()[:4] == b"\x89PNG"
    assert not list((tmp_path / "png").glob(".*"))  # no temporary files left
    assert out["cam_border"].iloc[:2].between(0, 1).all()


@pytest.mark.slow  # a fresh Spark worker imports TensorFlow: ~10 s of CPU unless earlier Spark tests did it
def test_explain_pass_over_a_runs_predictions(spark, blob_model, tmp_path):
    """Spark: a run's predictions partition of raw files (one per class) -> re-read, re-preprocessed, one
    overlay per predicted class, an explanations table, and a crashed run's leftovers removed. (The predictions are written
    here directly: the score job has its own tests.)"""
    import cv2
    import pandas as pd

    from cxr.image.pipeline import PreprocessParams
    from cxr.models import store
    from cxr.score.frames import PROB_COLUMNS
    from cxr.spark.explain import explain_run, parse_explain

    raw = tmp_path / "raw"
    raw.mkdir()
    x, y = blob_images(3, seed=5, size=96)
    paths = []
    for i in range(3):
        cv2.imwrite(str(raw / f"{i}.png"), (x[i, :, :, 0] * 255).astype(np.uint8))
        paths.append(f"file:{raw}/{i}.png")
    out = tmp_path / "pred"
    part = out / "predictions" / "run_date=2026-01-02" / "run_id=r1"
    part.mkdir(parents=True)
    pd.DataFrame({"path": paths, "sha256": ["s0", "s1", "s2"], "model_id": "m", "model_name": "cnn-blob",
                  "label": [CLASSES[c] for c in y], **{p: [0.5, 0.3, 0.2] for p in PROB_COLUMNS}}
                 ).to_parquet(part / "part-0.parquet")
    (out / "explain" / "run_id=dead").mkdir(parents=True)  # a crashed run's PNG folder (no runs/dead.json)
    model_dir = store.save_keras(blob_model, tmp_path / "cnn-blob", {"name": "cnn-blob", "family": "cnn"})
    res = explain_run(spark, f"file:{out}", "r1", "2026-01-02", str(model_dir), "m", str(raw), "raw",
                      PreprocessParams(size=SIZE), parse_explain("1"), batch_size=4, fail=True)
    assert res["images"] == 3 and res["errors"] == 0 and res["per_class"] == {"COVID": 1, "NORMAL": 1, "VIRAL": 1}
    table = pq.read_table(out / "explanations").to_pandas().sort_values("sha256")
    assert table["explain_png"].tolist() == [f"file:{out}/explain/run_id=r1/s{i}.png" for i in range(3)]
    assert set(table["run_id"]) == {"r1"} and set(table["model_id"]) == {"m"}
    assert table["p_label"].tolist() == pytest.approx([0.5, 0.3, 0.2])
    assert all((out / "explain" / "run_id=r1" / f"s{i}.png").read_bytes()[:4] == b"\x89PNG" for i in range(3))
    assert not (out / "explain" / "run_id=dead").exists() and not (out / "_staging").exists()


def test_parse_explain():
    from cxr.spark.explain import parse_explain

    assert parse_explain("all") == "all" and parse_explain("3") == 3 and parse_explain("0") is None
    assert parse_explain(None) is None
    for bad in ("-1", "some"):
        with pytest.raises(ValueError):
            parse_explain(bad)
