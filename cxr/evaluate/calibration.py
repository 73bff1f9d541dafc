"""Temperature scaling: make a trained model's probabilities mean what they say, without changing its calls.

A CNN trained to near-zero loss outputs 0.999 for calls that are right far less often than that. Temperature
scaling (Guo et al., 2017) fits one number T on the val split, by minimising the negative log-likelihood of
softmax(log(p) / T); T > 1 softens over-confident outputs. Dividing every logit of a row by the same T > 0
keeps their order, so accuracy, confusion matrices and the argmax call are unchanged — only the
probabilities (and thresholds a user sets on them) move.

The fit works on probabilities (log p are the logits up to a per-row constant, which softmax ignores), so
it needs nothing from the model but its outputs: Keras and cxr.nn models alike. NumPy only.

    fit_temperature(proba, y) -> T          apply_temperature(proba, T) -> calibrated proba
    ece(proba, y) -> expected calibration error (top-label, equal-width bins)
    calibrate_model(model_dir, data_dir)    fit on PRE_OUT's val split, record it in metrics.json
    calibration_section(...)                 the report's markdown + reliability diagram
"""
from __future__ import annotations

import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

import numpy as np

T_MIN, T_MAX = 0.05, 20.0  # a T outside this range means the val split is too small or degenerate
MIN_VAL_IMAGES = 50        # fits on fewer val images are recorded but not applied (unless forced)
N_BINS = 15
_LOG_FLOOR = 1e-30  # float32 softmax can underflow to exactly 0


def _logits(proba: np.ndarray) -> np.ndarray:
    p = np.asarray(proba, dtype=np.float64)
    if p.ndim != 2:
        raise ValueError(f"expected probabilities (N, K), got shape {p.shape}")
    return np.log(np.maximum(p, _LOG_FLOOR))


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def apply_temperature(proba: np.ndarray, temperature: float | None) -> np.ndarray:
    """softmax(log(p) / T), float32 like the model's own output; T None or 1 returns proba unchanged."""
    if temperature is None or float(temperature) == 1.0:
        return np.asarray(proba, dtype=np.float32)
    t = float(temperature)
    if not (t > 0 and math.isfinite(t)):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
    return _softmax(_logits(proba) / t).astype(np.float32)


