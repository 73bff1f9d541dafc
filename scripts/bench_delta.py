#!/usr/bin/env python
"""The score job's Delta tables at archive scale: what a commit costs, what an unchanged night costs, and whether
maintenance keeps the state table's file count bounded over 30 nights; writes "## Score: Delta tables" in
BENCHMARKS.md.

One local[2] session in this process, a synthetic archive (cxr.common.bench.synthetic_archive) and the random
study CNN (timing only). Steps, kept in CACHE/delta/results.json (--redo STEP measures it again):
  first    the first run over the archive into the Parquet layout, then the same as Delta tables (the default)
  nights   30 nights on the Delta PRED_DIR: each touches --touched files (new mtime, same bytes: hashed, a state
           row each, nothing rescored); one more night with nothing changed; maintenance (cxr.score.maintain:
           compact, checkpoint, vacuum with 0 h retention) every --maintain-every nights

    python scripts/bench_delta.py                    # 20,000 files
    python scripts/bench_delta.py --files 2000 --no-write
"""
from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cxr.common.bench import (CACHE, State, Timer, bench_parser, command_line, job_config, load_range,  # noqa: E402
                              loadavg, machine, quiet_logging, random_cnn, synthetic_archive, versions)
from cxr.common.markdown import num, publish, table  # noqa: E402

HEADING = "## Score: Delta tables"
STEPS = ("first", "nights")


def parse_args(argv=None):
    p = bench_parser(__doc__, state="delta/results.json", redo_help="steps to measure again", redo_choices=STEPS)
    p.add_argument("--files", type=int, default=20_000, help="files in the archive")
    p.add_argument("--image-px", type=int, default=256, help="side of the synthetic files (decode cost)")
    p.add_argument("--model-px", type=int, default=64, help="input size of the random CNN")
    p.add_argument("--nights", type=int, default=30)
    p.add_argument("--touched", type=int, default=200, help="files touched each night")
    p.add_argument("--maintain-every", type=int, default=7, help="nights between maintenance runs")
    return p.parse_args(argv)


def score_run(spark, archive: Path, model: Path, out: Path, config: dict, run_id: str) -> dict:
    from cxr.spark import score

    with Timer() as t:
        record = score.run(spark, str(archive), str(model), str(out), config, run_id=run_id)
    return {"wall_s": t.seconds, "commit_s": record["timings_s"].get("commit", 0.0), "counts": record["counts"],
            "load": loadavg()}


def state_files(out: Path) -> dict:
    """Files the state table's current version lists, Parquet files of it on disk, log entries."""
    from deltalake import DeltaTable

    table = DeltaTable(str(out / "state"))
    disk = [p for p in (out / "state").rglob("*.parquet") if "_delta_log" not in p.parts]
    return {"active": len(table.file_uris()), "on_disk": len(disk), "version": table.version(),
            "log_files": len(list((out / "state" / "_delta_log").glob("*.json")))}


def measure_first(spark, args, archive, model, work: Path) -> dict:
    out = {}
    for fmt in ("parquet", "delta"):   # Parquet first: the Delta run (whose wall the nights are compared with) meets warm workers
        pred = work / f"first-{fmt}"
        shutil.rmtree(pred, ignore_errors=True)
        config = job_config({"score.table_format": fmt})
        out[fmt] = score_run(spark, archive, model, pred, config, f"first-{fmt}")
        print(f"first run ({fmt}): {out[fmt]['wall_s']:.1f} s, commit {out[fmt]['commit_s']:.2f} s", flush=True)
    return out


def measure_nights(spark, args, archive, model, work: Path) -> dict:
    from cxr.score.delta_table import maintain

    pred = work / "nights"
    shutil.rmtree(pred, ignore_errors=True)
    shutil.copytree(work / "first-delta", pred)
    config = job_config({"score.table_format": "delta"})
    files = sorted(p for p in archive.rglob("*") if p.is_file() and not p.name.startswith("."))
    nights = []
    for night in range(1, args.nights + 1):
        for f in files[(night * args.touched) % len(files):][:args.touched]:
            os.utime(f, (time.time(), f.stat().st_mtime + 1))   # same bytes, newer mtime
        row = score_run(spark, archive, model, pred, config, f"night{night:02d}")
        row.update(night=night, state=state_files(pred))
        if night % args.maintain_every == 0:
            with Timer() as t:
                maintain(str(pred), retention_hours=0)
            row.update(maintain_s=t.seconds, after_maintain=state_files(pred))
        nights.append(row)
        print(f"night {night}: {row['wall_s']:.1f} s, commit {row['commit_s']:.2f} s, state {row['state']}", flush=True)
    unchanged = score_run(spark, archive, model, pred, config, "unchanged")
    return {"nights": nights, "unchanged": unchanged}


