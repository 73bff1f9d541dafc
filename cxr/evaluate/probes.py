"""Shortcut probes: does a model need the lungs, or does the image's source give the answer away?

Two kinds, both run on held-out images:
- metadata only: a random forest on what the file says about its origin (original width, height, aspect
  ratio, file format, colour mode) and nothing about the anatomy. If it comes close to the CNN, the data set
  lets a model win by recognising the source (DeGrave et al. 2021).
- region masks: the CNN's own predictions on images whose lung field is blanked (only the outer border band
  kept) and on images whose border band is blanked. A model that still scores well on the border alone has
  learned the source (labels, collimation, text), not the disease.
Blanked pixels take the mean of the pixels kept, so no brightness from the removed part leaks in.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd

from cxr import CLASSES
from cxr.evaluate.metrics import confusion_matrix, macro_f1, normal_vs_viral

BORDER = 0.15                       # band width as a fraction of the side (the "outer 15%")
REGIONS = ("border_only", "lungs_only")
METADATA_COLUMNS = ("orig_width", "orig_height", "source_format", "color_mode")


def region_mask(shape: tuple[int, int], border: float = BORDER) -> np.ndarray:
    """True on the outer band of `border` x side on every edge (the part that holds labels and collimation)."""
    h, w = shape
    bh, bw = max(1, int(round(h * border))), max(1, int(round(w * border)))
    mask = np.ones((h, w), dtype=bool)
    mask[bh:h - bh, bw:w - bw] = False
    return mask


def mask_images(x: np.ndarray, region: str, border: float = BORDER) -> np.ndarray:
    """(N, H, W, 1) images with everything but `region` set to the mean of the kept pixels, per image.

    region: "border_only" keeps the outer band (lung field blanked), "lungs_only" keeps the centre.
    """
    if region not in REGIONS:
        raise ValueError(f"unknown region {region!r}; known: {', '.join(REGIONS)}")
    band = region_mask(x.shape[1:3], border)
    keep = band if region == "border_only" else ~band
    out = np.array(x, copy=True)
    kept_mean = out[:, keep, :].mean(axis=1, keepdims=True)          # (N, 1, C)
    out[:, ~keep, :] = kept_mean
    return out


def quick_scores(y: np.ndarray, proba: np.ndarray) -> dict:
    """Accuracy, macro-F1 and NORMAL-vs-VIRAL accuracy: the probes' comparison numbers."""
    y = np.asarray(y, dtype=np.int64)
    cm = confusion_matrix(y, np.asarray(proba).argmax(axis=1))
    n = int(cm.sum())
    return {"n": n, "accuracy": float(np.trace(cm) / n) if n else None, "macro_f1": macro_f1(cm),
            "normal_vs_viral": normal_vs_viral(y, proba)["accuracy"]}


def region_scores(predict: Callable[[np.ndarray], np.ndarray], x: np.ndarray, y: np.ndarray,
                  border: float = BORDER) -> dict[str, dict]:
    """The model's scores on the full images and on each masked variant."""
    out = {"full": quick_scores(y, predict(x))}
    for region in REGIONS:
        out[region] = quick_scores(y, predict(mask_images(x, region, border)))
    return out


def metadata_features(meta: pd.DataFrame, formats: list[str] | None = None,
                      modes: list[str] | None = None) -> tuple[np.ndarray, list[str], list[str]]:
    """Numeric features from the preprocess output's file metadata (one-hot format and colour mode).

    Returns (X, formats, modes); pass the training call's formats/modes to encode a test set the same way.
    """
    missing = [c for c in METADATA_COLUMNS if c not in meta.columns]
    if missing:
        raise ValueError(f"metadata columns missing: {missing} (written by the preprocess job since its first version)")
    fmt = meta["source_format"].fillna("?").astype(str)
    mode = meta["color_mode"].fillna("?").astype(str)
    formats = formats if formats is not None else sorted(fmt.unique())
    modes = modes if modes is not None else sorted(mode.unique())
    w = meta["orig_width"].astype(float).to_numpy()
    h = meta["orig_height"].astype(float).to_numpy()
    cols = [w, h, w / np.maximum(h, 1.0)]
    cols += [(fmt == f).to_numpy(float) for f in formats]
    cols += [(mode == m).to_numpy(float) for m in modes]
    return np.column_stack(cols), formats, modes


def metadata_probe(train: pd.DataFrame, test: pd.DataFrame, seed: int = 0) -> dict:
    """Fit a random forest on train's metadata and labels, score test: (scores, class probabilities)."""
    from sklearn.ensemble import RandomForestClassifier

    lookup = {c: i for i, c in enumerate(CLASSES)}
    y_train = train["label"].map(lookup).to_numpy()
    y_test = test["label"].map(lookup).to_numpy()
    x_train, formats, modes = metadata_features(train)
    x_test, _, _ = metadata_features(test, formats, modes)
    forest = RandomForestClassifier(n_estimators=200, min_samples_leaf=2, random_state=int(seed), n_jobs=1)
    forest.fit(x_train, y_train)
    proba = np.zeros((len(test), len(CLASSES)))
    proba[:, forest.classes_] = forest.predict_proba(x_test)
    return {**quick_scores(y_test, proba), "features": ["orig_width", "orig_height", "aspect",
                                                        *[f"format={f}" for f in formats],
                                                        *[f"mode={m}" for m in modes]]}


