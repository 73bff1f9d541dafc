#!/usr/bin/env python
"""Images/s of the Spark preprocess job (local[2]) against a plain multiprocessing.Pool(2) loop, same files.

Both sides call the same per-image function, cxr.image.batch.process_file (read bytes -> sha256 ->
preprocess_bytes: decode, CLAHE, brightness, resize -> one row), and both end with Parquet on disk:

    Pool(2)  files -> imap_unordered(process_file) -> pyarrow ParquetWriter (zstd), in the parent
    Spark    cxr.spark.preprocess.run(): driver-side listing -> one stage (each Python worker reads its files,
             process_file, patient id + split) -> images Parquet; counts, duplicates, errors from thin columns

Timed: wall clock from "files on disk" to "Parquet written", warm on both sides (a Spark session and a warm-up
run() on 6 images first; the Pool's workers have imported everything before its clock starts). Each input runs
--rounds times per side, the order rotated every round, the median kept. Inputs: --sizes synthetic 1024 px files
(cxr.common.bench.synthetic_archive), the 450 real X-rays of ../shared/data/cxr, one --big Spark-only run; with
--reduction also preprocess.decode_reduction=auto. CPU seconds and peak RSS (VmHWM) of the workers, the driver
JVM and the Python driver come from /proc. Spark runs in a child process per configuration (--tuned adds a second
one: JVM options only apply when a JVM starts). The section's text is scripts/bench_preprocess_report.py.

    python scripts/bench_preprocess.py               # 600 + 5,000 synthetic, the real set, 20,000, reduction
    python scripts/bench_preprocess.py --quick       # 60 + 120 files at 512 px, nothing written: does it work?
    python scripts/bench_preprocess.py --tuned spark.sql.execution.arrow.maxRecordsPerBatch=64   # an experiment
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import re
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # also runs in the Pool's spawned children, which import this module

from bench_preprocess_report import MASTER, SECTION, report  # noqa: E402
from cxr.common.bench import (CACHE, POOL_WORKERS, SPARK_JVM, SPARK_WORKERS, ChildServer, Timer, Watch,  # noqa: E402
                              bench_parser, describe_files, input_files, job_config, linked_subset, quiet_logging,
                              rotations, serve, synthetic_archive)
from cxr.common.markdown import publish  # noqa: E402

SHARED = ROOT.parent / "shared" / "data" / "cxr"
WORKERS = 2


def parse_args(argv=None):
    p = bench_parser(__doc__, rounds=3, rounds_help="timed runs per side and input (median kept)")
    p.add_argument("--sizes", type=int, nargs=2, default=[600, 5000], metavar=("SMALL", "LARGE"),
                   help="synthetic set sizes: the slope between them is the marginal cost per image")
    p.add_argument("--big", type=int, default=20000, help="the one large Spark-only run (0: none)")
    p.add_argument("--size", type=int, default=1024, help="side of the synthetic images in pixels")
    p.add_argument("--skip-shared", action="store_true", help=f"do not run on {SHARED}")
    p.add_argument("--no-reduction", dest="reduction", action="store_false", help="skip the decode_reduction=auto runs")
    p.add_argument("--quick", action="store_true",
                   help="60 + 120 images at 512 px, 1 round, no shared data, no big run, BENCHMARKS.md untouched")
    p.add_argument("--conf", action="append", default=[], metavar="KEY=VALUE",
                   help="extra Spark setting for every Spark run (repeatable)")
    p.add_argument("--tuned", action="append", default=[], metavar="KEY=VALUE",
                   help="settings of a second Spark configuration measured in the same run (an experiment)")
    p.add_argument("--json", help="also write the raw measurements here")
    p.add_argument("--from-json", help="write the report from measurements saved with --json (nothing is run; "
                                       "give the flags of that run)")
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.size, args.rounds, args.no_write, args.skip_shared, args.big = [60, 120], 512, 1, True, True, 0
    return args


# ----------------------------------------------------------------------------- the plain Pool side
_STATE: dict = {}


def _pool_init(pre: dict, root: str):
    """Runs once in each Pool worker: the same imports and parameters a Spark worker ends up with."""
    from cxr.common.labels import alias_table
    from cxr.image.batch import process_file
    from cxr.image.pipeline import PreprocessParams

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
    return pa.schema([(c, pa.binary() if c == "image" else pa.int32() if c in ints else pa.string()) for c in COLUMNS])


def run_pool(files: list[str], root: Path, pre: dict, out: Path, chunksize: int = 4) -> dict:
    """Pool(2) over the files, rows streamed into one Parquet file as they come back. Timed warm."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    schema, counts = _arrow_schema(), {}
    t0 = time.perf_counter()
    with mp.get_context("spawn").Pool(WORKERS, initializer=_pool_init, initargs=(pre, str(root))) as pool:
        pool.map(_ready, range(WORKERS), chunksize=1)
        with Watch({"workers": POOL_WORKERS}) as w, \
                pq.ParquetWriter(out / "part-0.parquet", schema, compression="zstd") as writer:
            batch = []
            for row in pool.imap_unordered(_pool_task, files, chunksize=chunksize):
                counts[row["status"]] = counts.get(row["status"], 0) + 1
                batch.append(row)
                if len(batch) == 32:
                    writer.write_table(pa.Table.from_pylist(batch, schema))
                    batch = []
            if batch:
                writer.write_table(pa.Table.from_pylist(batch, schema))
    return {"seconds": w.seconds, "startup_s": w.start - t0, "counts": counts, "peak_rss_mb": w.peak_mb["workers"],
            "workers_seen": w.seen["workers"], "cpu_s": {"workers": w.cpu_s["workers"], "driver": w.self_cpu_s}}


