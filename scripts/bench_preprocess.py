#!/usr/bin/env python
"""Images/s of the Spark preprocess job (local[2]) against a plain multiprocessing.Pool(2) loop, same files.

Both sides call the same per-image function, cxr.image.batch.process_file (read bytes -> sha256 ->
preprocess_bytes: decode, CLAHE, brightness, resize -> one row), and both end with Parquet on disk:

    Pool(2)  files -> imap_unordered(process_file) -> pyarrow ParquetWriter (zstd), in the parent
    Spark    cxr.spark.preprocess.run(): driver-side listing -> one stage (each Python worker reads its files,
             process_file, patient id + split) -> images Parquet; counts, duplicates, errors from thin columns

Timed: wall clock from "files on disk" to "Parquet written", warm on both sides. The Spark session is
started and a warm-up run() on 6 images is done first (JVM, Python workers and their imports are ready,
as in a long-lived session); the Pool is created and its workers have imported everything before its
clock starts. Start-up costs are reported separately. Each input is run --rounds times per side, the
order rotated every round, and the median is kept (the machine is shared: single timings are noisy).

Inputs: --sizes synthetic 1024 px files (default 600 and 5,000; the first n of scripts/bench_score.py's
cached archive: 200 rendered radiographs, each file a flip/shift/exposure of one, 55/45 PNG/JPEG), the 450
real X-rays of ../shared/data/cxr, and one --big run (default 20,000 files, Spark only, one round) for how
time per image and memory hold up. CPU seconds of the Python workers and of the driver JVM come from /proc;
the slope between the two synthetic sizes is the marginal CPU per image, the intercept the fixed cost per run.
With --reduction, the 600-file and the real sets are also run with preprocess.decode_reduction=auto, on
both sides, for images per core-second with and without it.

Spark runs in child processes, one per configuration (conf/default.yaml as the job uses it; --tuned adds a
second configuration to compare, e.g. JVM options, which only apply when a JVM starts).

Peak memory is VmHWM from /proc (psutil is not a dependency): of any one Python worker (the Pool's
children, or the pyspark.daemon and workers under the JVM), of the driver JVM and of the Python driver,
each reset before every run (/proc/PID/clear_refs), so a peak belongs to that run.

    python scripts/bench_preprocess.py               # 600 + 5,000 synthetic, the real set, 20,000, reduction
    python scripts/bench_preprocess.py --quick       # 60 + 120 files at 512 px, nothing written: does it work?
    python scripts/bench_preprocess.py --tuned spark.sql.execution.arrow.maxRecordsPerBatch=64   # an experiment
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
GOALS = {"ratio_big": 0.9, "ratio_real": 0.9, "ratio_small": 0.8, "jvm_ms_per_image": 3.0, "big_within": 0.15}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs=2, default=[600, 5000], metavar=("SMALL", "LARGE"),
                   help="synthetic set sizes: the slope between them is the marginal cost per image")
    p.add_argument("--big", type=int, default=20000, help="the one large Spark-only run (0: none)")
    p.add_argument("--size", type=int, default=1024, help="side of the synthetic images in pixels")
    p.add_argument("--rounds", type=int, default=3, help="timed runs per side and input (median kept)")
    p.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"), help="BENCHMARKS.md to update")
    p.add_argument("--skip-shared", action="store_true", help=f"do not run on {SHARED}")
    p.add_argument("--no-reduction", dest="reduction", action="store_false",
                   help="skip the decode_reduction=auto runs")
    p.add_argument("--quick", action="store_true",
                   help="60 + 120 images at 512 px, 1 round, no shared data, no big run, BENCHMARKS.md untouched")
    p.add_argument("--no-write", action="store_true", help="print only")
    p.add_argument("--conf", action="append", default=[], metavar="KEY=VALUE",
                   help="extra Spark setting for every Spark run (repeatable)")
    p.add_argument("--tuned", action="append", default=[], metavar="KEY=VALUE",
                   help="settings of a second Spark configuration measured in the same run (an experiment)")
    p.add_argument("--json", help="also write the raw measurements here")
    p.add_argument("--from-json", help="write the report from measurements saved with --json (nothing is run; "
                                       "give the flags of that run)")
    p.add_argument("--serve-spark", help=argparse.SUPPRESS)
    p.add_argument("--reply-fd", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.size, args.rounds, args.no_write, args.skip_shared, args.big = [60, 120], 512, 1, True, True, 0
    return args


# ----------------------------------------------------------------------------- input data
def synthetic_inputs(sizes: list[int], size: int) -> dict[int, Path]:
    """{n: folder} with the first n files of scripts/bench_score.py's cached synthetic archive of the largest
    n (made once; the smaller sets are hard-linked subsets, so every set is a prefix of the next)."""
    from scripts.bench_score import synthetic_archive

    full_n = max(sizes)
    full = synthetic_archive(full_n, size)
    return {n: full if n == full_n else linked_subset(full, n, f"{full.name}-first{n}") for n in sizes}


# ----------------------------------------------------------------------------- memory of the workers
# /proc helpers shared with the other bench scripts: cxr/common/bench.py
from cxr.common.bench import (CACHE, POOL_WORKERS, SPARK_JVM, SPARK_WORKERS, WorkerMemory, cpu_delta,  # noqa: E402
                       cpu_seconds, input_files, linked_subset, matching, reset_peak_rss, status_kb, versions)


# ----------------------------------------------------------------------------- the plain Pool side
_STATE: dict = {}


def _pool_init(pre: dict, root: str):
    """Runs once in each Pool worker: the same imports and parameters a Spark worker ends up with."""
    from cxr.image.batch import process_file
    from cxr.image.pipeline import PreprocessParams
    from cxr.common.labels import alias_table

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
def bench_config(pre: dict | None = None) -> dict:
    """conf/default.yaml as the job uses it, with preprocess overrides; the console progress bar is off (it adds
    noise, not work)."""
    from cxr.config import load_config

    config = load_config()
    config["spark"]["conf"]["spark.ui.showConsoleProgress"] = False
    config["preprocess"].update(pre or {})
    return config


def start_spark(config: dict, extra_conf: dict):
    from cxr.spark.session import get_spark

    t0 = time.perf_counter()
    spark = get_spark(config, master=MASTER, app_name="bench-preprocess", extra_conf=extra_conf)
    return spark, time.perf_counter() - t0


def run_spark(spark, input_dir: Path, config: dict, out: Path) -> dict:
    """cxr.spark.preprocess.run() on a warm session, wall clock around the call (output removed first). Peak
    RSS of the JVM and of this Python driver is reset first, so it is this run's."""
    from cxr.spark.preprocess import run

    shutil.rmtree(out, ignore_errors=True)
    jvms = matching(SPARK_JVM)
    for pid in [*jvms, "self"]:
        reset_peak_rss(pid)
    with WorkerMemory(SPARK_WORKERS) as mem:
        cpu0, jvm0 = cpu_seconds(SPARK_WORKERS), cpu_seconds(SPARK_JVM)
        t0 = time.perf_counter()
        result = run(spark, str(input_dir), str(out), config)
        seconds = time.perf_counter() - t0
        cpu = {"workers": cpu_delta(cpu0, cpu_seconds(SPARK_WORKERS)),
               "driver": cpu_delta(jvm0, cpu_seconds(SPARK_JVM))}
    return {"seconds": seconds, "counts": result["counts"], "timings_s": result["timings_s"], "io": result["io"],
            "peak_rss_mb": mem.peak_mb, "workers_seen": len(mem.peaks), "cpu_s": cpu,
            "jvm_rss_mb": max((status_kb(pid, "VmHWM:") for pid in jvms), default=0) / 1024,
            "driver_rss_mb": status_kb("self", "VmHWM:") / 1024}


