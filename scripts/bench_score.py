#!/usr/bin/env python
"""The score job (cxr.spark.score.run) measured: Spark vs one Python process, incremental runs, ONNX Runtime vs
Keras, and how its cost grows with the archive; writes the "## Score" section of BENCHMARKS.md.

Parts, each result saved in --state as soon as it is measured (--redo PART measures a part again):
  a  Spark (local[2], warm session) vs ONE Python process (scripts/bench_score_baselines.py) running the same per-file
     function and ONNX model over the same files: raw archive and the preprocess job's Parquet; real and synthetic.
  b  incremental: first run, a rerun with 0 new files, a rerun with 1% new files (flipped copies).
  c  ONNX Runtime vs Keras: the predictor alone (1 thread, a fresh process each), and inside the Spark job.
  d  end to end at growing sizes (default 1,000 / 5,000 / 20,000 synthetic 1024 px files): time per image and
     the peak RSS of the Python driver, the driver JVM and the Python workers (VmHWM from /proc).
  e  pyspark.ml.functions.predict_batch_udf vs our mapInPandas path on the preprocessed input.
The section's text is scripts/bench_score_report.py.

    python scripts/bench_score.py                 # everything, BENCHMARKS.md updated
    python scripts/bench_score.py --quick         # small sizes, nothing written: does it work?
    python scripts/bench_score.py --report-only   # the section again from --state, nothing measured
"""
from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_score_baselines import ENGINE, MASTER, predict_batch_udf_vs_ours  # noqa: E402
from bench_score_report import SECTION, report  # noqa: E402
from cxr.common.bench import (CACHE, SPARK_JVM, SPARK_WORKERS, State, Timer, Watch, bench_parser,  # noqa: E402
                              cached, child_answer, command_line, deadline_seconds, describe_files, input_files,
                              interleaved, job_config, linked_subset, quiet_logging, random_cnn, run_parts,
                              synthetic_archive)

SHARED = ROOT.parent / "shared" / "data" / "cxr"
BASELINES = ROOT / "scripts" / "bench_score_baselines.py"   # the sides measured in fresh processes
PARTS = ("a", "b", "c", "d", "e")
LOG = CACHE / "logs" / "bench-score-child.log"


def parse_args(argv=None):
    p = bench_parser(__doc__, state="score-results.json", redo_help="parts (or part keys, e.g. d:20000) to measure again",
                     rounds=2, rounds_help="part a: timed runs per side and input (fastest kept)")
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000, 20000], help="part d: synthetic archive sizes")
    p.add_argument("--synthetic", type=int, default=1000, help="part a: synthetic images (the first of the largest set)")
    p.add_argument("--image-size", type=int, default=1024, help="side of the synthetic images in pixels")
    p.add_argument("--model-size", type=int, default=128, help="preprocess.size and CNN input (parts a, b, d)")
    p.add_argument("--predict-sizes", type=int, nargs="+", default=[128, 224], help="part c: CNN input sizes")
    p.add_argument("--predict-images", type=int, default=512, help="part c: images per predictor measurement")
    p.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    p.add_argument("--quick", action="store_true", help="synthetic sizes 60/120 at 512 px (also standing in for the "
                   "real set), 1 round, nothing written: does it work?")
    p.add_argument("--fallback-sizes", type=int, nargs="*", default=[10000],
                   help="part d: sizes tried (largest first) only when the largest of --sizes was skipped by --deadline")
    p.add_argument("--deadline", help="HH:MM (local time): part d skips a size whose estimated run (from the "
                   "previous size's time per image) would end later, and says so in the section")
    p.add_argument("--generate-only", type=int, metavar="N", help="make the N-file synthetic archive, nothing else")
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.synthetic, args.image_size, args.rounds, args.no_write = [60, 120], 60, 512, 1, True
        args.predict_images, args.predict_sizes, args.model_size = 64, [64], 64
        if args.state == str(CACHE / "score-results.json"):
            args.state = str(CACHE / "score-results-quick.json")
    return args


