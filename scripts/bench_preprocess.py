#!/usr/bin/env python
"""Images/s of the Spark preprocess job (local[2]) against a plain multiprocessing.Pool(2) loop, same files.

Both sides call the same per-image function, cxr.image.batch.process_file (read bytes -> sha256 ->
preprocess_bytes: decode, CLAHE, brightness, resize -> one row), and both end with Parquet on disk:

    Pool(2)  files -> imap_unordered(process_file) -> pyarrow ParquetWriter (zstd), in the parent
    Spark    cxr.spark.preprocess.run(): binaryFile -> mapInPandas(process_frame) -> staging Parquet ->
             dedup / split / repartition -> images, errors, duplicates Parquet + manifest.json

Timed: wall clock from "files on disk" to "Parquet written", warm on both sides. The Spark session is
started and a warm-up run() on 6 images is done first (JVM, Python workers and their imports are ready,
as in a long-lived session); the Pool is created and its workers have imported everything before its
clock starts. Start-up costs are reported separately. Each input is run --rounds times per side, the
order rotated every round, and the median is kept (the machine is shared: single timings are noisy).

Spark runs in child processes, one per configuration: conf/default.yaml as the job uses it, and a
"tuned" one (--tuned, default: larger file partitions and the JVM's C1 JIT only), because JVM options
only apply when a JVM starts. CPU seconds of the workers and of the driver JVM are read from /proc, to
show where the time goes: on 2 cores the JVM competes with the Python workers for the same CPUs.

Peak memory of the Python workers is polled from /proc (psutil is not a dependency): VmHWM of the
Pool's children, and of the pyspark.daemon / worker processes under each JVM. It is measured at two
input sizes (--images and a quarter of it) to show that it does not grow with the number of images.

    python scripts/bench_preprocess.py               # 600 synthetic 1024x1024 images + ../shared/data/cxr
    python scripts/bench_preprocess.py --quick       # 60 images at 512 px, nothing written: does it work?
    python scripts/bench_preprocess.py --tuned spark.sql.shuffle.partitions=4   # try other settings
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # also runs in the Pool's spawned children, which import this module

SECTION = "## Preprocess: Spark vs multiprocessing.Pool (scripts/bench_preprocess.py)"
SHARED = ROOT.parent / "shared" / "data" / "cxr"
MASTER = "local[2]"
WORKERS = 2
# The tuning finding: on 2 cores the driver JVM competes with the Python workers for CPU. Fewer, larger file
# tasks (41 -> 11 for 600 images: less per-task set-up in the JVM and the workers) and the JVM's quick C1 JIT
# only (its optimising C2 compiler keeps compiling Spark's code for minutes) cut the JVM's CPU by ~40%.
DEFAULT_TUNED = ["spark.sql.files.maxPartitionBytes=268435456", "spark.driver.extraJavaOptions=-XX:TieredStopAtLevel=1"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=600, help="synthetic images (a quarter of them is the small run)")
    p.add_argument("--size", type=int, default=1024, help="side of the synthetic images in pixels")
    p.add_argument("--rounds", type=int, default=3, help="timed runs per side and input (median kept)")
    p.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"), help="BENCHMARKS.md to update")
    p.add_argument("--skip-shared", action="store_true", help=f"do not run on {SHARED}")
    p.add_argument("--quick", action="store_true",
                   help="60 images at 512 px, 1 round, no shared data, BENCHMARKS.md untouched")
    p.add_argument("--no-write", action="store_true", help="print only")
    p.add_argument("--conf", action="append", default=[], metavar="KEY=VALUE",
                   help="extra Spark setting for the experiment (repeatable), e.g. "
                        "spark.sql.execution.arrow.maxRecordsPerBatch=64")
    p.add_argument("--tuned", action="append", default=None, metavar="KEY=VALUE",
                   help="settings of a second Spark configuration measured in the same run "
                        f"(default: {' '.join(DEFAULT_TUNED)}, see DEFAULT_TUNED)")
    p.add_argument("--no-tuned", action="store_true", help="measure the default Spark configuration only")
    p.add_argument("--json", help="also write the raw measurements here")
    p.add_argument("--serve-spark", help=argparse.SUPPRESS)
    p.add_argument("--reply-fd", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.tuned is None:
        args.tuned = list(DEFAULT_TUNED)
    if args.quick:
        args.images, args.size, args.rounds, args.no_write, args.skip_shared = 60, 512, 1, True, True
    return args


# ----------------------------------------------------------------------------- input data
def _render_one(job):
    """Draw one synthetic radiograph and write it as 8-bit PNG or JPEG (55/45, like cxr.synth)."""
    import cv2
    import numpy as np

    from cxr.synth import CLASSES, render_chest

    index, size, seed, out = job
    cls = CLASSES[index % len(CLASSES)]
    rng = np.random.default_rng([seed, index])
    ext = ".png" if rng.random() < 0.55 else ".jpg"
    pixels = np.round(render_chest(cls, size, rng) * 255.0).astype(np.uint8)
    path = Path(out, cls, f"{cls.lower()}_{index:05d}{ext}")
    if not cv2.imwrite(str(path), pixels):
        raise RuntimeError(f"could not write {path}")
    return str(path)


def synthetic_input(n: int, size: int, seed: int = 0) -> Path:
    """n images of size x size in class folders, made once and cached (rendering 1024 px takes ~0.5 s each).

    Written with render_chest + cv2.imwrite on 2 processes rather than cxr.synth.generate_archive, which
    renders one image at a time and adds DICOM/16-bit/broken files that are not the point here."""
    out = CACHE / f"synth-{size}px-{n}-seed{seed}"
    marker = out.with_name(out.name + ".done.json")
    if marker.is_file() and out.is_dir():
        return out
    shutil.rmtree(out, ignore_errors=True)
    from cxr.synth import CLASSES

    for cls in CLASSES:
        (out / cls).mkdir(parents=True)
    t0 = time.perf_counter()
    with mp.get_context("spawn").Pool(WORKERS) as pool:
        paths = pool.map(_render_one, [(i, size, seed, str(out)) for i in range(n)], chunksize=4)
    marker.write_text(json.dumps({"n": n, "size": size, "seed": seed, "seconds": time.perf_counter() - t0}))
    print(f"generated {len(paths)} images of {size}x{size} in {out} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return out


# ----------------------------------------------------------------------------- memory of the workers
# /proc helpers shared with the other bench scripts: cxr/bench.py
from cxr.bench import (CACHE, POOL_WORKERS, SPARK_JVM, SPARK_WORKERS, WorkerMemory, cpu_delta,  # noqa: E402
                       cpu_seconds, input_files, linked_subset, versions)


# ----------------------------------------------------------------------------- the plain Pool side
_STATE: dict = {}


def _pool_init(pre: dict, root: str):
    """Runs once in each Pool worker: the same imports and parameters a Spark worker ends up with."""
    from cxr.image.batch import process_file
    from cxr.image.pipeline import PreprocessParams
    from cxr.labels import alias_table

    _STATE.update(fn=process_file, params=PreprocessParams.from_config(pre), aliases=alias_table(pre["labels"]),
                  root=root)


def _pool_task(path: str) -> dict:
    """The Pool's per-image step: read the file, then exactly what the Spark UDF does with each row."""
    with open(path, "rb") as f:
        content = f.read()
    return _STATE["fn"](path, content, _STATE["root"], _STATE["params"], _STATE["aliases"])


