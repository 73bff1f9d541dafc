"""The "## Preprocess" section of BENCHMARKS.md from scripts/bench_preprocess.py's measurements (its --json): the
tables, the marginal and fixed costs and the goals of issue 14, so that --from-json rewrites it without measuring."""
from __future__ import annotations

from datetime import date

from cxr.common.bench import job_config, kinds_text, load_range, machine, versions
from cxr.common.markdown import met, table

SECTION = "## Preprocess: Spark vs multiprocessing.Pool (scripts/bench_preprocess.py)"
MASTER = "local[2]"
GOALS = {"ratio_big": 0.9, "ratio_real": 0.9, "ratio_small": 0.8, "jvm_ms_per_image": 3.0, "big_within": 0.15}
DEFAULTS = {"sizes": [600, 5000], "big": 20000, "size": 1024, "rounds": 3}   # flags left out of the quoted command


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


def main_table(res: dict, spark: str) -> list[str]:
    rows = []
    for r in (r for r in res["inputs"] if not r["pre"]):
        p, s = r["sides"]["Pool"], r["sides"][spark]
        st = s["stages_s"]
        rows.append([r["name"], r["files"], f"{p['seconds']:.1f}", f"{s['seconds']:.1f}", f"{p['ips']:.1f}",
                     f"{s['ips']:.1f}", f"**{s['ratio']:.2f}**", f"{p['cpu_workers_s']:.1f} + {p['cpu_driver_s']:.1f}",
                     f"{s['cpu_workers_s']:.1f} + {s['cpu_driver_s']:.1f}", f"**{cpu_ratio(r, spark):.2f}**",
                     f"{st['list']:.1f} / {st['decode']:.1f} / {st.get('write', 0) + st.get('verify', 0):.1f}",
                     f"{p['peak_rss_mb']:.0f} / {s['peak_rss_mb']:.0f} / {s['jvm_rss_mb']:.0f} / {s['driver_rss_mb']:.0f}"])
    return table(["input", "files", "Pool(2) s", "Spark s", "Pool img/s", "Spark img/s", "**Spark/Pool** (wall)",
                  "CPU s Pool: workers + parent", "CPU s Spark: workers + JVM", "**CPU Pool/Spark**",
                  "Spark stages s (list / decode+write / rest)",
                  "peak RSS MB: Pool worker / Spark worker / JVM / Python driver"], rows)


def marginal_table(res: dict, spark: str) -> list[str]:
    small, large = res["synthetic"]
    cells = [marginal(small, large, side, key) for side, key in (
        ("Pool", "cpu_workers_s"), ("Pool", "cpu_driver_s"), (spark, "cpu_workers_s"), (spark, "cpu_driver_s"),
        ("Pool", "seconds"), (spark, "seconds"))]
    return table(["per run, from the two synthetic sizes", "Pool workers", "Pool parent", "Spark Python workers",
                  "Spark JVM", "Pool wall", "Spark wall"],
                 [["marginal: ms per extra image", *(f"{c[0]:.2f}" for c in cells)],
                  ["fixed: s per run (intercept)", *(f"{c[1]:.2f}" for c in cells)]])


def reduction_table(res: dict, spark: str) -> list[str]:
    off = {r["name"]: r for r in res["inputs"] if not r["pre"]}
    rows = []
    for r in (r for r in res["inputs"] if r["pre"]):
        base = off[r["name"]]
        for label, x in (("off", base), (r["pre"]["decode_reduction"], r)):
            p, s = x["sides"]["Pool"], x["sides"][spark]
            rows.append([r["name"], label, f"{p['seconds']:.1f}", f"{s['seconds']:.1f}", f"{s['ratio']:.2f}",
                         f"{p['per_core_s']:.1f}", f"{s['per_core_s']:.1f}",
                         f"{s['per_core_s'] / base['sides'][spark]['per_core_s']:.2f}x"])
    return table(["input", "decode_reduction", "Pool s", "Spark s", "Spark/Pool", "Pool img per core-s",
                  "Spark img per core-s", "Spark auto / off per core-s"], rows)


def big_table(res: dict, spark: str) -> list[str]:
    ref = res["synthetic"][1]
    ref_ms, ref_cpu = 1000 * ref["sides"][spark]["seconds"] / ref["files"], cpu_ms(ref, spark)
    rows = []
    for r in [*res["synthetic"], res["big"]]:
        s = r["sides"][spark]
        ms = 1000 * s["seconds"] / r["files"]
        rows.append([r["name"], r["files"], f"{s['seconds']:.1f}", f"{ms:.2f}", f"{ms / ref_ms:.2f}x",
                     f"{cpu_ms(r, spark):.2f}", f"{cpu_ms(r, spark) / ref_cpu:.2f}x", f"{s['peak_rss_mb']:.0f}",
                     f"{s['jvm_rss_mb']:.0f}", f"{s['driver_rss_mb']:.0f}", load_range(r["loadavg"])])
    return table(["run", "files", "wall s", "ms per image", "vs the 5,000 run", "CPU ms per image (workers + JVM)",
                  "vs the 5,000 run", "peak worker RSS MB", "peak JVM RSS MB", "peak Python driver RSS MB",
                  "1-min load average"], rows)


