#!/usr/bin/env python
"""The framing probe (cxr.evaluate.framing): recall per (source, class) of raw films cut to other shapes, beside
the films as filed, for each model.

    python scripts/framing_probe.py --data PRE_OUT [--split val,test] NAME=MODEL_DIR [NAME=MODEL_DIR ...]
    python scripts/framing_probe.py --data PRE_OUT --crossval NAME=CV_DIR [NAME=CV_DIR ...]

PRE_OUT is the preprocess job's output the models were trained on (its images table names each film's raw file,
source, class and split). With --crossval each CV_DIR is a jobs/crossval.py run kept with --keep-models: every
film is called by the fold model that held it out, and recall is the mean (± sd) over its seeds. Models run in
ONNX Runtime on their own preprocessing. Prints the markdown table; --json writes the rows. --probe frames puts
a black or white frame around each film instead, --probe resolution shrinks it to the NIH files' 224 px, --probe markers burns in side and position text.
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
    parser.add_argument("--split", default="val,test", help="comma list of splits (default: val,test)")
    parser.add_argument("--crossval", action="store_true", help="the folders are jobs/crossval.py runs")
    parser.add_argument("--probe", default="framing", choices=["framing", "frames", "resolution", "markers"],
                        help="what to change in each film: its shape (default), a black or white frame around it, "
                             "its resolution, burnt-in markers (cxr.evaluate.framing.PROBES)")
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("models", nargs="+", help="NAME=MODEL_DIR (NAME=CV_DIR with --crossval)")
    args = parser.parse_args(argv)

    import pyarrow.dataset as ds

    from cxr.evaluate import framing
    from cxr.image.pipeline import PreprocessParams, decode_with, equalization_input
    from cxr.image.source import read_bytes
    from cxr.models import store
    from cxr.score.frames import predict_fixed_batches

    table = ds.dataset(f"{args.data}/images", format="parquet", partitioning="hive").to_table(
        columns=["path", "sha256", "label", "source", "split"]).to_pandas()
    table["source"] = table["source"].fillna("unknown")

    def predictor_of(model_dir):
        predictor = store.load_predictor(model_dir, batch_size=32, engine="onnx")
        return lambda x: predict_fixed_batches(predictor, x, 32)[0]

    def pixels(paths, params):
        return [equalization_input(decode_with(read_bytes(p), params)) for p in paths]

    results, variants = {}, framing.PROBES[args.probe]
    for spec in args.models:
        name, _, folder = spec.partition("=")
        if args.crossval:
            path_of = dict(zip(table["sha256"], table["path"]))
            results[name] = framing.crossval_probe(
                folder, lambda shas, params: pixels([path_of[s] for s in shas], params), predictor_of, variants)
            continue
        rows = table[table["split"].isin(args.split.split(","))].sort_values("path")
        if rows.empty:
            print(f"framing_probe: no {args.split} rows in {args.data}", file=sys.stderr)
            return 2
        params = PreprocessParams.from_dict(store.read_metadata(folder)["preprocess"])
        results[name] = framing.probe(predictor_of(folder), pixels(rows["path"], params), rows["label"],
                                      rows["source"], params, variants)
    print(framing.markdown(results))
    if args.json:
        Path(args.json).write_text(json.dumps({n: t.to_dict("records") for n, t in results.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
