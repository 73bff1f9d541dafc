"""The benchmarks' inputs and measurements, made once and kept under CACHE: synthetic archives take hours to
render, models minutes to build, and a long benchmark must be able to resume after a crash or a trimmed run.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

CACHE = Path("/tmp/cxr-bench")   # generated inputs and measurements, made once and reused
BASES = 200   # rendered radiographs of a synthetic archive; every file is one of them flipped/shifted/re-exposed


def cached(path: Path, build: Callable[[Path], Any], marker: Path | None = None) -> Path:
    """path, built by build(path) only when marker (default: path itself) is missing. build writes marker
    last, so an input whose making was cut short is made again rather than measured half-made."""
    path, marker = Path(path), Path(marker or path)
    if not marker.exists():
        build(path)
        if not marker.exists():
            raise RuntimeError(f"building {path} did not leave {marker}")
    return path


class State:
    """Measurements kept in one JSON file, each saved as soon as it is made: a crash or a trimmed rerun keeps
    what was done, --redo KEY (or its part, the text before ':') measures it again, and the report can be
    written again from the file without measuring anything."""

    def __init__(self, path: Path, redo=()):
        self.path, self.redo = Path(path), {str(r) for r in redo}
        self.data: dict = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def done(self, key: str) -> bool:
        return key in self.data and key not in self.redo and key.split(":", 1)[0] not in self.redo

    def save(self, key: str, value, **also) -> None:
        """data[key] = value (and the `also` keys, e.g. the date), written atomically."""
        self.data[key] = value
        self.data.update(also)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        os.replace(tmp, self.path)


def job_config(overrides: dict | None = None, pre: dict | None = None) -> dict:
    """conf/default.yaml as the jobs use it (dotted overrides, then preprocess keys), the console progress bar
    off: it adds noise to the bench's output, not work."""
    from cxr.config import load_config

    config = load_config(overrides=overrides)
    config["spark"]["conf"]["spark.ui.showConsoleProgress"] = False
    config["preprocess"].update(pre or {})
    return config


# ----------------------------------------------------------------------------- files
def linked_subset(src: Path, n: int, name: str) -> Path:
    """The first n files of src by index (classes take turns, so they stay balanced), hard-linked under
    CACHE/name: no copy, the same bytes and modification times."""
    out = CACHE / name
    files = sorted((p for p in src.rglob("*") if p.is_file() and not p.name.startswith(".")),
                   key=lambda p: (p.stem.rsplit("_", 1)[-1], p.name))[:n]
    wanted = {f.relative_to(src) for f in files}
    if out.is_dir() and {p.relative_to(out) for p in out.rglob("*") if p.is_file()} == wanted:
        return out
    shutil.rmtree(out, ignore_errors=True)
    for f in files:
        dest = out / f.relative_to(src)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.link(f, dest)
    return out


def input_files(root: Path, pre: dict) -> list[str]:
    """The files the jobs read under root: the jobs' own listing (extensions, excluded folders, size limits)."""
    from cxr.score.incremental import list_archive

    listing = list_archive(f"file:{Path(root).resolve()}", list(pre["extensions"]), list(pre.get("exclude_dirs") or []),
                           int(float(pre["max_file_mb"]) * 1024 * 1024))
    return sorted(p[len("file:"):] for p in listing.loc[listing["kind"] == "read", "path"])


def describe_files(files: list[str]) -> dict:
    """How many files, their MB and their kinds ({"JPG": n, "PNG": m}): the input line of a report."""
    kinds: dict[str, int] = {}
    for f in files:
        ext = os.path.splitext(f)[1].lower().replace(".jpeg", ".jpg").lstrip(".").upper()
        kinds[ext] = kinds.get(ext, 0) + 1
    return {"files": len(files), "mb": sum(os.path.getsize(f) for f in files) / 1e6, "kinds": kinds}


def kinds_text(kinds: dict[str, int]) -> str:
    """"27 JPG + 33 PNG" (also reads the older ".jpg" keys of saved measurements)."""
    return " + ".join(f"{n} {k.lstrip('.').upper()}" for k, n in sorted(kinds.items()))