def goals(res: dict, spark: str) -> list[str]:
    small, large = res["synthetic"]
    jvm_ms, _ = marginal(small, large, spark, "cpu_driver_s")

    def ratio_line(label: str, r: dict, goal: float) -> str:
        wall, cpu = r["sides"][spark]["ratio"], cpu_ratio(r, spark)
        return (f"- Spark / Pool(2) >= {goal} {label}: wall clock {wall:.2f} {met(wall >= goal)}; "
                f"CPU {cpu:.2f} {met(cpu >= goal)}")

    lines = [ratio_line(f"on {large['files']} synthetic", large, GOALS["ratio_big"])]
    if res.get("real"):
        lines.append(ratio_line("on the 450 real", res["real"], GOALS["ratio_real"]))
    lines += [ratio_line(f"at {small['files']}", small, GOALS["ratio_small"]),
              f"- marginal JVM CPU <= 3 ms per image: {jvm_ms:.2f} ms {met(jvm_ms <= GOALS['jvm_ms_per_image'])}"]
    if res.get("big"):
        big = res["big"]
        wall = (big["sides"][spark]["seconds"] / big["files"]) / (large["sides"][spark]["seconds"] / large["files"])
        rss = [r["sides"][spark]["peak_rss_mb"] for r in [small, large, big]]
        cpu = cpu_ms(big, spark) / cpu_ms(large, spark)
        lines += [f"- {big['files']} images: time per image within 15% of the {large['files']} run: wall clock "
                  f"{wall:.2f}x {met(wall <= 1 + GOALS['big_within'])}; CPU per image "
                  f"{cpu:.2f}x {met(abs(cpu - 1) <= GOALS['big_within'])}",
                  f"- worker RSS flat ({' -> '.join(f'{x:.0f}' for x in rss)} MB for "
                  f"{small['files']} -> {large['files']} -> {big['files']} images): {met(max(rss) <= 1.15 * min(rss))}"]
    return lines


def command_flags(args, conf_pairs: dict) -> str:
    """The flags of the run that differ from the defaults, as the command line quotes them."""
    flags = [f"--sizes {args.sizes[0]} {args.sizes[1]}"] * (args.sizes != DEFAULTS["sizes"]) + \
        [f"--{k} {getattr(args, k)}" for k in ("big", "size", "rounds") if getattr(args, k) != DEFAULTS[k]] + \
        ["--skip-shared"] * args.skip_shared + ["--no-reduction"] * (not args.reduction) + \
        [f"--conf {k}={v}" for k, v in conf_pairs.items()]
    return "".join(" " + f for f in flags)


def report(args, res: dict, spark: str, wall: float, conf_pairs: dict) -> str:
    v = versions()
    loads = [x for r in [*res["inputs"], *([res["big"]] if res.get("big") else [])] for x in r["loadavg"]]
    conf = job_config()["spark"]["conf"]
    tuned = ", ".join(f"`{k}={conf[k]}`" for k in sorted(conf) if k.startswith(
        ("spark.sql.files", "spark.sql.execution.arrow", "spark.python", "spark.driver.extraJava")))
    spark_runs = [r["sides"][spark] for r in res["inputs"]]
    lines = [
        SECTION, "",
        f"{date.today().isoformat()}. Command: `.venv/bin/python scripts/bench_preprocess.py"
        f"{command_flags(args, conf_pairs)}` ({wall / 60:.0f} min). Machine: {machine(bold=True)}, shared with other "
        f"jobs: 1-minute load average "
        f"{load_range(loads)} during the runs, so absolute times are noisy; compare the ratios, measured side by side. "
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
        + ", ".join(f"{s['session_s']:.1f}" for s in spark_runs) + " s, warm-up "
        + ", ".join(f"{s['warmup_s']:.1f}" for s in spark_runs) + " s, not counted); the Pool's "
        "workers have imported everything before its clock starts. "
        f"Each input ran {args.rounds} time{'s' if args.rounds != 1 else ''} per side, the order rotated each round; "
        "the tables have the median.", "",
        "Inputs: " + "; ".join(f"{r['name']}: {kinds_text(r['kinds'])}, {r['mb']:.0f} MB"
                               for r in res["inputs"] if not r["pre"]) + ".", "",
        *main_table(res, spark), "",
        "Marginal and fixed cost (the line through the two synthetic sizes; CPU from /proc):", "",
        *marginal_table(res, spark), ""]
    if any(r["pre"] for r in res["inputs"]):
        lines += ["Decode reduction (`preprocess.decode_reduction`, images per core-second = images / CPU seconds of "
                  "the workers + the parent or JVM):", "", *reduction_table(res, spark), ""]
    if res.get("big"):
        lines += [f"Large run: {res['big']['files']} synthetic files, Spark only, one round, a fresh session (peaks "
                  "reset before each run):", "", *big_table(res, spark), ""]
    return "\n".join(lines + ["Goals (issue 14):", "", *goals(res, spark), ""])