# ----------------------------------------------------------------------------- the Spark side (a child process)
def run_spark(spark, input_dir: Path, config: dict, out: Path) -> dict:
    """cxr.spark.preprocess.run() on a warm session, wall clock around the call (output removed first). Peak
    RSS of the JVM and of this Python driver is reset first, so it is this run's."""
    from cxr.spark.preprocess import run

    shutil.rmtree(out, ignore_errors=True)
    with Watch({"workers": SPARK_WORKERS, "driver": SPARK_JVM}, include_self=True, reset=("driver", "self")) as w:
        result = run(spark, str(input_dir), str(out), config)
    return {"seconds": w.seconds, "counts": result["counts"], "timings_s": result["timings_s"], "io": result["io"],
            "peak_rss_mb": w.peak_mb["workers"], "workers_seen": w.seen["workers"], "cpu_s": w.cpu_s,
            "jvm_rss_mb": w.peak_mb["driver"], "driver_rss_mb": w.self_peak_mb}


class SparkSide:
    """The child's state: one Spark configuration (extra_conf), a fresh SparkContext per input (fresh Python
    workers, so their VmHWM starts clean) after which run() requests reuse it. A process per configuration,
    because JVM options such as spark.driver.extraJavaOptions only take effect when the JVM starts."""

    def __init__(self, extra_conf: dict):
        self.extra_conf, self.spark = extra_conf, None

    def __call__(self, req: dict) -> dict:
        config = job_config(pre=req.get("pre"))
        if req["cmd"] != "session":
            return run_spark(self.spark, Path(req["input"]), config, Path(req["out"]))
        from cxr.spark.session import get_spark

        self.close()
        with Timer() as t:
            self.spark = get_spark(config, master=MASTER, app_name="bench-preprocess", extra_conf=self.extra_conf)
        warm = run_spark(self.spark, Path(req["warmup"]), config, Path(req["out"]))
        return {"session_s": t.seconds, "warmup_s": warm["seconds"], "warmup_files": warm["counts"]["input"]}

    def close(self):
        if self.spark is not None:
            self.spark.stop()


# ----------------------------------------------------------------------------- one input, every side
def bench_input(name: str, input_dir: Path, pre: dict, sparks: list[ChildServer], rounds: int, warmup: Path,
                with_pool: bool = True) -> dict:
    """A fresh SparkContext per input and configuration, then the sides in turn, the order rotated each round
    so that each side goes first once in 3 rounds; the median of each measure."""
    config_pre = job_config(pre=pre)["preprocess"]
    files = input_files(input_dir, config_pre)
    print(f"\n== {name}{f' ({pre})' if pre else ''}: {len(files)} files in {input_dir}", flush=True)
    sides = (["Pool"] if with_pool else []) + [s.label for s in sparks]
    by_label = {s.label: s for s in sparks}
    runs: dict[str, list[dict]] = {side: [] for side in sides}
    sessions = {s.label: s.call(cmd="session", warmup=str(warmup), out=str(CACHE / "out" / "spark-warmup"), pre=pre)
                for s in sparks}
    for label, s in sessions.items():
        print(f"   {label}: session {s['session_s']:.1f} s, warm-up run() on {s['warmup_files']} files "
              f"{s['warmup_s']:.1f} s", flush=True)
    loads = []
    for r, side in rotations(sides, rounds):
        loads.append(os.getloadavg()[0])
        out = CACHE / "out" / re.sub(r"[^a-z0-9]+", "-", f"{side}-{name}".lower())
        res = run_pool(files, input_dir, config_pre, out) if side == "Pool" else \
            by_label[side].call(cmd="run", input=str(input_dir), out=str(out), pre=pre)
        shutil.rmtree(out, ignore_errors=True)   # 20,000 rows are ~1 GB: do not keep them around
        runs[side].append(res)
        print(f"   round {r + 1} {side:12s} {res['seconds']:7.2f} s {len(files) / res['seconds']:6.1f} img/s  CPU s: "
              f"workers {res['cpu_s']['workers']:6.1f}, {'parent' if side == 'Pool' else 'JVM'} "
              f"{res['cpu_s']['driver']:5.1f}  peak worker RSS {res['peak_rss_mb']:.0f} MB", flush=True)
    info = describe_files(files)
    result = {"name": name, "pre": pre, "input": str(input_dir), "files": len(files), "rounds": rounds,
              "loadavg": loads, "mb": info["mb"], "kinds": info["kinds"],
              "sides": {side: summary(runs[side], side, len(files), sessions) for side in sides}}
    if with_pool:
        check_same_files(result, files, sparks)
    return result