# ----------------------------------------------------------------------------- synthetic archives
def _derive_files(job):
    """Render base radiograph b once, then write every file i with i % BASES == b: a random flip, shift and
    exposure of it, as 8-bit PNG or JPEG (55/45, cxr.datasets.synth.generate_archive's mix for plain images)."""
    import cv2
    import numpy as np

    from cxr.datasets.synth import CLASSES, render_chest

    b, indices, size, seed, out = job
    cls = CLASSES[b % len(CLASSES)]
    todo = []
    for i in indices:
        rng = np.random.default_rng([seed, i])
        ext = ".png" if rng.random() < 0.55 else ".jpg"
        path = Path(out, cls, f"{cls.lower()}_{i:05d}{ext}")
        if not path.is_file():
            todo.append((i, rng, path))
    if not todo:
        return 0
    base = np.round(render_chest(cls, size, np.random.default_rng([seed, 10**6 + b])) * 255.0).astype(np.uint8)
    for i, rng, path in todo:
        img = base[:, ::-1] if rng.random() < 0.5 else base
        img = np.roll(img, (int(rng.integers(-24, 25)), int(rng.integers(-24, 25))), axis=(0, 1))
        img = cv2.convertScaleAbs(img, alpha=float(rng.uniform(0.85, 1.15)), beta=float(rng.uniform(-12, 12)))
        ok, data = cv2.imencode(path.suffix, img)
        if not ok:
            raise RuntimeError(f"could not encode {path}")
        tmp = path.with_name("." + path.name + ".tmp")  # hidden and not an image extension while being written
        tmp.write_bytes(data.tobytes())
        os.replace(tmp, path)
    return len(todo)


def synthetic_archive(n: int, size: int = 1024, seed: int = 0) -> Path:
    """n files in class folders under CACHE: BASES radiographs rendered by cxr.datasets.synth.render_chest (0.7 s
    each at 1024 px, too slow to render 20,000), every file its own flip/shift/exposure of one of them. Made once;
    resumable (files already written are kept)."""
    out = CACHE / f"score-synth-{size}px-{n}-seed{seed}"
    marker = out.with_name(out.name + ".done.json")
    if not out.is_dir():
        marker.unlink(missing_ok=True)   # the marker of an archive since deleted
    return cached(out, lambda _: _render_archive(out, marker, n, size, seed), marker)


def _render_archive(out: Path, marker: Path, n: int, size: int, seed: int) -> None:
    from cxr.datasets.synth import CLASSES

    for cls in CLASSES:
        (out / cls).mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    jobs = [(b, list(range(b, n, BASES)), size, seed, str(out)) for b in range(min(BASES, n))]
    done = 0
    with mp.get_context("spawn").Pool(2) as pool:
        for k, written in enumerate(pool.imap_unordered(_derive_files, jobs)):
            done += written
            if k % 20 == 0:
                print(f"  generating {out.name}: {k + 1}/{len(jobs)} bases, {done} files written "
                      f"({time.perf_counter() - t0:.0f} s)", flush=True)
    marker.write_text(json.dumps({"n": n, "size": size, "seed": seed, "bases": BASES,
                                  "seconds": time.perf_counter() - t0}))
    print(f"generated {n} files in {out} ({time.perf_counter() - t0:.0f} s)", flush=True)


# ----------------------------------------------------------------------------- models
def random_cnn(size: int) -> Path:
    """The study CNN (train.keras.cnn of conf/default.yaml) at size x size with random weights (seed 0), saved
    with store.save_keras + model.onnx: a model to time, not to trust. Built once, in a child process, so that
    TensorFlow never loads into the bench's own process (it would weigh on the driver's measured RSS)."""
    import sys

    from cxr.common.bench.runs import run_child

    d = CACHE / "models" / f"cnn-{size}px-random"
    code = f"from cxr.common.bench.inputs import build_random_cnn; build_random_cnn({int(size)})"
    return cached(d, lambda _: run_child([sys.executable, "-c", code], CACHE / "logs" / "bench-model.log",
                                         answer=False, append=True), d / "model.onnx")


def build_random_cnn(size: int) -> dict:
    """random_cnn's build, in the child process."""
    import keras

    from cxr.image.pipeline import PreprocessParams
    from cxr.models import store
    from cxr.models.keras_models import build
    from cxr.models.onnx_export import export_onnx

    config = job_config({"preprocess.size": size})
    d = CACHE / "models" / f"cnn-{size}px-random"
    shutil.rmtree(d, ignore_errors=True)
    keras.utils.set_random_seed(0)
    model = build("cnn", (size, size, 1), config["train"]["keras"]["cnn"])
    meta = {"name": f"cnn-{size}px-random", "classes": ["COVID", "NORMAL", "VIRAL"],
            "preprocess": PreprocessParams.from_config(config["preprocess"]).to_dict(),
            "input": {"data_size": [size, size], "model_size": [size, size]},
            "note": "random init weights: for throughput only"}
    store.save_keras(model, d, meta)
    export_onnx(d)
    return {"dir": str(d), "params": int(model.count_params())}
