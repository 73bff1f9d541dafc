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

Threshold: the THRESHOLD_QUANTILE of the check's scores on films the scoring members never saw, each under the
recommended (96 px pad) and the default (224 px stretch) preprocessing, as the OOD distance's threshold is
calibrated (cxr.scope.reference): the VAL films of both folders (scored by the shipped members) pooled with the
out-of-fold scores of the TRAIN films (CALIBRATION_FOLDS folds by patient; each fold's films scored by members
trained with the same seeds on the other folds' films only, negatives made from them left out too; kept in
frontal.calibration.npz so the threshold can be recomputed). ~1,900 scores instead of the val split's 194: out of
fold, 45 of the 855 train films score under the val-only threshold (0.61), a tail the 97 val films did not show.
The lower threshold this gives lets some of a film's half mirrored into a symmetric picture through, which the
mirror prior (cxr.scope.frontal.asymmetry; its threshold the ASYMMETRY_QUANTILE of the train and val films' own
asymmetry, no network involved) catches. The test films stay for measuring. `--folds 0` sets the threshold on
the val films alone; `--recalibrate` redoes only this step for the members already in --out.
Members: MEMBERS networks on the same training set, each from its own seed (initial weights, dropout, batch
order), merged into one ONNX graph that takes the mean of their p(frontal) (cxr.models.onnx_export.ensemble_to_onnx):
one session per worker as before. A single network put 4 of 170 held-out test scores under a threshold set at the
0.5% quantile of val (frontal films of both folders scored low by one network's quirks); the mean of a few
narrows that tail.
Deterministic: seeds fixed (SEED + member, recorded), TF op determinism on, fixed epochs, no early stopping.

    python -m cxr.scope.frontal_train [--shared ../shared/data] [--out cxr/scope/frontal_model] [--epochs N]
                                      [--folds K] [--recalibrate]
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
                               asymmetry, build_keras, keras_scores, load_keras_members, read_meta, scope_input)

SEED = 31
MEMBERS = 3                  # networks from seeds SEED, SEED+1, ...: the check scores their mean
EPOCHS = 14
BATCH = 64
LEARNING_RATE = 1e-3
THRESHOLD_QUANTILE = 0.005   # of the calibration scores: ~0.5% of frontal films below it by design
CALIBRATION_FOLDS = 5        # out-of-fold folds over the train films pooled with val (0: val alone)
CALIBRATION_FILE = "frontal.calibration.npz"
ASYMMETRY_QUANTILE = 0.001   # of the train and val films' asymmetry: the mirror prior's share of the 1% budget
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


def out_of_fold_scores(films: list, mnist_dir: Path | None, seed: int, members: int, epochs: int, folds: int,
                       threads: int = 2, log=print) -> dict[str, np.ndarray]:
    """Each train film's score by members that never saw it: for each fold (by patient), the training set is made
    from the other folds' train films (cxr.scope.frontal_data.training_set, same seed), `members` networks are
    trained from the shipped seeds, and the fold's films are scored under every HELDOUT_VARIANTS preprocessing."""
    from dataclasses import replace

    import keras

    from cxr.scope import frontal_data as fd

    out: dict[str, list] = {"path": [], "variant": [], "fold": [], "score": []}
    for k in range(folds):
        marked = [replace(f, split="calibration") if f.split == "train"
                  and fd.calibration_fold(f.group, folds, seed) == k else f for f in films]
        data = fd.training_set(marked, mnist_dir, seed)
        nets = [train(data, epochs, seed + m, threads, log=lambda line: None)[0] for m in range(members)]
        held = fd.heldout_set(marked, ("calibration",))
        scores = keras_scores(nets, held.x)
        out["path"] += list(held.path)
        out["variant"] += list(held.variant)
        out["fold"] += [k] * len(scores)
        out["score"] += list(scores)
        log(f"calibration fold {k + 1}/{folds}: {len(scores)} scores, trained on {len(data.y)} images; "
            f"lowest {np.sort(scores)[:3].round(3).tolist()}")
        keras.backend.clear_session()
    return {"path": np.array(out["path"]), "variant": np.array(out["variant"]),
            "fold": np.array(out["fold"], np.int64), "score": np.array(out["score"], np.float32)}