def nll(proba: np.ndarray, y: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the true classes after temperature scaling."""
    z = _logits(proba) / float(temperature)
    z = z - z.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(z).sum(axis=1))
    y = np.asarray(y, dtype=np.int64)
    return float(np.mean(log_norm - z[np.arange(len(y)), y]))


def fit_temperature(proba: np.ndarray, y: np.ndarray, t_min: float = T_MIN, t_max: float = T_MAX) -> float:
    """The T in [t_min, t_max] minimising the NLL of softmax(log(p) / T) on (proba, y).

    With s = 1/T the NLL is convex in s and its derivative is mean(E_softmax(s z)[z] - z_y), increasing in s,
    so a bisection on the derivative's sign finds the minimum without tuning (60 halvings of log s).
    On a val split every image of which is called right with room to spare the NLL keeps falling as T -> 0:
    the fit then stops at t_min, which calibrate_model reports as a warning.
    """
    z = _logits(proba)
    y = np.asarray(y, dtype=np.int64)
    if len(y) == 0:
        raise ValueError("cannot fit a temperature on zero images")
    if len(y) != len(z) or y.min() < 0 or y.max() >= z.shape[1]:
        raise ValueError("labels must be class indices, one per row of proba")
    z_true = z[np.arange(len(y)), y]

    def slope(s: float) -> float:  # d NLL / d s
        q = _softmax(s * z)
        return float(np.mean((q * z).sum(axis=1) - z_true))

    lo, hi = math.log(1.0 / t_max), math.log(1.0 / t_min)  # bounds on log s
    if slope(math.exp(lo)) >= 0:
        return float(t_max)
    if slope(math.exp(hi)) <= 0:
        return float(t_min)
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if slope(math.exp(mid)) > 0:
            hi = mid
        else:
            lo = mid
    return float(1.0 / math.exp(0.5 * (lo + hi)))


def reliability(proba: np.ndarray, y: np.ndarray, n_bins: int = N_BINS) -> dict[str, np.ndarray]:
    """Per equal-width confidence bin: count, mean confidence, accuracy (NaN where empty)."""
    p = np.asarray(proba, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    conf, call = p.max(axis=1), p.argmax(axis=1)
    bins = np.minimum((conf * n_bins).astype(np.int64), n_bins - 1)
    count = np.bincount(bins, minlength=n_bins).astype(np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(bins, weights=conf, minlength=n_bins) / count
        acc = np.bincount(bins, weights=(call == y).astype(np.float64), minlength=n_bins) / count
    return {"count": count, "confidence": mean_conf, "accuracy": acc, "edges": np.linspace(0, 1, n_bins + 1)}


def ece(proba: np.ndarray, y: np.ndarray, n_bins: int = N_BINS) -> float:
    """Expected calibration error: sum over bins of (bin share) x |accuracy - mean confidence|, top label."""
    if len(y) == 0:
        return float("nan")
    r = reliability(proba, y, n_bins)
    filled = r["count"] > 0
    gaps = np.abs(r["accuracy"][filled] - r["confidence"][filled])
    return float(np.sum(r["count"][filled] * gaps) / len(y))


def fit_report(proba: np.ndarray, y: np.ndarray, n_bins: int = N_BINS, force: bool = False) -> dict[str, Any]:
    """Fit T and say what it did: the `calibration` record stored in metrics.json (minus provenance).

    `applied` says whether scoring should use T: not when the fit hit a bound or rests on fewer than
    MIN_VAL_IMAGES images (on 42 val images of the real sample set, a fitted T = 1.8 made the test NLL worse),
    unless `force`."""
    t = fit_temperature(proba, y)
    after = apply_temperature(proba, t)
    record = {"temperature": t, "ece_before": ece(proba, y, n_bins), "ece_after": ece(after, y, n_bins),
              "nll_before": nll(proba, y), "nll_after": nll(proba, y, t), "n_val": int(len(y)), "n_bins": n_bins,
              "method": "temperature scaling of log(p), NLL minimised on the val split"}
    warnings = []
    if t in (T_MIN, T_MAX):
        warnings.append(f"temperature hit its bound ({t:g}): the val split gives no usable optimum "
                        f"(too small, or every image called right with near certainty)")
    if len(y) < MIN_VAL_IMAGES:
        warnings.append(f"fitted on only {len(y)} val images: T and both ECEs are rough")
    record["applied"] = bool(force or not warnings)
    if warnings and not force:
        warnings.append("so scoring does not apply it (scripts/calibrate.py --force to apply anyway)")
    record["warnings"] = warnings
    return record


def calibrate_model(model_dir: str | Path, data_dir: str | Path, split: str = "val", val=None,
                    n_bins: int = N_BINS, write: bool = True, force: bool = False) -> dict[str, Any]:
    """Fit T for the model in model_dir on PRE_OUT's `split` (or an already loaded SplitData `val`) and, if
    `write`, store it as metrics.json's `calibration`. The train job can call this after saving each model.
    `val` may be in memory (SplitData) or streamed (cxr.data.stream.ParquetSplit); either is read in batches."""
    from cxr.data.loader import read_manifest
    from cxr.data.stream import ParquetSplit, predict_source
    from cxr.models import store

    predictor = store.load_predictor(model_dir, batch_size=16)  # 16 a call: bounded activations at 224 px
    data = val if val is not None else ParquetSplit.open(str(data_dir), split)  # streamed: one batch in memory
    if len(data) == 0:
        raise ValueError(f"no labeled {split} images in {data_dir}: nothing to fit a temperature on")
    proba = predict_source(predictor.predict_proba, data)
    record = fit_report(proba, data.y.astype(np.int64), n_bins, force)
    try:
        _, manifest_sha = read_manifest(str(data_dir))
    except FileNotFoundError:
        manifest_sha = None
    record.update(split=split, data_dir=str(data_dir), manifest_sha256=manifest_sha,
                  fitted_utc=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    if write:
        meta = store.read_metadata(model_dir)
        meta["calibration"] = record
        store.write_metadata(model_dir, meta)
    return record


def temperature_of(metadata: Mapping[str, Any]) -> float | None:
    """The T scoring should apply for a model's metrics.json: None when uncalibrated or the fit is not
    `applied` (too few val images, T at a bound)."""
    cal = metadata.get("calibration") or {}
    if cal.get("temperature") is None or not cal.get("applied", True):
        return None
    return float(cal["temperature"])


# ------------------------------------------------------------------------------------------------- report

def plot_reliability(proba: np.ndarray, y: np.ndarray, temperature: float | None, path: str | Path,
                     title: str = "", n_bins: int = N_BINS) -> Path:
    """Reliability diagram, before and after scaling: accuracy per confidence bin against the diagonal."""
    from cxr.explain.viz import plt, save_figure

    pyplot = plt()
    fig, axes = pyplot.subplots(1, 2, figsize=(6.4, 3.2), sharey=True)
    for ax, (name, p) in zip(axes, (("before", proba), (f"after (T={temperature:.2f})" if temperature else "after",
                                                        apply_temperature(proba, temperature)))):
        r = reliability(p, y, n_bins)
        width = 1.0 / n_bins
        centers = r["edges"][:-1] + width / 2
        filled = r["count"] > 0
        ax.bar(centers[filled], r["accuracy"][filled], width=width * 0.9, color="#4c72b0", label="accuracy")
        ax.plot(r["confidence"][filled], r["confidence"][filled], "o", ms=3, color="#dd8452", label="confidence")
        ax.plot([0, 1], [0, 1], ":", color="grey")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("confidence (top class)", fontsize=8)
        ax.set_title(f"{name}: ECE {ece(p, y, n_bins):.3f}", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0].set_ylabel("accuracy", fontsize=8)
    axes[0].legend(fontsize=7, loc="upper left")
    return save_figure(fig, path, title)


def calibration_section(evaluation: Mapping[str, Any] | None, metas: Mapping[str, Mapping[str, Any]],
                        plots_dir: str | Path) -> str:
    """Markdown for report.md: per calibrated model, T and ECE on val (where it was fitted) and on the
    evaluated split before/after, with a reliability diagram per model in plots_dir.

    `evaluation` and `metas` are what cxr.evaluate.report.write_report already holds (evaluation["models"][name]
    ["predictions"] = {"y", "proba"}; metas[name] = metrics.json)."""
    plots = Path(plots_dir)
    rows, images, notes = [], [], []
    split = (evaluation or {}).get("split", "test")
    for name, meta in metas.items():
        cal = meta.get("calibration")
        if not cal:
            continue
        t = float(cal["temperature"])
        pred = ((evaluation or {}).get("models", {}).get(name) or {}).get("predictions")
        test_before = test_after = nll_before = nll_after = None
        if pred and len(pred.get("y", [])):
            y = np.asarray(pred["y"], dtype=np.int64)
            proba = np.asarray(pred["proba"], dtype=np.float64).reshape(len(y), -1)
            test_before, test_after = ece(proba, y), ece(apply_temperature(proba, t), y)
            nll_before, nll_after = nll(proba, y), nll(proba, y, t)
            png = plot_reliability(proba, y, t, plots / f"reliability_{name}.png", f"{name} on {split}")
            images.append(f"![Reliability, {name}]({plots.name}/{png.name})")
        fmt = (lambda v: "n/a" if v is None else f"{v:.4f}")
        shown = f"{t:.3f}" + ("" if cal.get("applied", True) else " (not applied)")
        rows.append(f"| {name} | {shown} | {cal.get('n_val')} | {fmt(cal.get('ece_before'))} -> "
                     f"{fmt(cal.get('ece_after'))} | {fmt(test_before)} -> {fmt(test_after)} | "
                     f"{fmt(nll_before)} -> {fmt(nll_after)} |")
        notes += [f"> **Note ({name}):** {w}" for w in cal.get("warnings", [])]
    if not rows:
        return ""
    lines = ["## Calibration (temperature scaling)", "",
             "One temperature per model fitted on the val split (NLL of softmax(log p / T)); the score job reports "
             "softmax(log p / T). Calls and accuracy are unchanged; ECE = expected calibration error, top label, "
             f"{N_BINS} equal-width bins; NLL = mean negative log-likelihood (lower is better for both; with few "
             "images ECE is noisy, NLL less so).", "",
             f"| model | T | val images | ECE val (fitted) | ECE {split} | NLL {split} |",
             "|---|---|---|---|---|---|", *rows, ""]
    for note in notes:
        lines += [note, ""]
    for img in images:
        lines += [img, ""]
    return "\n".join(lines)
