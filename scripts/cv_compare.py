"""Rows of grouped cross-validations compared on the same folds: spread over folds x seeds, spread across seeds of
each seed's CV mean (what one training run varies by), paired differences against the first row, per (source,
class) recall with its paired differences (runs whose folds.csv has a source), and the held-out confusion matrix.

    python scripts/cv_compare.py LABEL=CV_DIR[+CV_DIR...][:MODEL][&CV_DIR...[:MODEL]] ... [--errors LABEL]
        [--json OUT.json]

MODEL defaults to the run's first model; `cnn-adam:member0` is one member of an ensemble run with
crossval.members, `cnn-adam:first3` the mean of its first 3 members (an ensemble of 3 on the same folds,
recomputed from predictions.csv.gz). Several CV_DIRs joined by + are one row: cross-validations of other seeds
(train.seed 45 --seeds 2 adds seeds 45 and 46 to a --seeds 3 run from 42; a seed's folds depend on the seed
only). Rows are compared on the (seed, fold) pairs they share, which must hold the same images (checked from
folds.csv). Runs joined by & are one mixed row: the mean of their probabilities per image (models of different
settings combined on the same folds, scored without training; only the images and seeds all of them have).
Prints markdown.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from cxr import CLASSES  # noqa: E402
from cxr.evaluate.crossval import (FOLDS_FILE, HEADLINE, PREDICTIONS_FILE, PROBA_COLUMNS, RESULT_FILE,  # noqa: E402
                                   aggregate, first_members, metrics_of_mean, paired, per_seed)

METRICS = ("macro_f1", "normal_vs_viral", "accuracy", "ece")


def parse_row(spec: str) -> tuple[str, list[tuple[list[Path], str | None]]]:
    """LABEL=RUN[&RUN...] -> (label, [(dirs, model) per RUN])."""
    label, _, rest = spec.partition("=")
    runs = []
    for run in rest.split("&"):
        paths, _, model = run.partition(":")
        runs.append(([Path(p) for p in paths.split("+")], model or None))
    return label, runs


def read_many(dirs: list[Path], name: str) -> pd.DataFrame:
    return pd.concat([pd.read_csv(d / name) for d in dirs], ignore_index=True)


def first_model(dirs: list[Path]) -> str:
    return json.loads((dirs[0] / RESULT_FILE).read_text())["models"][0]


def held_out(dirs: list[Path], model: str | None) -> pd.DataFrame:
    """The held-out predictions of `model` (`name:firstK`: its first K members' mean) in the runs of dirs."""
    pred = read_many(dirs, PREDICTIONS_FILE)
    model = model or first_model(dirs)
    if ":first" in model:
        name, k = model.split(":first")
        return first_members(pred, name, int(k))
    if model not in set(pred["model"]):
        raise SystemExit(f"{dirs}: no model {model!r}; it has {sorted(set(pred['model']))}")
    return pred[pred["model"] == model]


def shared_predictions(runs: list[tuple[list[Path], str | None]]) -> pd.DataFrame:
    """The held-out predictions of a row's runs, kept for the (seed, image) pairs every run has."""
    both = pd.concat([held_out(d, m).assign(run=i) for i, (d, m) in enumerate(runs)], ignore_index=True)
    return both[both.groupby(["seed", "sha256"])["run"].transform("nunique") == len(runs)]


def load_runs(runs: list[tuple[list[Path], str | None]]) -> tuple[pd.DataFrame, str]:
    """One row of metrics per (seed, fold) for a row: one run's model as the run scored it, or the mean
    probabilities of several runs' models (or of an ensemble run's first members), recomputed."""
    name = " & ".join(m or first_model(d) for d, m in runs)
    if len(runs) > 1 or ":first" in name:
        return metrics_of_mean(shared_predictions(runs), name), name
    dirs = runs[0][0]
    table = pd.concat([pd.DataFrame(json.loads((d / RESULT_FILE).read_text())["runs"]) for d in dirs],
                      ignore_index=True)
    if name not in set(table["model"]):
        raise SystemExit(f"{dirs}: no model {name!r}; it has {sorted(set(table['model']))}")
    return table[table["model"] == name].reset_index(drop=True), name


def check_same_folds(rows: list[list[Path]]) -> None:
    """Refuse rows that share a seed but did not hold out the same images in its folds."""
    first = read_many(rows[0], FOLDS_FILE).set_index(["seed", "sha256"])["fold"]
    for dirs in rows[1:]:
        other = read_many(dirs, FOLDS_FILE).set_index(["seed", "sha256"])["fold"]
        common = first.index.intersection(other.index)
        if not len(common) or not first.loc[common].equals(other.loc[common]):
            raise SystemExit(f"{dirs} does not share the first row's folds: rows are not paired")


def confusion(runs: list[tuple[list[Path], str | None]]) -> np.ndarray:
    """Held-out confusion matrix (rows true, columns predicted) per complete cross-validation (summed over the
    folds, averaged over the seeds)."""
    part = shared_predictions(runs).groupby(["seed", "sha256", "y"])[PROBA_COLUMNS].mean().reset_index()
    m = np.zeros((len(CLASSES), len(CLASSES)))
    np.add.at(m, (part["y"].to_numpy(), part[PROBA_COLUMNS].to_numpy().argmax(1)), 1)
    return m / part["seed"].nunique()


def fmt(s) -> str:
    return "n/a" if not s or s.get("mean") is None else f"{s['mean']:.3f} ± {s['sd']:.3f}"


def fmt_paired(p: dict) -> str:
    return "—" if p is None else ("n/a" if p.get("se") is None else f"{p['mean']:+.3f} ± {p['se']:.3f} ({p['call']})")


def compare(rows: list[tuple[str, pd.DataFrame]]) -> list[dict]:
    out = []
    base = rows[0][1].to_dict("records")
    for i, (label, runs) in enumerate(rows):
        recs = runs.to_dict("records")
        out.append({"row": label, "n": f"{runs['seed'].nunique()} x {runs['fold'].nunique()}",
                    "folds_x_seeds": aggregate(runs.assign(model=label)[["model", "seed", "fold", *HEADLINE]],
                                               ["model"])[label],
                    "across_seeds": per_seed(runs.assign(model=label))[label],
                    "paired": None if i == 0 else {m: paired(base, recs, m) for m in ("macro_f1", "normal_vs_viral")}})
    return out


def table(results: list[dict]) -> str:
    lines = ["| row | seeds x folds | macro-F1 (folds x seeds) | NORMAL vs VIRAL | ECE | macro-F1 across seeds "
             "| NvV across seeds | macro-F1 per seed | vs first row: macro-F1 | NvV |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        f, s, p = r["folds_x_seeds"], r["across_seeds"], r["paired"] or {}
        per = ", ".join(f"{v:.3f}" for _, v in sorted(s["seed_means"]["macro_f1"].items()))
        lines.append(f"| {r['row']} | {r['n']} | {fmt(f['macro_f1'])} | {fmt(f['normal_vs_viral'])} | {fmt(f['ece'])} "
                     f"| {fmt(s['macro_f1'])} | {fmt(s['normal_vs_viral'])} | {per} | "
                     f"{fmt_paired(p.get('macro_f1'))} | {fmt_paired(p.get('normal_vs_viral'))} |")
    return "\n".join(lines)


def errors_table(label: str, m: np.ndarray) -> str:
    lines = [f"Held-out confusion of {label} (rows: true class, columns: predicted; images per complete CV, "
             "mean over seeds):", "", "| true \\ predicted | " + " | ".join(CLASSES) + " | sensitivity |",
             "|---|" + "---|" * (len(CLASSES) + 1)]
    for i, c in enumerate(CLASSES):
        lines.append(f"| {c} | " + " | ".join(f"{v:.1f}" for v in m[i]) + f" | {m[i, i] / m[i].sum():.3f} |")
    return "\n".join(lines)


def source_recalls(runs: list[tuple[list[Path], str | None]]) -> pd.DataFrame | None:
    """Recall of each (source, class) cell per seed (its held-out images over all folds of the seed); None when
    the run's folds.csv has no source column (older runs)."""
    folds = read_many(runs[0][0], FOLDS_FILE)
    if "source" not in folds:
        return None
    pred = shared_predictions(runs).groupby(["seed", "sha256", "y"])[PROBA_COLUMNS].mean().reset_index()
    part = pred.merge(folds[["seed", "sha256", "source"]].drop_duplicates(), on=["seed", "sha256"])
    part["hit"] = part[PROBA_COLUMNS].to_numpy().argmax(1) == part["y"]
    part["class"] = [CLASSES[i] for i in part["y"]]
    return part.groupby(["source", "class", "seed"])["hit"].mean().unstack("seed")


def source_table(specs: list[tuple[str, list]]) -> str | None:
    """Per (source, class): each row's recall (mean ± sd over seeds) and each later row's paired difference
    against the first (mean, then per seed): a lever can move one collection's cell and not the pooled score."""
    recalls = [(label, source_recalls(runs)) for label, runs in specs]
    if any(r is None for _, r in recalls):
        return None
    (base_label, base), rest = recalls[0], recalls[1:]
    lines = ["| source | class | " + " | ".join(f"{label} recall" for label, _ in recalls) + " | "
             + " | ".join(f"{label} - {base_label} (mean; per seed)" for label, _ in rest) + " |",
             "|---|---|" + "---|" * (len(recalls) + len(rest))]
    for cell in base.index:
        cells = [f"{r.loc[cell].mean():.3f} ± {r.loc[cell].std(ddof=1):.3f}" if cell in r.index else "n/a"
                 for _, r in recalls]
        for _, r in rest:
            d = (r.loc[cell] - base.loc[cell]).dropna() if cell in r.index else pd.Series(dtype=float)
            cells.append(f"{d.mean():+.3f}; " + ", ".join(f"{v:+.3f}" for v in d) if len(d) else "n/a")
        lines.append(f"| {cell[0]} | {cell[1]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("rows", nargs="+", help="LABEL=CV_DIR[:MODEL][&...]; the first row is the paired baseline")
    parser.add_argument("--errors", action="append", default=[], help="LABEL of a row to print the confusion of")
    parser.add_argument("--json", help="also write the comparison here")
    args = parser.parse_args(argv)
    specs = [parse_row(r) for r in args.rows]
    check_same_folds([d for _, runs in specs for d, _ in runs])
    loaded = [(label, *load_runs(runs)) for label, runs in specs]
    results = compare([(label, runs) for label, runs, _ in loaded])
    print(table(results))
    by_source = source_table(specs)
    if by_source:
        print("\nPer source and class, paired by seed (recall of the held-out images of each cell):\n")
        print(by_source)
    for label in args.errors:
        print("\n" + errors_table(label, confusion(dict(specs)[label])))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
