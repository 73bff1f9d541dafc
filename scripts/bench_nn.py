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
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Scratch NumPy networks (scripts/bench_nn.py)"
CONFIGS = {  # name -> (worker, threads, label)
    "cxr.nn": ("ours", 1, "cxr.nn (NumPy, 1 BLAS thread)"),
    "keras": ("keras", 0, "Keras (TF default threads)"),
    "keras-1t": ("keras", 1, "Keras (1 TF thread)"),
}
CASES = [("cnn", 32), ("dnn", 32), ("cnn", 1), ("dnn", 1)]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared/data/mnist"),
                   help="MNIST folder (random images of the same shape are used if it is missing)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2, help="timed epochs per case per round")
    p.add_argument("--batch1-samples", type=int, default=1000)
    p.add_argument("--benchmarks", default=str(ROOT / "BENCHMARKS.md"))
    p.add_argument("--json", default=None, help="also write the raw timings here")
    p.add_argument("--no-write", action="store_true", help="print only, leave BENCHMARKS.md alone")
    p.add_argument("--worker", choices=["ours", "keras"], help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- worker side
def load_data(data_dir):
    import numpy as np

    sys.path.insert(0, str(ROOT))
    from cxr.datasets.mnist import downsample, load_mnist, select_classes

    if Path(data_dir, "train-images-idx3-ubyte.gz").is_file():
        x, y = select_classes(*load_mnist(data_dir, "train"), range(5), 2000, rng=np.random.default_rng(0))
        return downsample(x)[..., None], y, "MNIST digits 0-4, 2,000 per digit, 14x14"
    rng = np.random.default_rng(0)
    return rng.random((10000, 14, 14, 1), dtype=np.float32), rng.integers(0, 5, 10000), \
        "random 14x14 images (MNIST folder not found)"


def worker(args):
    """Runs in a child process; prints {case: [epoch seconds...]} as JSON on the last line."""
    x, y, data_desc = load_data(args.data)
    from cxr.nn import Adam, cnn, dnn

    builders = {"cnn": lambda: cnn((14, 14, 1), 5, filters=32, hidden=128, seed=0),
                "dnn": lambda: dnn((14, 14, 1), 5, hidden=128, seed=0)}
    times = {}
    if args.worker == "keras":
        from cxr.nn import compare
        from cxr.nn.keras_compat import to_keras

        compare.keras_threads(args.threads)
    for model, batch in CASES:
        n = len(x) if batch > 1 else args.batch1_samples
        xs, ys = x[:n], y[:n]
        warm = slice(0, n if batch > 1 else min(n, 200))
        if args.worker == "ours":
            net = builders[model]()
            opt = Adam(1e-3)
            net.train(xs[warm], ys[warm], epochs=1, batch_size=batch, optimizer=opt, seed=0)
            hist = net.train(xs, ys, epochs=args.repeats, batch_size=batch, optimizer=opt, seed=1)
            t = hist.times
        else:
            import keras

            keras.utils.set_random_seed(0)
            m = to_keras(builders[model](), copy_weights=False)
            compare.keras_fit(m, xs[warm], ys[warm], epochs=1, batch_size=batch)
            _, t = compare.keras_fit(m, xs, ys, epochs=args.repeats, batch_size=batch, compile=False)
        times[f"{model}/b{batch}"] = t
    print(json.dumps({"times": times, "data": data_desc, "loadavg": os.getloadavg()}))


# ----------------------------------------------------------------------------- parent side
def run_child(args, name):
    kind, threads, _ = CONFIGS[name]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    if kind == "ours":
        env["OPENBLAS_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--threads", str(threads),
           "--data", args.data, "--repeats", str(args.repeats), "--batch1-samples", str(args.batch1_samples)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{name} worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def median(v):
    v = sorted(v)
    k = len(v) // 2
    return v[k] if len(v) % 2 else (v[k - 1] + v[k]) / 2


def versions():
    out = {"python": platform.python_version()}
    code = "import numpy, tensorflow, keras; print(numpy.__version__, tensorflow.__version__, keras.__version__)"
    try:
        np_v, tf_v, k_v = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                         env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}).stdout.split()
        out.update(numpy=np_v, tensorflow=tf_v, keras=k_v)
    except ValueError:
        pass
    return out