def _ready(_):
    time.sleep(0.2)  # long enough that both workers take one: both have run their initializer
    return os.getpid()


def _arrow_schema():
    import pyarrow as pa

    from cxr.image.batch import COLUMNS

    ints = {"height", "width", "orig_height", "orig_width"}
    return pa.schema([(c, pa.binary() if c == "image" else pa.int32() if c in ints else pa.string())
                      for c in COLUMNS])


def run_pool(files: list[str], root: Path, pre: dict, out: Path, chunksize: int = 4) -> dict:
    """Pool(2) over the files, rows streamed into one Parquet file as they come back. Timed warm."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    schema = _arrow_schema()
    t0 = time.perf_counter()
    with WorkerMemory(POOL_WORKERS) as mem, \
            mp.get_context("spawn").Pool(WORKERS, initializer=_pool_init, initargs=(pre, str(root))) as pool:
        pool.map(_ready, range(WORKERS), chunksize=1)
        cpu0, parent0 = cpu_seconds(POOL_WORKERS), time.process_time()
        started = time.perf_counter()
        counts: dict[str, int] = {}
        with pq.ParquetWriter(out / "part-0.parquet", schema, compression="zstd") as writer:
            batch = []
            for row in pool.imap_unordered(_pool_task, files, chunksize=chunksize):
                counts[row["status"]] = counts.get(row["status"], 0) + 1
                batch.append(row)
                if len(batch) == 32:
                    writer.write_table(pa.Table.from_pylist(batch, schema))
                    batch = []
            if batch:
                writer.write_table(pa.Table.from_pylist(batch, schema))
        seconds = time.perf_counter() - started
        cpu = {"workers": cpu_delta(cpu0, cpu_seconds(POOL_WORKERS)), "driver": time.process_time() - parent0}
    return {"seconds": seconds, "startup_s": started - t0, "counts": counts, "peak_rss_mb": mem.peak_mb,
            "workers_seen": len(mem.peaks), "cpu_s": cpu}


# ----------------------------------------------------------------------------- the Spark side
def bench_config() -> dict:
    """conf/default.yaml as the job uses it; only the console progress bar is off (it adds noise, not work)."""
    from cxr.config import load_config

    config = load_config()
    config["spark"]["conf"]["spark.ui.showConsoleProgress"] = False
    return config


def start_spark(config: dict, extra_conf: dict):
    from cxr.spark.session import get_spark

    t0 = time.perf_counter()
    spark = get_spark(config, master=MASTER, app_name="bench-preprocess", extra_conf=extra_conf)
    return spark, time.perf_counter() - t0


def run_spark(spark, input_dir: Path, config: dict, out: Path) -> dict:
    """cxr.spark.preprocess.run() on a warm session, wall clock around the call (output removed first)."""
    from cxr.spark.preprocess import run

    shutil.rmtree(out, ignore_errors=True)
    with WorkerMemory(SPARK_WORKERS) as mem:
        cpu0, jvm0 = cpu_seconds(SPARK_WORKERS), cpu_seconds(SPARK_JVM)
        t0 = time.perf_counter()
        result = run(spark, str(input_dir), str(out), config)
        seconds = time.perf_counter() - t0
        cpu = {"workers": cpu_delta(cpu0, cpu_seconds(SPARK_WORKERS)),
               "driver": cpu_delta(jvm0, cpu_seconds(SPARK_JVM))}
    return {"seconds": seconds, "counts": result["counts"], "timings_s": result["timings_s"],
            "peak_rss_mb": mem.peak_mb, "workers_seen": len(mem.peaks), "cpu_s": cpu}


def serve_spark(extra_conf: dict, reply_fd: int) -> int:
    """Child process: one Spark configuration, driven by JSON lines on stdin, answers on reply_fd.

    Each configuration gets its own process (and JVM) because JVM options such as
    spark.driver.extraJavaOptions only take effect when the JVM starts."""
    import traceback

    logging_quiet()
    config = bench_config()
    spark = None
    with os.fdopen(reply_fd, "w") as replies:
        for line in sys.stdin:
            req = json.loads(line)
            try:
                if req["cmd"] == "session":  # a fresh SparkContext (fresh Python workers), then the warm-up
                    if spark is not None:
                        spark.stop()
                    spark, session_s = start_spark(config, extra_conf)
                    warm = run_spark(spark, Path(req["warmup"]), config, Path(req["out"]))
                    reply = {"session_s": session_s, "warmup_s": warm["seconds"],
                             "warmup_files": warm["counts"]["input"]}
                else:
                    reply = run_spark(spark, Path(req["input"]), config, Path(req["out"]))
            except Exception:
                reply = {"error": traceback.format_exc()}
            replies.write(json.dumps(reply) + "\n")
            replies.flush()
    if spark is not None:
        spark.stop()
    return 0


class SparkChild:
    """The parent's handle on one serve_spark process; its Spark/JVM output goes to a log file."""

    def __init__(self, label: str, extra_conf: dict):
        self.label, self.extra_conf = label, extra_conf
        self.log = CACHE / "logs" / f"spark-{re.sub(r'[^a-z0-9]+', '-', label.lower()).strip('-')}.log"
        self.log.parent.mkdir(parents=True, exist_ok=True)
        read_fd, write_fd = os.pipe()
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), "--serve-spark", json.dumps(extra_conf),
                 "--reply-fd", str(write_fd)], stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT,
                pass_fds=(write_fd,), text=True, cwd=ROOT)
        os.close(write_fd)
        self.replies = os.fdopen(read_fd)

    def call(self, **request) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.replies.readline()
        if not line:
            raise RuntimeError(f"{self.label} process ended; see {self.log}")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"{self.label} failed:\n{reply['error']}")
        return reply

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=300)
        self.replies.close()


