"""MODELS_DIR/report.md and its plots: the study's optimizer table beside ours, every model's test metrics,
and the caveats a reader needs (test size, patients, source confounding). matplotlib with the Agg backend."""
from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from cxr import CLASSES
from cxr.evaluate.metrics import roc_curve
from cxr.models.store import list_models, read_metadata
from cxr.explain.viz import plt as viz_plt
from cxr.explain.viz import save_figure

STUDY_OPTIMIZERS = ("rmsprop", "sgd", "adadelta", "adagrad", "adam")
STUDY_LABELS = {"rmsprop": "RMSprop", "sgd": "SGD", "adadelta": "Adadelta", "adagrad": "Adagrad", "adam": "Adam"}
# Section 4.1 of the study: training accuracy and loss of its Keras CNN, first and final of 50 epochs.
STUDY_TABLE = {
    "accuracy_first": {"rmsprop": 0.9983, "sgd": 0.9286, "adadelta": 0.9939, "adagrad": 0.9817, "adam": 0.9904},
    "accuracy_final": {"rmsprop": 1.0, "sgd": 1.0, "adadelta": 1.0, "adagrad": 1.0, "adam": 1.0},
    "loss_first": {"rmsprop": 0.0383, "sgd": 0.6425, "adadelta": 0.0453, "adagrad": 0.9830, "adam": 0.0852},
    "loss_final": {"rmsprop": 2.3842e-7, "sgd": 0.6931, "adadelta": 1.0417e-6, "adagrad": 2.3842e-7, "adam": 2.3842e-7},
}
ROW_LABELS = {"accuracy_first": "Accuracy (first epoch)", "accuracy_final": "Accuracy (final epoch)",
              "loss_first": "Loss (first epoch)", "loss_final": "Loss (final epoch)"}

SOURCE_CAVEAT = (
    "**Source confounding.** Public chest X-ray collections rarely hold every class from every source: in "
    "`../shared/data/cxr` every COVID film is an adult's from papers and every NORMAL and VIRAL film a child's "
    "from one hospital; `../shared/data/cxr-adult` adds adult NORMAL (NIH) and COVID (Hannover) films, but VIRAL "
    "stays one paediatric source. A model can score well here by recognising the source (age, scanner, size, "
    "burnt-in markers) instead of the disease. Read the per-source tables, the model cards and the confound "
    "probe below, and the leave-one-source-out cross-validation (`jobs/crossval.py --group-by source`), before "
    "the pooled numbers.")


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if isinstance(v, float):
        if v != 0 and abs(v) < 1e-3:
            return f"{v:.4e}"
        return f"{v:.{digits}f}"
    return str(v)


def _ci(summary: Mapping) -> str:
    lo, hi = summary.get("accuracy_ci95") or (None, None)
    return f"{_fmt(summary.get('accuracy'))} [{_fmt(lo, 3)}, {_fmt(hi, 3)}]"


def _study_rows(metas: Mapping[str, dict], evaluation: Mapping | None) -> list[str]:
    present = [o for o in STUDY_OPTIMIZERS if f"cnn-{o}" in metas]
    if not present:
        return ["(no cnn-<optimizer> models in this run)"]
    header = "| | " + " | ".join(STUDY_LABELS[o] for o in STUDY_OPTIMIZERS) + " |"
    lines = [header, "|---" * (len(STUDY_OPTIMIZERS) + 1) + "|"]
    for key, label in ROW_LABELS.items():
        metric, which = key.split("_")
        ours = []
        for o in STUDY_OPTIMIZERS:
            hist = (metas.get(f"cnn-{o}") or {}).get("history", {}).get(metric)
            ours.append(_fmt(hist[0] if which == "first" else hist[-1]) if hist else "–")
        lines.append(f"| {label}, ours | " + " | ".join(ours) + " |")
        lines.append(f"| {label}, study | " + " | ".join(_fmt(STUDY_TABLE[key][o]) for o in STUDY_OPTIMIZERS) + " |")
    extra = {"Val accuracy (final epoch), ours": lambda m: (m.get("history", {}).get("val_accuracy") or [None])[-1]}
    for label, get in extra.items():
        lines.append(f"| {label} | " + " | ".join(_fmt(get(metas[f'cnn-{o}'])) if f"cnn-{o}" in metas else "–"
                                                   for o in STUDY_OPTIMIZERS) + " |")
    if evaluation:
        ev = evaluation["models"]
        lines.append(f"| Test accuracy ({evaluation['split']}), ours | " + " | ".join(
            _fmt(ev[f"cnn-{o}"]["accuracy"]) if f"cnn-{o}" in ev else "–" for o in STUDY_OPTIMIZERS) + " |")
        lines.append(f"| Test macro-F1, ours | " + " | ".join(
            _fmt(ev[f"cnn-{o}"]["macro_f1"]) if f"cnn-{o}" in ev else "–" for o in STUDY_OPTIMIZERS) + " |")
    return lines



