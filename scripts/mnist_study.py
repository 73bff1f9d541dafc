#!/usr/bin/env python
"""The study's MNIST experiment, reproduced and compared with the study's own numbers.

Protocol (the study's): digits 0-4, 2,000 training images per digit, images downsampled
28x28 -> 14x14 (2x2 block mean), 10 epochs, test on every test-set image of digits 0-4 (5,139).
Every model gets the same hyper-parameters: Adam(lr 1e-3, Keras defaults otherwise), batch 32,
categorical cross-entropy, Glorot-uniform weights / zero biases; DNN = Dense(128)-ReLU-Dense(5),
CNN = Conv 32x3x3 'valid'-ReLU-MaxPool 2x2-Dense(128)-ReLU-Dense(5). Each seed draws its own
2,000-per-digit subset (used by all models of that seed), initial weights and shuffling.

    python scripts/mnist_study.py --data ../shared/data/mnist --out /tmp/m [--seeds 0,1,2]

Writes OUT/results.json, OUT/results.md (table beside the study's numbers) and OUT/mnist_loss.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

# Small matrices are faster on one BLAS thread, and a busy 2-core machine makes multi-threaded
# OpenBLAS spin; set before NumPy loads. Override by exporting OPENBLAS_NUM_THREADS yourself.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from cxr.datasets.mnist import downsample, load_mnist, select_classes  # noqa: E402
from cxr.nn import cnn, dnn  # noqa: E402
from cxr.nn import compare  # noqa: E402

DIGITS = (0, 1, 2, 3, 4)
PER_DIGIT = 2000
INPUT_SHAPE = (14, 14, 1)
# Test accuracies reported by the study for the same protocol.
STUDY = {"scratch_dnn": 0.9628, "scratch_cnn": 0.8644, "torch_dnn": 0.9624, "keras_cnn": 0.9528}
MODELS = ("scratch_dnn", "scratch_cnn", "keras_cnn", "keras_dnn", "torch_dnn")
LABELS = {"scratch_dnn": "Scratch DNN (cxr.nn)", "scratch_cnn": "Scratch CNN (cxr.nn)",
          "keras_cnn": "Keras CNN", "keras_dnn": "Keras DNN", "torch_dnn": "PyTorch DNN"}
GOALS = {"scratch_cnn": 0.98, "scratch_dnn": 0.97}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="folder with the four MNIST .gz IDX files")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--filters", type=int, default=32)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--models", default=",".join(MODELS), help=f"subset of {','.join(MODELS)}")
    p.add_argument("--threads", type=int, default=1,
                   help="TensorFlow and PyTorch thread pools (0 = framework default); NumPy follows "
                        "OPENBLAS_NUM_THREADS, which this script defaults to 1")
    return p.parse_args(argv)


def study_data(train, test, seed):
    """This seed's 2,000-per-digit training subset and the fixed test set, as (N, 14, 14, 1) in [0, 1]."""
    x, y = select_classes(*train, DIGITS, PER_DIGIT, rng=np.random.default_rng(seed))
    xt, yt = select_classes(*test, DIGITS)
    return downsample(x)[..., None], y, downsample(xt)[..., None], yt


def mean_sd(values):
    v = np.asarray(values, dtype=float)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def summarise(runs):
    out = {}
    for model, per_seed in runs.items():
        accs = [r["test_accuracy"] for r in per_seed.values()]
        m, sd = mean_sd(accs)
        eps = [s for r in per_seed.values() for s in r["epoch_seconds"][1:]]  # epoch 1 holds start-up costs
        out[model] = {
            "test_accuracy_mean": m, "test_accuracy_sd": sd,
            "test_accuracy_min": float(min(accs)), "test_accuracy_max": float(max(accs)),
            "final_loss_mean": mean_sd([r["loss"][-1] for r in per_seed.values()])[0],
            "epoch_seconds_median": float(np.median(eps)) if eps else None,
            "train_seconds_mean": mean_sd([r["train_seconds"] for r in per_seed.values()])[0],
            "n_params": next(iter(per_seed.values()))["n_params"],
            "seeds": len(accs),
        }
    return out


def markdown(summary, args, machine, skipped):
    seeds = args.seeds
    lines = [
        f"| model | study | this run: test accuracy, mean ± sd (min–max) | final train loss | s/epoch (median, epochs 2+) | train s ({args.epochs} epochs) | params |",
        "|---|---|---|---|---|---|---|",
    ]
    for model in MODELS:
        study = f"{STUDY[model]:.4f}" if model in STUDY else "—"
        if model not in summary:
            lines.append(f"| {LABELS[model]} | {study} | not run: {skipped.get(model, 'not selected')} | | | | |")
            continue
        s = summary[model]
        lines.append(
            f"| {LABELS[model]} | {study} | **{s['test_accuracy_mean']:.4f}** ± {s['test_accuracy_sd']:.4f} "
            f"({s['test_accuracy_min']:.4f}–{s['test_accuracy_max']:.4f}) | {s['final_loss_mean']:.4f} | "
            f"{s['epoch_seconds_median']:.2f} | {s['train_seconds_mean']:.1f} | {s['n_params']:,} |")
    lines += [
        "",
        f"Protocol: digits 0–4, {PER_DIGIT} training images per digit (drawn per seed), 14×14 (2×2 block mean), "
        f"{args.epochs} epochs, batch {args.batch_size}, Adam lr {args.lr:g} (β 0.9/0.999, ε 1e-7), "
        f"Glorot-uniform weights, zero biases; test = all 5,139 test images of digits 0–4. "
        f"Seeds {seeds}; sd is the sample standard deviation over seeds.",
        f"DNN: Flatten–Dense({args.hidden})–ReLU–Dense(5)–softmax. "
        f"CNN: Conv2D({args.filters}, 3×3, valid)–ReLU–MaxPool(2×2)–Flatten–Dense({args.hidden})–ReLU–Dense(5)–softmax.",
        f"Machine: {machine['cores']} cores, {machine['platform']}; numpy {machine['numpy']} "
        f"(OPENBLAS_NUM_THREADS={machine['openblas_threads']}), tensorflow {machine.get('tensorflow', '—')}, "
        f"torch {machine.get('torch', '—')}; TF/PyTorch threads: {machine['framework_threads']}. "
        f"Times are wall-clock on a shared machine (load average at start "
        f"{machine['load_average_at_start'][0]:.1f}); see BENCHMARKS.md for controlled epoch timings.",
    ]
    return "\n".join(lines) + "\n"