def serve_spark(extra_conf: dict, reply_fd: int) -> int:
    """Child process: one Spark configuration, driven by JSON lines on stdin, answers on reply_fd.

    Each configuration gets its own process (and JVM) because JVM options such as
    spark.driver.extraJavaOptions only take effect when the JVM starts."""
    import traceback

    logging_quiet()
    spark = None
    with os.fdopen(reply_fd, "w") as replies:
        for line in sys.stdin:
            req = json.loads(line)
            try:
                config = bench_config(req.get("pre"))
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
def bench_input(name: str, input_dir: Path, pre: dict, sparks: list[SparkChild], rounds: int, warmup: Path,
                with_pool: bool = True) -> dict:
    """A fresh SparkContext per input and configuration (so the workers' VmHWM starts clean), then the
    sides in turn, the order rotated each round so that each side goes first once in 3 rounds."""
    config_pre = {**bench_config()["preprocess"], **pre}
    files = input_files(input_dir, config_pre)
    tag = f" ({', '.join(f'{k}={v}' for k, v in pre.items())})" if pre else ""
    print(f"\n== {name}{tag}: {len(files)} files in {input_dir}", flush=True)
    sides = (["Pool"] if with_pool else []) + [s.label for s in sparks]
    by_label = {s.label: s for s in sparks}
    runs: dict[str, list[dict]] = {side: [] for side in sides}
    sessions = {}
    for s in sparks:
        sessions[s.label] = s.call(cmd="session", warmup=str(warmup), out=str(CACHE / "out" / "spark-warmup"),
                                   pre=pre)
        print(f"   {s.label}: session {sessions[s.label]['session_s']:.1f} s, warm-up run() on "
              f"{sessions[s.label]['warmup_files']} files {sessions[s.label]['warmup_s']:.1f} s", flush=True)
    loads = []
    for r in range(rounds):
        for side in sides[r % len(sides):] + sides[:r % len(sides)]:
            loads.append(os.getloadavg()[0])
            out = CACHE / "out" / re.sub(r"[^a-z0-9]+", "-", f"{side}-{name}".lower())
            if side == "Pool":
                res = run_pool(files, input_dir, config_pre, out)
            else:
                res = by_label[side].call(cmd="run", input=str(input_dir), out=str(out), pre=pre)
            shutil.rmtree(out, ignore_errors=True)   # 20,000 rows are ~1 GB: do not keep them around
            runs[side].append(res)
            print(f"   round {r + 1} {side:12s} {res['seconds']:7.2f} s {len(files) / res['seconds']:6.1f} img/s"
                  f"  CPU s: workers {res['cpu_s']['workers']:6.1f}, {'JVM' if side != 'Pool' else 'parent'} "
                  f"{res['cpu_s']['driver']:5.1f}  peak worker RSS {res['peak_rss_mb']:.0f} MB"
                  + (f"  JVM RSS {res['jvm_rss_mb']:.0f} MB, stages {res['timings_s']}, io {res['io']}"
                     if side != "Pool" else ""), flush=True)
    med = statistics.median
    kinds: dict[str, int] = {}
    for f in files:
        ext = os.path.splitext(f)[1].lower().replace(".jpeg", ".jpg")
        kinds[ext] = kinds.get(ext, 0) + 1
    result = {"name": name, "pre": pre, "input": str(input_dir), "files": len(files), "rounds": rounds,
              "loadavg": loads, "mb": sum(os.path.getsize(f) for f in files) / 1e6, "kinds": kinds, "sides": {}}
    for side in sides:
        rs = runs[side]
        d = result["sides"][side] = {
            "seconds": med(x["seconds"] for x in rs), "all_s": [round(x["seconds"], 2) for x in rs],
            "cpu_workers_s": med(x["cpu_s"]["workers"] for x in rs),
            "cpu_driver_s": med(x["cpu_s"]["driver"] for x in rs),
            "peak_rss_mb": max(x["peak_rss_mb"] for x in rs), "counts": rs[0]["counts"]}
        if side == "Pool":
            d["startup_s"] = med(x["startup_s"] for x in rs)
        else:
            d.update(stages_s={k: med(x["timings_s"][k] for x in rs) for k in rs[0]["timings_s"]},
                     jvm_rss_mb=max(x["jvm_rss_mb"] for x in rs), driver_rss_mb=max(x["driver_rss_mb"] for x in rs),
                     io=rs[0]["io"], **sessions[side])
        d["ips"] = len(files) / d["seconds"]
        d["per_core_s"] = len(files) / max(1e-9, d["cpu_workers_s"] + d["cpu_driver_s"])
    if with_pool:
        pool = result["sides"]["Pool"]
        for side in sides:
            result["sides"][side]["ratio"] = pool["seconds"] / result["sides"][side]["seconds"]
        ok = pool["counts"].get("ok", 0)
        for s in sparks:
            c = result["sides"][s.label]["counts"]
            if ok != c["written"] + c["duplicates"] or len(files) != c["input"]:
                print(f"   WARNING: {s.label} saw other files than the Pool: {c} vs {pool['counts']}", flush=True)
    return result


