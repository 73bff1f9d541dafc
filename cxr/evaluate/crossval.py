"""Grouped k-fold cross-validation: numbers that survive a small data set and its sources.

A single 10% test split of a few hundred images moves by several points from seed to seed. Here every
labeled image (all of the preprocess job's splits pooled) is held out once per seed: folds grouped by
patient (content hash without one) and stratified by class, repeated over seeds (seed i uses
train.seed + i for the fold assignment and for the model's initialisation). Models train on the driver
(cxr.train), the held-out folds are evaluated on the executors (cxr.spark.crossval), and the shortcut probes
(cxr.evaluate.probes) run on the same folds, so every number is reported as mean and spread over folds x seeds.

Two spreads are reported because they answer different questions: over folds x seeds (how much one held-out
fold of ~90 images moves) and across seeds of each seed's CV mean (`per_seed`: how much the whole procedure,
i.e. one user's training on all the data, moves with the seed; issue 21). With crossval.members, the members of
a seed ensemble are evaluated as models of their own (`<name>:member<i>`), so one run gives the single model,
the ensemble and, from predictions.csv.gz, every smaller ensemble of its first members on the same folds.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from cxr import CLASSES
from cxr.evaluate import by_source, confound
from cxr.evaluate.calibration import ece
from cxr.data.loader import images_dataset, read_manifest
from cxr.evaluate.folds import assign_folds, check_grouping, fold_key, group_keys
from cxr.evaluate.metrics import summarize
from cxr.evaluate.probes import REGIONS, metadata_probe, quick_scores, verdict
from cxr.models import store
from cxr.common.manifest import source_names
from cxr.common.provenance import package_versions
from cxr.common.splits import SPLITS
from cxr.train import OutputExistsError, _as_list, class_weights, plan, train_and_save

log = logging.getLogger(__name__)

HEADLINE = ("accuracy", "macro_f1", "normal_vs_viral", "ece")
RESULT_FILE = "crossval.json"
REPORT_FILE = "crossval.md"
FOLDS_FILE = "folds.csv"         # sha256, seed, fold, group, label: which image was held out where
PREDICTIONS_FILE = "predictions.csv.gz"   # seed, fold, model, sha256, y, p_<CLASS>: every held-out probability
PROBA_COLUMNS = [f"p_{c}" for c in CLASSES]


def load_pool(data_dir: str, batch_rows: int = 64, conf: Mapping[str, Any] | None = None):
    """Every labeled image of every split, and its file metadata (for the metadata probe) in the same order.
    The pixels are not loaded: each fold's training streams them (cxr.data.stream, train.shuffle_buffer)."""
    from cxr.data.stream import open_training_split

    data = open_training_split(data_dir, SPLITS, {**(conf or {}), "loader_batch_rows": batch_rows})
    cols = ["sha256", "label", "patient_id", "orig_width", "orig_height", "source_format", "color_mode"]
    meta = images_dataset(data_dir).to_table(columns=cols).to_pandas().drop_duplicates("sha256")
    meta = meta.set_index("sha256").loc[list(data.sha256)].reset_index()
    return data, meta


def fold_assignment(data, k: int, seeds: Sequence[int]) -> pd.DataFrame:
    """(sha256, seed, fold, group) for every image and seed; checks that no group spans two folds."""
    groups = group_keys(data.patient_id, data.sha256)
    frames = []
    for seed in seeds:
        folds = assign_folds(data.y, groups, k, seed)
        check_grouping(folds, groups)
        frames.append(pd.DataFrame({"sha256": data.sha256, "seed": int(seed), "fold": folds, "group": groups}))
    return pd.concat(frames, ignore_index=True)


GROUP_BY = ("patient", "source")