def report(args, st: dict) -> str:
    first, nights = st["first"], st["nights"]
    d, p, u = first["delta"], first["parquet"], nights["unchanged"]
    commits = [n["commit_s"] for n in nights["nights"]]
    most_active = max(n["state"]["active"] for n in nights["nights"])
    most_disk = max(n["state"]["on_disk"] for n in nights["nights"])
    ratio = u["wall_s"] / d["wall_s"]
    lines = [HEADING, "",
             f"{args.files:,} synthetic files ({args.image_px} px PNG/JPEG/DICOM mix), the random study CNN at "
             f"{args.model_px} px, local[2] in one process; {machine()}; load {st.get('load', '?')}; "
             f"{st.get('date', '?')}. `{command_line('bench_delta.py', st.get('argv', []))}`", "",
             "Wall: `score.run` in one process, its session already up (the score section's (b) times whole "
             "spark-submits); commit: the run's `commit` lap, moving the staged files in and the Delta "
             "transactions (or the renames), without the staging clean-up and the monitoring.", "",
             *table(["run", "wall s", "commit s", "scored", "goal"], [
                 ["first run, Delta", num(d["wall_s"]), num(d["commit_s"], 2), d["counts"]["scored"],
                  f"commit <= 1 s: **{'met' if d['commit_s'] <= 1 else 'not met'}**"],
                 ["first run, Parquet layout (renames)", num(p["wall_s"]), num(p["commit_s"], 2),
                  p["counts"]["scored"], ""],
                 [f"a night touching {args.touched} files (median of {len(commits)})", num(_median(
                     [n["wall_s"] for n in nights["nights"]])), num(_median(commits), 2), 0,
                  f"commit <= 1 s: **{'met' if max(commits) <= 1 else 'not met'}** (max {max(commits):.2f} s)"],
                 ["unchanged night", num(u["wall_s"]), num(u["commit_s"], 2), u["counts"]["scored"],
                  f"<= 0.05x first run: **{'met' if ratio <= 0.05 else 'not met'}** ({ratio:.3f}x)"]]), "",
             f"State table over {len(commits)} nights, maintenance every {args.maintain_every} nights "
             f"(`python -m cxr.score.maintain PRED_DIR --retention-hours 0`): at most {most_active} files in the "
             f"current version and {most_disk} Parquet files on disk (without maintenance: one more a night).", "",
             *table(["night", "state files (current)", "on disk", "after maintenance", "maintenance s"], [
                 [n["night"], n["state"]["active"], n["state"]["on_disk"],
                  n.get("after_maintain", {}).get("active", ""), num(n["maintain_s"], 2) if "maintain_s" in n else ""]
                 for n in nights["nights"] if n["night"] % args.maintain_every in (0, 1) or n["night"] == len(commits)]),
             "", f"Versions: {st.get('versions')}."]
    return "\n".join(lines) + "\n"


def _median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if xs else 0.0


def main(argv=None) -> int:
    args = parse_args(argv)
    quiet_logging()
    st = State(Path(args.state), args.redo)
    if not args.report_only:
        from cxr.spark.session import get_spark

        archive = synthetic_archive(args.files, args.image_px)
        model = random_cnn(args.model_px)
        work = CACHE / "delta" / f"{args.files}"
        work.mkdir(parents=True, exist_ok=True)
        spark = get_spark(job_config(), master="local[2]", app_name="bench-delta")
        loads = [loadavg()]
        if not st.done("first"):
            st.save("first", measure_first(spark, args, archive, model, work))
        loads.append(loadavg())
        if not st.done("nights"):
            st.save("nights", measure_nights(spark, args, archive, model, work))
        loads.append(loadavg())
        spark.stop()
        st.save("argv", list(argv if argv is not None else sys.argv[1:]), date=time.strftime("%Y-%m-%d"),
                load=load_range(loads), versions=versions(("pyspark", "pyarrow", "deltalake")))
    publish(report(args, st.data), Path(args.out), HEADING, write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
