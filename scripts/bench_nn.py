#!/usr/bin/env python
"""Time one training epoch of the study's CNN and DNN: cxr.nn (NumPy) vs Keras, same data, same machine.

Cases: batch 32 over the study's 10,000 training images (14x14x1), and batch 1 over the first
--batch1-samples of them (default 1,000, so Keras' per-step overhead does not take minutes).
Each framework configuration runs in its own process (TF's thread pools can only be set before
TF starts): cxr.nn with OPENBLAS_NUM_THREADS=1, Keras with TF's default threads, Keras with 1
thread. Every process trains one warm-up epoch per case (graph tracing, caches), then times
--repeats epochs; the whole set runs --rounds times, interleaved, so load from other processes
on a shared machine hits all configurations alike. Reported: median seconds per epoch, and the
ratio cxr.nn / fastest Keras configuration (< 1 means cxr.nn is faster).

    python scripts/bench_nn.py                 # prints, and writes its section of BENCHMARKS.md
    python scripts/bench_nn.py --no-write --rounds 1 --repeats 1   # quick look
    python scripts/bench_nn.py --from-json T.json                  # the section again from timings saved with --json
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cxr.common.bench import (CACHE, answer_child, bench_parser, child_answer, command_line, load_range,  # noqa: E402
                              machine, rotations, versions)
from cxr.common.markdown import publish, table  # noqa: E402

SECTION = "## Scratch NumPy networks (scripts/bench_nn.py)"
CONFIGS = {  # name -> (worker, threads, label)
    "cxr.nn": ("ours", 1, "cxr.nn (NumPy, 1 BLAS thread)"),
    "keras": ("keras", 0, "Keras (TF default threads)"),
    "keras-1t": ("keras", 1, "Keras (1 TF thread)"),
}
CASES = [("cnn", 32), ("dnn", 32), ("cnn", 1), ("dnn", 1)]


def parse_args(argv=None):
    p = bench_parser(__doc__, rounds=2)
    p.add_argument("--data", default=str(ROOT.parent / "shared/data/mnist"),
                   help="MNIST folder (random images of the same shape are used if it is missing)")
    p.add_argument("--repeats", type=int, default=2, help="timed epochs per case per round")
    p.add_argument("--batch1-samples", type=int, default=1000)
    p.add_argument("--json", default=None, help="also write the raw timings here")
    p.add_argument("--from-json", help="write the section from timings saved with --json (nothing is run; give the "
                                       "flags of that run)")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- worker side
def load_data(data_dir):
    import numpy as np

    from cxr.datasets.mnist import downsample, load_mnist, select_classes

    if Path(data_dir, "train-images-idx3-ubyte.gz").is_file():
        x, y = select_classes(*load_mnist(data_dir, "train"), range(5), 2000, rng=np.random.default_rng(0))
        return downsample(x)[..., None], y, "MNIST digits 0-4, 2,000 per digit, 14x14"
    rng = np.random.default_rng(0)
    return rng.random((10000, 14, 14, 1), dtype=np.float32), rng.integers(0, 5, 10000), \
        "random 14x14 images (MNIST folder not found)"


def worker(req: dict) -> dict:
    """Runs in a child process: {case: [epoch seconds...]} of one framework configuration."""
    x, y, data_desc = load_data(req["data"])
    from cxr.nn import Adam, cnn, dnn

    builders = {"cnn": lambda: cnn((14, 14, 1), 5, filters=32, hidden=128, seed=0),
                "dnn": lambda: dnn((14, 14, 1), 5, hidden=128, seed=0)}
    times = {}
    if req["worker"] == "keras":
        from cxr.nn import compare
        from cxr.nn.keras_compat import to_keras

        compare.keras_threads(req["threads"])
    for model, batch in CASES:
        n = len(x) if batch > 1 else req["batch1_samples"]
        xs, ys = x[:n], y[:n]
        warm = slice(0, n if batch > 1 else min(n, 200))
        if req["worker"] == "ours":
            net = builders[model]()
            opt = Adam(1e-3)
            net.train(xs[warm], ys[warm], epochs=1, batch_size=batch, optimizer=opt, seed=0)
            hist = net.train(xs, ys, epochs=req["repeats"], batch_size=batch, optimizer=opt, seed=1)
            t = hist.times
        else:
            import keras

            keras.utils.set_random_seed(0)
            m = to_keras(builders[model](), copy_weights=False)
            compare.keras_fit(m, xs[warm], ys[warm], epochs=1, batch_size=batch)
            _, t = compare.keras_fit(m, xs, ys, epochs=req["repeats"], batch_size=batch, compile=False)
        times[f"{model}/b{batch}"] = t
    return {"times": times, "data": data_desc, "loadavg": os.getloadavg()}


# ----------------------------------------------------------------------------- parent side
def run_child(args, name):
    """One framework configuration in a fresh process (TF's thread pools can only be set before TF starts)."""
    kind, threads, _ = CONFIGS[name]
    env = {"TF_CPP_MIN_LOG_LEVEL": "2", **({"OPENBLAS_NUM_THREADS": str(threads)} if kind == "ours" else {})}
    request = {"worker": kind, "threads": threads, "data": args.data, "repeats": args.repeats,
               "batch1_samples": args.batch1_samples}
    return child_answer(__file__, request, CACHE / "logs" / "bench-nn-child.log", env=env)


def report(args, samples, data_desc, loads, wall):
    med = {name: {case: statistics.median(t) for case, t in per.items()} for name, per in samples.items()}
    keras_names = [n for n in CONFIGS if n != "cxr.nn"]
    rows, ratios = [], {}
    for model, batch in CASES:
        case = f"{model}/b{batch}"
        best = min(keras_names, key=lambda n: med[n][case])
        ratios[case] = {"ratio": med["cxr.nn"][case] / med[best][case], "vs": best}
        rows.append([model.upper(), batch, f"{10000 if batch > 1 else args.batch1_samples:,}",
                     f"{med['cxr.nn'][case]:.3f}", *(f"{med[k][case]:.3f}" for k in keras_names),
                     f"**{ratios[case]['ratio']:.2f}** (vs {CONFIGS[best][2]})"])
    v = versions(("numpy", "tensorflow", "tensorflow-cpu", "keras"))
    lines = [
        SECTION, "",
        f"Seconds per training epoch (median of {args.rounds} rounds x {args.repeats} epochs, after a warm-up "
        f"epoch), Adam lr 1e-3, the study's architectures: CNN = Conv2D 32x3x3 valid - ReLU - MaxPool 2x2 - "
        f"Dense 128 - ReLU - Dense 5 - softmax (148,549 params); DNN = Dense 128 - ReLU - Dense 5 - softmax "
        f"(25,861 params). Data: {data_desc}; batch 32 uses all 10,000 images, **batch 1 uses only the first "
        f"{args.batch1_samples:,}** to keep it short. Ratio = cxr.nn / fastest Keras configuration "
        f"(< 1: cxr.nn faster).", "",
        *table(["model", "batch", "samples/epoch", *(f"{CONFIGS[k][2]} s" for k in CONFIGS), "ratio"], rows), "",
        f"Machine: {machine(bold=True)}, no GPU; Python {v.get('python')}, NumPy {v.get('numpy', '?')}, TensorFlow "
        f"{v.get('tensorflow') or v.get('tensorflow-cpu', '?')}, Keras {v.get('keras', '?')}. The machine was shared "
        f"with other jobs: 1-minute load average {load_range(loads)} during the {wall:.0f} s run, so single timings "
        "are noisy; the configurations were interleaved.",
        "Keras runs `model.fit(..., verbose=0)` (its default non-XLA graph mode on CPU); cxr.nn runs "
        "`Network.train`. Each configuration runs in a fresh process.", "",
        f"Reproduce: `{command_line('bench_nn.py', [])}` (options: --rounds {args.rounds} --repeats "
        f"{args.repeats} --batch1-samples {args.batch1_samples}).", ""]
    return "\n".join(lines), med, ratios


def measure(args) -> dict:
    """Every configuration once a round, in the same order: {samples, data, loadavg, wall_s}."""
    t0 = time.perf_counter()
    samples = {name: {} for name in CONFIGS}
    loads, data_desc = [os.getloadavg()[0]], None
    for r, name in rotations(list(CONFIGS), args.rounds, rotate=False):
        res = run_child(args, name)
        data_desc = res["data"]
        loads.append(res["loadavg"][0])
        for case, t in res["times"].items():
            samples[name].setdefault(case, []).extend(t)
        print(f"round {r + 1}/{args.rounds} {name:<9} "
              + "  ".join(f"{c} {statistics.median(t):.3f}s" for c, t in res["times"].items()), flush=True)
    return {"samples": samples, "data": data_desc, "loadavg": loads, "wall_s": time.perf_counter() - t0}


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        return answer_child(worker, args.child)
    res = json.loads(Path(args.from_json).read_text()) if args.from_json else measure(args)
    section, med, ratios = report(args, res["samples"], res["data"], res["loadavg"], res["wall_s"])
    for case, r in ratios.items():
        print(f"{case:<8} cxr.nn {med['cxr.nn'][case]:.3f}s  best Keras ({r['vs']}) {med[r['vs']][case]:.3f}s  "
              f"ratio {r['ratio']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({**res, "median": med, "ratios": ratios, "cores": os.cpu_count()},
                                              indent=1))
    publish(section, Path(args.out), SECTION, write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
