"""Run monitoring and the run page (issue 22 items 3-4) on real chest X-rays and the real score job (local[2]):
no drift on a run drawn from the training data's distribution, drift on a run of much darker images, exit 4
with --fail-on-drift, the monitoring values in runs/R.json and in MLflow, and the page rendered in headless
Chromium without console errors. Plus the statistics and tests themselves, without Spark."""
from __future__ import annotations

import contextlib
import io
import json
import logging
import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from cxr.config import load_config
from cxr.data.stream import open_training_split
from cxr.models import store
from cxr.monitor import drift
from cxr.monitor.assess import assess, metric_values
from cxr.monitor.reference import read_reference, write_reference
from cxr.monitor.stats import pooled, reason_key, run_statistics
from cxr.score.frames import model_id
from cxr.scope.ood import fit_model
from cxr.spark import preprocess
from tests.conftest import load_job, shared_data
from tests.scoring_models import tiny_keras_cnn

SIZE = 32
CHROMIUM = Path("/usr/bin/chromium")
ODD_NAME = '<b>odd & "name".png'   # a user's file name with markup in it: the page must show it as text


# ------------------------------------------------------------------------------------------ statistics, no Spark

def _rows(n: int, rng, dark: bool = False) -> pd.DataFrame:
    p = rng.dirichlet([4, 2, 2], n)
    return pd.DataFrame({"status": "ok", "label": np.array(["COVID", "NORMAL", "VIRAL"])[p.argmax(1)],
                         "p_covid": p[:, 0], "p_normal": p[:, 1], "p_viral": p[:, 2],
                         "source_format": "JPEG", "orig_dtype": "uint8", "orig_height": 1024, "orig_width": 1024,
                         "mean_intensity": rng.normal(60 if dark else 140, 10, n)})


def test_psi_and_chi_square_flag_a_shift_and_not_noise():
    conf = load_config()["monitor"]
    rng = np.random.default_rng(0)
    ref = run_statistics(_rows(400, rng))
    same, dark = run_statistics(_rows(30, rng)), run_statistics(_rows(30, rng, dark=True))
    assert not any(r["drifted"] for r in drift.compare(same, ref, "reference", conf))
    rows = {r["statistic"]: r for r in drift.compare(dark, ref, "reference", conf)}
    assert rows["intensity"]["drifted"] and rows["intensity"]["value"] > 1
    assert not rows["formats"]["drifted"] and rows["status"]["note"] is None   # one category: p = 1
    assert drift.psi(np.array([5., 5.]), np.array([50., 50.])) == pytest.approx(0.0)


def test_statistics_pool_and_reasons_group():
    assert reason_key("decode", "truncated PNG: file ends before the IEND chunk (123 bytes; the file ...)") == \
        reason_key("decode", "truncated PNG: file ends before the IEND chunk (99 bytes; other)")
    rng = np.random.default_rng(1)
    a, b = run_statistics(_rows(10, rng)), run_statistics(_rows(15, rng))
    both = pooled([a, b])
    assert both["rows"] == 25 and sum(both["binned"]["intensity"]["counts"]) == 25
    m = assess(a, None, [("r1", b)], load_config()["monitor"])
    assert "no training reference" in m["notes"][0] and {r["baseline"] for r in m["drift"]} == {"last run"}
    assert metric_values(m)["monitor.share.calls.COVID"] == pytest.approx(a["categorical"]["calls"]["COVID"] / 10)


def test_a_monitoring_failure_is_recorded_and_never_fails_the_run():
    """After the commit the record must be written (a run without runs/R.json counts as crashed)."""
    from cxr.spark import monitor

    m = monitor.finish(None, "/nowhere", {"run_id": "r"}, monitor.Watch({}), "/nowhere", load_config(), "", "raw", None)
    assert m["error"].startswith("KeyError") and m["drifted"] == [] and metric_values(m)["monitor.rows"] == 0
    assert monitor.finish(None, "/nowhere", {}, monitor.Watch({}, error="boom"), "", {}, "", "raw", None)["error"] == "boom"