def plot_optimizer_curves(metas: Mapping[str, dict], path: Path, names: list[str] | None = None,
                          title: str = "CNN: accuracy and loss per optimizer") -> Path | None:
    """Like the study's Figure 2: one column per model, accuracy on top, loss below, train and val."""
    names = names or [f"cnn-{o}" for o in STUDY_OPTIMIZERS if f"cnn-{o}" in metas]
    if not names:
        return None
    plt = viz_plt()
    fig, axes = plt.subplots(2, len(names), figsize=(2.6 * len(names), 4.6), squeeze=False)
    for j, name in enumerate(names):
        h = metas[name].get("history", {})
        for i, metric in enumerate(("accuracy", "loss")):
            ax = axes[i][j]
            for key, style in ((metric, "-"), (f"val_{metric}", "--")):
                if h.get(key):
                    ax.plot(range(1, len(h[key]) + 1), h[key], style, label="train" if style == "-" else "val")
            ax.set_title(f"{name} {metric}", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.set_xlabel("epoch", fontsize=7)
            if metric == "accuracy":
                ax.set_ylim(0, 1.02)
            if i == 0 and j == 0:
                ax.legend(fontsize=7)
    return save_figure(fig, path, title)


def _grid(n: int) -> tuple[int, int]:
    cols = min(n, 5)
    return math.ceil(n / cols), cols


def _model_panels(evaluation: Mapping):
    """(figure, [(axes, model name), ...]): one small panel per evaluated model, unused panels hidden; None
    without models."""
    models = list(evaluation["models"])
    if not models:
        return None
    plt = viz_plt()
    rows, cols = _grid(len(models))
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 2.4 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    return fig, list(zip(axes.ravel(), models))


def plot_confusions(evaluation: Mapping, path: Path) -> Path | None:
    panels = _model_panels(evaluation)
    if panels is None:
        return None
    fig, pairs = panels
    for ax, name in pairs:
        cm = np.asarray(evaluation["models"][name]["confusion"])
        ax.axis("on")
        ax.imshow(cm, cmap="Blues", vmin=0, vmax=max(int(cm.sum(axis=1).max()), 1))
        for (i, j), v in np.ndenumerate(cm):
            ax.text(j, i, str(v), ha="center", va="center", fontsize=8,
                    color="white" if v > cm.sum(axis=1).max() / 2 else "black")
        ax.set_xticks(range(len(CLASSES)), [c[:3] for c in CLASSES], fontsize=7)
        ax.set_yticks(range(len(CLASSES)), [c[:3] for c in CLASSES], fontsize=7)
        ax.set_title(name, fontsize=8)
        ax.set_xlabel("predicted", fontsize=7)
        ax.set_ylabel("true", fontsize=7)
    return save_figure(fig, path)


def plot_rocs(evaluation: Mapping, path: Path) -> Path | None:
    panels = _model_panels(evaluation)
    if panels is None:
        return None
    fig, pairs = panels
    for ax, name in pairs:
        pred = evaluation["models"][name]["predictions"]
        y, proba = np.asarray(pred["y"]), np.asarray(pred["proba"]).reshape(-1, len(CLASSES))
        ax.axis("on")
        for i, c in enumerate(CLASSES):
            if len(y) and 0 < (y == i).sum() < len(y):
                fpr, tpr = roc_curve(y == i, proba[:, i])
                auc = evaluation["models"][name]["roc_auc"]["per_class"].get(c)
                ax.plot(fpr, tpr, label=f"{c[:3]} {_fmt(auc, 2)}")
        ax.plot([0, 1], [0, 1], ":", color="grey")
        ax.set_title(name, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6, loc="lower right")
    return save_figure(fig, path)


def write_report(models_dir: str | Path, evaluation: Mapping | None = None, split: str = "test") -> Path:
    """Write models_dir/report.md and models_dir/plots/*.png from the models' metrics.json and the
    evaluation (read from models_dir/evaluation_<split>.json when not given)."""
    root = Path(models_dir)
    metas = {d.name: read_metadata(d) for d in list_models(root)}
    if evaluation is None:
        ev_path = root / f"evaluation_{split}.json"
        evaluation = json.loads(ev_path.read_text()) if ev_path.is_file() else None
    plots = root / "plots"
    plots.mkdir(exist_ok=True)
    first = next(iter(metas.values()), {})
    data, pre = first.get("data", {}), first.get("preprocess", {})
    training = first.get("training", {})
    cw = training.get("class_weight", {})

    L: list[str] = ["# Training and evaluation report", ""]
    L.append(f"Generated {datetime.now(timezone.utc).isoformat(timespec='seconds')} from `{root}`. "
             f"Data: `{data.get('dir')}` (preprocess manifest sha256 `{data.get('manifest_sha256')}`); images "
             f"{pre.get('size')}x{pre.get('size')}, {pre.get('method')} (clip {pre.get('clip_limit')}, tiles "
             f"{pre.get('tile_grid')}), brightness {pre.get('brightness_alpha')}·x+{pre.get('brightness_beta')}, "
             f"resize {pre.get('resize_mode')}.")
    L.append("")
    L.append("## Data")
    L.append("")
    L.append("| split | images | patients | " + " | ".join(CLASSES) + " |")
    L.append("|---|---|---|" + "---|" * len(CLASSES))
    for s in ("train", "val"):
        d = data.get(s, {})
        L.append(f"| {s} | {d.get('images')} | {d.get('patients')} | "
                 + " | ".join(str(d.get("classes", {}).get(c)) for c in CLASSES) + " |")
    if evaluation:
        t = evaluation["data"]
        L.append(f"| {t['split']} (evaluated) | {t['images']} | {t['patients']} | "
                 + " | ".join(str(t["classes"].get(c)) for c in CLASSES) + " |")
    L.append("")
    if evaluation:
        t = evaluation["data"]
        L.append(f"The {t['split']} split holds **{t['images']} labeled images from {t['patients']} patients** "
                 f"({t['images_without_patient_id']} images without a patient id, each counted as its own patient). "
                 f"It was checked to share no image (sha256) and no patient id with {'/'.join(t['checked_against'])} "
                 f"before evaluation. Rows were spread over {evaluation['partitions']} Spark partitions.")
        L.append("")
        for w in evaluation.get("warnings", []):
            L.append(f"> **Warning:** {w}")
            L.append("")
    L.append(f"Class weights: **{cw.get('mode')}** {_weights(cw.get('weights'))} (train counts "
             f"{cw.get('train_counts')}). Training accuracy/loss in the curves and the study table are "
             "class-weighted when weights are on (as Keras logs them); validation and test numbers are not.")
    L.append("")
    L.append(SOURCE_CAVEAT)
    L.append("")

    L.append("## The study's table: Keras CNN with five optimizers")
    L.append("")
    epochs = training.get("epochs")
    L.append(f"Training accuracy and loss at the first and final epoch; ours after {epochs} epochs (batch "
             f"{training.get('batch_size')}, seed {training.get('seeds', {}).get('seed')}), the study's after 50. "
             "Optimizers use Keras defaults unless the config says otherwise "
             f"({_opt_summary(metas)}).")
    L.append("")
    L += _study_rows(metas, evaluation)
    L.append("")
    curves = plot_optimizer_curves(metas, plots / "curves_cnn_optimizers.png")
    if curves:
        L.append(f"![CNN curves per optimizer](plots/{curves.name})")
        L.append("")
    others = [n for n in metas if not n.startswith("cnn-")]
    if others:
        p = plot_optimizer_curves(metas, plots / "curves_other_models.png", others, "Other models: accuracy and loss")
        L.append(f"![Other models' curves](plots/{p.name})")
        L.append("")

    if evaluation:
        ev = evaluation["models"]
        L.append(f"## Evaluation on the {evaluation['split']} split (distributed, {evaluation['spark']['master']})")
        L.append("")
        L.append("| model | n | accuracy [95% Wilson CI] | macro-F1 | macro ROC-AUC | NORMAL-vs-VIRAL acc | "
                 "epochs | train s |")
        L.append("|---|---|---|---|---|---|---|---|")
        for name, s in ev.items():
            m = metas.get(name, {})
            L.append(f"| {name} | {s['n']} | {_ci(s)} | {_fmt(s['macro_f1'])} | {_fmt(s['roc_auc']['macro'])} | "
                     f"{_fmt(s['normal_vs_viral']['accuracy'])} | {m.get('training', {}).get('epochs')} | "
                     f"{_fmt(m.get('timings_s', {}).get('train'), 1)} |")
        L.append("")
        L.append("### Per class (one-vs-rest)")
        L.append("")
        L.append("| model | class | support | sensitivity | specificity | precision | F1 | ROC-AUC |")
        L.append("|---|---|---|---|---|---|---|---|")
        for name, s in ev.items():
            for c in CLASSES:
                pc = s["per_class"][c]
                L.append(f"| {name} | {c} | {pc['support']} | {_fmt(pc['sensitivity'])} | {_fmt(pc['specificity'])} "
                         f"| {_fmt(pc['precision'])} | {_fmt(pc['f1'])} | {_fmt(s['roc_auc']['per_class'].get(c))} |")
        L.append("")
        L.append("### NORMAL vs VIRAL (within one source)")
        L.append("")
        L.append("Test rows whose truth is NORMAL or VIRAL, called by the larger of the NORMAL and VIRAL outputs "
                 "(COVID output ignored). Confusion rows = truth (NORMAL, VIRAL), columns = call.")
        L.append("")
        L.append("| model | n | accuracy [95% CI] | AUC (VIRAL vs NORMAL) | confusion | argmax was COVID |")
        L.append("|---|---|---|---|---|---|")
        for name, s in ev.items():
            nv = s["normal_vs_viral"]
            lo, hi = nv["accuracy_ci95"]
            L.append(f"| {name} | {nv['n']} | {_fmt(nv['accuracy'])} [{_fmt(lo, 3)}, {_fmt(hi, 3)}] | "
                     f"{_fmt(nv['auc_viral_vs_normal'])} | {nv['confusion']} | {nv['also_called_covid']} |")
        L.append("")
        if any(s.get("by_source") for s in ev.values()):
            from cxr.evaluate.by_source import table

            L.append(f"### Per source and class ({evaluation['split']} split)")
            L.append("")
            L.append("Each collection's films on their own: a pooled score can be high while one source's films of "
                     "a class are missed (a recall under 0.9 in bold). `called` columns count the model's calls.")
            L.append("")
            for name, s in ev.items():
                L.append(table(s["by_source"], title=name))
                L.append("")
        cm_png = plot_confusions(evaluation, plots / "confusion_matrices.png")
        roc_png = plot_rocs(evaluation, plots / "roc_curves.png")
        if cm_png:
            L.append(f"![Confusion matrices](plots/{cm_png.name})")
            L.append("")
        if roc_png:
            L.append(f"![ROC curves, one-vs-rest](plots/{roc_png.name})")
            L.append("")
    else:
        L.append("(No evaluation found: run jobs/evaluate.py.)")
        L.append("")
    L += ensemble_rows(metas, evaluation)

    from cxr.evaluate.calibration import calibration_section
    from cxr.explain.gradcam import shortcut_section

    L.append(calibration_section(evaluation, metas, plots))  # "" when no model is calibrated
    if data.get("dir"):
        from cxr.evaluate.probes import probes_section

        from cxr.models.card import report_section as cards_section

        L.append(cards_section(list_models(root)))
        L.append(probes_section(list_models(root), data["dir"], split)[0])
        from cxr.evaluate.confound import report_section

        L.append(report_section(list_models(root), data["dir"])[0])
        for d in list_models(root):
            md, _ = shortcut_section(d, data["dir"], split, plots_dir=plots)
            L.append(md)

    L.append("## Provenance")
    L.append("")
    seeds = training.get("seeds", {})
    versions = first.get("versions", {})
    L.append(f"Seeds: Python/NumPy/TensorFlow {seeds.get('seed')}, op determinism {seeds.get('op_determinism')}. "
             f"Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items() if k in
                                        ("python", "tensorflow-cpu", "keras", "numpy", "pyspark")) + ". "
             "Each model folder's metrics.json records its architecture, optimizer settings, per-epoch history and "
             "timings, data counts and the preprocess params scoring must repeat.")
    L.append("")
    path = root / "report.md"
    path.write_text("\n".join(L))
    return path


