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

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cxr.common.bench import CACHE, machine, versions  # noqa: E402  (after the sys.path insert)

SECTION = "## Scope gate and OOD (scripts/bench_scope.py)"
SHARED = ROOT.parent / "shared" / "data"
WORK = CACHE / "scope"
STEPS = ("material", "preprocess", "train", "score", "cost")
BATCH = 32


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ensemble", type=int, default=3, help="seed ensemble size of the model (recommended: 3)")
    p.add_argument("--redo", nargs="*", default=[], choices=STEPS, help="steps to run again")
    p.add_argument("--rounds", type=int, default=5, help="cost step: timed rounds per measurement (fastest kept)")
    p.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    p.add_argument("--doc", default=str(ROOT / "docs" / "scope_gate.md"), help="its ## Measurement is rewritten")
    p.add_argument("--no-write", action="store_true", help="print the section only")
    p.add_argument("--report-only", action="store_true", help="write the section from the cache, measure nothing")
    return p.parse_args(argv)


def job(name: str, script: str, *args) -> dict:
    """jobs/SCRIPT.py ARGS in a subprocess (local[2]); its wall and CPU seconds (the job and everything it ran)."""
    env = {**os.environ, "SPARK_LOCAL_IP": "127.0.0.1", "PYSPARK_PYTHON": sys.executable, "TF_CPP_MIN_LOG_LEVEL": "2"}
    cmd = [sys.executable, str(ROOT / "jobs" / f"{script}.py"), "--master", "local[2]", *map(str, args)]
    log = CACHE / "logs" / f"scope-{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"[{time.strftime('%H:%M:%S')}] {name}: {' '.join(cmd[1:])} (log {log})", flush=True)
    cpu0, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    with open(log, "w") as fh:
        rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT).returncode
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if rc:
        raise RuntimeError(f"{name} failed ({rc}): see {log}")
    return {"wall_s": time.perf_counter() - t0, "cpu_s": cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime}


def local(path: str) -> Path:
    return Path(path.removeprefix("file:"))


def in_scope_files(pre: Path, link_to: Path | None = None) -> dict[str, list[Path]]:
    """The val and test files of the preprocess output (its images table's split column); with link_to, hard
    links of them under link_to/SPLIT/CLASS/ (same bytes, no copy)."""
    import pyarrow.parquet as pq

    t = pq.read_table(pre / "images", columns=["path", "split"]).to_pylist()
    files = {s: sorted(local(r["path"]) for r in t if r["split"] == s) for s in ("val", "test")}
    if link_to is not None:
        shutil.rmtree(link_to, ignore_errors=True)
        for split, p in ((s, p) for s, ps in files.items() for p in ps):
            (link_to / split / p.relative_to(SHARED / "cxr")).parent.mkdir(parents=True, exist_ok=True)
            os.link(p, link_to / split / p.relative_to(SHARED / "cxr"))
    return files


