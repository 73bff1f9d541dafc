#!/usr/bin/env python
"""The scope gate and the out-of-distribution (OOD) distance measured on the 450 shared X-rays and the out-of-scope
material (cxr.quality.out_of_scope); writes "## Scope gate and OOD" in BENCHMARKS.md and "## Measurement" in
docs/scope_gate.md.

Steps, each kept in CACHE/scope (--redo STEP runs it again): material; preprocess (--conf recommended, the shared
MANIFEST.csv); train (jobs/train.py --conf recommended: OOD reference on train, threshold on val); score (jobs/score.py
on the val + test files, then on the material); cost (one core: header read, distance, whole score path).

    python scripts/bench_scope.py                   # everything, BENCHMARKS.md and docs/scope_gate.md updated
    python scripts/bench_scope.py --report-only     # rewrite both from the cached measurements
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_scope_report import BATCH, SECTION, WORK, report  # noqa: E402
from cxr.common.bench import (CACHE, State, bench_parser, command_line, fastest_cpu, interleaved,  # noqa: E402
                              run_child, versions)
from cxr.common.markdown import publish, replace_section  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
STEPS = ("material", "preprocess", "train", "score", "cost")


def parse_args(argv=None):
    p = bench_parser(__doc__, state="scope/results.json", redo_help="steps to run again", redo_choices=STEPS,
                     rounds=5, rounds_help="cost step: timed rounds per measurement (fastest kept)")
    p.add_argument("--ensemble", type=int, help="seed ensemble size of the model (default: the recommended profile's)")
    p.add_argument("--doc", default=str(ROOT / "docs" / "scope_gate.md"), help="its ## Measurement is rewritten")
    return p.parse_args(argv)


def job(name: str, script: str, *args) -> dict:
    """jobs/SCRIPT.py ARGS in a subprocess (local[2]); its wall and CPU seconds (the job and everything it ran)."""
    cmd = [sys.executable, ROOT / "jobs" / f"{script}.py", "--master", "local[2]", *args]
    log = CACHE / "logs" / f"scope-{name}.log"
    print(f"[{time.strftime('%H:%M:%S')}] {name}: {' '.join(map(str, cmd[1:]))} (log {log})", flush=True)
    run = run_child(cmd, log, cwd=ROOT, answer=False, env={"SPARK_LOCAL_IP": "127.0.0.1", "PYSPARK_PYTHON":
                                                          sys.executable, "TF_CPP_MIN_LOG_LEVEL": "2"})
    return {"wall_s": run.wall_s, "cpu_s": run.cpu_s}


def local(path: str) -> Path:
    return Path(path.removeprefix("file:"))


def in_scope_files(link_to: Path | None = None) -> dict[str, list[Path]]:
    """The val and test films of both shared folders (split by patient as the preprocess job splits them:
    cxr.scope.frontal_data), keyed "FOLDER/SPLIT"; with link_to, hard links of them under
    link_to/FOLDER/SPLIT/CLASS/ (same bytes, no copy)."""
    from cxr.scope.frontal_data import heldout_films

    files: dict[str, list[Path]] = {}
    for rel, folder, split in heldout_films(SHARED):
        files.setdefault(f"{folder}/{split}", []).append(SHARED / rel)
    if link_to is not None:
        shutil.rmtree(link_to, ignore_errors=True)
        for key, p in ((k, p) for k, ps in files.items() for p in ps):
            dest = link_to / key / p.relative_to(SHARED / key.split("/")[0])
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.link(p, dest)
    return {k: sorted(v) for k, v in sorted(files.items())}


def outcomes(pred: Path, root: Path) -> dict[str, dict]:
    """Per file (relative to root): outcome header | ood | decoder | missed, the distance, the frontal check's
    score, which pixel signals fired ("by": frontal, distance) and the reason."""
    import pyarrow.dataset as ds

    def rows(table, cols):
        return ds.dataset(pred / table, partitioning="hive").to_table(columns=cols).to_pylist() \
            if (pred / table).is_dir() else []
    from cxr.scope.frontal import NOT_FRONTAL, UNLIKE_TRAINING

    rel = lambda r: str(local(r["path"]).relative_to(root))  # noqa: E731
    by = lambda reason: [s for s, words in (("frontal", NOT_FRONTAL), ("distance", UNLIKE_TRAINING))  # noqa: E731
                         if words in (reason or "")]
    return {**{rel(r): {"outcome": "missed" if r["in_distribution"] else "ood", "distance": r["ood_distance"],
                        "scope": r["scope_score"], "by": by(r["ood_reason"])}
               for r in rows("predictions", ["path", "ood_distance", "in_distribution", "scope_score", "ood_reason"])},
            **{rel(r): {"outcome": "header" if r["stage"] == "scope" else "ood", "distance": r["ood_distance"],
                        "scope": r["scope_score"], "by": by(r["reason"]) if r["stage"] != "scope" else [],
                        "reason": r["reason"]}
               for r in rows("out_of_scope", ["path", "stage", "reason", "ood_distance", "scope_score"])},
            **{rel(r): {"outcome": "decoder", "reason": r["reason"]} for r in rows("errors", ["path", "reason"])}}


def parquet_distances(pre: Path, model: Path) -> dict[str, list[float]]:
    """Distances of every split's images as the preprocess job wrote them (what the reference was fitted on)."""
    import numpy as np
    import pyarrow.parquet as pq

    from cxr.models import store

    predictor = store.load_predictor(model, batch_size=BATCH, engine="onnx", onnx_threads=2)
    rows = pq.read_table(pre / "images", columns=["split", "image", "height", "width"]).to_pylist()
    out = {}
    for split in ("train", "val", "test"):
        x = np.stack([np.frombuffer(r["image"], np.uint8).reshape(r["height"], r["width"]) for r in rows
                      if r["split"] == split])[..., None].astype(np.float32) / 255
        out[split] = [float(d) for d in predictor.predict_scored(x)[1]]
    return out


