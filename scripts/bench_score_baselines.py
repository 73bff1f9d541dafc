#!/usr/bin/env python
"""What scripts/bench_score.py measures the score job against: the per-file function and the model the Spark
workers run, in ONE Python process on one core (part a), the predictors alone (part c), each in a fresh process
(`--child JSON`), and Spark's own predict_batch_udf (part e), in the bench's Spark session."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cxr.common.bench import CACHE, Timer, answer_child, input_files, interleaved, job_config, random_cnn  # noqa: E402

MASTER, ENGINE, BATCH = "local[2]", "onnx", 32   # the Spark side's master; every side's engine and batch


def single_process(mode: str, input_dir: str, model: str, size: int) -> dict:
    """ONE Python process (one core): the per-file function and the model the Spark workers run, same files.

    raw: read bytes -> cxr.image.batch.process_file -> predict_fixed_batches (ONNX, 1 thread), in chunks of
    score.files_per_task files as a Spark task does; pre: the images table read with pyarrow -> predict."""
    import numpy as np
    import pyarrow.parquet as pq

    from cxr.common.labels import alias_table
    from cxr.image.batch import process_file
    from cxr.image.pipeline import PreprocessParams
    from cxr.models import store
    from cxr.score.frames import predict_fixed_batches

    config = job_config({"preprocess.size": size})
    pre = config["preprocess"]
    chunk = int(config["score"].get("files_per_task", 64))
    predictor = store.cached_predictor(model, batch_size=BATCH, tf_threads=1, engine=ENGINE, onnx_threads=1)
    params = PreprocessParams.from_dict(store.read_metadata(model)["preprocess"])
    aliases = alias_table(pre["labels"])

    def predict(images):
        return len(predict_fixed_batches(predictor, np.stack(images), BATCH)[0]) if len(images) else 0

    def raw(files):
        scored = 0
        for start in range(0, len(files), chunk):
            done = [process_file(path, Path(path).read_bytes(), input_dir, params, aliases)
                    for path in files[start:start + chunk]]
            scored += predict([np.frombuffer(d["image"], np.uint8).reshape(d["height"], d["width"])
                               for d in done if d["status"] == "ok"])
        return scored

    def preprocessed(limit=None):
        table = pq.read_table(f"{input_dir}/images", columns=["path", "sha256", "label", "image", "height", "width"])
        scored = 0
        for batch in (table.slice(0, limit) if limit else table).to_batches(max_chunksize=1024):
            col = batch.to_pydict()
            scored += predict([np.frombuffer(b, np.uint8).reshape(h, w)
                               for b, h, w in zip(col["image"], col["height"], col["width"])])
        return scored

    if mode == "raw":
        files = input_files(Path(input_dir), pre)
        run, warm = (lambda: raw(files)), (lambda: raw(files[:8]))
    else:
        run, warm = preprocessed, (lambda: preprocessed(limit=8))
    warm()  # imports, OpenCV and ONNX Runtime initialised, as in a warm Spark worker
    cpu0 = time.process_time()
    with Timer() as t:
        scored = run()
    return {"seconds": t.seconds, "cpu_s": time.process_time() - cpu0,
            "input": len(files) if mode == "raw" else scored, "scored": scored}


def predictor_speed(engine: str, size: int, n: int) -> dict:
    """The predictor alone, one thread, fixed batches of BATCH: images per second and per CPU second."""
    import threading

    import numpy as np

    from cxr.models import store
    from cxr.score.frames import predict_fixed_batches

    d = str(random_cnn(size))
    if engine == "keras":
        store.limit_tf_threads(1)  # before TensorFlow starts: its intra- and inter-op pools really are 1
    predictor = store.load_predictor(d, batch_size=BATCH, engine=engine, onnx_threads=1)
    images = np.random.default_rng(0).integers(0, 256, (n, size, size), dtype=np.uint8)
    predict_fixed_batches(predictor, images[:2 * BATCH], BATCH)  # warm-up (graph tracing, allocations)
    cpu0 = time.process_time()
    with Timer() as t:
        predict_fixed_batches(predictor, images, BATCH)
    cpu = time.process_time() - cpu0
    return {"engine": engine, "size": size, "images": n, "seconds": t.seconds, "cpu_s": cpu,
            "img_per_s": n / t.seconds, "img_per_cpu_s": n / cpu, "threads_at_end": threading.active_count(),
            "os_threads": len(os.listdir("/proc/self/task"))}


def predict_batch_udf_vs_ours(bench) -> dict:
    """Spark's own batch-inference helper vs our mapInPandas path, same preprocessed images, same model and
    batches, both writing (path, sha256, probabilities) to Parquet."""
    from pyspark.ml.functions import predict_batch_udf
    from pyspark.sql import types as T

    from cxr.score.frames import Engine, score_preprocessed_frame
    from cxr.spark.score import RESULT_SCHEMA

    spark = bench.session()
    pre = bench.preprocessed(bench.synth, f"synth{bench.args.synthetic}")
    model, size = str(bench.model), bench.args.model_size

    def make_predict_fn():
        import numpy as np

        from cxr.models import store
        from cxr.score.frames import predict_fixed_batches

        predictor = store.cached_predictor(model, batch_size=BATCH, tf_threads=1, engine=ENGINE, onnx_threads=1)
        return lambda images: predict_fixed_batches(
            predictor, np.stack([np.frombuffer(b, np.uint8) for b in images]).reshape(-1, size, size), BATCH)[0]

    udf = predict_batch_udf(make_predict_fn, return_type=T.ArrayType(T.FloatType()), batch_size=BATCH)
    engine = Engine(model, ENGINE, BATCH, 1, 1)
    images = spark.read.parquet(f"{pre}/images")
    n = images.count()
    sides = {"predict_batch_udf": lambda frame: frame.select("path", "sha256", udf("image").alias("proba")),
             "mapInPandas (ours)": lambda frame: frame.select("path", "sha256", "label", "image", "height", "width")
             .mapInPandas(lambda fs: (score_preprocessed_frame(f, engine) for f in fs), schema=RESULT_SCHEMA)}
    for fn in sides.values():  # warm-up on a few rows
        fn(images.limit(40)).write.mode("overwrite").parquet(str(CACHE / "out" / "e-warmup"))

    def timed(name):
        with Timer() as t:
            sides[name](images).write.mode("overwrite").parquet(str(CACHE / "out" / f"e-{name[:4]}"))
        print(f"   e: {name} {n} images {t.seconds:.1f} s, {n / t.seconds:.1f} img/s", flush=True)
        return t.seconds
    runs = interleaved({name: (lambda name=name: timed(name)) for name in sides}, max(2, bench.args.rounds))
    job = bench.score(pre, "e-score-run", full=True)
    return {"images": n, "input": str(pre), "seconds": {k: min(v) for k, v in runs.items()},
            "all_s": runs, "score_run": job, "partitions": images.rdd.getNumPartitions(),
            "arrow_batch": spark.conf.get("spark.sql.execution.arrow.maxRecordsPerBatch")}


def main() -> int:
    """`--child '["single", mode, input, model, size]'` or `--child '["predict", engine, size, images]'`."""
    functions = {"single": single_process, "predict": predictor_speed}
    return answer_child(lambda request: functions[request[0]](*request[1:]), sys.argv[sys.argv.index("--child") + 1])


if __name__ == "__main__":
    sys.exit(main())
