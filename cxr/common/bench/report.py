"""What every benchmark's section of BENCHMARKS.md and command line share: the machine and versions it ran on,
the load on the shared machine, the command to reproduce it, and the flags of a bench script."""
from __future__ import annotations

import argparse
import logging
import os
import platform
import subprocess
from pathlib import Path

from cxr.common.bench.inputs import CACHE

ROOT = Path(__file__).resolve().parents[3]
BENCHMARKS = ROOT / "BENCHMARKS.md"


def versions(packages=("pyspark", "pyarrow", "opencv-python-headless", "numpy", "pandas")) -> dict:
    """Python, the given packages' versions (those installed) and Java's."""
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in packages:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    try:
        java = subprocess.run(["java", "-version"], capture_output=True, text=True).stderr.splitlines()
    except OSError:
        java = []
    out["java"] = java[0].split('"')[1] if java and '"' in java[0] else "?"
    return out


def machine(bold: bool = False) -> str:
    """"2 cores (os.cpu_count(), x86_64, Linux)": the line every report's numbers depend on (bold: the cores)."""
    cores = f"**{os.cpu_count()} cores**" if bold else f"{os.cpu_count()} cores"
    return f"{cores} (os.cpu_count(), {platform.machine()}, {platform.system()})"


def load_range(loads) -> str:
    """"0.8-2.3": the 1-minute load averages seen during a bench (absolute times are only as good as this)."""
    loads = list(loads)
    return f"{min(loads):.1f}-{max(loads):.1f}" if loads else "0.0-0.0"


def command_line(script: str, argv) -> str:
    """The command that reproduces a run, as the reports quote it."""
    return f".venv/bin/python scripts/{script}" + "".join(f" {a}" for a in argv)


def bench_parser(doc: str, *, state: str | None = None, redo_help: str = "measurements to make again",
                 redo_choices=None, rounds: int | None = None, rounds_help: str = "timed runs per side"
                 ) -> argparse.ArgumentParser:
    """The flags every bench script shares: --out and --no-write (where its section goes); with state (a file name
    under CACHE), --state, --report-only and --redo of a bench that keeps its measurements; with rounds (its
    default), --rounds; and the hidden --child, --serve and --reply-fd its own child processes are started with
    (runs.child_answer, runs.ChildServer)."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--out", default=str(BENCHMARKS), help="BENCHMARKS.md to update")
    p.add_argument("--no-write", action="store_true", help="print the section only")
    if rounds is not None:
        p.add_argument("--rounds", type=int, default=rounds, help=rounds_help)
    if state:
        p.add_argument("--state", default=str(CACHE / state), help="measurements cache (resumable)")
        p.add_argument("--report-only", action="store_true", help="write the section from --state, measure nothing")
        p.add_argument("--redo", nargs="*", default=[], choices=redo_choices, help=redo_help)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--serve", help=argparse.SUPPRESS)
    p.add_argument("--reply-fd", type=int, help=argparse.SUPPRESS)
    return p


def quiet_logging() -> None:
    """Warnings only from the jobs' own loggers: their per-stage INFO lines would bury the bench's output."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
