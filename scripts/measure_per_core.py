#!/usr/bin/env python
"""Single-core throughput of the per-image work, the number docs/scaling.md multiplies out.

    python scripts/measure_per_core.py [--images 40] [--side 1024] [--size 224] [--keras] [--onnx]

One process, one OpenCV / BLAS / TensorFlow thread: what one Spark executor core does, without Spark's
overhead (measured separately on the cluster). Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(var, "1")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--side", type=int, default=1024, help="source image side (real CXRs: 1024-3000 px)")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--keras", action="store_true", help="also time the Keras CNN's inference")
    parser.add_argument("--onnx", action="store_true",
                        help="also time that CNN exported to model.onnx in ONNX Runtime (one intra-op thread)")
    args = parser.parse_args()

    import cv2
    import numpy as np

    from cxr.common.bench import Timer, throughput
    from cxr.config import load_config
    from cxr.image.pipeline import PreprocessParams, preprocess_bytes
    from cxr.datasets.synth import render_chest

    cv2.setNumThreads(1)
    params = PreprocessParams.from_config(load_config(overrides={"preprocess.size": args.size})["preprocess"])
    pictures = [(render_chest(["COVID", "NORMAL", "VIRAL"][i % 3], args.side, i) * 255).astype(np.uint8)
                for i in range(args.images)]
    files = {"png8": [cv2.imencode(".png", p)[1].tobytes() for p in pictures],
             "jpeg": [cv2.imencode(".jpg", p, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes() for p in pictures]}
    result = {"cpus": os.cpu_count(), "images": args.images, "side": args.side, "size": args.size, "load_avg_1m": os.getloadavg()[0],
              "mean_file_kb": {k: round(sum(map(len, v)) / len(v) / 1024, 1) for k, v in files.items()}}
    for kind, blobs in files.items():
        preprocess_bytes(blobs[0], params)  # warm-up
        per_s, per_cpu_s = throughput(lambda: [preprocess_bytes(blob, params) for blob in blobs], len(blobs))
        result[f"preprocess_{kind}_images_per_s"], result[f"preprocess_{kind}_images_per_cpu_s"] = \
            round(per_s, 2), round(per_cpu_s, 2)

    from cxr.models import store
    from cxr.nn import models

    batch = np.random.default_rng(0).random((32, args.size, args.size, 1), dtype=np.float32)
    net = models.dnn((args.size, args.size, 1), 3, hidden=128, seed=0)
    net.predict_proba(batch)
    rates = throughput(lambda: [net.predict_proba(batch) for _ in range(4)], 4 * len(batch))
    result["scratch_dnn_images_per_s"], result["scratch_dnn_images_per_cpu_s"] = (round(r, 1) for r in rates)

    if args.keras or args.onnx:
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(1)
        tf.config.threading.set_inter_op_parallelism_threads(1)
        from cxr.models.keras_models import build

        conf = load_config()["train"]["keras"]["cnn"]
        model = build("cnn", (args.size, args.size, 1), conf)
    if args.keras:
        model.predict(batch, verbose=0)
        rates = throughput(lambda: [model.predict(batch, verbose=0) for _ in range(3)], 3 * len(batch))
        result["keras_cnn_images_per_s"], result["keras_cnn_images_per_cpu_s"] = (round(r, 1) for r in rates)
    if args.onnx:
        import tempfile

        from cxr.models.onnx_export import export_onnx, measure_throughput

        with tempfile.TemporaryDirectory() as tmp:
            d = store.save_keras(model, tmp, {"name": "cnn", "input": {"data_size": [args.size, args.size]}})
            with Timer() as export:
                export_onnx(d, batch)
            result["onnx_export_s"] = round(export.seconds, 2)
            ort = measure_throughput(store.load_predictor(d, batch_size=len(batch), engine="onnx"), batch, 5.0)
        result["onnx_cnn_images_per_s"] = ort["images_per_s"]
        result["onnx_cnn_images_per_cpu_s"] = ort["images_per_core_s"]
    del store
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