def source_assignment(data, seeds: Sequence[int]) -> tuple[pd.DataFrame, list[dict]]:
    """Leave-one-source-out: fold f holds out source f's images of every class that has another source (so the
    model still learns that class, from elsewhere); images of a class only that source has stay in every
    training fold (fold -1, never held out). Returns ((sha256, seed, fold, group) for the held-out images, one
    row per fold: source, held-out classes, classes kept in training because no other source has them)."""
    names = source_names(data.source)
    labels = np.asarray(CLASSES)[data.y]
    sources_of = {c: set(names[labels == c]) for c in CLASSES}
    fold_of = np.full(len(names), -1)
    folds = []
    for source in sorted(set(names)):
        held_classes = sorted(c for c in CLASSES if source in sources_of[c] and len(sources_of[c]) > 1)
        if not held_classes:
            continue
        mask = (names == source) & np.isin(labels, held_classes)
        fold_of[mask] = len(folds)
        folds.append({"fold": len(folds), "source": source, "held_out_classes": held_classes,
                      "images": int(mask.sum()),
                      "kept_in_training": sorted(c for c in CLASSES if source in sources_of[c]
                                                 and c not in held_classes)})
    if not folds:
        raise ValueError("leave-one-source-out needs a class with images from two or more sources; the sources "
                         f"here: { {c: sorted(v) for c, v in sources_of.items()} }")
    groups = group_keys(data.patient_id, data.sha256)
    held = fold_of >= 0
    frames = [pd.DataFrame({"sha256": data.sha256[held], "seed": int(seed), "fold": fold_of[held],
                            "group": groups[held]}) for seed in seeds]
    return pd.concat(frames, ignore_index=True), folds


def train_mask(fold_of: np.ndarray, groups: np.ndarray, fold: int) -> np.ndarray:
    """The rows fold `fold` trains on: every row not held out whose patient (group) has no held-out image (the
    second condition is a no-op for patient-grouped folds, checked there; leaving a source out can split one)."""
    held = np.asarray(fold_of) == fold
    groups = np.asarray(groups, dtype=object)
    return ~held & ~np.isin(groups, groups[held])


def run_metrics(y: np.ndarray, proba: np.ndarray) -> dict[str, float | None]:
    """The numbers reported per (model, seed, fold): headline metrics and per-class sensitivity/specificity."""
    s = summarize(y, proba)
    out = {"n": s["n"], "accuracy": s["accuracy"], "macro_f1": s["macro_f1"],
           "normal_vs_viral": s["normal_vs_viral"]["accuracy"], "ece": ece(proba, y)}
    for c in CLASSES:
        out[f"sensitivity_{c}"] = s["per_class"][c]["sensitivity"]
        out[f"specificity_{c}"] = s["per_class"][c]["specificity"]
    return out


def spread(values: Sequence[float | None]) -> dict[str, float | int | None]:
    """mean, sample standard deviation, min and max of the defined values."""
    v = np.asarray([x for x in values if x is not None and not np.isnan(x)], dtype=np.float64)
    if not len(v):
        return {"mean": None, "sd": None, "min": None, "max": None, "n": 0}
    return {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
            "min": float(v.min()), "max": float(v.max()), "n": int(len(v))}


def aggregate(runs: pd.DataFrame, by: Sequence[str]) -> dict[str, dict]:
    """runs (one row per seed x fold) -> {key: {metric: spread}} over the rows of each key."""
    metrics = [c for c in runs.columns if c not in ("seed", "fold", "model", "region", "n", "train_s")]
    out = {}
    for key, part in runs.groupby(list(by), sort=True):
        name = key if isinstance(key, str) else "/".join(map(str, key if isinstance(key, tuple) else (key,)))
        out[name] = {m: spread(part[m].tolist()) for m in metrics}
        out[name]["runs"] = int(len(part))
    return out