# ----------------------------------------------------------------------------- one input, every side
def bench_input(name: str, input_dir: Path, pre: dict, sparks: list[SparkChild], rounds: int, warmup: Path) -> dict:
    """A fresh SparkContext per input and configuration (so the workers' VmHWM starts clean), then the
    sides in turn, the order rotated each round so that each side goes first once in 3 rounds."""
    files = input_files(input_dir, pre)
    print(f"\n== {name}: {len(files)} files in {input_dir}", flush=True)
    sides = ["Pool"] + [s.label for s in sparks]
    by_label = {s.label: s for s in sparks}
    runs: dict[str, list[dict]] = {side: [] for side in sides}
    sessions = {}
    for s in sparks:
        sessions[s.label] = s.call(cmd="session", warmup=str(warmup), out=str(CACHE / "out" / "spark-warmup"))
        print(f"   {s.label}: session {sessions[s.label]['session_s']:.1f} s, warm-up run() on "
              f"{sessions[s.label]['warmup_files']} files {sessions[s.label]['warmup_s']:.1f} s", flush=True)
    loads = []
    for r in range(rounds):
        for side in sides[r % len(sides):] + sides[:r % len(sides)]:
            loads.append(os.getloadavg()[0])
            out = CACHE / "out" / re.sub(r"[^a-z0-9]+", "-", f"{side}-{name}".lower())
            if side == "Pool":
                res = run_pool(files, input_dir, pre, out)
            else:
                res = by_label[side].call(cmd="run", input=str(input_dir), out=str(out))
            runs[side].append(res)
            print(f"   round {r + 1} {side:12s} {res['seconds']:6.2f} s {len(files) / res['seconds']:6.1f} img/s"
                  f"  CPU s: workers {res['cpu_s']['workers']:5.1f}, {'JVM' if side != 'Pool' else 'parent'} "
                  f"{res['cpu_s']['driver']:5.1f}  peak worker RSS {res['peak_rss_mb']:.0f} MB"
                  + (f"  stages {res['timings_s']}" if side != "Pool" else ""), flush=True)
    med = statistics.median
    kinds: dict[str, int] = {}
    for f in files:
        ext = os.path.splitext(f)[1].lower().replace(".jpeg", ".jpg")
        kinds[ext] = kinds.get(ext, 0) + 1
    result = {"name": name, "input": str(input_dir), "files": len(files), "rounds": rounds, "loadavg": loads,
              "mb": sum(os.path.getsize(f) for f in files) / 1e6, "kinds": kinds, "sides": {}}
    for side in sides:
        rs = runs[side]
        result["sides"][side] = {
            "seconds": med(x["seconds"] for x in rs), "all_s": [round(x["seconds"], 2) for x in rs],
            "cpu_workers_s": med(x["cpu_s"]["workers"] for x in rs),
            "cpu_driver_s": med(x["cpu_s"]["driver"] for x in rs),
            "peak_rss_mb": max(x["peak_rss_mb"] for x in rs), "counts": rs[0]["counts"],
            **({"startup_s": med(x["startup_s"] for x in rs)} if side == "Pool" else
               {"stages_s": {k: med(x["timings_s"][k] for x in rs) for k in rs[0]["timings_s"]}, **sessions[side]}),
        }
    pool = result["sides"]["Pool"]
    for side in sides:
        result["sides"][side]["ips"] = len(files) / result["sides"][side]["seconds"]
        result["sides"][side]["ratio"] = pool["seconds"] / result["sides"][side]["seconds"]
    ok = pool["counts"].get("ok", 0)
    for s in sparks:
        c = result["sides"][s.label]["counts"]
        if ok != c["written"] + c["duplicates"] or len(files) != c["input"]:
            print(f"   WARNING: {s.label} saw other files than the Pool: {c} vs {pool['counts']}", flush=True)
    return result


