"""Shared helpers of the benchmark scripts (scripts/bench_*.py): timing, CPU seconds and peak memory from /proc.

No psutil (not a dependency): everything is read from /proc, so these helpers work on Linux only.

    with WorkerMemory(SPARK_WORKERS) as mem, Timer() as t:   # peak RSS of the Spark Python workers
        cpu0 = cpu_seconds(SPARK_WORKERS)
        ...
    print(t.seconds, mem.peak_mb, cpu_delta(cpu0, cpu_seconds(SPARK_WORKERS)))
"""
from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

# cmdline patterns of the processes the benchmarks watch (all below the benchmark's own process)
SPARK_WORKERS = r"pyspark[./](daemon|worker)"
SPARK_JVM = r"org\.apache\.spark\.deploy\.SparkSubmit"
POOL_WORKERS = r"multiprocessing\.spawn|spawn_main"

_TICK = os.sysconf("SC_CLK_TCK")


class Timer:
    """Wall clock around a block: `with Timer() as t: ...; t.seconds`."""

    def __enter__(self):
        self.start = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start


def status_kb(pid: int | str, field: str) -> int:
    """A kB field of /proc/PID/status (VmHWM: peak RSS, VmRSS: current), 0 if the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return 0


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def descendants(pid: int) -> set[int]:
    """Every process below pid, from /proc/PID/task/TID/children (no psutil)."""
    found, todo = set(), [pid]
    while todo:
        parent = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                with open(f"/proc/{parent}/task/{tid}/children") as f:
                    kids = [int(k) for k in f.read().split()]
            except OSError:
                continue
            for kid in kids:
                if kid not in found:
                    found.add(kid)
                    todo.append(kid)
    return found


def matching(pattern: str, root: int | None = None) -> list[int]:
    """Processes below root (default: this one) whose command line matches pattern."""
    regex = re.compile(pattern)
    return [pid for pid in descendants(os.getpid() if root is None else root) if regex.search(cmdline(pid))]


def process_cpu_seconds(pid: int | str) -> float | None:
    """User + system CPU seconds of one process so far (None if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _TICK
    except (OSError, IndexError, ValueError):
        return None


def cpu_seconds(pattern: str) -> dict[int, float]:
    """Cumulative CPU (user + system) of each matching process under this one: to tell work from waiting."""
    out = {}
    for pid in matching(pattern):
        t = process_cpu_seconds(pid)
        if t is not None:
            out[pid] = t
    return out


def cpu_delta(before: dict[int, float], after: dict[int, float]) -> float:
    return sum(t - before.get(pid, 0.0) for pid, t in after.items())


def self_cpu_seconds() -> float:
    """CPU seconds of this process, all threads (time.process_time)."""
    return time.process_time()


class WorkerMemory:
    """Polls the matching processes under this one and keeps each one's peak RSS (VmHWM, kB).

    VmHWM is the kernel's own high-water mark, so peaks between two polls are not missed as long
    as the process is seen once before it exits (Spark reuses its workers; the Pool's live on).
    With include_self=True this process's own VmHWM is tracked too (key "self": e.g. the Python driver)."""

    def __init__(self, pattern: str, interval: float = 0.1, include_self: bool = False):
        self.pattern = re.compile(pattern)
        self.interval = interval
        self.include_self = include_self
        self.peaks: dict[int | str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _poll(self):
        for pid in _descendants_matching(self.pattern):
            self.peaks[pid] = max(self.peaks.get(pid, 0), status_kb(pid, "VmHWM:"))
        if self.include_self:
            self.peaks["self"] = max(self.peaks.get("self", 0), status_kb("self", "VmHWM:"))

    def _loop(self):
        while not self._stop.is_set():
            self._poll()
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._poll()

    @property
    def peak_mb(self) -> float:
        """The largest peak of any one watched process (MB)."""
        return max((v for k, v in self.peaks.items() if k != "self"), default=0) / 1024

    @property
    def self_peak_mb(self) -> float:
        return self.peaks.get("self", 0) / 1024


def _descendants_matching(regex: re.Pattern) -> list[int]:
    return [pid for pid in descendants(os.getpid()) if regex.search(cmdline(pid))]


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


def machine() -> str:
    return f"{os.cpu_count()} cores (os.cpu_count(), {platform.machine()}, {platform.system()})"


def loadavg() -> float:
    return os.getloadavg()[0]


def reset_peak_rss(pid: int | str = "self") -> bool:
    """Reset a process's VmHWM to its current RSS (writes 5 to /proc/PID/clear_refs, Linux >= 4.0), so that
    the next peak is of what comes next only. False if not allowed or gone."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ----------------------------------------------------------------------------- benchmark inputs
CACHE = Path("/tmp/cxr-bench")   # generated inputs and measurements, made once and reused


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