# ----------------------------------------------------------------------------- the Spark side (this process)
class Bench:
    """One warm local[2] session in this process (the Spark driver), the measurements (--state), the inputs."""

    def __init__(self, args):
        self.args, self.state = args, State(args.state, args.redo)
        self.config = job_config({"preprocess.size": args.model_size})
        self.pre, self.spark, self.skipped, self.real_note = self.config["preprocess"], None, [], None

    def session(self):
        if self.spark is None:
            from cxr.spark.session import get_spark

            with Timer() as t:
                self.spark = get_spark(self.config, master=MASTER, app_name="bench-score",
                                       extra_conf={"spark.ui.enabled": False})
            self.session_s = t.seconds
            self.warmup()
        return self.spark

    def warmup(self):
        """A small run of each path first: JVM, Python workers, their imports and the model cache are warm."""
        from cxr.spark import score

        def run(src, out):
            score.run(self.spark, str(src), str(self.model), str(CACHE / "out" / out), self.config, engine=ENGINE,
                      full=True)
        small = linked_subset(self.real, 8, "score-warmup-8")
        with Timer() as t:
            run(small, "warmup-raw")
            run(self.preprocessed(small, "warmup-8"), "warmup-pre")
        self.warmup_s = t.seconds
        print(f"session {self.session_s:.1f} s, warm-up {self.warmup_s:.1f} s", flush=True)

    def preprocessed(self, raw: Path, name: str) -> Path:
        """The preprocess job's output for raw at the model's size, made once."""
        from cxr.spark import preprocess

        def build(out):
            shutil.rmtree(out, ignore_errors=True)
            preprocess.run(self.session(), str(raw), str(out), self.config)
        out = CACHE / "pre" / f"{name}-{self.args.model_size}px"
        return cached(out, build, out / "manifest.json")

    def score(self, input_dir: Path, out_name: str, fresh: bool = True, engine: str = ENGINE, full: bool = True,
              memory: bool = False) -> dict:
        """score.run in the warm session, wall clock around the call; with memory=True the peak RSS
        (VmHWM, reset first) of this Python driver, the driver JVM and the Python workers."""
        from cxr.spark import score

        spark, out = self.session(), CACHE / "out" / out_name
        if fresh:
            shutil.rmtree(out, ignore_errors=True)
        with Watch({"workers": SPARK_WORKERS, "jvm": SPARK_JVM}, {"workers": 0.2, "jvm": 0.5}, include_self=True,
                   reset=("self", "jvm", "workers") if memory else ()) as w:
            record = score.run(spark, str(input_dir), str(self.model), str(out), self.config, engine=engine, full=full)
        res = {"wall_s": w.seconds, "seconds": record["seconds"], "counts": record["counts"],
               "bytes_read": record["bytes_read"], "timings_s": record["timings_s"], "mode": record["mode"],
               "engine": record["engine"]["name"], "cpu_s": {**w.cpu_s, "driver_py": w.self_cpu_s}, "load": list(w.load)}
        if memory:
            res.update(peak_worker_mb=w.peak_mb["workers"], peak_driver_py_mb=w.self_peak_mb,
                       peak_jvm_mb=w.peak_mb["jvm"], workers_seen=w.seen["workers"])
        c = record["counts"]
        print(f"   spark {record['mode']:12s} {input_dir.name}: {c['scored']} scored of {c['input']} in "
              f"{w.seconds:.1f} s (job {record['seconds']:.1f} s), {c['scored'] / w.seconds:.1f} img/s, bytes read "
              f"{record['bytes_read']:,}" + (f", peak RSS MB: driver {res['peak_driver_py_mb']:.0f} + JVM "
                                            f"{res['peak_jvm_mb']:.0f}, worker {res['peak_worker_mb']:.0f}"
                                            if memory else ""), flush=True)
        return res

    def setup_inputs(self):
        args = self.args
        self.model = random_cnn(args.model_size)
        biggest = max([*args.sizes, args.synthetic])
        self.synth_all = synthetic_archive(biggest, args.image_size)
        if args.quick:
            self.real = linked_subset(self.synth_all, 60, "score-quick-real-standin")
        elif SHARED.is_dir():
            self.real = SHARED
        else:
            self.real_note = f"{SHARED} not found: the real-image parts were skipped"
            self.real = linked_subset(self.synth_all, 450, "score-real-standin-450")
        self.synth = self.first(args.synthetic)

    def first(self, n: int) -> Path:
        """The first n files of the largest synthetic archive (hard links), or that archive itself."""
        if n == max([*self.args.sizes, self.args.synthetic]):
            return self.synth_all
        return linked_subset(self.synth_all, n, f"{self.synth_all.name}-first{n}")

    def part_a(self):
        """Spark vs one process, each input raw and preprocessed, sides alternated, the fastest of each kept."""
        synth = f"synth{self.args.synthetic}"
        for label, raw, short in (("real X-rays (../shared/data/cxr)" if self.real == SHARED else "real stand-in",
                                   self.real, "real"),
                                  (f"synthetic {self.args.image_size} px x{self.args.synthetic}", self.synth, synth)):
            if self.state.done(f"a:{short}"):
                continue
            pre = self.preprocessed(raw, short)
            result = {"label": label, "input": str(raw), "preprocessed": str(pre),
                      **describe_files(input_files(raw, self.pre))}
            for mode, src in (("raw", raw), ("pre", pre)):
                runs = interleaved({"spark": lambda: self.score(src, f"a-{short}-{mode}"),
                                    "single": lambda: self.single(mode, src, raw)}, self.args.rounds)
                result[mode] = {"spark": min(runs["spark"], key=lambda x: x["wall_s"]),
                                "single": min(runs["single"], key=lambda x: x["seconds"]),
                                "spark_all_s": [round(x["wall_s"], 2) for x in runs["spark"]],
                                "single_all_s": [round(x["seconds"], 2) for x in runs["single"]]}
            self.state.save(f"a:{short}", result)

    def single(self, mode: str, src: Path, raw: Path) -> dict:
        s = child_answer(BASELINES, ["single", mode, str(src), str(self.model), self.args.model_size], LOG, cwd=ROOT)
        print(f"   single {mode:12s} {raw.name}: {s['scored']} scored in {s['seconds']:.1f} s, "
              f"{s['scored'] / s['seconds']:.1f} img/s", flush=True)
        return s

    def part_b(self):
        """First run, a rerun with nothing new, a rerun with 1% new files (flipped copies under new names)."""
        import cv2

        if self.state.done("b"):
            return
        arch = CACHE / "score-incremental-archive"
        shutil.rmtree(arch, ignore_errors=True)
        shutil.copytree(self.real, arch, copy_function=os.link)  # hard links: same size and mtime as the source
        files = input_files(arch, self.pre)
        runs = {"first": self.score(arch, "b-incremental", fresh=True, full=False)}
        runs["0 new"] = self.score(arch, "b-incremental", fresh=False, full=False)
        n_new, new_bytes = max(1, -(-len(files) // 100)), 0  # 1%, rounded up (450 -> 5)
        for src in files[:: max(1, len(files) // n_new)][:n_new]:
            stem, ext = os.path.splitext(src)
            dest = f"{stem}_bench_flipped{ext}"
            if not cv2.imwrite(dest, cv2.flip(cv2.imread(src, cv2.IMREAD_UNCHANGED), 1)):
                raise RuntimeError(f"could not write {dest}")
            new_bytes += os.path.getsize(dest)
        runs["1% new"] = self.score(arch, "b-incremental", fresh=False, full=False)
        self.state.save("b", {"files": len(files), "new_files": n_new, "new_bytes": new_bytes,
                              "archive_bytes": sum(os.path.getsize(f) for f in files), "runs": runs})

    def part_c(self):
        """The predictors alone, one thread, each engine in a fresh process."""
        for size in self.args.predict_sizes:
            random_cnn(size)
            for engine in ("onnx", "keras"):
                if not self.state.done(f"c:{engine}:{size}"):
                    r = child_answer(BASELINES, ["predict", engine, size, self.args.predict_images], LOG, cwd=ROOT)
                    print(f"   predictor {engine} {size} px: {r['img_per_s']:.1f} img/s, {r['img_per_cpu_s']:.1f} "
                          f"img per CPU s", flush=True)
                    self.state.save(f"c:{engine}:{size}", r)

    def part_c_spark(self):
        """The engines inside the job; run after part d, so TensorFlow in the workers does not weigh on d's RSS."""
        if not self.state.done("c:spark"):
            self.score(linked_subset(self.real, 8, "score-warmup-8"), "c-warmup-keras", engine="keras")  # TF first
            self.state.save("c:spark", {engine: self.score(self.real, f"c-spark-{engine}", engine=engine, full=True)
                                        for engine in ("onnx", "keras")})

    def part_d(self):
        """score.run on growing archives; a size whose estimated run ends after --deadline is skipped, and a
        fallback size is measured only when the largest was."""
        sizes, fallbacks, st = list(self.args.sizes), self.args.fallback_sizes, self.state.data
        for n in sizes + sorted(fallbacks, reverse=True):
            if n not in sizes and (max(sizes) not in self.skipped or
                                   any(m > n and f"d:{m}" in st for m in fallbacks)):
                continue
            if self.state.done(f"d:{n}") or self.past_deadline(n):
                continue
            src = self.first(n)
            info = describe_files(input_files(src, self.pre))
            print(f"   d: {n} files ({info['mb']:.0f} MB) ...", flush=True)
            self.state.save(f"d:{n}", {**info, **self.score(src, f"d-{n}", fresh=True, full=False, memory=True)})

    def past_deadline(self, n: int) -> bool:
        done = [v for k, v in self.state.data.items() if k.startswith("d:")]
        if not (self.args.deadline and done):
            return False
        per_image = max(r["wall_s"] / r["counts"]["input"] for r in done)
        left = deadline_seconds(self.args.deadline)
        if per_image * n * 1.1 <= left:
            return False
        print(f"   d: {n} files skipped: ~{per_image * n:.0f} s estimated, {left:.0f} s left before "
              f"{self.args.deadline}", flush=True)
        self.skipped.append(n)
        return True

    def part_e(self):
        if self.state.done("e"):
            return
        if self.args.deadline and deadline_seconds(self.args.deadline) < 0:
            print(f"   e: skipped, past the deadline {self.args.deadline}", flush=True)
            return
        self.state.save("e", predict_batch_udf_vs_ours(self))

    def stop(self):
        if self.spark is not None:
            self.spark.stop()


def measure(args, bench: Bench, meta: dict, argv) -> None:
    """The parts in order (c's Spark runs after d); what the report needs of the run goes into meta."""
    command, loads, t0 = command_line("bench_score.py", argv), meta.get("loads", []), time.perf_counter()
    meta["failed"] = []
    bench.setup_inputs()
    try:
        meta["failed"] = run_parts([p for p in ("a", "b", "c", "d", "c_spark", "e") if p.split("_")[0] in args.parts],
                                   lambda part: getattr(bench, f"part_{part}")(), loads)
    finally:
        commands = meta.get("commands") or ([meta["command"]] if meta.get("command") else [])
        meta.update(command=command, commands=commands + [command], loads=loads, real_note=bench.real_note,
                    session_s=getattr(bench, "session_s", meta.get("session_s", 0)),
                    warmup_s=getattr(bench, "warmup_s", meta.get("warmup_s", 0)),
                    minutes=meta.get("minutes", 0) + (time.perf_counter() - t0) / 60)
        bench.state.save("meta", meta)
        bench.stop()


def main(argv=None) -> int:
    from cxr.common.markdown import publish

    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.generate_only:
        synthetic_archive(args.generate_only)
        return 0
    quiet_logging()
    bench = Bench(args)
    meta = bench.state.data.get("meta", {})
    if not args.report_only:
        measure(args, bench, meta, argv)
    meta.setdefault("command", command_line("bench_score.py", argv))
    publish(report(args, bench.state.data, meta), Path(args.out), SECTION, write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