def calibrate(members: list, films: list, out: Path, mnist_dir: Path | None, seed: int, epochs: int, folds: int,
              threads: int, log=print) -> dict:
    """The threshold and what it was set on (frontal.json's calibration keys); writes CALIBRATION_FILE."""
    from cxr.scope import frontal_data as fd

    heldout = fd.heldout_set(films)
    scores = keras_scores(members, heldout.x)
    on_val = heldout.split == "val"
    sample, on = [scores[on_val]], [f"the val films of {' and '.join(fd.FOLDERS)} ({int(on_val.sum())} scores)"]
    calibration = {"folds": int(folds), "val_scores": int(on_val.sum()),
                   "val_only_threshold": float(np.quantile(scores[on_val], THRESHOLD_QUANTILE))}
    (out / CALIBRATION_FILE).unlink(missing_ok=True)
    if folds >= 2:
        oof = out_of_fold_scores(films, mnist_dir, seed, len(members), epochs, folds, threads, log)
        np.savez(out / CALIBRATION_FILE, **oof)
        sample.append(oof["score"])
        on.insert(0, f"out-of-fold train films (k={folds} by patient, {len(oof['score'])} scores)")
        calibration.update(oof_scores=int(len(oof["score"])), file=CALIBRATION_FILE,
                           sha256=sha256(out / CALIBRATION_FILE),
                           fold_scores=np.bincount(oof["fold"], minlength=folds).tolist())
    threshold = float(np.quantile(np.concatenate(sample), THRESHOLD_QUANTILE))
    frontal_films = fd.heldout_set(films, ("train", "val"))   # the mirror prior: no network, every film unseen
    asym_threshold = float(np.quantile(asymmetry(scope_input(frontal_films.x)), ASYMMETRY_QUANTILE))
    kept_out = (scores < threshold) | (asymmetry(scope_input(heldout.x)) < asym_threshold)
    flagged = {f"{folder}/{split}": {"films": int(sel.sum() // len(fd.HELDOUT_VARIANTS)),
                                    "scores": int(sel.sum()), "flagged": int(kept_out[sel].sum())}
               for folder in fd.FOLDERS for split in ("val", "test")
               for sel in [(heldout.folder == folder) & (heldout.split == split)]}
    variants = f"each film under {len(fd.HELDOUT_VARIANTS)} preprocessings {list(fd.HELDOUT_VARIANTS)}"
    return {"threshold": threshold, "threshold_quantile": THRESHOLD_QUANTILE,
            "threshold_on": " + ".join(on) + f": {variants}",
            "asymmetry_threshold": asym_threshold, "asymmetry_quantile": ASYMMETRY_QUANTILE,
            "asymmetry_on": f"the train and val films of {' and '.join(fd.FOLDERS)} ({len(frontal_films.x)} "
                            f"images: {variants})",
            "heldout": flagged, "calibration": calibration}


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
    p.add_argument("--folds", type=int, default=CALIBRATION_FOLDS,
                   help="out-of-fold calibration folds over the train films (0: the val films' scores alone)")
    p.add_argument("--recalibrate", action="store_true",
                   help="keep the members already in --out; set the threshold again (frontal.json, "
                        f"{CALIBRATION_FILE})")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    shared, out = Path(args.shared), Path(args.out)
    films = fd.load_films(shared, Path(args.cache))
    print(f"{len(films)} films decoded ({time.perf_counter() - t0:.0f}s): "
          + ", ".join(f"{s}: {sum(f.split == s for f in films)}" for s in ("train", "val", "test")), flush=True)
    command = "python -m cxr.scope.frontal_train " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.recalibrate:   # the members in --out stay; only the threshold is set again
        members, meta = load_keras_members(out), read_meta(out)
        meta["calibration_command"] = command
    else:
        data = fd.training_set(films, shared / "mnist", args.seed)
        print(f"training set: {len(data.y)} images ({int(data.y.sum())} frontal) in {time.perf_counter() - t0:.0f}s;"
              f" {data.counts}", flush=True)
        seeds = [args.seed + k for k in range(args.members)]
        members, history = [], {}
        for seed in seeds:
            model, history[seed], weights = train(data, args.epochs, seed, args.threads)
            members.append(model)
        check = export(members, out, fd.heldout_set(films).x[:512])
        meta = {
            "what": "p(frontal chest radiograph) of the model's preprocessed image at 64 px (cxr.scope.frontal)",
            "seed": args.seed, "members": len(members), "seeds": seeds, "epochs": args.epochs,
            "batch": BATCH, "learning_rate": LEARNING_RATE,
            "class_weights": weights, "training_set": data.counts, "training_films": data.films,
            "films_sha256": data.films_sha256, "history": history, "onnx_check": check,
            "onnx_sha256": sha256(out / ONNX_FILE), "weights_sha256": sha256(out / WEIGHTS_FILE),
            "params": int(sum(m.count_params() for m in members)), "input_side": INPUT_SIDE,
            "split": fd.split_conf(), "train_s": round(time.perf_counter() - t0, 1), "command": command,
        }
    meta.update(calibrate(members, films, out, shared / "mnist", meta["seed"], meta["epochs"], args.folds,
                          args.threads))
    meta["calibration"]["s"] = round(time.perf_counter() - t0, 1)
    from cxr.common.provenance import package_versions

    meta["versions"] = package_versions()
    (out / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    print(f"threshold {meta['threshold']:.4f} ({meta['threshold_on']}); held-out flagged: {meta['heldout']}; "
          f"{time.perf_counter() - t0:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
