"""The confound probe: how much of the class the source explains, and how well the source can be read off the
files' metadata and off the model's own features.

Why: if every COVID film comes from papers and every NORMAL film from one children's hospital, "which source"
answers "which class", and any model (or a random forest on file sizes) can score well without seeing disease.
Three numbers say how exposed a data set and a model are:
- class from source: the accuracy of calling each image the most common class of its source (no pixels, no
  model). Near 1: the class is mostly explained by the source (in bold in the reports).
- source from metadata: a random forest on original width, height, aspect, format and colour mode, grouped
  cross-validation by patient. High: the files themselves say where they came from.
- source from the model's features: a logistic regression on model.onnx's "features" output, same folds, also
  within each class that has more than one source (where it is not just the class read back). High within a
  class: the model keeps what tells the sources apart, which it can use as a shortcut.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from cxr import CLASSES
from cxr.common.manifest import source_names

MOSTLY = 0.8     # class-from-source accuracy from which the class counts as mostly explained by the source
MIN_PER_SOURCE = 5


def class_from_source(labels: Sequence[str], sources: Sequence) -> dict[str, Any]:
    """Accuracy of predicting the class as its source's most common class, against the majority-class rate."""
    frame = pd.DataFrame({"label": list(labels), "source": source_names(sources)})
    n = len(frame)
    if not n:
        return {"n": 0, "accuracy": None, "chance": None, "mostly_explained": False}
    table = pd.crosstab(frame["source"], frame["label"])
    accuracy = float(table.max(axis=1).sum() / n)
    chance = float(frame["label"].value_counts().max() / n)
    return {"n": n, "accuracy": accuracy, "chance": chance, "mostly_explained": bool(accuracy >= MOSTLY),
            "sources": {s: {c: int(table.loc[s].get(c, 0)) for c in table.columns} for s in table.index}}


def _grouped_accuracy(x: np.ndarray, target: np.ndarray, groups: np.ndarray, make_model, folds: int = 5,
                      seed: int = 0) -> dict[str, Any]:
    """Held-out accuracy and balanced accuracy of predicting `target` from x, folds grouped by patient."""
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.model_selection import StratifiedGroupKFold

    keep = pd.Series(target).map(pd.Series(target).value_counts()) >= MIN_PER_SOURCE
    x, target, groups = x[keep.to_numpy()], target[keep.to_numpy()], groups[keep.to_numpy()]
    classes = np.unique(target)
    if len(classes) < 2:
        return {"n": int(len(target)), "accuracy": None, "balanced_accuracy": None, "chance": None,
                "targets": [str(c) for c in classes]}
    k = int(min(folds, pd.Series(target).value_counts().min(), len(np.unique(groups))))
    if k < 2:
        return {"n": int(len(target)), "accuracy": None, "balanced_accuracy": None, "chance": None,
                "targets": [str(c) for c in classes]}
    pred = np.empty(len(target), dtype=object)
    for train, test in StratifiedGroupKFold(k, shuffle=True, random_state=seed).split(x, target, groups):
        model = make_model(seed)
        model.fit(x[train], target[train])
        pred[test] = model.predict(x[test])
    return {"n": int(len(target)), "accuracy": float((pred == target).mean()),
            "balanced_accuracy": float(balanced_accuracy_score(target, pred.astype(target.dtype))),
            "chance": float(pd.Series(target).value_counts().max() / len(target)), "folds": k,
            "targets": [str(c) for c in classes]}


def _forest(seed: int):
    from sklearn.ensemble import RandomForestClassifier

    return RandomForestClassifier(n_estimators=200, min_samples_leaf=2, random_state=int(seed), n_jobs=1)


def _linear(seed: int):
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), PCA(n_components=32, random_state=int(seed)),
                         LogisticRegression(max_iter=2000, C=0.5))


def source_probe(x: np.ndarray, labels: Sequence[str], sources: Sequence, groups: Sequence, make_model,
                 seed: int = 0) -> dict[str, Any]:
    """Source predicted from x over all images and within each class that has more than one source."""
    names = source_names(sources)
    labels = np.asarray(list(labels), dtype=object)
    groups = np.asarray([str(g) for g in groups], dtype=object)
    out = {"all": _grouped_accuracy(x, names, groups, make_model, seed=seed), "within_class": {}}
    for c in CLASSES:
        mask = labels == c
        if len(set(names[mask])) > 1:
            out["within_class"][c] = _grouped_accuracy(x[mask], names[mask], groups[mask], make_model, seed=seed)
    return out