def costs(model: Path, files: list[Path], dicoms: list[Path], n_shared: int, rounds: int) -> dict:
    """One core: per-image CPU of the header read, of the whole score path (read, decode, preprocess, ONNX with
    the distance, the frontal check), of ONNX with vs without the ood_distance output and of the frontal check
    (resize to 64 px + its ONNX graph) on the same images (batch 32, 1 thread), alternated in one process."""
    import numpy as np
    import onnx

    from cxr.config import load_config
    from cxr.image.batch import process_file
    from cxr.common.labels import alias_table
    from cxr.models import store
    from cxr.models.onnx_export import keep_outputs
    from cxr.score.frames import predict_fixed_batches, scoring_params
    from cxr.scope.dicom_header import HeaderReader
    from cxr.scope.frontal import FrontalCheck
    from cxr.scope.rules import ScopeGate

    config = load_config()
    reader = HeaderReader(None)
    blobs = [p.read_bytes() for p in dicoms]
    header_ms = {p.name: 1000 * fastest_cpu(lambda b=b: [reader.read(b) for _ in range(20)], rounds, per=20)
                 for p, b in zip(dicoms, blobs)}
    predictor = store.load_predictor(model, batch_size=BATCH, engine="onnx", onnx_threads=1)
    params = scoring_params(predictor.metadata["preprocess"], config)
    aliases, gate = alias_table(config["preprocess"]["labels"]), ScopeGate.from_config(config)
    frontal = FrontalCheck.load()

    def score_all():
        """What the workers do: per file read, sha256, gate, decode, preprocess; the model and the frontal check
        on batches of them."""
        rows = [process_file(str(p), p.read_bytes(), str(p.parents[1]), params, aliases, gate) for p in files]
        images = np.stack([np.frombuffer(r["image"], np.uint8).reshape(r["height"], r["width"]) for r in rows])
        predict_fixed_batches(predictor, images, BATCH)
        frontal.assess(images)
        return images
    images = score_all()   # warm: OpenCV, ONNX Runtime, the file cache
    score_ms = 1000 * fastest_cpu(score_all, max(2, rounds // 2)) / len(files)
    x = np.stack(images)[..., None].astype(np.float32) / 255
    proto = onnx.load(str(model / store.ONNX_FILE))
    proba = proto.graph.output[0].name
    keep_outputs(proto.graph, [proba])
    bare = WORK / "model-without-ood.onnx"
    onnx.save(proto, str(bare))
    sessions = {"with": (store.onnx_session(model / store.ONNX_FILE, 1), [proba, "ood_distance"]),
                "without": (store.onnx_session(bare, 1), [proba])}
    x = np.concatenate([x] * -(-512 // len(x)))     # >= 512 images a round: the difference is small
    u8 = np.concatenate([images] * -(-512 // len(images)))
    frontal = FrontalCheck(frontal.model_dir, frontal.threshold, BATCH, frontal.asymmetry_threshold)

    def onnx(sess, names):
        feed = sess.get_inputs()[0].name
        for start in range(0, len(x), BATCH):
            sess.run(names, {feed: x[start:start + BATCH]})
    timed = {**{k: lambda k=k: onnx(*sessions[k]) for k in sessions}, "frontal": lambda: frontal.assess(u8)}
    runs = interleaved({k: lambda k=k: fastest_cpu(timed[k], 1, per=len(x)) for k in timed},
                       rounds, rotate=False)   # alternated, so that the machine's load hits all alike
    onnx_ms = {k: 1000 * min(v) for k, v in runs.items()}
    return {"header_ms": header_ms, "shared_dicoms": n_shared, "score_ms": score_ms, "onnx_ms": onnx_ms,
            "images": len(images), "files": len(files)}


def save(state: State, key: str, value) -> None:
    """A step's result, with the date and versions of the run (the report's header)."""
    state.save(key, value, date=time.strftime("%Y-%m-%d"), versions=versions(("onnxruntime", "pydicom", "pyspark")))


def measure(args, state: State) -> None:
    from cxr.quality.out_of_scope import MANIFEST, write_material

    material, pre, models = WORK / "material", WORK / "pre96", WORK / "models"
    model = models / "cnn-adam"
    if "material" in args.redo or not (material / MANIFEST).is_file():
        t0 = time.perf_counter()
        rows = write_material(material, cxr_dir=SHARED / "cxr", mnist_dir=SHARED / "mnist", shared_dir=SHARED)
        save(state, "material", {"files": len(rows), "wall_s": time.perf_counter() - t0})
    if not state.done("preprocess"):
        both = [a for folder in ("cxr", "cxr-adult")   # the shipped profile's training population (README)
                for a in ("--input", SHARED / folder, "--manifest", SHARED / folder / "MANIFEST.csv")]
        save(state, "preprocess", job("preprocess", "preprocess", "--conf", "recommended", *both, "--output", pre,
                                      "--overwrite"))
    if not state.done("train"):
        size = ["--ensemble", args.ensemble] if args.ensemble else []
        r = job("train", "train", "--conf", "recommended", "--data", pre, "--out", models, *size, "--no-tracking",
                "--no-evaluate", "--overwrite")
        meta = json.loads((model / "metrics.json").read_text())
        from cxr.scope.reference import load_reference

        members = meta.get("ensemble", {}).get("members") or [meta]
        save(state, "train", {**r, "ensemble": len(members), "epochs": len(members[0]["history"]["loss"]),
                              "ood": meta["ood"],
                       "calibration": [float(v) for v in load_reference(model).calibration]})
    todo = not state.done("score")
    files, inscope = in_scope_files(WORK / "inscope" if todo else None), WORK / "inscope"
    if todo:
        res = {}
        for name, src in (("inscope", inscope), ("material", material)):
            shutil.rmtree(WORK / f"pred-{name}", ignore_errors=True)
            r = job(f"score-{name}", "score", "--conf", "recommended", "--input", src, "--model", model,
                    "--output", WORK / f"pred-{name}", "--no-tracking")
            res[name] = {**r, "files": outcomes(WORK / f"pred-{name}", src)}
        from cxr.scope.frontal import BUILTIN_DIR, read_meta

        save(state, "score", {**res, "parquet_distances": parquet_distances(pre, model),
                              "frontal": read_meta(BUILTIN_DIR)})
    if not state.done("cost"):
        shared = sorted((SHARED / "dicom").glob("*.dcm"))
        written = sorted(p for p in material.rglob("*.dcm") if not p.parent.name.startswith("pydicom"))
        save(state, "cost", costs(model, files["cxr/val"] + files["cxr/test"], shared + written, len(shared),
                                  args.rounds))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    state = State(args.state, args.redo)
    if not args.report_only:
        t0 = time.perf_counter()
        measure(args, state)
        save(state, "command", command_line("bench_scope.py", argv))
        save(state, "minutes", (time.perf_counter() - t0) / 60)
    section = report(args, state.data)
    publish(section, Path(args.out), SECTION, write=not args.no_write)
    if not args.no_write:
        replace_section(Path(args.doc), "## Measurement", section.replace(SECTION, "## Measurement", 1),
                        title="# Scope gate and out-of-distribution score")
    return 0


if __name__ == "__main__":
    sys.exit(main())