def report(args, samples, data_desc, loads, wall):
    med = {name: {case: median(t) for case, t in per.items()} for name, per in samples.items()}
    keras_names = [n for n in CONFIGS if n != "cxr.nn"]
    rows, ratios = [], {}
    for model, batch in CASES:
        case = f"{model}/b{batch}"
        best = min(keras_names, key=lambda n: med[n][case])
        ratio = med["cxr.nn"][case] / med[best][case]
        ratios[case] = {"ratio": ratio, "vs": best}
        n = 10000 if batch > 1 else args.batch1_samples
        rows.append(f"| {model.upper()} | {batch} | {n:,} | {med['cxr.nn'][case]:.3f} | "
                    + " | ".join(f"{med[k][case]:.3f}" for k in keras_names)
                    + f" | **{ratio:.2f}** (vs {CONFIGS[best][2]}) |")
    v = versions()
    cores = os.cpu_count()
    lines = [
        SECTION,
        "",
        f"Seconds per training epoch (median of {args.rounds} rounds x {args.repeats} epochs, after a warm-up "
        f"epoch), Adam lr 1e-3, the study's architectures: CNN = Conv2D 32x3x3 valid - ReLU - MaxPool 2x2 - "
        f"Dense 128 - ReLU - Dense 5 - softmax (148,549 params); DNN = Dense 128 - ReLU - Dense 5 - softmax "
        f"(25,861 params). Data: {data_desc}; batch 32 uses all 10,000 images, **batch 1 uses only the first "
        f"{args.batch1_samples:,}** to keep it short. Ratio = cxr.nn / fastest Keras configuration "
        f"(< 1: cxr.nn faster).",
        "",
        f"| model | batch | samples/epoch | {CONFIGS['cxr.nn'][2]} s | "
        + " | ".join(f"{CONFIGS[k][2]} s" for k in keras_names)
        + " | ratio |",
        "|---|---|---|---|" + "---|" * len(keras_names) + "---|",
        *rows,
        "",
        f"Machine: **{cores} cores** ({platform.machine()}, {platform.system()}), no GPU; Python {v.get('python')}, "
        f"NumPy {v.get('numpy', '?')}, TensorFlow {v.get('tensorflow', '?')}, Keras {v.get('keras', '?')}. "
        f"The machine was shared with other jobs: 1-minute load average {min(loads):.1f}-{max(loads):.1f} "
        f"during the {wall:.0f} s run, so single timings are noisy; the configurations were interleaved.",
        "Keras runs `model.fit(..., verbose=0)` (its default non-XLA graph mode on CPU); cxr.nn runs "
        "`Network.train`. Each configuration runs in a fresh process.",
        "",
        f"Reproduce: `.venv/bin/python scripts/bench_nn.py` (options: --rounds {args.rounds} --repeats "
        f"{args.repeats} --batch1-samples {args.batch1_samples}).",
        "",
    ]
    return "\n".join(lines), med, ratios


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    t0 = time.perf_counter()
    samples = {name: {} for name in CONFIGS}
    loads, data_desc = [os.getloadavg()[0]], None
    for r in range(args.rounds):
        for name in CONFIGS:
            res = run_child(args, name)
            data_desc = res["data"]
            loads.append(res["loadavg"][0])
            for case, t in res["times"].items():
                samples[name].setdefault(case, []).extend(t)
            print(f"round {r + 1}/{args.rounds} {name:<9} "
                  + "  ".join(f"{c} {median(t):.3f}s" for c, t in res["times"].items()), flush=True)
    wall = time.perf_counter() - t0
    section, med, ratios = report(args, samples, data_desc, loads, wall)
    print()
    for case, r in ratios.items():
        print(f"{case:<8} cxr.nn {med['cxr.nn'][case]:.3f}s  best Keras ({r['vs']}) {med[r['vs']][case]:.3f}s  "
              f"ratio {r['ratio']:.2f}")
    print(f"\n{os.cpu_count()} cores; load average {min(loads):.1f}-{max(loads):.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"samples": samples, "median": med, "ratios": ratios,
                                               "cores": os.cpu_count(), "loadavg": loads}, indent=1))
    if not args.no_write:
        sys.path.insert(0, str(ROOT))
        from cxr.common.markdown import replace_section

        replace_section(Path(args.benchmarks), SECTION, section)
        print(f"updated {args.benchmarks}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