def per_seed(runs: pd.DataFrame, metrics: Sequence[str] = HEADLINE) -> dict[str, dict]:
    """{model: {"seed_means": {metric: {seed: mean over that seed's folds}}, metric: spread of those means}}.
    The spread across seeds is what one training on all the data varies by (issue 21), which the spread over
    folds x seeds (dominated by which ~90 patients a fold holds) is not."""
    out = {}
    for model, part in runs.groupby("model", sort=True):
        means = part.groupby("seed")[list(metrics)].mean()
        out[model] = {"seed_means": {m: {int(k): float(v) for k, v in means[m].items()} for m in metrics},
                      **{m: spread(means[m].tolist()) for m in metrics}, "seeds": int(len(means))}
    return out


def paired(base: Sequence[Mapping], row: Sequence[Mapping], metric: str = "macro_f1") -> dict:
    """Mean and standard error of row - base over the (seed, fold) pairs both have, called helped/hurt only when
    a two-sided paired t-test rejects 'no difference' at 5%."""
    from scipy.stats import t

    b = {(r["seed"], r["fold"]): r[metric] for r in base}
    diffs = np.asarray([r[metric] - b[(r["seed"], r["fold"])] for r in row
                        if (r["seed"], r["fold"]) in b and r[metric] is not None and b[(r["seed"], r["fold"])] is not None])
    if len(diffs) < 2:
        return {"mean": float(diffs.mean()) if len(diffs) else None, "se": None, "n": int(len(diffs)), "call": "n/a"}
    se = float(diffs.std(ddof=1) / np.sqrt(len(diffs)))
    mean = float(diffs.mean())
    bound = float(t.ppf(0.975, len(diffs) - 1)) * se
    call = "helped" if mean > bound else "hurt" if mean < -bound else "no clear difference"
    return {"mean": mean, "se": se, "n": int(len(diffs)), "t_bound": bound, "call": call}


def member_label(name: str, index: int) -> str:
    """How the i-th member of ensemble `name` is reported (the member folders' own names carry their seed,
    which differs from one cross-validation seed to the next)."""
    return f"{name}:member{int(index)}"


def predictions_table(evaluated: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """One row per held-out image and model (full images only): seed, fold, model, sha256, y, p_<CLASS>."""
    parts = []
    for r in evaluated:
        if r["region"] != "full":
            continue
        proba = np.asarray(r["proba"], np.float32)
        parts.append(pd.DataFrame({"seed": r["seed"], "fold": r["fold"], "model": r["model"], "sha256": r["sha256"],
                                   "y": np.asarray(r["y"], np.int64),
                                   **dict(zip(PROBA_COLUMNS, proba.T))}))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def ensemble_of_members(predictions: pd.DataFrame, name: str, k: int) -> pd.DataFrame:
    """Per (seed, fold), the metrics of the mean of the first k members' probabilities: what an ensemble of k
    (train.ensemble: k, members seeded seed..seed+k-1) scores on those folds, without training it again."""
    return metrics_of_mean(first_members(predictions, name, k), f"{name}:first{k}")


def first_members(predictions: pd.DataFrame, name: str, k: int) -> pd.DataFrame:
    """The held-out predictions of an ensemble of the first k members (their mean probabilities per image)."""
    labels = [member_label(name, i) for i in range(int(k))]
    part = predictions[predictions["model"].isin(labels)]
    if part["model"].nunique() < k:
        raise ValueError(f"{name}: fewer than {k} members in the predictions")
    return part.groupby(["seed", "fold", "sha256", "y"], sort=True)[PROBA_COLUMNS].mean().reset_index()


def metrics_of_mean(predictions: pd.DataFrame, model: str) -> pd.DataFrame:
    """Per (seed, fold), the metrics of the mean probabilities of every prediction an image has there (several
    models' held-out predictions on the same folds: an ensemble scored without training it)."""
    mean = predictions.groupby(["seed", "fold", "sha256", "y"], sort=True)[PROBA_COLUMNS].mean().reset_index()
    rows = [{"seed": int(seed), "fold": int(fold), "model": model,
             **run_metrics(g["y"].to_numpy(), g[PROBA_COLUMNS].to_numpy())} for (seed, fold), g in mean.groupby(["seed", "fold"])]
    return pd.DataFrame(rows)


def train_subsample(y: np.ndarray, groups: np.ndarray, fraction: float, seed: int, fold: int) -> np.ndarray:
    """Boolean mask keeping about `fraction` of a training fold's patients (groups) in each class, seeded by
    (seed, fold): the learning curve's smaller training sets (crossval.train_fraction). Whole patients are kept
    or dropped, so the training set shrinks in patients, not only in images."""
    if fraction >= 1.0:
        return np.ones(len(y), dtype=bool)
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"crossval.train_fraction must be in (0, 1], got {fraction}")
    rng = np.random.default_rng([int(seed), int(fold), 2])
    first = pd.DataFrame({"g": groups, "y": y}).drop_duplicates("g")
    keep = []
    for _, part in first.groupby("y", sort=True):
        names = part["g"].to_numpy()
        keep += list(rng.choice(names, size=max(1, int(round(fraction * len(names)))), replace=False))
    return np.isin(groups, np.asarray(keep, dtype=object))


