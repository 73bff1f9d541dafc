"""The images that many grouped cross-validations of one data set keep getting wrong, and the score a model
would be capped at if those stayed wrong (cxr.evaluate.hard_images). Every model of every CV_DIR counts as
one prediction per image and seed (ensemble members too).

    python scripts/cv_hard_images.py CV_DIR [CV_DIR ...] [--manifest MANIFEST.csv] [--list-above 0.5]

--manifest names the images: a CSV with sha256 and relative_path columns (../shared/data/cxr/MANIFEST.csv).
Prints markdown: a list for label review, and the ceilings.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pandas as pd  # noqa: E402

from cxr import CLASSES  # noqa: E402
from cxr.common.markdown import table  # noqa: E402
from cxr.evaluate.crossval import PREDICTIONS_FILE  # noqa: E402
from cxr.evaluate.hard_images import ceiling, error_rates  # noqa: E402

THRESHOLDS = (0.5, 0.75, 0.9)


def report(rates: pd.DataFrame, names: dict[str, str], list_above: float, runs: int) -> str:
    lines = [f"{len(rates)} images, {runs} cross-validations, {int(rates['n'].median())} held-out predictions per "
             "image (median).", ""]
    lines += table(["wrong in more than", "images", *CLASSES, "ceiling: macro-F1", "NORMAL vs VIRAL"],
                   [[f"{t:.0%} of models", c["images"],
                     *(int(((rates["error_rate"] > t) & (rates["y"] == i)).sum()) for i in range(len(CLASSES))),
                     f"{c['macro_f1']:.3f}", f"{c['normal_vs_viral']:.3f}"]
                    for t in THRESHOLDS for c in [ceiling(rates, t)]])
    hard = rates[rates["error_rate"] > list_above].sort_values(["y", "error_rate"], ascending=[True, False])
    lines += ["", f"Images wrong in more than {list_above:.0%} of the predictions:", ""]
    lines += table(["image", "label", "wrong", "most often called", "predictions"],
                   [[names.get(r.sha256, r.sha256[:16]), CLASSES[r.y], f"{r.error_rate:.0%}",
                     CLASSES[r.most_predicted], r.n] for r in hard.itertuples()])
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cv_dirs", nargs="+", type=Path)
    parser.add_argument("--manifest", type=Path, help="CSV with sha256 and relative_path, to name the images")
    parser.add_argument("--list-above", type=float, default=0.5, help="list images wrong more often than this")
    args = parser.parse_args(argv)
    predictions = pd.concat([pd.read_csv(d / PREDICTIONS_FILE) for d in args.cv_dirs], ignore_index=True)
    names = {}
    if args.manifest:
        m = pd.read_csv(args.manifest, usecols=["sha256", "relative_path"])
        names = dict(zip(m["sha256"], m["relative_path"]))
    print(report(error_rates(predictions), names, args.list_above, len(args.cv_dirs)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
