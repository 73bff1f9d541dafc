#!/usr/bin/env python
"""The score job beside the engines built for batch inference on Python workers: Pool(2), Daft, Ray Data.

Every side runs the project's own per-file function (cxr.image.batch.process_file) and the same model.onnx (ONNX
Runtime, 1 thread per worker, batches of 32, the model loaded once per worker), on the same files, 2 workers, and
writes its predictions to Parquet; one row per file and the same probabilities are checked for every side against
Pool(2). Each side lives in its own long-lived child process (ChildServer: the Spark session, the Pool, Ray or
Daft started once, warmed up on the first 8 files, the time that took reported as the cold start); the timed runs
are interleaved, the order rotated each round, and CPU is read from /proc for the child and every process under
it (JVM, Python workers, Ray's raylets and workers). `score-before` is the score job of another checkout
(--before DIR, e.g. `git worktree add /tmp/before main`), in the same harness: before/after in one run.
The peers run in .venv-peers (`make bench-peers` builds it: the `peers` extra of pyproject.toml).

Parts: `throughput` (the table), `submit` (whole `scripts/submit.sh jobs/score.py --full` with MLflow on vs a fresh
Pool(2) process, imports and model load included; then an unchanged night), `profile` (where the time of one image
goes, one process).
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cxr.common.bench import (CACHE, TreeCPU, bench_parser, describe_files, input_files, job_config,  # noqa: E402
                              kinds_text, linked_subset, load_range, machine, random_cnn, rotations, synthetic_archive,
                              versions)
from cxr.common.bench.runs import ChildServer, serve  # noqa: E402
from cxr.common.markdown import publish, table as md_table  # noqa: E402

BATCH, WORKERS, FIRST = 32, 2, 8
REAL = ROOT.parent / "shared" / "data" / "cxr"
PEERS_PYTHON = ROOT / ".venv-peers" / "bin" / "python"
EVERYTHING = r"."   # every process under the side's child process
SECTION = "## Score: the peers side by side (scripts/bench_peers.py)"
RESULTS, SUBMIT = CACHE / "peers-results.json", CACHE / "peers-submit.json"
GROUPS = {"jvm": r"org\.apache\.spark\.deploy\.SparkSubmit|java", "workers": r"pyspark[./](daemon|worker)|"
          r"multiprocessing\.spawn|spawn_main|ray::|raylet|gcs_server|daft", "all": EVERYTHING}


# ----------------------------------------------------------------------------- the per-file work every side runs
_STATE: dict = {}


def _setup(model: str, root: str):
    """Once per worker process: the model, the preprocessing parameters it was trained with, the labels."""
    if "predictor" not in _STATE:
        from cxr.common.labels import alias_table
        from cxr.image.pipeline import PreprocessParams
        from cxr.models import store

        _STATE["predictor"] = store.cached_predictor(model, batch_size=BATCH, tf_threads=1, engine="onnx",
                                                     onnx_threads=1)
        _STATE["params"] = PreprocessParams.from_dict(store.read_metadata(model)["preprocess"])
        _STATE["aliases"] = alias_table(job_config()["preprocess"]["labels"])
        _STATE["root"] = root
    return _STATE


def score_files(paths: list[str], model: str, root: str, contents: list[bytes] | None = None) -> dict[str, list]:
    """paths (and their bytes, when the engine read them) -> {path, p_covid, p_normal, p_viral} of the ok ones."""
    import numpy as np

    from cxr.image.batch import process_file
    from cxr.score.frames import predict_fixed_batches

    s = _setup(model, root)
    done = []
    for i, path in enumerate(paths):
        data = contents[i] if contents is not None else Path(path).read_bytes()
        done.append(process_file(path, data, root, s["params"], s["aliases"]))
    ok = [d for d in done if d["status"] == "ok"]
    out = {"path": [d["path"] for d in ok], "p_covid": [], "p_normal": [], "p_viral": []}
    if ok:
        proba, _ = predict_fixed_batches(s["predictor"], np.stack(
            [np.frombuffer(d["image"], np.uint8).reshape(d["height"], d["width"]) for d in ok]), BATCH)
        for j, col in enumerate(("p_covid", "p_normal", "p_viral")):
            out[col] = proba[:, j].tolist()
    return out


def _chunk(paths, model, root):
    return score_files(paths, model, root)


def _write(columns: dict[str, list], out: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), out / "part-0.parquet")


def _merge(parts: list[dict]) -> dict[str, list]:
    keys = ("path", "p_covid", "p_normal", "p_viral")
    return {k: [v for p in parts for v in p[k]] for k in keys}


# ----------------------------------------------------------------------------- the sides (in their child process)
class Pool2:
    def __init__(self, files, model, root):
        import multiprocessing as mp

        self.files, self.model, self.root = files, model, root
        self.pool = mp.get_context("spawn").Pool(WORKERS)

    def run(self, files, out: Path) -> dict:
        chunks = [files[i:i + BATCH] for i in range(0, len(files), BATCH)]
        parts = self.pool.starmap(_chunk, [(c, self.model, self.root) for c in chunks], chunksize=1)
        _write(_merge(parts), out)
        return {}


class ScoreJob:
    """cxr.spark.score.run, local[2], conf/default.yaml (UI off), into a fresh PRED_DIR each time."""

    def __init__(self, files, model, root):
        from cxr.spark.session import get_spark

        self.model, self.root = model, root
        self.config = job_config()
        self.spark = get_spark(self.config, master=f"local[{WORKERS}]", app_name="bench-peers",
                               extra_conf={"spark.ui.enabled": False, "spark.eventLog.enabled": False})

    def prepare(self, files, out: Path) -> None:
        _link(files, self.root, out.with_name(out.name + "-in"))
        self._before = self._probe()   # outside the timed window: the probe jobs are the benchmark's, not the run's

    def run(self, files, out: Path) -> dict:
        from cxr.spark.score import run

        archive = out.with_name(out.name + "-in")
        record = run(self.spark, str(archive), self.model, str(out), self.config, full=True, batch_size=BATCH)
        return {"monitoring_s": (record.get("monitoring") or {}).get("seconds"),
                **{k: record.get(k) for k in ("spark_jobs", "timings_s", "counts", "read_passes", "bytes_read")}}

    def finish(self) -> dict:
        """After the timed window: the Spark jobs seen from outside the run (the record's count checked)."""
        return {"jobs_seen": self._probe() - self._before - 1}

    def _probe(self) -> int:
        """The id of a job started now (ids count up in a SparkContext): the jobs of a run lie in between."""
        sc, group = self.spark.sparkContext, f"probe-{time.time_ns()}"
        sc.setLocalProperty("spark.jobGroup.id", group)
        sc.parallelize([1], 1).count()
        sc.setLocalProperty("spark.jobGroup.id", None)
        return sc.statusTracker().getJobIdsForGroup(group)[0]


class Daft:
    """Daft's native runner: paths in, daft.functions.download() reads the bytes, a @daft.cls UDF (model once per
    instance) with WORKERS instances, batches of 32."""

    def __init__(self, files, model, root):
        import daft

        self.daft = daft

        @daft.cls(max_concurrency=WORKERS)
        class Score:
            def __init__(self, model: str, root: str):
                self.model, self.root = model, root
                _setup(model, root)

            @daft.method.batch(return_dtype=daft.DataType.list(daft.DataType.float64()), batch_size=BATCH)
            def __call__(self, paths, data):
                paths = paths.to_pylist()
                got = score_files(paths, self.model, self.root, data.to_pylist())
                probs = dict(zip(got["path"], map(list, zip(got["p_covid"], got["p_normal"], got["p_viral"]))))
                return [probs.get(p) for p in paths]

        self.udf = Score(model, root)

    def run(self, files, out: Path) -> dict:
        df = self.daft.from_pydict({"path": list(files)})
        df = df.with_column("data", self.daft.functions.download(df["path"]))
        got = df.select("path", self.udf(df["path"], df["data"]).alias("p")).to_pydict()
        rows = [(path, p) for path, p in zip(got["path"], got["p"]) if p is not None]
        _write({"path": [r[0] for r in rows], "p_covid": [r[1][0] for r in rows],
                "p_normal": [r[1][1] for r in rows], "p_viral": [r[1][2] for r in rows]}, out)
        return {}


class RayData:
    """Ray Data: from_items(paths) + map_batches of an actor class (model once per actor), WORKERS actors, the
    actors read the files themselves."""

    def __init__(self, files, model, root):
        import ray

        ray.init(num_cpus=WORKERS, include_dashboard=False, log_to_driver=False)
        self.ray, self.model, self.root = ray, model, root

    def run(self, files, out: Path) -> dict:
        import ray.data

        model, root = self.model, self.root

        class Score:
            def __init__(self):
                _setup(model, root)

            def __call__(self, batch):
                return score_files(list(batch["path"]), model, root)

        ds = ray.data.from_items([{"path": p} for p in files], override_num_blocks=max(WORKERS, len(files) // BATCH))
        rows = ds.map_batches(Score, batch_size=BATCH, concurrency=WORKERS, num_cpus=1).to_pandas()
        _write({c: rows[c].tolist() for c in ("path", "p_covid", "p_normal", "p_viral")}, out)
        return {}


SIDES = {"pool2": Pool2, "score": ScoreJob, "score-before": ScoreJob, "daft": Daft, "ray": RayData}
PEERS = ("daft", "ray")


def _link(files, root: str, dst: Path) -> None:
    """The files hard-linked under dst in their folders (same bytes and times; the job lists dst)."""
    if dst.exists():
        return
    for f in files:
        target = dst / Path(f).relative_to(root)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.link(f, target)


def _engine_version(side: str) -> str:
    from importlib import metadata

    package = {"daft": "daft", "ray": "ray", "pool2": None}.get(side, "pyspark")
    return f"{package} {metadata.version(package)}" if package else "multiprocessing"


def _side_server(arg: dict):
    """The child's handler: `start` builds the side and warms it up on the first 8 files (the cold start),
    `run` scores every file once, measured."""
    side: dict = {}

    def handle(req):
        if req["op"] == "start":
            files = req["files"]
            with TreeCPU(GROUPS) as w0:
                obj = SIDES[arg["side"]](files, arg["model"], arg["root"])
            if hasattr(obj, "prepare"):
                obj.prepare(files[:FIRST], Path(req["out"]))
            with TreeCPU(GROUPS) as w1:
                obj.run(files[:FIRST], Path(req["out"]))
            if hasattr(obj, "finish"):
                obj.finish()
            side["obj"] = obj
            return {"engine": _engine_version(arg["side"]), "start_s": w0.seconds, "first8_s": w1.seconds,
                    "start_cpu": w0.self_cpu + w0.cpu_s["all"], "first8_cpu": w1.self_cpu + w1.cpu_s["all"],
                    "first8_groups": {"driver": w1.self_cpu, **w1.cpu_s}}
        if hasattr(side["obj"], "prepare"):
            side["obj"].prepare(req["files"], Path(req["out"]))
        with TreeCPU(GROUPS) as w:
            extra = side["obj"].run(req["files"], Path(req["out"]))
        if hasattr(side["obj"], "finish"):
            extra.update(side["obj"].finish())
        return {"seconds": w.seconds, "self_cpu": w.self_cpu, "cpu": w.cpu_s, "machine_cpu": w.machine_cpu,
                "load": w.load, **extra}
    return handle


# ----------------------------------------------------------------------------- the parent
def _server(name: str, model: str, root: str, before: str | None) -> ChildServer:
    arg = {"side": name, "model": model, "root": root}
    log = CACHE / "logs" / f"peers-{name}.log"
    env, cwd = {}, None
    if name == "score-before":   # the other checkout's cxr, in the child and its Spark workers
        script = Path(before) / "scripts" / "bench_peers.py"
        shutil.copy(__file__, script)
        env["PYTHONPATH"] = str(before)
        cwd = Path(before)   # `python -m pyspark.daemon` puts the JVM's cwd first on the workers' sys.path
    else:
        script = Path(__file__)
    python = str(PEERS_PYTHON) if name in PEERS else sys.executable
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return ChildServer(script, name, arg, log, cwd=cwd, python=python)
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def _predictions(name: str, out: Path):
    import pyarrow.dataset as ds

    folder = out / "predictions" if name.startswith("score") else out
    table = ds.dataset(str(folder), format="parquet", partitioning="hive").to_table(
        columns=["path", "p_covid", "p_normal", "p_viral"]).to_pandas()
    table["path"] = table["path"].str.replace(r"^file:", "", regex=True)
    return table


def _check(name: str, out: Path, reference, files, root: str) -> dict:
    """One row per file that decodes, and the probabilities of Pool(2) (max |diff|)."""
    import numpy as np

    got = _predictions(name, out)
    if name.startswith("score"):   # the job scored hard links of the files under OUT-in
        got["path"] = got["path"].str.replace(str(out) + "-in", root, regex=False)
    merged = reference.merge(got, on="path", how="outer", suffixes=("", "_side"), indicator=True)
    diff = float(np.abs(merged[[f"{c}_side" for c in ("p_covid", "p_normal", "p_viral")]].to_numpy()
                        - merged[["p_covid", "p_normal", "p_viral"]].to_numpy()).max()) if len(merged) else 0.0
    return {"rows": int(len(got)), "unique": int(got["path"].nunique()),
            "matched": bool((merged["_merge"] == "both").all()), "max_abs_diff": diff}


def throughput(args, files: list[str], root: str, model: str, label: str) -> dict:
    sides = [s for s in args.sides if s in SIDES]
    servers, cold = {}, {}
    work = CACHE / "peers" / label
    shutil.rmtree(work, ignore_errors=True)
    for name in sides:
        t0 = time.perf_counter()
        servers[name] = _server(name, model, root, args.before)
        cold[name] = servers[name].call(op="start", files=files, out=str(work / f"{name}-warm"))
        cold[name]["process_s"] = time.perf_counter() - t0
        print(f"  {label} {name}: started, cold start {cold[name]}", flush=True)
    runs = {name: [] for name in sides}
    checks = {}
    reference = None
    for r, name in rotations(sides, args.rounds):
        out = work / f"{name}-r{r}"
        res = servers[name].call(op="run", files=files, out=str(out))
        res["cpu_total"] = res["self_cpu"] + res["cpu"]["all"]
        runs[name].append(res)
        print(f"  {label} round {r} {name}: {res['seconds']:.1f} s, CPU {res['cpu_total']:.1f} s "
              f"(machine {res['machine_cpu']:.1f}) "
              f"(self {res['self_cpu']:.1f}, jvm {res['cpu']['jvm']:.1f}, workers {res['cpu']['workers']:.1f}), "
              f"load {res['load'][0]:.1f}", flush=True)
        if name == "pool2" and reference is None:
            reference = _predictions(name, out)
    for name in sides:
        checks[name] = _check(name, work / f"{name}-r0", reference, files, root) if reference is not None else None
    for s in servers.values():
        s.close()
    return {"files": len(files), "describe": describe_files(files), "cold": cold, "runs": runs, "checks": checks}


def profile(files: list[str], root: str, model: str) -> dict:
    """Where one image's time goes in a score worker, in ONE process (this one; warm: imports, model, 8 files
    first): CPU ms per image of each step, then the whole worker function (cxr.score.frames.score_raw_frame on
    batches of 32 and the job's file size cap, the task summary per task of score.files_per_task files) for
    what the steps leave out (rows, pandas, types)."""
    import hashlib

    import numpy as np
    import pandas as pd

    from cxr.image.pipeline import adjust_brightness, decode_with, equalization_input, equalize, resize_square, to_uint8
    from cxr.scope.rules import ScopeGate
    from cxr.score.frames import Engine, predict_fixed_batches, score_raw_frame
    from cxr.score.summary import with_summaries

    config = job_config()
    s = _setup(model, root)
    params, gate = s["params"], ScopeGate.from_config(config)
    steps = dict.fromkeys(("read", "sha256", "dicom header (scope gate)", "decode", "CLAHE", "brightness", "resize",
                           "ONNX (batches of 32)"), 0.0)
    clock = time.process_time
    images = []
    for f in files[:FIRST]:   # warm
        score_files([f], model, root)
    for f in files:
        t = clock(); data = Path(f).read_bytes(); steps["read"] += clock() - t
        t = clock(); hashlib.sha256(data).hexdigest(); steps["sha256"] += clock() - t
        t = clock(); gate.check(data); steps["dicom header (scope gate)"] += clock() - t
        t = clock(); decoded = decode_with(data, params); steps["decode"] += clock() - t
        t = clock(); eq = equalize(equalization_input(decoded), params); steps["CLAHE"] += clock() - t
        t = clock(); bright = adjust_brightness(to_uint8(eq), params.brightness_alpha, params.brightness_beta)
        steps["brightness"] += clock() - t
        t = clock(); images.append(resize_square(bright, params.size, params.resize_mode)); steps["resize"] += clock() - t
    stack = np.stack(images)
    t = clock(); predict_fixed_batches(s["predictor"], stack, BATCH); steps["ONNX (batches of 32)"] += clock() - t
    engine = Engine(model, "onnx", BATCH, 1, 1)
    frame = pd.DataFrame({"path": [f"file:{f}" for f in files], "size": [os.path.getsize(f) for f in files],
                          "mtime_ms": 0})
    batches = [frame.iloc[i:i + BATCH] for i in range(0, len(frame), BATCH)]
    t = clock()
    per_task = int(config["score"]["files_per_task"]) // BATCH
    max_bytes = int(float(config["preprocess"]["max_file_mb"]) * 1024 * 1024)
    for i in range(0, len(batches), per_task):
        for _ in with_summaries((score_raw_frame(b, f"file:{root}", params, s["aliases"], engine, max_bytes, gate)
                                 for b in batches[i:i + per_task]), 6, 200):
            pass
    whole = clock() - t
    n = len(files)
    ms = {k: 1000 * v / n for k, v in steps.items()}
    ms["worker function (all of the above + rows, pandas, summary)"] = 1000 * whole / n
    ms["of which not in the steps above"] = ms["worker function (all of the above + rows, pandas, summary)"] - sum(
        v for k, v in ms.items() if not k.startswith("worker"))
    return ms


def pool_child(root: str, model: str, out: str) -> dict:
    """A fresh process as a user would write it: imports, a spawn Pool(2), every file through the per-file
    function and the model (batches of 32), predictions to Parquet."""
    import multiprocessing as mp

    files = input_files(Path(root), job_config()["preprocess"])
    chunks = [files[i:i + BATCH] for i in range(0, len(files), BATCH)]
    with mp.get_context("spawn").Pool(WORKERS) as pool:
        parts = pool.starmap(_chunk, [(c, model, root) for c in chunks], chunksize=1)
    _write(_merge(parts), Path(out))
    return {"files": len(files)}


def submit(root: str, model: str, rounds: int, before: str | None = None) -> dict:
    """The whole `scripts/submit.sh jobs/score.py --full` (local[2], MLflow on, into a throwaway sqlite store) vs
    a fresh Pool(2) process (pool_child), alternated; then an unchanged night (the same command without --full).
    CPU: getrusage of the waited child and its descendants (JVM, Python driver, workers)."""
    from cxr.common.bench import child_run, run_child

    work = CACHE / "peers" / "submit"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{work}/mlflow.db"}
    log = CACHE / "logs" / "peers-submit.log"
    runs = {"submit --full": [], "pool2 process": [], "unchanged night": []}

    def job(out, full, checkout=None):
        """checkout: another one (--before): its submit.sh and jobs/score.py, its cxr in the driver and workers."""
        home = Path(checkout) if checkout else ROOT
        cmd = ["bash", str(home / "scripts" / "submit.sh"), "--master", f"local[{WORKERS}]", str(home / "jobs" / "score.py"),
               "--input", root, "--model", model, "--output", str(out), *(["--full"] if full else [])]
        extra = {"CXR_VENV": str(ROOT / ".venv"), "PYTHONPATH": str(home)} if checkout else {}
        r = run_child(cmd, log, env={**env, **extra}, answer=False, append=True, cwd=home)   # cwd: the workers' cxr
        record = json.loads(max((out / "runs").glob("*.json"), key=os.path.getmtime).read_text())
        return {"seconds": r.wall_s, "cpu": r.cpu_s, "spark_jobs": record.get("spark_jobs"),
                "timings_s": record.get("timings_s"), "counts": record.get("counts")}

    if before:
        runs["submit --full (before)"] = []
    for r in range(rounds):
        out = work / f"pred-{r}"
        order = ["submit --full", "pool2 process", *(["submit --full (before)"] if before else [])]
        order = order[r % len(order):] + order[:r % len(order)]
        for side in order:
            if side == "submit --full (before)":
                runs[side].append(job(work / f"pred-before-{r}", True, before))
            elif side == "submit --full":
                runs[side].append(job(out, True))
            else:
                c = child_run(__file__, ["pool", root, model, str(work / f"pool-{r}")], log)
                runs[side].append({"seconds": c.wall_s, "cpu": c.cpu_s})
            print(f"  submit round {r} {side}: {runs[side][-1]}", flush=True)
        runs["unchanged night"].append(job(out, False))
        print(f"  submit round {r} unchanged night: {runs['unchanged night'][-1]}", flush=True)
    return runs


def _input(name: str) -> Path:
    """real: ../shared/data/cxr; synthN: the N-file synthetic archive; synthN:K its first K files (hard links)."""
    if name == "real":
        return REAL
    n, _, k = name.removeprefix("synth").partition(":")
    archive = synthetic_archive(int(n))
    return linked_subset(archive, int(k), f"score-synth-{n}-first{k}") if k else archive


def _median(runs, key):
    return statistics.median(r[key] for r in runs)


def table(result: dict, base: str = "pool2") -> list[str]:
    runs = result["runs"]
    ref = _median(runs[base], "cpu_total")
    lines = ["| side | wall s (median) | CPU s (median, all processes) | of which JVM | Python workers | driver | "
             "machine CPU s (check) | x Pool(2) CPU | Spark jobs | rows / max abs diff vs Pool(2) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, rs in runs.items():
        c = result["checks"].get(name) or {}
        lines.append(f"| {name} | {_median(rs, 'seconds'):.1f} | {_median(rs, 'cpu_total'):.1f} | "
                     f"{statistics.median(r['cpu']['jvm'] for r in rs):.1f} | "
                     f"{statistics.median(r['cpu']['workers'] for r in rs):.1f} | "
                     f"{statistics.median(r['self_cpu'] for r in rs):.1f} | "
                     f"{statistics.median(r.get('machine_cpu', float('nan')) for r in rs):.1f} | "
                     f"**{_median(rs, 'cpu_total') / ref:.2f}** | {rs[0].get('jobs_seen', '')} | "
                     f"{c.get('rows')} ({'one per file' if c.get('unique') == c.get('rows') and c.get('matched') else 'MISMATCH'}) / {c.get('max_abs_diff', 0):.1e} |")
    return lines


def cold_table(result: dict) -> list[str]:
    rows = [[name, c.get("engine", ""), f"{c['start_s']:.1f} / {c['start_cpu']:.1f}",
             f"{c['first8_s']:.1f} / {c['first8_cpu']:.1f}", f"**{c['start_s'] + c['first8_s']:.1f}**"]
            for name, c in result["cold"].items()]
    return md_table(["side", "engine", "start: wall s / CPU s", "first 8 files: wall s / CPU s",
                     "cold start, wall s"], rows)


def submit_table(runs: dict) -> list[str]:
    pool = statistics.median(r["cpu"] for r in runs["pool2 process"])
    rows = [[name, f"{_median(rs, 'seconds'):.1f}", f"{_median(rs, 'cpu'):.1f}",
             f"**{_median(rs, 'cpu') / pool:.2f}**", rs[0].get("spark_jobs", "")] for name, rs in runs.items() if rs]
    return md_table(["run", "wall s (median)", "CPU s (median, the process and its children)", "x Pool(2) process CPU",
                     "Spark jobs"], rows)


def _saved(path: Path, args) -> Path:
    """Where a run keeps its measurements: a trial (--no-write) beside, not over, the ones the section is from."""
    return path.with_name(f"{path.stem}-trial{path.suffix}") if args.no_write else path


def section(results: Path = RESULTS, submitted: Path = SUBMIT) -> str:
    """BENCHMARKS.md's peers section from saved measurements: whatever has been measured."""
    lines = [SECTION, ""]
    if results.exists():
        state = json.loads(results.read_text())
        loads = [x for res in state["results"].values() for rs in res["runs"].values() for r in rs for x in r["load"]]
        lines += [f"{state.get('date', '?')}, {machine()}, 1-minute load {load_range(loads)}; "
                  f"{', '.join(f'{k} {v}' for k, v in state['versions'].items())}. Every side runs "
                  "`cxr.image.batch.process_file` and the same model.onnx (the study CNN at "
                  f"{state['args'].get('size', 128)} px, random weights; ONNX Runtime, 1 thread per worker, batches of "
                  f"{BATCH}, the model loaded once per worker), 2 workers, predictions to Parquet; "
                  f"{state['args']['rounds']} timed rounds per side, interleaved, the order rotated each round; "
                  "CPU of every process under each side's own child process, polled from /proc every 0.1 s (the "
                  "poller's own CPU taken out); \"machine CPU\" is the whole machine's busy CPU over the same "
                  "run, a check that the tree missed nothing (it also holds the other sides' idle engines and the "
                  "poller).", ""]
        for name, res in state["results"].items():
            d = res["describe"]
            lines += [f"### {name}: {d['files']} files ({kinds_text(d['kinds'])}, {d['mb']:.0f} MB)", "",
                      *table(res), "", "Cold start (a fresh child process: the engine started, then the first "
                      f"{FIRST} files):", "", *cold_table(res), ""]
    if submitted.exists():
        state = json.loads(submitted.read_text())
        lines += ["### The whole `spark-submit jobs/score.py --full` as a user runs it (450 real X-rays)", "",
                  f"{state.get('date', '?')}: `scripts/submit.sh --master local[2] jobs/score.py --full` (MLflow on, "
                  "a sqlite store) vs a fresh Python process running a spawn Pool(2) of the same function and model "
                  "(imports and model load included), alternated; then an unchanged night (the same command "
                  "without --full). CPU from getrusage of the waited child and its descendants.", "",
                  *submit_table(state["submit"]), ""]
    lines.append("Reproduce: `make bench-peers` (both inputs, every side; BENCH_ARGS='--submit' for the whole "
                 "spark-submit, '--profile N' for the worker profile, '--report-only' to rewrite this section).")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = bench_parser(__doc__, rounds=3)
    p.add_argument("--sides", nargs="*", default=["pool2", "score", "daft", "ray"])
    p.add_argument("--before", help="another checkout whose score job runs as side score-before")
    p.add_argument("--inputs", nargs="*", default=["real", "synth5000"])
    p.add_argument("--size", type=int, default=128, help="the model's input side")
    p.add_argument("--submit", action="store_true", help="the whole spark-submit vs a fresh Pool(2) process instead")
    p.add_argument("--profile", type=int, default=0, help="profile the worker function on the first N files instead")
    p.add_argument("--report-only", action="store_true", help="write the section from the saved measurements")
    args = p.parse_args()
    if args.serve:
        return serve(_side_server(json.loads(args.serve)), args.reply_fd)
    if args.child:
        from cxr.common.bench import answer_child

        return answer_child(lambda req: pool_child(*req[1:]), args.child)
    if args.report_only:
        publish(section(), Path(args.out), SECTION, not args.no_write)
        return 0
    if args.before:
        args.sides = list(dict.fromkeys([*args.sides, "score-before"]))
    model = str(random_cnn(args.size))
    pre = job_config()["preprocess"]
    results = {}
    if args.profile:
        for name in args.inputs:
            root = _input(name).resolve()
            files = input_files(root, pre)[:args.profile]
            results[f"profile-{name}"] = profile(files, str(root), model)
            print(name, json.dumps(results[f"profile-{name}"], indent=1), flush=True)
        return 0
    if args.submit:
        results["submit"] = submit(str(REAL.resolve()), model, args.rounds, args.before)
        saved = _saved(SUBMIT, args)
        saved.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), **results}, indent=1, default=str))
        publish(section(submitted=saved), Path(args.out), SECTION, not args.no_write)
        return 0
    for name in args.inputs:
        root = _input(name).resolve()
        files = input_files(root, pre)
        results[name] = throughput(args, files, str(root), model, name)
        print("\n".join(table(results[name])), flush=True)
    saved = _saved(RESULTS, args)
    saved.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "versions": versions(), "results": results,
                                 "args": vars(args)}, indent=1, default=str))
    publish(section(results=saved), Path(args.out), SECTION, not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