def fold_table(assignment: pd.DataFrame, data) -> list[dict]:
    """Images per class in each fold of the first seed (to see the stratification)."""
    first = assignment[assignment["seed"] == assignment["seed"].min()]
    labels = pd.Series(np.asarray(CLASSES)[data.y], index=data.sha256)
    table = pd.crosstab(first["fold"], labels.loc[first["sha256"]].to_numpy())
    return [{"fold": int(f), **{c: int(table.loc[f].get(c, 0)) for c in CLASSES},
             "groups": int(first.loc[first["fold"] == f, "group"].nunique())} for f in table.index]


def score_evaluations(evaluated: Sequence[Mapping[str, Any]], assignment: pd.DataFrame, n_models: int) -> pd.DataFrame:
    """The executors' per-(seed, fold, model, region) predictions -> one row of metrics each, after checking that
    every image came back exactly once per seed and model (nothing lost or doubled in the join). n_models counts
    what each fold evaluates, ensemble members included when they are evaluated too."""
    rows = []
    for r in evaluated:
        scores = run_metrics if r["region"] == "full" else quick_scores
        rows.append({"seed": r["seed"], "fold": r["fold"], "model": r["model"], "region": r["region"],
                     **scores(r["y"], r["proba"])})
    for seed, part in assignment.groupby("seed"):
        got = [sha for r in evaluated if r["seed"] == seed and r["region"] == "full" for sha in r["sha256"]]
        if len(got) != n_models * len(part) or set(got) != set(part["sha256"]):
            raise RuntimeError(f"seed {seed}: {len(got)} predictions for {len(part)} images x {n_models} models; "
                               "did the data change during cross-validation?")
    return pd.DataFrame(rows)