def plot(runs, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    for model in MODELS:
        if model not in runs:
            continue
        curves = np.array([r["loss"] for r in runs[model].values()])
        ep = np.arange(1, curves.shape[1] + 1)
        line, = ax.plot(ep, curves.mean(0), marker="o", ms=3, label=LABELS[model])
        ax.fill_between(ep, curves.min(0), curves.max(0), color=line.get_color(), alpha=0.2, lw=0)
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss (cross-entropy)")
    ax.set_title(f"MNIST 0–4, 14×14: mean over {len(next(iter(runs.values())))} seeds (band = min–max)", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = set(models) - set(MODELS)
    if unknown:
        sys.exit(f"unknown models {sorted(unknown)}; choose from {MODELS}")

    machine = {"cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
               "numpy": np.__version__, "openblas_threads": os.environ.get("OPENBLAS_NUM_THREADS"),
               "framework_threads": args.threads or "default", "load_average_at_start": os.getloadavg()}
    skipped = {}
    if any(m.startswith("keras") for m in models):
        import tensorflow as tf

        compare.keras_threads(args.threads)
        machine["tensorflow"] = tf.__version__
    if "torch_dnn" in models:
        ok, reason = compare.torch_available()
        if ok:
            import torch

            machine["torch"] = torch.__version__
        else:
            print(f"skipping torch_dnn: {reason}", flush=True)
            skipped["torch_dnn"] = reason
            models.remove("torch_dnn")

    hp = dict(epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.lr)
    runs = {m: {} for m in models}
    t_start = time.perf_counter()
    train, test = load_mnist(args.data, "train"), load_mnist(args.data, "test")
    for seed in seeds:
        x, y, xt, yt = study_data(train, test, seed)
        print(f"seed {seed}: train {x.shape}, test {xt.shape}", flush=True)
        for model in models:
            arch = dnn(INPUT_SHAPE, len(DIGITS), hidden=args.hidden, seed=seed) if model.endswith("dnn") else \
                cnn(INPUT_SHAPE, len(DIGITS), filters=args.filters, hidden=args.hidden, seed=seed)
            if model.startswith("scratch"):
                res = compare.train_scratch(arch, x, y, xt, yt, seed=seed, **hp)
            elif model.startswith("keras"):
                res = compare.train_keras(arch, x, y, xt, yt, seed=seed, **hp)
            else:
                res = compare.train_torch_dnn(INPUT_SHAPE, len(DIGITS), x, y, xt, yt, hidden=args.hidden,
                                              seed=seed, threads=args.threads, **hp)
            runs[model][str(seed)] = res.to_dict()
            print(f"  {model:<12} test acc {res.test_accuracy:.4f}  loss/epoch "
                  f"{' '.join(f'{v:.3f}' for v in res.loss)}  {res.train_seconds:.1f}s", flush=True)

    summary = summarise(runs)
    goals = {f"{m} >= {g}": summary[m]["test_accuracy_mean"] >= g for m, g in GOALS.items() if m in summary}
    result = {
        "protocol": {"digits": list(DIGITS), "train_per_digit": PER_DIGIT, "image_size": list(INPUT_SHAPE[:2]),
                     "downsample": "2x2 block mean, /255", "test": "all test images of digits 0-4",
                     "seeds": seeds},
        "hyperparameters": {**hp, "optimizer": "Adam(beta_1=0.9, beta_2=0.999, epsilon=1e-7)",
                            "filters": args.filters, "kernel_size": 3, "pool_size": 2, "hidden": args.hidden,
                            "init": "glorot_uniform kernels, zero biases"},
        "study": STUDY, "machine": machine, "skipped": skipped, "summary": summary, "goals": goals,
        "runs": runs, "wall_seconds": time.perf_counter() - t_start,
    }
    (out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    table = markdown(summary, args, machine, skipped)
    (out / "results.md").write_text("# MNIST study: scratch NumPy vs Keras vs PyTorch\n\n" + table)
    plot(runs, out / "mnist_loss.png")
    print("\n" + table)
    print(f"goals: {goals}")
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'mnist_loss.png'} "
          f"in {result['wall_seconds']:.0f}s")
    return 0 if all(goals.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
