"""What test-time augmentation would add, measured on the models a grouped cross-validation kept
(`jobs/crossval.py --keep-models`): each (seed, fold) model scores its own held-out images once as they are and
once as the mean of its probabilities over a fixed set of shifted copies (edge-padded, so no black border
appears); the two are compared fold by fold (paired, as scripts/cv_compare.py does). Nothing is trained again.

    python scripts/cv_tta.py CV_DIR DATA_DIR [--model cnn-adam] [--shifts 2 4]

DATA_DIR is the preprocess output the cross-validation read (all splits pooled, as crossval does).
Prints markdown.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from cxr.common.markdown import num, table  # noqa: E402
from cxr.data.loader import load_split  # noqa: E402
from cxr.evaluate.crossval import FOLDS_FILE, paired, run_metrics  # noqa: E402
from cxr.models.store import load_predictor  # noqa: E402


METRICS = ("macro_f1", "normal_vs_viral")


def shifted(x: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """x (N, H, W, 1) moved by (dy, dx) pixels, the uncovered edge filled with the nearest row/column."""
    p = max(abs(dy), abs(dx))
    if p == 0:
        return x
    h, w = x.shape[1:3]
    padded = np.pad(x, ((0, 0), (p, p), (p, p), (0, 0)), mode="edge")
    return padded[:, p - dy:p - dy + h, p - dx:p - dx + w]


def plus_shifts(step: int) -> list[tuple[int, int]]:
    """The image and its four moves by `step` pixels (up, down, left, right)."""
    return [(0, 0), (step, 0), (-step, 0), (0, step), (0, -step)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cv_dir", type=Path)
    ap.add_argument("data_dir")
    ap.add_argument("--model", default="cnn-adam")
    ap.add_argument("--shifts", type=int, nargs="+", default=[2, 4], help="shift steps in pixels, one row each")
    args = ap.parse_args(argv)

    data = load_split(args.data_dir, ["train", "val", "test"])
    row_of = {s: i for i, s in enumerate(data.sha256)}
    folds = pd.read_csv(args.cv_dir / FOLDS_FILE)
    results: dict[str, list[dict]] = {"plain": []}
    for (seed, fold), part in folds.groupby(["seed", "fold"], sort=True):
        model_dir = args.cv_dir / "models" / f"seed{seed}" / f"fold{fold}" / args.model
        if not model_dir.is_dir():
            raise SystemExit(f"{model_dir}: missing (run the cross-validation with --keep-models)")
        predictor = load_predictor(model_dir, engine="keras", batch_size=128)
        rows = np.asarray([row_of[s] for s in part["sha256"]])
        x, y = data.x[rows], data.y[rows]
        key = {"seed": int(seed), "fold": int(fold)}
        results["plain"].append({**key, **run_metrics(y, predictor.predict_proba(x))})
        for step in args.shifts:
            proba = np.mean([predictor.predict_proba(shifted(x, dy, dx)) for dy, dx in plus_shifts(step)], axis=0)
            results.setdefault(f"mean over 5 shifts of {step} px", []).append({**key, **run_metrics(y, proba)})

    lines = []
    for label, runs in results.items():
        frame = pd.DataFrame(runs)
        cells = [label, f"{frame['seed'].nunique()} x {frame['fold'].nunique()}",
                 *(f"{num(frame[m].mean(), 3)} ± {num(frame[m].std(ddof=1), 3)}" for m in METRICS)]
        for metric in METRICS:
            if label == "plain":
                cells.append("—")
                continue
            d = paired(results["plain"], runs, metric)
            cells.append(f"{d['mean']:+.3f} ± {d['se']:.3f} ({d['call']})")
        lines.append(cells)
    header = ["scored as", "seeds x folds", "macro-F1", "NORMAL vs VIRAL", "vs plain: macro-F1", "NvV"]
    print("\n".join(table(header, lines)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
