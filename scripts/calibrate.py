#!/usr/bin/env python
"""Fit a temperature on the val split and record it in the model's metrics.json (`calibration`).

    python scripts/calibrate.py --data PRE_OUT --model MODELS_DIR/NAME [--split val] [--dry-run] [--force] [--plot PNG]

Scoring then reports softmax(log p / T) (cxr.evaluate.calibration.apply_temperature); the calls do not change.
A fit on fewer than 50 val images, or at a bound of T, is recorded with applied=false (scoring ignores it)
unless --force.
Prints T, NLL and ECE before/after; --plot writes a reliability diagram of the fitted split.
Works for Keras and cxr.nn models. Exit status 2 on bad input.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="the preprocess job's output folder")
    parser.add_argument("--model", required=True, help="a model folder written by jobs/train.py")
    parser.add_argument("--split", default="val", help="split to fit on (default val; never the test split)")
    parser.add_argument("--dry-run", action="store_true", help="fit and print, do not write metrics.json")
    parser.add_argument("--force", action="store_true",
                        help="let scoring apply T even if the fit rests on few images or hit a bound")
    parser.add_argument("--plot", help="write a reliability diagram (before/after) of the fitted split here")
    args = parser.parse_args(argv)

    from cxr.evaluate.calibration import calibrate_model, plot_reliability

    if args.split == "test":
        print("calibrate: error: fitting on the test split would leak it into the reported numbers; use val",
              file=sys.stderr)
        return 2
    try:
        rec = calibrate_model(args.model, args.data, split=args.split, write=not args.dry_run,
                              force=args.force)
        if args.plot:
            from cxr.data.loader import load_split
            from cxr.models.store import load_predictor

            data = load_split(args.data, args.split)
            proba = load_predictor(args.model).predict_proba(data.x)
            plot_reliability(proba, data.y, rec["temperature"], args.plot, f"{Path(args.model).name} on {args.split}")
    except (FileNotFoundError, ValueError) as exc:
        print(f"calibrate: error: {exc}", file=sys.stderr)
        return 2
    print(f"{Path(args.model).name}: T = {rec['temperature']:.4f} on {rec['n_val']} {args.split} images; "
          f"NLL {rec['nll_before']:.4f} -> {rec['nll_after']:.4f}; "
          f"ECE {rec['ece_before']:.4f} -> {rec['ece_after']:.4f}"
          + ("" if args.dry_run else f"; recorded in {Path(args.model) / 'metrics.json'}")
          + ("" if rec["applied"] else " (not applied by scoring)"))
    for w in rec["warnings"]:
        print(f"warning: {w}")
    if args.plot:
        print(f"reliability diagram: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
