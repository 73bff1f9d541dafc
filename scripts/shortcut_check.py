#!/usr/bin/env python
"""Does a model look at the lungs? Grad-CAM shares on the image border / outside a central lung box, per class.

    python scripts/shortcut_check.py --data PRE_OUT --model MODELS_DIR/NAME [--split test|all|a,b] [--out DIR]

Prints the markdown table (the same section the train report can include: cxr.explain.gradcam.shortcut_section) and
writes DIR/shortcut_<model>.json and DIR/shortcut_<model>.png (mean heatmap per class); DIR defaults to the
model folder. Exit status 0 also when warnings are found (they are findings, not failures); 2 on bad input.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="the preprocess job's output folder")
    parser.add_argument("--model", required=True, help="a Keras CNN or separable CNN folder written by jobs/train.py")
    parser.add_argument("--split", default="test", help="split(s) to check: test (default), a comma list, or all")
    parser.add_argument("--method", default="hirescam", choices=("hirescam", "gradcam"),
                        help="heatmap variant (default hirescam: see cxr/explain/gradcam.py)")
    parser.add_argument("--out", help="folder for the .json and .png (default: the model folder)")
    args = parser.parse_args(argv)

    from cxr.explain.gradcam import shortcut_section

    model = Path(args.model)
    out = Path(args.out) if args.out else model
    try:
        out.mkdir(parents=True, exist_ok=True)
        markdown, result = shortcut_section(model, args.data, args.split, plots_dir=out,
                                            method=args.method)
    except (FileNotFoundError, ValueError) as exc:
        print(f"shortcut_check: error: {exc}", file=sys.stderr)
        return 2
    print(markdown)
    if result is not None:
        path = out / f"shortcut_{model.name}.json"
        path.write_text(json.dumps({"model": str(model), "data": args.data, "split": args.split, **result},
                                   indent=2, sort_keys=True) + "\n")
        print(f"wrote {path} and {out / f'shortcut_{model.name}.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