def summary(rs: list[dict], side: str, n_files: int, sessions: dict) -> dict:
    """The median of each measure over the rounds (the peaks: the largest), images/s and per core-second."""
    med = statistics.median
    d = {"seconds": med(x["seconds"] for x in rs), "all_s": [round(x["seconds"], 2) for x in rs],
         "cpu_workers_s": med(x["cpu_s"]["workers"] for x in rs), "cpu_driver_s": med(x["cpu_s"]["driver"] for x in rs),
         "peak_rss_mb": max(x["peak_rss_mb"] for x in rs), "counts": rs[0]["counts"]}
    if side == "Pool":
        d["startup_s"] = med(x["startup_s"] for x in rs)
    else:
        d.update(stages_s={k: med(x["timings_s"][k] for x in rs) for k in rs[0]["timings_s"]},
                 jvm_rss_mb=max(x["jvm_rss_mb"] for x in rs), driver_rss_mb=max(x["driver_rss_mb"] for x in rs),
                 io=rs[0]["io"], **sessions[side])
    d["ips"] = n_files / d["seconds"]
    d["per_core_s"] = n_files / max(1e-9, d["cpu_workers_s"] + d["cpu_driver_s"])
    return d


def check_same_files(result: dict, files: list[str], sparks: list[ChildServer]) -> None:
    """Every side's ratio to the Pool, and a warning if a Spark side saw other files than the Pool."""
    pool = result["sides"]["Pool"]
    for side in result["sides"].values():
        side["ratio"] = pool["seconds"] / side["seconds"]
    for s in sparks:
        c = result["sides"][s.label]["counts"]
        if pool["counts"].get("ok", 0) != c["written"] + c["duplicates"] or len(files) != c["input"]:
            print(f"   WARNING: {s.label} saw other files than the Pool: {c} vs {pool['counts']}", flush=True)


# ----------------------------------------------------------------------------- main
def conf_pairs(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--conf expects KEY=VALUE, got {pair!r}")
        out[key.strip()] = value.strip()
    return out


def measure(args, base_conf: dict) -> dict:
    sizes = sorted(args.sizes)
    full = synthetic_archive(max(sizes + [args.big]), args.size)
    synth = {n: full if n == max(sizes + [args.big]) else linked_subset(full, n, f"{full.name}-first{n}")
             for n in sizes + ([args.big] if args.big else [])}
    warmup = linked_subset(synth[sizes[0]], 6, f"{synth[sizes[0]].name}-first6")
    names = {n: f"synthetic {args.size} px x{n}" for n in synth}
    inputs = [(names[n], synth[n], {}) for n in sizes]
    real = ("../shared/data/cxr (real)", SHARED, {}) if not args.skip_shared and SHARED.is_dir() else None
    if not args.skip_shared and real is None:
        print(f"{SHARED} not found: skipped", flush=True)
    inputs += [real] if real else []
    if args.reduction:
        inputs += [(name, path, {"decode_reduction": "auto"}) for name, path, _ in [inputs[0], *([real] if real else [])]]
    sparks = [ChildServer(__file__, "Spark", base_conf, CACHE / "logs" / "spark-spark.log", cwd=ROOT)]
    if args.tuned:
        sparks.append(ChildServer(__file__, "Spark tuned", {**base_conf, **conf_pairs(args.tuned)},
                                  CACHE / "logs" / "spark-spark-tuned.log", cwd=ROOT))
    print("Spark logs: " + ", ".join(str(s.log) for s in sparks), flush=True)
    res: dict = {"params_size": job_config()["preprocess"]["size"]}
    try:
        res["inputs"] = [bench_input(name, path, p, sparks, args.rounds, warmup) for name, path, p in inputs]
        if args.big:
            res["big"] = bench_input(names[args.big], synth[args.big], {}, sparks[:1], 1, warmup, with_pool=False)
    finally:
        for s in sparks:
            s.close()
    res["synthetic"] = [r for r in res["inputs"] if not r["pre"] and r["input"] in {str(synth[n]) for n in sizes}]
    res["real"] = next((r for r in res["inputs"] if not r["pre"] and r["input"] == str(SHARED)), None)
    return res


def main(argv=None) -> int:
    args = parse_args(argv)
    quiet_logging()
    if args.serve is not None:
        side = SparkSide(json.loads(args.serve))
        return serve(side, args.reply_fd, close=side.close)
    base_conf = conf_pairs(args.conf)
    if args.from_json:
        res = json.loads(Path(args.from_json).read_text())
    else:
        with Timer() as t:
            res = measure(args, base_conf)
        res["wall_s"] = t.seconds
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=2, default=str))
    for label in ["Spark"] + (["Spark tuned"] if args.tuned else []):
        publish(report(args, res, label, res.get("wall_s", 0.0), base_conf), Path(args.out), SECTION,
                write=not args.no_write and label == "Spark")
    return 0


if __name__ == "__main__":
    sys.exit(main())