def ensemble_rows(metas: Mapping[str, dict], evaluation: Mapping | None) -> list[str]:
    """The seed-ensemble section: every member (evaluated beside its ensemble by cxr.spark.evaluate), the
    members' mean and spread (what one training run would give), and the ensemble itself."""
    ensembles = {n: m for n, m in metas.items() if m.get("kind") == "ensemble"}
    if not ensembles:
        return []
    ev = (evaluation or {}).get("models", {})
    split = (evaluation or {}).get("split", "test")
    nv = (lambda s: (s.get("normal_vs_viral") or {}).get("accuracy"))
    L = ["## Seed ensembles", "",
         f"Each ensemble is one model (one folder, one model id, one model.onnx) predicting the mean of its members' "
         f"probabilities; the members differ only in their seed. Numbers on the {split} split; \"members mean ± sd\" "
         "is what a single training run gives on average and how much it moves with the seed.", "",
         f"| model | seed | accuracy | macro-F1 | NORMAL-vs-VIRAL acc | final val accuracy |",
         "|---|---|---|---|---|---|"]
    for name, meta in ensembles.items():
        members = meta["ensemble"]["members"]
        for m in members:
            s = ev.get(m["name"], {})
            L.append(f"| {m['name']} | {m['seed']} | {_fmt(s.get('accuracy'))} | {_fmt(s.get('macro_f1'))} | "
                     f"{_fmt(nv(s) if s else None)} | {_fmt((m['history'].get('val_accuracy') or [None])[-1])} |")
        got = [ev[m["name"]] for m in members if m["name"] in ev]
        if len(got) > 1:
            spread = (lambda vals: "n/a" if any(v is None for v in vals) else
                      f"{np.mean(vals):.4f} ± {np.std(vals, ddof=1):.4f}")
            L.append(f"| members mean ± sd | | {spread([g['accuracy'] for g in got])} | "
                     f"{spread([g['macro_f1'] for g in got])} | {spread([nv(g) for g in got])} | |")
        s = ev.get(name, {})
        L.append(f"| **{name}** (ensemble of {len(members)}) | {', '.join(str(m['seed']) for m in members)} | "
                 f"{_fmt(s.get('accuracy'))} | {_fmt(s.get('macro_f1'))} | {_fmt(nv(s) if s else None)} | "
                 f"{_fmt((meta.get('history', {}).get('val_accuracy') or [None])[-1])} (members' mean) |")
    L.append("")
    return L


def _weights(w: Mapping | None) -> str:
    return "" if not w else "(" + ", ".join(f"{k} {v:.3f}" for k, v in w.items()) + ")"


def _opt_summary(metas: Mapping[str, dict]) -> str:
    parts = []
    for o in STUDY_OPTIMIZERS:
        m = metas.get(f"cnn-{o}")
        if m:
            lr = m.get("optimizer", {}).get("config", {}).get("learning_rate")
            parts.append(f"{STUDY_LABELS[o]} lr {_fmt(lr, 4) if isinstance(lr, float) else lr}")
    return ", ".join(parts) or "none"