def probe(meta: pd.DataFrame, features: Mapping[str, np.ndarray] | None = None,
          feature_rows: np.ndarray | None = None, seed: int = 0) -> dict[str, Any]:
    """meta: one row per image with label, source, patient_id, sha256 and the file metadata columns
    (cxr.evaluate.probes.METADATA_COLUMNS); features: {model: (M, D) features} of meta's rows selected by
    feature_rows (a boolean mask; all rows when None), or None."""
    from cxr.evaluate.probes import metadata_features

    groups = meta["patient_id"].where(meta["patient_id"].notna(), meta["sha256"]).to_numpy()
    x_meta, _, _ = metadata_features(meta)
    result = {"class_from_source": class_from_source(meta["label"], meta["source"]),
              "metadata": source_probe(x_meta, meta["label"], meta["source"], groups, _forest, seed),
              "features": {}}
    rows = np.ones(len(meta), bool) if feature_rows is None else np.asarray(feature_rows, bool)
    for name, x in (features or {}).items():
        result["features"][name] = source_probe(np.asarray(x, np.float32), meta["label"][rows],
                                                meta["source"][rows], groups[rows], _linear, seed)
    return result


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def section(result: Mapping[str, Any], title: str = "## Confound probe: class, source and what the model keeps") -> str:
    """Markdown of probe()'s result."""
    cfs = result["class_from_source"]
    head = (f"Class from source alone: accuracy {_pct(cfs['accuracy'])} (majority class {_pct(cfs['chance'])}, "
            f"{cfs['n']} images)")
    if cfs["mostly_explained"]:
        head = f"**{head}: the class is mostly explained by the source.**"
    feats = result.get("features") or {}
    lines = [title, "", head, "",
             "Source predicted held-out (folds grouped by patient): from file metadata (random forest on original "
             "size, aspect, format, colour mode; all images) and from each model's own features (logistic "
             "regression on model.onnx's features; the images the model did not train on). Within a class, a "
             "score well above chance means the films of that class still say where they came from; in a model's "
             "features, that the model keeps that cue and can use it as a shortcut.", "",
             "| predicting the source of | chance | from metadata |" + "".join(
                 f" from {m}'s features |" for m in feats), "|---|---|---|" + "---|" * len(feats)]

    def row(name: str, meta_r: Mapping | None, feat_rs: Sequence[Mapping | None]) -> None:
        meta_r = meta_r or {}
        lines.append(f"| {name} ({meta_r.get('n', 'n/a')} images) | {_pct(meta_r.get('chance'))} | "
                     f"{_pct(meta_r.get('accuracy'))} |"
                     + "".join(f" {_pct((r or {}).get('accuracy'))} ({(r or {}).get('n', 0)} images) |"
                               for r in feat_rs))

    row("all images", result["metadata"]["all"], [f.get("all") for f in feats.values()])
    for c, r in result["metadata"]["within_class"].items():
        row(f"{c} ({', '.join(r['targets'])})", r, [(f.get("within_class") or {}).get(c) for f in feats.values()])
    sources = cfs.get("sources") or {}
    if sources:
        lines += ["", "| source | " + " | ".join(CLASSES) + " |", "|---|" + "---|" * len(CLASSES)]
        lines += [f"| {s} | " + " | ".join(str(counts.get(c, 0)) for c in CLASSES) + " |"
                  for s, counts in sources.items()]
    return "\n".join(lines) + "\n"


def report_section(model_dirs: Sequence[str | Path], data_dir: str | Path,
                   feature_splits: Sequence[str] = ("val", "test"), seed: int = 0) -> tuple[str, dict]:
    """The train/evaluate report's confound probe: metadata over every labelled image, each model's features over
    the images of feature_splits (not the ones it was fitted on). Returns (markdown, numbers)."""
    from cxr.data.loader import images_dataset, load_split
    from cxr.evaluate.probes import METADATA_COLUMNS
    from cxr.models.store import FEATURES_OUTPUT, load_predictor

    dataset = images_dataset(str(data_dir))
    cols = ["sha256", "label", "split", "patient_id", *METADATA_COLUMNS]
    meta = dataset.to_table(columns=cols + (["source"] if "source" in dataset.schema.names else [])).to_pandas()
    meta = meta[meta["label"].isin(list(CLASSES))].drop_duplicates("sha256").reset_index(drop=True)
    if "source" not in meta:
        meta["source"] = None
    data = load_split(str(data_dir), list(feature_splits))
    rows = meta["sha256"].isin(set(data.sha256)).to_numpy()
    order = pd.Series(np.arange(len(data)), index=data.sha256)
    features = {}
    if len(data):
        x = data.x[order.loc[meta.loc[rows, "sha256"]].to_numpy()]
        for d in model_dirs:
            predictor = load_predictor(d, engine="onnx")
            features[Path(d).name] = np.concatenate([predictor.run_outputs(x[i:i + 64], [FEATURES_OUTPUT])[0]
                                                     for i in range(0, len(x), 64)])
    result = probe(meta, features, rows, seed)
    return section(result), result