# ----------------------------------------------------------------------------- report
def tables(results: list[dict], labels: list[str]) -> list[str]:
    sparks = labels[1:]
    head = ("| input | files | Pool(2) s | " + " | ".join(f"{l} s" for l in sparks) + " | Pool img/s | "
            + " | ".join(f"{l} img/s | **ratio {l}/Pool**" for l in sparks) + " |")
    rows = [head, "|---|---|---|" + "---|" * len(sparks) + "---|" + "---|---|" * len(sparks)]
    for r in results:
        sd = r["sides"]
        rows.append(f"| {r['name']} | {r['files']} | {sd['Pool']['seconds']:.1f} | "
                    + " | ".join(f"{sd[l]['seconds']:.1f}" for l in sparks) + f" | {sd['Pool']['ips']:.1f} | "
                    + " | ".join(f"{sd[l]['ips']:.1f} | **{sd[l]['ratio']:.2f}**" for l in sparks) + " |")
    rows += ["", "Where the CPU goes (median CPU seconds per run, from /proc: Python workers + the parent or the "
             "driver JVM), Spark's decode stage (read + preprocess + staging Parquet, from run()'s own timings) "
             "and the peak RSS of one Python worker:", "",
             "| input | Pool CPU s workers + parent | " + " | ".join(f"{l} CPU s workers + JVM" for l in sparks)
             + " | " + " | ".join(f"{l} decode stage s" for l in sparks) + " | peak worker RSS MB: Pool / "
             + " / ".join(sparks) + " |",
             "|---|---|" + "---|" * (2 * len(sparks)) + "---|"]
    for r in results:
        sd = r["sides"]
        rows.append(f"| {r['name']} | {sd['Pool']['cpu_workers_s']:.1f} + {sd['Pool']['cpu_driver_s']:.1f} | "
                    + " | ".join(f"{sd[l]['cpu_workers_s']:.1f} + {sd[l]['cpu_driver_s']:.1f}" for l in sparks) + " | "
                    + " | ".join(f"{sd[l]['stages_s']['decode']:.1f}" for l in sparks) + " | "
                    + " / ".join(f"{sd[l]['peak_rss_mb']:.0f}" for l in labels) + " |")
    return rows