def test_the_page_charts_are_svg_drawn_to_scale():
    """The run page's charts (SVG written by cxr.monitor.plots, no matplotlib): valid XML, one bar per category
    and series, each bar's height its share of the tallest."""
    import base64
    import xml.etree.ElementTree as ET

    from cxr.monitor import plots

    stats = {"categorical": {"calls": {"COVID": 30, "NORMAL": 10}}, "binned": {}}
    ref = {"categorical": {"calls": {"COVID": 5, "NORMAL": 10, "VIRAL": 5}}, "binned": {}}
    uri = plots.distribution(stats, {"training reference": ref}, "calls", "Calls <&>")
    assert uri.startswith("data:image/svg+xml;base64,")
    root = ET.fromstring(base64.b64decode(uri.split(",", 1)[1]))
    ns = "{http://www.w3.org/2000/svg}"
    bars = [r for r in root.iter(f"{ns}rect") if r.find(f"{ns}title") is not None]
    assert len(bars) == 2 * 3   # two series x three categories (VIRAL is 0 in this run)
    heights = {r.find(f"{ns}title").text + r.get("fill"): float(r.get("height")) for r in bars}
    assert heights["COVID: 0.750" + plots.COLORS[0]] == pytest.approx(plots.HEIGHT - plots.TOP - plots.BOTTOM, abs=0.1)
    assert heights["NORMAL: 0.250" + plots.COLORS[0]] == pytest.approx(heights["COVID: 0.750" + plots.COLORS[0]] / 3, abs=0.1)
    assert heights["VIRAL: 0.000" + plots.COLORS[0]] == 0
    assert "Calls <&>" in [t.text for t in root.iter(f"{ns}text")]
    nights = plots.over_nights([("r1", {"intensity": 0.1}), ("r2", {"intensity": float("nan")}),
                                ("r3", {"intensity": 0.4})], 0.25, "PSI")
    ET.fromstring(base64.b64decode(nights.split(",", 1)[1]))


def test_every_profile_inherits_the_monitor_section():
    from cxr.config import CONF_DIR

    default = load_config()["monitor"]
    assert default["psi_threshold"] == 0.25 and default["fail_on_drift"] is False
    for profile in sorted(CONF_DIR.glob("*.yaml")):
        assert load_config(profile.stem)["monitor"] == default, profile.name


# ------------------------------------------------------------------------------------ the score job, real files