def outcomes(pred: Path, root: Path) -> dict[str, dict]:
    """Per file (relative to root): outcome header | ood | decoder | missed, the distance and the reason."""
    import pyarrow.dataset as ds

    def rows(table, cols):
        return ds.dataset(pred / table, partitioning="hive").to_table(columns=cols).to_pylist() \
            if (pred / table).is_dir() else []
    rel = lambda r: str(local(r["path"]).relative_to(root))  # noqa: E731
    return {**{rel(r): {"outcome": "missed" if r["in_distribution"] else "ood", "distance": r["ood_distance"]}
               for r in rows("predictions", ["path", "ood_distance", "in_distribution"])},
            **{rel(r): {"outcome": "header" if r["stage"] == "scope" else "ood", "distance": r["ood_distance"],
                        "reason": r["reason"]} for r in rows("out_of_scope", ["path", "stage", "reason", "ood_distance"])},
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


def cpu_per_item(fn, items, rounds: int) -> float:
    """Fastest of `rounds` of CPU seconds (this process, all threads) of fn over items, per item."""
    best = float("inf")
    for _ in range(rounds):
        t0 = time.process_time()
        for it in items:
            fn(it)
        best = min(best, (time.process_time() - t0) / len(items))
    return best


def costs(model: Path, files: list[Path], dicoms: list[Path], n_shared: int, rounds: int) -> dict:
    """One core: per-image CPU of the header read, of the whole score path (read, decode, preprocess, ONNX with
    the distance), and of ONNX with vs without the ood_distance output on the same images (batch 32, 1 thread)."""
    import numpy as np
    import onnx

    from cxr.config import load_config
    from cxr.image.batch import process_file
    from cxr.common.labels import alias_table
    from cxr.models import store
    from cxr.models.onnx_export import keep_outputs
    from cxr.score.frames import predict_fixed_batches, scoring_params
    from cxr.scope.dicom_header import HeaderReader
    from cxr.scope.rules import ScopeGate

    config = load_config()
    reader = HeaderReader(None)
    blobs = [p.read_bytes() for p in dicoms]
    header_ms = {p.name: 1000 * cpu_per_item(reader.read, [b] * 20, rounds) for p, b in zip(dicoms, blobs)}
    predictor = store.load_predictor(model, batch_size=BATCH, engine="onnx", onnx_threads=1)
    params = scoring_params(predictor.metadata["preprocess"], config)
    aliases, gate = alias_table(config["preprocess"]["labels"]), ScopeGate.from_config(config)

    def score_all():
        """What the workers do: per file read, sha256, gate, decode, preprocess; the model on batches of them."""
        rows = [process_file(str(p), p.read_bytes(), str(SHARED / "cxr"), params, aliases, gate) for p in files]
        images = np.stack([np.frombuffer(r["image"], np.uint8).reshape(r["height"], r["width"]) for r in rows])
        predict_fixed_batches(predictor, images, BATCH)
        return images
    images = score_all()   # warm: OpenCV, ONNX Runtime, the file cache
    score_ms = 1000 * cpu_per_item(lambda _: score_all(), [None], max(2, rounds // 2)) / len(files)
    x = np.stack(images)[..., None].astype(np.float32) / 255
    proto = onnx.load(str(model / store.ONNX_FILE))
    proba = proto.graph.output[0].name
    keep_outputs(proto.graph, [proba])
    bare = WORK / "model-without-ood.onnx"
    onnx.save(proto, str(bare))
    sessions = {"with": (store.onnx_session(model / store.ONNX_FILE, 1), [proba, "ood_distance"]),
                "without": (store.onnx_session(bare, 1), [proba])}
    x = np.concatenate([x] * -(-512 // len(x)))     # >= 512 images a round: the difference is small
    onnx_ms = {k: float("inf") for k in sessions}
    for _ in range(rounds):   # alternated, so that the machine's load hits both alike
        for k, (sess, names) in sessions.items():
            feed, t0 = sess.get_inputs()[0].name, time.process_time()
            for start in range(0, len(x), BATCH):
                sess.run(names, {feed: x[start:start + BATCH]})
            onnx_ms[k] = min(onnx_ms[k], 1000 * (time.process_time() - t0) / len(x))
    return {"header_ms": header_ms, "shared_dicoms": n_shared, "score_ms": score_ms, "onnx_ms": onnx_ms,
            "images": len(images), "files": len(files)}


def measure(args, st: dict, save) -> None:
    from cxr.quality.out_of_scope import MANIFEST, write_material

    material, pre, models = WORK / "material", WORK / "pre96", WORK / "models"
    model = models / "cnn-adam"
    if "material" in args.redo or not (material / MANIFEST).is_file():
        t0 = time.perf_counter()
        rows = write_material(material, cxr_dir=SHARED / "cxr", mnist_dir=SHARED / "mnist")
        save("material", {"files": len(rows), "wall_s": time.perf_counter() - t0})
    if "preprocess" in args.redo or "preprocess" not in st:
        save("preprocess", job("preprocess", "preprocess", "--conf", "recommended", "--input", SHARED / "cxr",
                               "--output", pre, "--manifest", SHARED / "cxr" / "MANIFEST.csv", "--overwrite"))
    if "train" in args.redo or "train" not in st:
        r = job("train", "train", "--conf", "recommended", "--data", pre, "--out", models, "--ensemble",
                args.ensemble, "--no-tracking", "--no-evaluate", "--overwrite")
        meta = json.loads((model / "metrics.json").read_text())
        from cxr.scope.reference import load_reference

        save("train", {**r, "ensemble": args.ensemble, "ood": meta["ood"],
                       "calibration": [float(v) for v in load_reference(model).calibration]})
    todo = "score" in args.redo or "score" not in st
    files, inscope = in_scope_files(pre, WORK / "inscope" if todo else None), WORK / "inscope"
    if todo:
        res = {}
        for name, src in (("inscope", inscope), ("material", material)):
            shutil.rmtree(WORK / f"pred-{name}", ignore_errors=True)
            r = job(f"score-{name}", "score", "--conf", "recommended", "--input", src, "--model", model,
                    "--output", WORK / f"pred-{name}", "--no-tracking")
            res[name] = {**r, "files": outcomes(WORK / f"pred-{name}", src)}
        save("score", {**res, "parquet_distances": parquet_distances(pre, model)})
    if "cost" in args.redo or "cost" not in st:
        shared = sorted((SHARED / "dicom").glob("*.dcm"))
        written = sorted(p for p in material.rglob("*.dcm") if not p.parent.name.startswith("pydicom"))
        save("cost", costs(model, files["val"] + files["test"], shared + written, len(shared), args.rounds))


def pct(a: int, n: int) -> str:
    return f"{100 * a / n:.1f}% ({a}/{n})" if n else "n/a"


def report(args, st: dict) -> str:
    import csv

    import numpy as np

    from cxr.quality.out_of_scope import KINDS, MANIFEST

    kinds = {r["relative_path"]: r["kind"] for r in csv.DictReader(open(WORK / "material" / MANIFEST))}
    tr, sc, co = st["train"], st["score"], st["cost"]
    ood, inside, thr = tr["ood"], sc["inscope"]["files"], tr["ood"]["threshold"]
    shrink = ", ".join(f"{r['shrinkage']:.3f}" for r in ood["layers"])
    d_in = np.array([v["distance"] for v in inside.values()])
    auroc = lambda d: float(np.mean(np.asarray(d)[None, :] > d_in[:, None]))  # noqa: E731 (P(farther than in-scope))
    lines = [SECTION, "", f"Measured {st['date']} on {machine()}, shared with other developers' jobs; "
             f"{st['minutes']:.1f} min in all. Python {st['versions']['python']}, onnxruntime "
             f"{st['versions'].get('onnxruntime', '?')}, pydicom {st['versions'].get('pydicom', '?')}. Model: the "
             f"recommended profile (96 px `pad`, CNN + Adam, 10 epochs, seed ensemble of {tr['ensemble']}) trained by "
             "`jobs/train.py` on the 450 shared X-rays split by patient; its OOD reference: the "
             f"{ood['dims']} features of model.onnx in {len(ood['layers'])} layers of "
             f"{', '.join(str(r['dims']) for r in ood['layers'])} dims (each conv block's activations averaged over "
             "the image, then the penultimate activations; a layer pools that layer of every member), one Mahalanobis "
             "distance per layer (Ledoit-Wolf, shrinkage "
             f"{shrink}) "
             f"fitted on {ood['n_train']} train images, each divided by its median out-of-fold distance, summed; "
             f"threshold **{thr:.2f}** = the {100 * ood['quantile']:.1f}% quantile of {ood['n_calibration']} scores "
             f"({ood['threshold_on']}). Scored by `jobs/score.py` (raw files, scope.ood: flag, local[2]).", "",
             "**In-scope images** (goal: <= 2% of val and test flagged):", "",
             "| split | images | flagged out of distribution | median / max distance |", "|---|---|---|---|"]
    d = sc["parquet_distances"]["train"]
    lines.append(f"| train (the reference's own images; preprocess Parquet, not scored) | {len(d)} | "
                 f"{pct(sum(x > thr for x in d), len(d))} | {np.median(d):.2f} / {max(d):.2f} |")
    for split in ("val", "test", None):
        rs = [v for k, v in inside.items() if split is None or k.startswith(split + "/")]
        d = [v["distance"] for v in rs]
        lines.append(f"| {split or '**val + test** (scored files)'} | {len(rs)} | "
                     f"**{pct(sum(v['outcome'] == 'ood' for v in rs), len(rs))}** | {np.median(d):.2f} / {max(d):.2f} |")
    flagged = sorted((k for k, v in inside.items() if v["outcome"] == "ood"), key=lambda k: -inside[k]["distance"])
    lines += ["", "Flagged: " + (", ".join(f"`{k}` ({inside[k]['distance']:.1f})" for k in flagged) or "none") +
              f". The threshold rests on {ood['n_calibration']} scores: each train image's from a reference fitted "
              f"on the other {ood['folds'] - 1} of {ood['folds']} folds, and the val images'; the train row above "
              "is the final reference's own images, test is the independent check.", "",
              "**Out-of-scope material** (`cxr.quality.out_of_scope`; goal: >= 95% caught). AUROC: the chance that "
              "a file of the kind lies farther than an in-scope val/test image (1 = always, 0.5 = no better than "
              "chance).", "", "| kind | group | files | caught by the header rules | caught by the OOD distance | "
              "rejected by the decoder | missed (scored as in distribution) | **caught** | median distance | AUROC |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    mat, groups = sc["material"]["files"], {"header-rule kinds (a, c)": [], "OOD-only kinds (b, d, e)": [], "all": []}

    def row(name, group, rs):
        c = {o: sum(r["outcome"] == o for r in rs) for o in ("header", "ood", "decoder", "missed")}
        d = [r["distance"] for r in rs if r.get("distance") is not None]
        return (f"| {name} | {group} | {len(rs)} | {c['header']} | {c['ood']} | {c['decoder']} | {c['missed']} | "
                f"**{pct(sum(c.values()) - c['missed'], len(rs))}** | {f'{np.median(d):.1f}' if d else '-'} | "
                f"{f'{auroc(d):.2f}' if d else '-'} |")
    for kind, spec in KINDS.items():
        rs = [mat.get(p, {"outcome": "absent"}) for p, k in kinds.items() if k == kind]
        if rs:
            lines.append(row(kind, spec.group, rs))
            groups["all"].extend(rs)
            groups["header-rule kinds (a, c)" if spec.catch == "header" else "OOD-only kinds (b, d, e)"].extend(rs)
    lines += [row(f"**{name}**", "", rs) for name, rs in groups.items()]
    d_out = [r["distance"] for r in groups["OOD-only kinds (b, d, e)"]]
    t95, t2 = np.quantile(d_out, 0.05), np.quantile(d_in, 0.98)
    lines += ["", f"No threshold meets both goals on the OOD-only kinds: catching 95% of them takes a threshold of "
              f"{t95:.2f}, which flags **{pct(sum(d > t95 for d in d_in), len(d_in))}** of the in-scope val + test "
              f"images; flagging <= 2% of those ({t2:.2f}) catches **{pct(sum(d > t2 for d in d_out), len(d_out))}** "
              "of the OOD-only files." if t95 < t2 else "A threshold between "
              f"{t2:.2f} and {t95:.2f} would meet both goals on this material."]
    cal = tr.get("calibration") or []
    if cal:
        alt = [(q, float(np.quantile(cal, q))) for q in (0.99, 0.98, 0.95) if q < ood["quantile"]]
        lines += ["", "Other values of `scope.ood_quantile` (the threshold from the same calibration scores): " +
                  "; ".join(f"{q} gives {t:.2f}, which flags {pct(sum(d > t for d in d_in), len(d_in))} of the "
                            f"in-scope val + test images and catches {pct(sum(d > t for d in d_out), len(d_out))} of the "
                            "OOD-only files" for q, t in alt) + "."]
    h = co["header_ms"]
    dist_ms = co["onnx_ms"]["with"] - co["onnx_ms"]["without"]
    lines += ["", f"**Cost per image, one core** (CPU; goal: each < 5% of the per-image score cost). Score cost: "
              f"read, sha256, scope gate, decode, CLAHE, 96 px, ONNX with the distance (batch {BATCH}, 1 thread) "
              f"over the {co['files']} val + test files in one process: **{co['score_ms']:.1f} ms**.", "",
              "| step | ms per image | share of the score cost |", "|---|---|---|",
              f"| header read (`HeaderReader.read`), {len(h)} DICOMs: mean (max) | {np.mean(list(h.values())):.3f} "
              f"({max(h.values()):.3f}) | **{100 * np.mean(list(h.values())) / co['score_ms']:.2f}%** "
              f"({100 * max(h.values()) / co['score_ms']:.2f}%) |",
              f"| ONNX without the ood_distance output | {co['onnx_ms']['without']:.3f} | "
              f"{100 * co['onnx_ms']['without'] / co['score_ms']:.1f}% |",
              f"| ONNX with it | {co['onnx_ms']['with']:.3f} | {100 * co['onnx_ms']['with'] / co['score_ms']:.1f}% |",
              f"| **the distance** (with - without) | {dist_ms:.3f} | **{100 * dist_ms / co['score_ms']:.2f}%** |", "",
              f"Header reads: the bytes in memory (the job reads them anyway), the {co['shared_dicoms']} DICOMs of "
              f"../shared/data/dicom and the {len(h) - co['shared_dicoms']} written ones (group c), 20 reads each. "
              f"ONNX: the {co['images']} val + test images repeated to >= 512 a round, the two graphs alternated. "
              f"Fastest of {args.rounds} rounds each. The score cost is that of JPEG/PNG files (a DICOM's decode costs "
              f"more), so the shares are upper bounds. Runs: preprocess {st['preprocess']['wall_s']:.0f} s, train "
              f"{tr['wall_s'] / 60:.1f} min ({tr['cpu_s'] / 60:.1f} CPU min), score in-scope "
              f"{sc['inscope']['wall_s']:.0f} s, score material {sc['material']['wall_s']:.0f} s.", "",
              f"Reproduce: `{st['command']}` (inputs, model and results cached in {WORK}; `--redo train score cost` "
              "retrains and measures again).", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    state = WORK / "results.json"
    st = json.loads(state.read_text()) if state.is_file() else {}

    def save(key, value):
        st[key] = value
        st.update(date=time.strftime("%Y-%m-%d"), versions=versions(("onnxruntime", "pydicom", "pyspark")))
        WORK.mkdir(parents=True, exist_ok=True)
        state.write_text(json.dumps(st, indent=1, default=str))
    if not args.report_only:
        t0 = time.perf_counter()
        measure(args, st, save)
        save("command", ".venv/bin/python scripts/bench_scope.py" + "".join(f" {a}" for a in (argv or sys.argv[1:])))
        save("minutes", (time.perf_counter() - t0) / 60)
    from cxr.common.markdown import publish, replace_section

    section = report(args, st)
    publish(section, Path(args.out), SECTION, write=not args.no_write)
    if not args.no_write:
        replace_section(Path(args.doc), "## Measurement", section.replace(SECTION, "## Measurement", 1),
                        title="# Scope gate and out-of-distribution score")
    return 0


if __name__ == "__main__":
    sys.exit(main())