# ----------------------------------------------------------------------------- report
def cpu_ratio(r: dict, spark: str) -> float:
    """Pool CPU seconds / Spark CPU seconds for the same files (workers + parent or JVM): the ratio on dedicated
    cores, less at the mercy of the other jobs on a shared machine than the wall-clock one."""
    p, s = r["sides"]["Pool"], r["sides"][spark]
    return (p["cpu_workers_s"] + p["cpu_driver_s"]) / max(1e-9, s["cpu_workers_s"] + s["cpu_driver_s"])


def cpu_ms(r: dict, side: str) -> float:
    s = r["sides"][side]
    return 1000 * (s["cpu_workers_s"] + s["cpu_driver_s"]) / r["files"]


def marginal(small: dict, large: dict, side: str, key: str) -> tuple[float, float]:
    """(ms per extra image, fixed seconds per run) of a measure, from the line through the two sizes."""
    a, b = small["sides"][side][key], large["sides"][side][key]
    slope = (b - a) / max(1, large["files"] - small["files"])
    return slope * 1000, a - slope * small["files"]


def _met(ok: bool) -> str:
    return "**met**" if ok else "**not met**"


def tables(res: dict, spark: str) -> list[str]:
    main = [r for r in res["inputs"] if not r["pre"]]
    rows = ["| input | files | Pool(2) s | Spark s | Pool img/s | Spark img/s | **Spark/Pool** (wall) | CPU s Pool: workers + "
            "parent | CPU s Spark: workers + JVM | **CPU Pool/Spark** | Spark stages s (list / decode+write / rest) | "
            "peak RSS MB: Pool worker / Spark worker / JVM / Python driver |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in main:
        p, s = r["sides"]["Pool"], r["sides"][spark]
        st = s["stages_s"]
        rows.append(f"| {r['name']} | {r['files']} | {p['seconds']:.1f} | {s['seconds']:.1f} | {p['ips']:.1f} | "
                    f"{s['ips']:.1f} | **{s['ratio']:.2f}** | {p['cpu_workers_s']:.1f} + {p['cpu_driver_s']:.1f} | "
                    f"{s['cpu_workers_s']:.1f} + {s['cpu_driver_s']:.1f} | **{cpu_ratio(r, spark):.2f}** | "
                    f"{st['list']:.1f} / {st['decode']:.1f} / "
                    f"{st.get('write', 0) + st.get('verify', 0):.1f} | {p['peak_rss_mb']:.0f} / {s['peak_rss_mb']:.0f} / "
                    f"{s['jvm_rss_mb']:.0f} / {s['driver_rss_mb']:.0f} |")
    return rows


def marginal_table(res: dict, spark: str) -> list[str]:
    small, large = res["synthetic"]
    rows = ["| per run, from the two synthetic sizes | Pool workers | Pool parent | Spark Python workers | Spark JVM | "
            "Pool wall | Spark wall |", "|---|---|---|---|---|---|---|"]
    cells = [marginal(small, large, "Pool", "cpu_workers_s"), marginal(small, large, "Pool", "cpu_driver_s"),
             marginal(small, large, spark, "cpu_workers_s"), marginal(small, large, spark, "cpu_driver_s"),
             marginal(small, large, "Pool", "seconds"), marginal(small, large, spark, "seconds")]
    rows.append("| marginal: ms per extra image | " + " | ".join(f"{c[0]:.2f}" for c in cells) + " |")
    rows.append("| fixed: s per run (intercept) | " + " | ".join(f"{c[1]:.2f}" for c in cells) + " |")
    return rows


def reduction_table(res: dict, spark: str) -> list[str]:
    rows = ["| input | decode_reduction | Pool s | Spark s | Spark/Pool | Pool img per core-s | Spark img per core-s "
            "| Spark auto / off per core-s |", "|---|---|---|---|---|---|---|---|"]
    off = {r["name"]: r for r in res["inputs"] if not r["pre"]}
    for r in res["inputs"]:
        if not r["pre"]:
            continue
        base = off[r["name"]]
        for label, x in (("off", base), (r["pre"]["decode_reduction"], r)):
            p, s = x["sides"]["Pool"], x["sides"][spark]
            gain = s["per_core_s"] / base["sides"][spark]["per_core_s"]
            rows.append(f"| {r['name']} | {label} | {p['seconds']:.1f} | {s['seconds']:.1f} | {s['ratio']:.2f} | "
                        f"{p['per_core_s']:.1f} | {s['per_core_s']:.1f} | {gain:.2f}x |")
    return rows


def big_table(res: dict, spark: str) -> list[str]:
    rows = ["| run | files | wall s | ms per image | vs the 5,000 run | CPU ms per image (workers + JVM) | vs the 5,000 "
            "run | peak worker RSS MB | peak JVM RSS MB | peak Python driver RSS MB | 1-min load average |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    ref = res["synthetic"][1]["sides"][spark]
    ref_ms = 1000 * ref["seconds"] / res["synthetic"][1]["files"]
    ref_cpu = cpu_ms(res["synthetic"][1], spark)
    for r in [*res["synthetic"], res["big"]]:
        s = r["sides"][spark]
        ms = 1000 * s["seconds"] / r["files"]
        loads = r["loadavg"]
        rows.append(f"| {r['name']} | {r['files']} | {s['seconds']:.1f} | {ms:.2f} | {ms / ref_ms:.2f}x | "
                    f"{cpu_ms(r, spark):.2f} | {cpu_ms(r, spark) / ref_cpu:.2f}x | "
                    f"{s['peak_rss_mb']:.0f} | {s['jvm_rss_mb']:.0f} | {s['driver_rss_mb']:.0f} | "
                    f"{min(loads):.1f}-{max(loads):.1f} |")
    return rows


def goals(res: dict, spark: str) -> list[str]:
    small, large = res["synthetic"]
    real = res.get("real")
    jvm_ms, _ = marginal(small, large, spark, "cpu_driver_s")
    def ratio_line(label: str, r: dict, goal: float) -> str:
        wall, cpu = r["sides"][spark]["ratio"], cpu_ratio(r, spark)
        return (f"- Spark / Pool(2) >= {goal} {label}: wall clock {wall:.2f} {_met(wall >= goal)}; "
                f"CPU {cpu:.2f} {_met(cpu >= goal)}")

    lines = [ratio_line(f"on {large['files']} synthetic", large, GOALS["ratio_big"])]
    if real:
        lines.append(ratio_line("on the 450 real", real, GOALS["ratio_real"]))
    lines += [ratio_line(f"at {small['files']}", small, GOALS["ratio_small"]),
              f"- marginal JVM CPU <= 3 ms per image: {jvm_ms:.2f} ms {_met(jvm_ms <= GOALS['jvm_ms_per_image'])}"]
    if res.get("big"):
        big = res["big"]
        ms_big = big["sides"][spark]["seconds"] / big["files"]
        ms_ref = large["sides"][spark]["seconds"] / large["files"]
        rss = [r["sides"][spark]["peak_rss_mb"] for r in [small, large, big]]
        cpu = cpu_ms(big, spark) / cpu_ms(large, spark)
        lines += [f"- {big['files']} images: time per image within 15% of the {large['files']} run: wall clock "
                  f"{ms_big / ms_ref:.2f}x {_met(ms_big / ms_ref <= 1 + GOALS['big_within'])}; CPU per image "
                  f"{cpu:.2f}x {_met(abs(cpu - 1) <= GOALS['big_within'])}",
                  f"- worker RSS flat ({' -> '.join(f'{x:.0f}' for x in rss)} MB for "
                  f"{small['files']} -> {large['files']} -> {big['files']} images): "
                  f"{_met(max(rss) <= 1.15 * min(rss))}"]
    return lines


def report(args, res: dict, spark: str, wall: float) -> str:
    v = versions()
    loads = [x for r in [*res["inputs"], *([res["big"]] if res.get("big") else [])] for x in r["loadavg"]]
    flags = ([f"--sizes {args.sizes[0]} {args.sizes[1]}"] if args.sizes != [600, 5000] else []) + \
        ([f"--big {args.big}"] if args.big != 20000 else []) + \
        ([f"--size {args.size}"] if args.size != 1024 else []) + \
        ([f"--rounds {args.rounds}"] if args.rounds != 3 else []) + (["--skip-shared"] if args.skip_shared else []) + \
        ([] if args.reduction else ["--no-reduction"]) + \
        [f"--conf {k}={v_}" for k, v_ in _conf_pairs(args.conf).items()]
    conf = bench_config()["spark"]["conf"]
    tuned = ", ".join(f"`{k}={conf[k]}`" for k in sorted(conf) if k.startswith(("spark.sql.files", "spark.sql.execution.arrow", "spark.python", "spark.driver.extraJava")))
    lines = [
        SECTION, "",
        f"{date.today().isoformat()}. Command: `.venv/bin/python scripts/bench_preprocess.py{''.join(' ' + f for f in flags)}` "
        f"({wall / 60:.0f} min). Machine: **{os.cpu_count()} cores** (os.cpu_count(), {platform.machine()}, "
        f"{platform.system()}), shared with other jobs: 1-minute load average {min(loads):.1f}-{max(loads):.1f} "
        f"during the runs, so absolute times are noisy; compare the ratios, measured side by side. "
        f"Python {v['python']}, PySpark {v.get('pyspark')} (Java {v['java']}), pyarrow {v.get('pyarrow')}, "
        f"OpenCV {v.get('opencv-python-headless')}, NumPy {v.get('numpy')}, pandas {v.get('pandas')}.", "",
        f"Both sides run `cxr.image.batch.process_file` on every file (sha256, decode, CLAHE, brightness, resize to "
        f"{res['params_size']} px) and end with zstd Parquet on disk. **Pool(2)**: `multiprocessing.Pool(2)` (spawn), "
        "`imap_unordered(chunksize=4)` over the files, each worker reads its file; the parent streams the rows into "
        f"one Parquet file with pyarrow. **Spark**: `cxr.spark.preprocess.run()` in `{MASTER}` with conf/default.yaml "
        f"({tuned}): one driver-side listing, one stage in which each task's Python worker reads its files and "
        "returns finished rows that Spark writes into `images/` (no staging copy, no shuffle of pixels), then "
        "counts, duplicates and errors from thin columns, manifest verified from the Parquet footers. "
        "Warm: the Spark session is started and a warm-up `run()` on 6 images is done first (session start "
        + ", ".join(f"{r['sides'][spark]['session_s']:.1f}" for r in res["inputs"]) + " s, warm-up "
        + ", ".join(f"{r['sides'][spark]['warmup_s']:.1f}" for r in res["inputs"]) + " s, not counted); the Pool's "
        "workers have imported everything before its clock starts. "
        f"Each input ran {args.rounds} time{'s' if args.rounds != 1 else ''} per side, the order rotated each round; "
        "the tables have the median.", "",
        "Inputs: " + "; ".join(
            f"{r['name']}: " + " + ".join(f"{n} {ext.lstrip('.').upper()}" for ext, n in sorted(r["kinds"].items()))
            + f", {r['mb']:.0f} MB" for r in res["inputs"] if not r["pre"]) + ".", "",
        *tables(res, spark), "",
        "Marginal and fixed cost (the line through the two synthetic sizes; CPU from /proc):", "",
        *marginal_table(res, spark), "",
    ]
    if any(r["pre"] for r in res["inputs"]):
        lines += ["Decode reduction (`preprocess.decode_reduction`, images per core-second = images / CPU seconds of "
                  "the workers + the parent or JVM):", "", *reduction_table(res, spark), ""]
    if res.get("big"):
        lines += [f"Large run: {res['big']['files']} synthetic files, Spark only, one round, a fresh session (peaks "
                  "reset before each run):", "", *big_table(res, spark), ""]
    lines += ["Goals (issue 14):", "", *goals(res, spark), ""]
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
    t0 = time.perf_counter()
    sizes = sorted(args.sizes)
    synth = synthetic_inputs(sizes + ([args.big] if args.big else []), args.size)
    warmup = linked_subset(synth[sizes[0]], 6, f"{synth[sizes[0]].name}-first6")
    names = {n: f"synthetic {args.size} px x{n}" for n in synth}
    inputs = [(names[n], synth[n], {}) for n in sizes]
    real = None
    if not args.skip_shared:
        if SHARED.is_dir():
            real = ("../shared/data/cxr (real)", SHARED, {})
            inputs.append(real)
        else:
            print(f"{SHARED} not found: skipped", flush=True)
    if args.reduction:
        inputs += [(names[sizes[0]], synth[sizes[0]], {"decode_reduction": "auto"})]
        if real:
            inputs.append((real[0], real[1], {"decode_reduction": "auto"}))
    sparks = [SparkChild("Spark", base_conf)]
    if args.tuned:
        sparks.append(SparkChild("Spark tuned", {**base_conf, **_conf_pairs(args.tuned)}))
    print("Spark logs: " + ", ".join(str(s.log) for s in sparks), flush=True)
    res: dict = {"params_size": pre["size"]}
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        publish_report(args, saved, ["Spark"] + (["Spark tuned"] if args.tuned else []), saved.get("wall_s", 0.0))
        return 0
    try:
        res["inputs"] = [bench_input(name, path, p, sparks, args.rounds, warmup) for name, path, p in inputs]
        if args.big:
            res["big"] = bench_input(names[args.big], synth[args.big], {}, sparks[:1], 1, warmup, with_pool=False)
    finally:
        for s in sparks:
            s.close()
    res["synthetic"] = [r for r in res["inputs"] if not r["pre"] and r["input"] in {str(synth[n]) for n in sizes}]
    res["real"] = next((r for r in res["inputs"] if not r["pre"] and r["input"] == str(SHARED)), None)
    res["wall_s"] = time.perf_counter() - t0
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2, default=str))
    publish_report(args, res, [s.label for s in sparks], res["wall_s"])
    return 0


def publish_report(args, res: dict, labels: list[str], wall: float) -> None:
    from cxr.common.markdown import publish

    for label in labels:
        section = report(args, res, label, wall)
        publish(section, Path(args.out), SECTION, write=not args.no_write and label == "Spark")


def logging_quiet():
    """Only warnings from the job's own logger: its per-stage INFO lines would bury the table."""
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


if __name__ == "__main__":
    sys.exit(main())