def verdict(cnn: Mapping[str, dict], metadata: Mapping[str, float] | None, margin: float = 0.05) -> list[str]:
    """Plain-language warnings from the probes' numbers (empty when nothing looks like a shortcut).

    cnn: region_scores' output (averaged or single); metadata: metadata_probe's scores.
    """
    notes = []
    full = cnn.get("full", {})
    if metadata and full.get("accuracy") is not None and metadata.get("accuracy") is not None:
        if metadata["accuracy"] >= full["accuracy"] - margin:
            notes.append(f"WARNING: file metadata alone (size, format, colour mode) scores accuracy "
                         f"{metadata['accuracy']:.3f} against the CNN's {full['accuracy']:.3f}: this data set can be "
                         "solved by recognising where an image came from.")
        nv_meta, nv_cnn = metadata.get("normal_vs_viral"), full.get("normal_vs_viral")
        if nv_meta is not None and nv_cnn is not None and nv_meta >= nv_cnn - margin:
            notes.append(f"WARNING: on NORMAL vs VIRAL, metadata alone scores {nv_meta:.3f} against the CNN's "
                         f"{nv_cnn:.3f}.")
    border = cnn.get("border_only", {})
    chance = 1.0 / len(CLASSES)
    if border.get("accuracy") is not None and full.get("accuracy"):
        if border["accuracy"] >= chance + 0.5 * (full["accuracy"] - chance):
            notes.append(f"WARNING: with the lung field blanked the CNN still scores accuracy {border['accuracy']:.3f} "
                         f"(full images {full['accuracy']:.3f}, chance {chance:.2f}): it uses the image border, "
                         "i.e. the source, not only the lungs.")
    return notes


def probes_section(model_dirs: Sequence[str | Path], data_dir: str | Path, split: str = "test") -> tuple[str, dict]:
    """The train report's hook: the metadata probe (fit on train+val, scored on `split`) and every model on the
    split's full / border-only / lungs-only images, on the driver (the split is small). Returns (markdown, numbers)."""
    from cxr.data.loader import images_dataset, load_split
    from cxr.models.store import load_predictor

    data = load_split(str(data_dir), split)
    header = f"## Shortcut probes ({split} split)\n\n"
    if len(data) == 0:
        return header + f"(not run: no labeled {split} images)\n", {}
    cols = ["sha256", "label", "split", *METADATA_COLUMNS]
    meta = images_dataset(str(data_dir)).to_table(columns=cols).to_pandas()
    meta = meta[meta["label"].isin(list(CLASSES))]
    fit_on = meta[meta["split"].isin(["train", "val"])]
    held = meta.set_index("sha256").loc[list(data.sha256)].reset_index()
    numbers: dict[str, Any] = {"split": split, "n": len(data), "models": {}}
    numbers["metadata_only"] = metadata_probe(fit_on, held) if len(fit_on) else None
    for d in model_dirs:
        predictor = load_predictor(d)
        numbers["models"][Path(d).name] = region_scores(predictor.predict_proba, data.x, data.y)
    lines = [header.rstrip("\n"), "",
             "Does a model need the lungs? `metadata only` is a random forest fitted on the train/val images' "
             "original width, height, aspect ratio, file format and colour mode (no pixels). `border only` keeps "
             f"the outer {BORDER:.0%} band of each image and blanks the lung field; `lungs only` blanks that band. "
             "A model that still scores well on the border alone has learned where images come from.", "",
             "| model | input | accuracy | macro-F1 | NORMAL vs VIRAL acc. |", "|---|---|---|---|---|"]
    fmt = (lambda v: "n/a" if v is None else f"{v:.3f}")  # noqa: E731
    md = numbers["metadata_only"]
    if md:
        lines.append(f"| metadata only | size, format, colour | {fmt(md['accuracy'])} | {fmt(md['macro_f1'])} | "
                     f"{fmt(md['normal_vs_viral'])} |")
    warnings = []
    for name, scores in numbers["models"].items():
        for region in ("full", *REGIONS):
            s = scores[region]
            lines.append(f"| {name} | {region.replace('_', ' ')} | {fmt(s['accuracy'])} | {fmt(s['macro_f1'])} | "
                         f"{fmt(s['normal_vs_viral'])} |")
        warnings += [f"{name}: {w}" for w in verdict(scores, md)]
    numbers["warnings"] = warnings
    lines += [""] + [f"> **{w}**" for w in warnings] + ([""] if warnings else [])
    return "\n".join(lines) + "\n", numbers