def _pick(n_ref: int, n_run: int) -> tuple[list[Path], list[Path]]:
    root = shared_data("cxr")
    ref, run = [], []
    for cls in ("COVID", "NORMAL", "VIRAL"):
        files = sorted(p for p in (root / cls).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
        ref += files[:n_ref]
        run += files[n_ref:n_ref + n_run]
    return ref, run


def _archive(dst: Path, files: list[Path], darken: float | None = None) -> Path:
    for f in files:
        target = dst / f.parent.name / f.name
        target.parent.mkdir(parents=True, exist_ok=True)
        if darken is None:
            shutil.copy(f, target)
        else:   # much darker exposures, same format and size
            img = cv2.imread(str(f), cv2.IMREAD_UNCHANGED)
            cv2.imwrite(str(target), (img * darken).astype(img.dtype))
    (dst / "NORMAL" / ODD_NAME).write_text("<html>not an image</html>")
    return dst


@pytest.fixture(scope="module")
def scene(spark, tmp_path_factory):
    """A model with its training reference (36 real X-rays), a run of 24 others and the same 24 much darker."""
    root = tmp_path_factory.mktemp("monitor")
    ref_files, run_files = _pick(12, 8)
    config = load_config(overrides={"preprocess.size": SIZE})
    pre = root / "pre"
    result = preprocess.run(spark, str(_archive(root / "ref", ref_files)), str(pre), config)
    model = tiny_keras_cnn(root / "models" / "cnn-monitor", result["params"], SIZE)
    fit_model(model, open_training_split(str(pre), "train", config["train"]), None, 0.9)   # an OOD reference
    before = model_id(model)
    write_reference(model, str(pre), config)
    return {"model": model, "pre": pre, "id_before_reference": before, "same": _archive(root / "same", run_files),
            "dark": _archive(root / "dark", run_files, darken=0.25), "root": root}


@pytest.fixture(scope="module")
def nights(scene, tmp_path_factory):
    """Two nights of the score job (jobs/score.py) into one PRED_DIR, --fail-on-drift: same distribution, then
    darker (with --explain all, so the page's thumbnails are Grad-CAM overlays)."""
    out = scene["root"] / "pred"
    score = load_job("score")
    warnings = _Collect()
    logging.getLogger("cxr.spark.monitor").addHandler(warnings)
    codes, printed = [], []
    try:
        for run_id, archive, extra in (("night1-same", scene["same"], []),
                                       ("night2-dark", scene["dark"], ["--explain", "all"])):
            with contextlib.redirect_stdout(io.StringIO()) as text:
                codes.append(score(["--input", str(archive), "--model", str(scene["model"]), "--output", str(out),
                                    "--run-id", run_id, "--fail-on-drift", *extra]))
            printed.append(text.getvalue())
    finally:
        logging.getLogger("cxr.spark.monitor").removeHandler(warnings)
    records = {r: json.loads((out / "runs" / f"{r}.json").read_text()) for r in ("night1-same", "night2-dark")}
    return {"codes": codes, "out": out, "records": records, "printed": printed, "warnings": warnings.lines}


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def test_the_training_reference_is_part_of_the_model_id(scene):
    ref = read_reference(scene["model"])
    assert ref["split"] == "train" and ref["images"] >= 10   # val holds < monitor.min_rows of 36 images
    assert ref["stats"]["scored"] == ref["images"] and ref["stats"]["categorical"]["formats"]
    assert store.MONITOR_FILE in store.weight_files(scene["model"])
    assert model_id(scene["model"]) != scene["id_before_reference"]


def test_preprocessed_input_carries_the_input_statistics(spark, scene):
    """The preprocessed-input path: format, dtype and size come from the images table, intensity from its pixels."""
    from cxr.spark import score

    record = score.run(spark, str(scene["pre"]), str(scene["model"]), str(scene["root"] / "pred-pre"), load_config())
    stats = record["monitoring"]["stats"]
    assert record["mode"] == "preprocessed" and stats["scored"] == record["counts"]["scored"] == 36
    for name in ("intensity", "size"):
        assert sum(stats["binned"][name]["counts"]) == 36
    assert sum(stats["categorical"]["formats"].values()) == sum(stats["categorical"]["bit_depths"].values()) == 36
    assert record["monitoring"]["drifted"] == []   # the reference's own images (its train split and the rest)


def test_same_distribution_does_not_drift_darker_images_do_and_exit_4(nights):
    assert nights["codes"] == [0, 4]
    assert "monitor: no drift" in nights["printed"][0]
    assert "monitor: WARN drift in " in nights["printed"][1] and "intensity vs reference" in nights["printed"][1]
    assert any(line.startswith("drift: intensity vs reference: PSI") for line in nights["warnings"])
    same, dark = (nights["records"][r]["monitoring"] for r in ("night1-same", "night2-dark"))
    assert same["drifted"] == [], same["drift"]
    assert "intensity vs reference" in dark["drifted"] and "intensity vs last run" in dark["drifted"]
    row = next(r for r in dark["drift"] if r["statistic"] == "intensity" and r["baseline"] == "reference")
    assert row["value"] >= row["threshold"] and row["p_value"] <= row["p_threshold"] and row["n_run"] == 24
    assert dark["stats"]["categorical"]["status"] == {"rejected": 1, "scored": 24}
    assert dark["baselines"]["last run"]["runs"] == ["night1-same"]
    ood = next(r for r in dark["drift"] if r["statistic"] == "ood" and r["baseline"] == "reference")
    assert ood["n_run"] == 24 and ood["value"] is not None   # the model has an OOD reference: its share is tested


def test_monitoring_values_reach_mlflow(nights):
    import mlflow

    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name("cxr-spark")
    run = client.search_runs([exp.experiment_id], "tags.`cxr.run_id` = 'night2-dark'")[0]
    m = run.data.metrics
    psi = next(r["value"] for r in nights["records"]["night2-dark"]["monitoring"]["drift"]
               if r["statistic"] == "intensity" and r["baseline"] == "reference")
    assert m["monitor.psi.intensity.reference"] == pytest.approx(psi)
    assert m["monitor.count.status.rejected"] == 1 and m["monitor.drifted"] >= 1
    assert sum(m[f"monitor.share.calls.{c}"] for c in ("COVID", "NORMAL", "VIRAL")) == pytest.approx(1)


def test_the_run_page_renders_in_chromium_with_the_counts(nights):
    if not CHROMIUM.is_file():
        pytest.skip("no /usr/bin/chromium: `make chromium` installs Debian's package (needs apt-get as root)")
    playwright = pytest.importorskip("playwright.sync_api", reason="the playwright package (pyproject test extra)")
    record = nights["records"]["night2-dark"]
    page_file = Path(record["monitoring"]["page"])
    assert page_file == nights["out"] / "reports" / "night2-dark.html"
    html = page_file.read_text()
    assert "http://" not in html and "https://" not in html and "<b>odd" not in html
    messages, failed = [], []
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        try:
            page = browser.new_page()
            page.on("console", lambda msg: messages.append((msg.type, msg.text)))
            page.on("pageerror", lambda exc: messages.append(("pageerror", str(exc))))
            page.on("requestfailed", lambda req: failed.append(req.url))
            page.goto(page_file.as_uri())
            text = page.inner_text("body")
            counts = {k: page.inner_text(f"#count-{k}") for k in ("input", "scored", "rejected")}
            images = page.eval_on_selector_all("img", "els => els.map(e => [e.naturalWidth, e.src.slice(0, 15)])")
        finally:
            browser.close()
    assert not [m for m in messages if m[0] in ("error", "pageerror", "warning")], messages
    assert not failed
    c = record["counts"]
    assert counts == {"input": str(c["input"]), "scored": str(c["scored"]), "rejected": str(c["rejected"])}
    assert c["scored"] == 24 and c["rejected"] == 1
    assert "Drift: " in text and "intensity vs reference" in text
    assert ODD_NAME in text                            # listed as text, with its reason
    assert "Grad-CAM" in text                          # least confident thumbnails: --explain all ran
    assert "Most out-of-distribution images" in text
    assert images and all(w > 0 and src.startswith(("data:image/svg", "data:image/jpeg")) for w, src in images)