def interpretation(results: list[dict], labels: list[str]) -> str:
    small, big = results[0], results[1]
    base = big["sides"][labels[1]]
    pool = big["sides"]["Pool"]
    text = (f"On {big['files']} images Spark (default conf) runs at **{base['ratio']:.2f}x** the plain Pool "
            f"({'meets' if base['ratio'] >= 0.9 else 'misses'} the 0.9x goal): its Python workers use about the "
            f"Pool's CPU ({base['cpu_workers_s']:.0f} s vs {pool['cpu_workers_s']:.0f} s) but the driver JVM adds "
            f"{base['cpu_driver_s']:.0f} s of CPU on the same 2 cores (JIT compilation, per-task set-up, planning and "
            f"the ~34 stages of run(): listing, staging write, dedup, repartition, verify)")
    if len(labels) > 2:
        tuned = big["sides"][labels[2]]
        text += (f"; {labels[2]} cuts the JVM to {tuned['cpu_driver_s']:.0f} s and reaches "
                 f"**{tuned['ratio']:.2f}x**")
    rss = " / ".join(f"{l} {small['sides'][l]['peak_rss_mb']:.0f} -> {big['sides'][l]['peak_rss_mb']:.0f} MB"
                     for l in labels)
    return (text + f". Peak worker RSS does not grow with the input ({small['files']} -> {big['files']} images: "
            f"{rss}).")