def run(spark, data_dir: str, out_dir: str, config: Mapping[str, Any], folds: int | None = None,
        seeds: int | None = None, models: Sequence[str] | str | None = None,
        optimizers: Sequence[str] | str | None = None, epochs: int | None = None, probes: bool | None = None,
        overwrite: bool = False, members: bool | None = None, group_by: str | None = None) -> dict:
    """Train every (seed, fold, model), evaluate the held-out folds on the executors (and, with members, each
    ensemble member as a model of its own), write out_dir/crossval.json, crossval.md, folds.csv and
    predictions.csv.gz, and return the result. group_by "source": leave-one-source-out folds
    (source_assignment) instead of k folds grouped by patient; the probes are then off."""
    cv = config.get("crossval") or {}
    tconf = dict(config["train"])
    k = int(folds or cv.get("folds", 5))
    n_seeds = int(seeds or cv.get("seeds", 3))
    epochs = int(epochs or cv.get("epochs") or tconf["epochs"])
    probes = bool(cv.get("probes", True) if probes is None else probes)
    members = bool(cv.get("members", False) if members is None else members)
    fraction = float(cv.get("train_fraction") or 1.0)
    group_by = str(group_by or cv.get("group_by") or "patient")
    if group_by not in GROUP_BY:
        raise ValueError(f"crossval group_by must be one of {', '.join(GROUP_BY)}, got {group_by!r}")
    if group_by == "source":
        probes = False
    todo = plan(_as_list(models) or _as_list(cv.get("models", ["cnn"])),
                _as_list(optimizers) or _as_list(cv.get("optimizers", ["adam"])),
                tconf.get("default_optimizer", "adam"))
    base_seed = int(tconf["seed"])
    seed_values = [base_seed + i for i in range(n_seeds)]
    out = Path(out_dir)
    if (out / RESULT_FILE).exists() and not overwrite:
        raise OutputExistsError(f"{out} already holds a cross-validation ({RESULT_FILE}); pass --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    model_root = out / "models"
    if model_root.exists():
        shutil.rmtree(model_root)

    t0 = time.perf_counter()
    manifest, manifest_sha = read_manifest(data_dir)
    data, meta = load_pool(data_dir, int(tconf.get("loader_batch_rows", 64)), tconf)
    source_folds = None
    if group_by == "source":
        assignment, source_folds = source_assignment(data, seed_values)
        k = len(source_folds)
    elif len(data) < k:
        raise ValueError(f"{data_dir} holds {len(data)} labeled images: too few for {k} folds")
    else:
        assignment = fold_assignment(data, k, seed_values)
    load_s = round(time.perf_counter() - t0, 3)
    log.info("cross-validating %s on %d images (%d groups), %d folds x %d seeds, %d epochs",
             ", ".join(t["name"] for t in todo), len(data), assignment["group"].nunique(), k, n_seeds, epochs)

    empty = data.subset(np.zeros(len(data), dtype=bool))
    fold_models: dict[str, list[str]] = {}
    labels: dict[tuple[int, str], str] = {}      # (seed, member folder name) -> member_label
    train_rows, meta_rows = [], []
    groups_all = group_keys(data.patient_id, data.sha256)
    for seed in seed_values:
        # every pooled image's fold (-1: never held out, leave-one-source-out only) and group, in data's order
        mine = assignment[assignment["seed"] == seed].set_index("sha256")
        fold_of = mine["fold"].reindex(data.sha256).fillna(-1).astype(int).to_numpy()
        group_of = groups_all
        for fold in range(k):
            held = fold_of == fold
            usable = train_mask(fold_of, group_of, fold)
            kept = train_subsample(data.y[usable], group_of[usable], fraction, seed, fold)
            train = data.subset(np.flatnonzero(usable)[kept])
            cw = class_weights(train.y, tconf.get("class_weight", "balanced"), train.source)
            record = {"dir": str(data_dir), "manifest_sha256": manifest_sha,
                      "image_size": list(data.image_size),
                      "crossval": {"seed": seed, "fold": fold, "folds": k, "group_by": group_by,
                                   "train_images": int(len(train)),
                                   "held_out_images": int(held.sum())}, "load_s": load_s}
            key = fold_key(seed, fold)
            fold_models[key] = []
            for spec in todo:
                target = model_root / f"seed{seed}" / f"fold{fold}" / spec["name"]
                result = train_and_save(spec, train, empty, tconf, cw, epochs, seed, target, record, manifest)
                fold_models[key].append(result["dir"])
                if members:
                    for i, d in enumerate(store.ensemble_members(result["dir"])):
                        fold_models[key].append(str(d))
                        labels[(seed, d.name)] = member_label(spec["name"], i)
                train_rows.append({"seed": seed, "fold": fold, "model": spec["name"], "train_s": result["train_s"]})
            if probes:
                scores = metadata_probe(meta[~held], meta[held], seed=seed)
                meta_rows.append({"seed": seed, "fold": fold, "model": "metadata-only", "region": "full",
                                  **{m: scores[m] for m in ("n", "accuracy", "macro_f1", "normal_vs_viral")}})
    train_s = round(time.perf_counter() - t0 - load_s, 3)

    from cxr.spark.crossval import evaluate_folds

    t_eval = time.perf_counter()
    evaluated = evaluate_folds(spark, data_dir, assignment[["sha256", "seed", "fold"]], fold_models, config,
                               regions=("full", *REGIONS) if probes else ("full",))
    eval_s = round(time.perf_counter() - t_eval, 3)
    for r in evaluated:
        r["model"] = labels.get((r["seed"], r["model"]), r["model"])
    runs = score_evaluations(evaluated, assignment, len(fold_models[fold_key(seed_values[0], 0)]))
    timing = pd.DataFrame(train_rows)
    full = runs[runs["region"] == "full"].merge(timing, on=["seed", "fold", "model"], how="left")
    result = {
        "data": {"dir": str(data_dir), "manifest_sha256": manifest_sha, "images": int(len(data)),
                 "groups": int(assignment.loc[assignment["seed"] == seed_values[0], "group"].nunique()),
                 "images_without_patient_id": int(sum(p is None for p in data.patient_id)),
                 "classes": data.class_counts(), "image_size": list(data.image_size)},
        "preprocess": manifest.get("params", {}),
        "folds": k, "seeds": seed_values, "epochs": epochs, "models": [t["name"] for t in todo],
        "group_by": group_by, "source_folds": source_folds,
        "train": {key: tconf.get(key) for key in ("batch_size", "class_weight", "augment", "site_augment",
                                                  "framing", "source_adversary", "optimizer_config", "ensemble")},
        "members_evaluated": members, "train_fraction": fraction,
        "fold_sizes": fold_table(assignment, data),
        "grouping_checked": True,
        "summary": aggregate(full.drop(columns=["train_s"]), ["model"]),
        "per_seed": per_seed(full),
        "probes": {},
        "runs": [{k2: (None if isinstance(v, float) and np.isnan(v) else v) for k2, v in r.items()}
                 for r in full.to_dict("records")],
        "timings_s": {"load": load_s, "train": train_s, "evaluate": eval_s,
                      "total": round(time.perf_counter() - t0, 3),
                      "train_per_fit": spread(timing["train_s"].tolist())},
        "versions": package_versions(),
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if probes:
        masked = runs[runs["region"] != "full"][["seed", "fold", "model", "region", "accuracy", "macro_f1",
                                                 "normal_vs_viral"]]
        both = pd.concat([masked, pd.DataFrame(meta_rows)[masked.columns]], ignore_index=True)
        result["probes"] = aggregate(both, ["model", "region"])
        result["warnings"] = {}
        for t in todo:
            name = t["name"]
            cnn = {"full": _means(result["summary"][name]),
                   **{r: _means(result["probes"][f"{name}/{r}"]) for r in REGIONS}}
            result["warnings"][name] = verdict(cnn, _means(result["probes"]["metadata-only/full"]))
    if not cv.get("keep_models", False):
        shutil.rmtree(model_root, ignore_errors=True)
        result["models_kept"] = False
    else:
        result["models_kept"] = str(model_root)
    predictions = predictions_table(evaluated)
    source_of = pd.Series(source_names(data.source), index=data.sha256)
    result["by_source"] = by_source.across_runs(predictions, source_of, PROBA_COLUMNS).to_dict("records")
    result["confound"] = confound.probe(meta.assign(source=source_of.reindex(meta["sha256"]).to_numpy()),
                                        seed=base_seed)
    assignment.merge(pd.DataFrame({"sha256": data.sha256, "label": np.asarray(CLASSES)[data.y],
                                   "source": source_of.to_numpy()}), on="sha256") \
        .to_csv(out / FOLDS_FILE, index=False)
    predictions.to_csv(out / PREDICTIONS_FILE, index=False)
    (out / RESULT_FILE).write_text(json.dumps(result, indent=1, default=_json_default))
    (out / REPORT_FILE).write_text(format_report(result))
    return result


def _means(agg: Mapping[str, Any]) -> dict[str, float | None]:
    return {m: v["mean"] for m, v in agg.items() if isinstance(v, dict)}


def _json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _fmt(s: Mapping[str, Any] | None, digits: int = 3) -> str:
    if not s or s.get("mean") is None:
        return "n/a"
    return f"{s['mean']:.{digits}f} ± {s['sd']:.{digits}f}"


def across_seeds_section(result: Mapping[str, Any]) -> list[str]:
    """crossval.md's lines on the spread across seeds of each seed's CV mean (what one training run varies by)."""
    seeds = result.get("per_seed") or {}
    if len(result["seeds"]) < 2 or not seeds:
        return []
    lines = ["", "## Across seeds", "",
             f"Each seed's mean over its {result['folds']} folds is one estimate of what a training on all the data "
             "scores on new patients; their mean ± sd over the seeds is what one such training is predicted to "
             "score, and by how much it varies.", "",
             "| model | seeds | macro-F1 | NORMAL vs VIRAL acc. | accuracy | ECE | macro-F1 per seed |", "|---|---|---|---|---|---|---|"]
    for name, s in seeds.items():
        per = ", ".join(f"{v:.3f}" for _, v in sorted(s["seed_means"]["macro_f1"].items()))
        lines.append(f"| {name} | {s['seeds']} | {_fmt(s['macro_f1'])} | {_fmt(s['normal_vs_viral'])} | "
                     f"{_fmt(s['accuracy'])} | {_fmt(s['ece'])} | {per} |")
    return lines


def source_sections(result: Mapping[str, Any]) -> list[str]:
    """crossval.md's per-(source, class) recall (and, leaving sources out, what each fold held out) and the
    confound probe."""
    lines: list[str] = []
    rows = pd.DataFrame(result.get("by_source") or [])
    if result.get("group_by") == "source":
        lines += ["", "## Leave one source out", "",
                  "Each fold trains without one source's images of every class that another source also has, then "
                  "calls exactly those images: how the model does on a collection it never saw, for a class it "
                  "learnt elsewhere. Classes only that source has stay in training (they cannot be learnt from "
                  "anywhere else).", "",
                  "| fold | held-out source | held-out classes (images) | kept in training |", "|---|---|---|---|"]
        for f in result.get("source_folds") or []:
            lines.append(f"| {f['fold']} | {f['source']} | {', '.join(f['held_out_classes'])} ({f['images']}) | "
                         f"{', '.join(f['kept_in_training']) or '-'} |")
    if len(rows):
        lines += ["", "## Per source and class" + (" (held-out sources)" if result.get("group_by") == "source"
                                                   else ""), "",
                  "Recall of each (source, class) cell: each seed's held-out predictions pooled over its folds, "
                  "then mean ± sd over the seeds. A pooled score can be high while one collection's films of a "
                  "class are missed; a recall under 0.9 is in bold."]
        for model in sorted(rows["model"].unique()):
            lines += ["", f"**{model}**", "", by_source.across_runs_table(rows, model)]
    if result.get("confound"):
        lines += ["", confound.section(result["confound"], "## Confound probe").rstrip("\n")]
    return lines


def format_report(result: Mapping[str, Any]) -> str:
    """crossval.md: the per-model table (mean ± sd over folds x seeds), the probes, the folds, the caveats."""
    d = result["data"]
    p = result.get("preprocess") or {}
    runs_per = len(result["seeds"]) * result["folds"]
    lines = [
        "# Grouped cross-validation",
        "",
        f"- data: `{d['dir']}`: {d['images']} labeled images ({', '.join(f'{c} {n}' for c, n in d['classes'].items())}), "
        f"{d['groups']} groups (patients, or single images without a patient id: {d['images_without_patient_id']}), "
        f"{d['image_size'][0]}x{d['image_size'][1]} px; the preprocess job's train/val/test splits are pooled",
        f"- preprocessing: method {p.get('method')}, clip {p.get('clip_limit')}, tiles {p.get('tile_grid')}, "
        f"brightness alpha {p.get('brightness_alpha')} beta {p.get('brightness_beta')}, resize {p.get('resize_mode')}, "
        f"decode reduction {p.get('decode_reduction', 'off')}; ensemble {result.get('train', {}).get('ensemble') or 1}",
        (f"- {result['folds']} folds grouped by patient and stratified by class x seeds {result['seeds']} "
         if result.get("group_by", "patient") == "patient" else
         f"- leave one source out: {result['folds']} folds (one per held-out source) x seeds {result['seeds']} ")
        + f"= {runs_per} held-out evaluations per model; {result['epochs']} epochs; no patient is in a fold's "
        "training and test part (checked)",
        f"- time: {result['timings_s']['total']:.0f} s (training {result['timings_s']['train']:.0f} s on the driver, "
        f"evaluation {result['timings_s']['evaluate']:.0f} s on the executors)",
    ]
    by_source_only = result.get("group_by") == "source"   # a held-out fold is one class: pooled metrics mean nothing
    if not by_source_only:
        lines += [
            "", "Values are mean ± sample standard deviation over folds x seeds.", "",
            "| model | accuracy | macro-F1 | NORMAL vs VIRAL acc. | ECE | "
            + " | ".join(f"sens. {c}" for c in CLASSES) + " | " + " | ".join(f"spec. {c}" for c in CLASSES) + " |",
            "|---|" + "---|" * (4 + 2 * len(CLASSES))]
    for name, s in ({} if by_source_only else result["summary"]).items():
        cells = [_fmt(s.get(m)) for m in HEADLINE]
        cells += [_fmt(s.get(f"sensitivity_{c}")) for c in CLASSES]
        cells += [_fmt(s.get(f"specificity_{c}")) for c in CLASSES]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if result.get("probes"):
        lines += ["", "## Shortcut probes", "",
                  "The metadata-only probe is a random forest on original width, height, aspect ratio, file format "
                  "and colour mode (no pixels), trained and tested on the same folds. `border_only` keeps only the "
                  "outer 15% band of each held-out image (lung field blanked to the band's mean), `lungs_only` "
                  "blanks that band instead; both use the models trained on full images.", "",
                  "| probe | accuracy | macro-F1 | NORMAL vs VIRAL acc. |", "|---|---|---|---|"]
        for name, s in result["probes"].items():
            lines.append(f"| {name} | {_fmt(s.get('accuracy'))} | {_fmt(s.get('macro_f1'))} | "
                         f"{_fmt(s.get('normal_vs_viral'))} |")
        warnings = [w for ws in (result.get("warnings") or {}).values() for w in ws]
        lines += [""] + ([f"- **{w}**" for w in warnings] if warnings else ["- No probe came within 0.05 of a model's accuracy, and no model kept more than half of its gain over "
              "chance on the border band alone. Read the numbers above all the same: any score well above chance "
              "(0.33) without pixels or without lungs is information the data set gives away."])
    lines += source_sections(result)
    lines += [] if by_source_only else across_seeds_section(result)
    lines += ["", "## Folds (first seed)", "", "| fold | " + " | ".join(CLASSES) + " | groups |",
              "|---|" + "---|" * (len(CLASSES) + 1)]
    for f in result["fold_sizes"]:
        lines.append(f"| {f['fold']} | " + " | ".join(str(f[c]) for c in CLASSES) + f" | {f['groups']} |")
    lines += ["", "## What these numbers mean", "",
              "They estimate how the model does on new images from the same sources as this archive. They say "
              "nothing about other hospitals, scanners or populations, and a spread of several points means "
              "differences smaller than that between models are noise. This is research software, not a "
              "diagnostic device.", ""]
    return "\n".join(lines)