def report(args, results: list[dict], labels: list[str], tuned_conf: dict, wall: float) -> str:
    v = versions()
    loads = [x for r in results for x in r["loadavg"]]
    flags = ([f"--images {args.images}"] if args.images != 600 else []) + \
        ([f"--size {args.size}"] if args.size != 1024 else []) + \
        ([f"--rounds {args.rounds}"] if args.rounds != 3 else []) + (["--skip-shared"] if args.skip_shared else []) + \
        [f"--conf {k}={v_}" for k, v_ in _conf_pairs(args.conf).items()] + \
        (["--no-tuned"] if args.no_tuned else [f"--tuned {k}={v_}" for k, v_ in _conf_pairs(args.tuned).items()
                                               if args.tuned != DEFAULT_TUNED])

    def spark_list(key):
        return ", ".join(f"{r['sides'][label][key]:.1f}" for r in results for label in labels[1:])

    lines = [
        SECTION, "",
        f"{date.today().isoformat()}. Machine: **{os.cpu_count()} cores** (os.cpu_count(), {platform.machine()}, "
        f"{platform.system()}), shared with other jobs: 1-minute load average {min(loads):.1f}-{max(loads):.1f} "
        f"during the {wall / 60:.0f} min run, so absolute times are slow and noisy; compare the ratios. "
        f"Python {v['python']}, PySpark {v.get('pyspark')} (Java {v['java']}), pyarrow {v.get('pyarrow')}, "
        f"OpenCV {v.get('opencv-python-headless')}, NumPy {v.get('numpy')}, pandas {v.get('pandas')}.", "",
        f"Both sides run `cxr.image.batch.process_file` on every file (sha256, decode, CLAHE, brightness, resize "
        f"to {results[0]['size']} px) and end with zstd Parquet on disk. **Pool(2)**: `multiprocessing.Pool(2)` "
        f"(spawn), `imap_unordered(chunksize=4)` over the files, each worker reads its file; the parent streams "
        f"the rows into one Parquet file with pyarrow. **Spark**: `cxr.spark.preprocess.run()` in `{MASTER}` with "
        f"conf/default.yaml" + (f" plus {', '.join(f'`{k}={v_}`' for k, v_ in _conf_pairs(args.conf).items())}"
                                 if args.conf else "")
        + " (binaryFile -> mapInPandas -> staging Parquet -> dedup, split, repartition -> images/errors/duplicates "
        "Parquet + manifest, counts verified)"
        + (f"; **{labels[2]}** is the same with "
           + ", ".join(f"`{k}={v_}`" for k, v_ in tuned_conf.items()) + " (a tuning experiment, not the default)"
           if len(labels) > 2 else "") + ". "
        "Each Spark configuration runs in its own process (JVM options apply only at JVM start). "
        "Times are wall clock, files in -> Parquet out, warm: the Spark session is started and a warm-up `run()` "
        f"on 6 images is done first (not counted: session start {spark_list('session_s')} s, warm-up "
        f"{spark_list('warmup_s')} s); the Pool is created and its workers have imported everything before its clock "
        "starts (not counted: " + ", ".join(f"{r['sides']['Pool']['startup_s']:.1f}" for r in results) + " s). "
        f"Each input ran {args.rounds} time{'s' if args.rounds != 1 else ''} per side, the order rotated each round; "
        "the tables have the median. Ratio = Spark img/s / Pool img/s (goal >= 0.9).", "",
        "Inputs: " + "; ".join(
            f"{r['name']}: " + " + ".join(f"{n} {ext.lstrip('.').upper()}" for ext, n in sorted(r["kinds"].items()))
            + f", {r['mb']:.0f} MB" for r in results)
        + f" (synthetic = cxr.synth.render_chest, 8-bit grayscale, classes in turn; the small set is the first "
        f"quarter of the large one).", "",
        *tables(results, labels), "",
        "Peak worker RSS = the largest VmHWM (peak resident set, from /proc) of any one Python worker: the Pool's "
        "children, or the pyspark.daemon and the Python workers it forks under that configuration's JVM (a fresh "
        "SparkContext per input, so the high-water mark starts clean).", "",
        interpretation(results, labels), "",
        f"Reproduce: `.venv/bin/python scripts/bench_preprocess.py{''.join(' ' + f for f in flags)}` (inputs are "
        f"generated once into {CACHE}; `--quick` checks the script on 60 images of 512 px without writing here).", "",
    ]
    return "\n".join(lines)


def _conf_pairs(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--conf expects KEY=VALUE, got {pair!r}")
        out[key.strip()] = value.strip()
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.serve_spark is not None:
        return serve_spark(json.loads(args.serve_spark), args.reply_fd)
    logging_quiet()
    pre = bench_config()["preprocess"]
    base_conf = _conf_pairs(args.conf)
    tuned_conf = {} if args.no_tuned else {**base_conf, **_conf_pairs(args.tuned)}
    t0 = time.perf_counter()
    big_dir = synthetic_input(args.images, args.size)
    n_small = max(3, args.images // 4)
    small_dir = linked_subset(big_dir, n_small, f"{big_dir.name}-first{n_small}")
    warmup = linked_subset(big_dir, 6, f"{big_dir.name}-first6")
    inputs = [(f"synthetic {args.size} px x{n_small}", small_dir),
              (f"synthetic {args.size} px x{args.images}", big_dir)]
    if not args.skip_shared:
        if SHARED.is_dir():
            inputs.append(("../shared/data/cxr (real)", SHARED))
        else:
            print(f"{SHARED} not found: skipped", flush=True)
    sparks = [SparkChild("Spark", base_conf)]
    if not args.no_tuned:
        sparks.append(SparkChild("Spark tuned", tuned_conf))
    print("Spark logs: " + ", ".join(str(s.log) for s in sparks), flush=True)
    try:
        results = [bench_input(name, path, pre, sparks, args.rounds, warmup) for name, path in inputs]
    finally:
        for s in sparks:
            s.close()
    for r in results:
        r["size"] = pre["size"]
    labels = ["Pool"] + [s.label for s in sparks]
    section = report(args, results, labels, _conf_pairs(args.tuned), time.perf_counter() - t0)
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "labels": labels}, indent=2))
    from cxr.markdown import publish

    publish(section, Path(args.out), SECTION, write=not args.no_write)
    return 0


def logging_quiet():
    """Only warnings from the job's own logger: its per-stage INFO lines would bury the table."""
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


if __name__ == "__main__":
    sys.exit(main())
