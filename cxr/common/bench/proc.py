"""CPU seconds and peak memory of the processes a benchmark runs, read from /proc (Linux only; psutil is not a
dependency).

    with Watch({"workers": SPARK_WORKERS, "jvm": SPARK_JVM}, include_self=True) as w:
        ...
    w.seconds, w.cpu_s["workers"], w.peak_mb["jvm"], w.self_peak_mb, w.load
"""
from __future__ import annotations

import os
import re
import threading
import time

# cmdline patterns of the processes the benchmarks watch (all below the benchmark's own process)
SPARK_WORKERS = r"pyspark[./](daemon|worker)"
SPARK_JVM = r"org\.apache\.spark\.deploy\.SparkSubmit"
POOL_WORKERS = r"multiprocessing\.spawn|spawn_main"

_TICK = os.sysconf("SC_CLK_TCK")


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
    """The command line of pid, words joined by spaces ("" if it is gone): what the patterns above match."""
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
    """CPU seconds spent between two cpu_seconds() snapshots; a process new in `after` counts from 0."""
    return sum(t - before.get(pid, 0.0) for pid, t in after.items())


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
        for pid in matching(self.pattern.pattern):
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


def machine_cpu_seconds() -> float:
    """CPU seconds the whole machine has spent busy since boot (all cores; /proc/stat: every state but idle and
    iowait): over a block on a quiet machine, an upper bound of what the block's processes used."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / _TICK


def loadavg() -> float:
    """The 1-minute load average: the benchmarks note it beside their times (the machine is shared)."""
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


class Watch:
    """Wall clock, CPU seconds and peak RSS of groups of processes (cmdline patterns) around one block.

    One object for what every benchmark run needs, so that each measures the same way: the peak RSS is the
    kernel's VmHWM (the groups named in `reset`, and "self", are reset first, so their peak belongs to this
    block; the others keep the peak since they started), CPU is user + system
    from /proc of each group, the wall clock stops before the CPU is read. self_cpu_s is this process (all
    threads); load is the 1-minute load average at the start and the end."""

    def __init__(self, groups: dict[str, str], interval: float | dict[str, float] = 0.1, include_self: bool = False,
                 reset: tuple[str, ...] = ()):
        """interval: seconds between two polls of the peak RSS, one for all groups or {group: seconds}."""
        self.groups, self.include_self, self.reset = groups, include_self, reset
        every = interval if isinstance(interval, dict) else dict.fromkeys(groups, interval)
        self.memory = {name: WorkerMemory(pattern, every[name], include_self=include_self and i == 0)
                       for i, (name, pattern) in enumerate(groups.items())}
        self.seconds, self.self_cpu_s, self.cpu_s, self.load = 0.0, 0.0, {}, (0.0, 0.0)

    def __enter__(self):
        for name in self.reset:
            for pid in ["self"] if name == "self" else matching(self.groups[name]):
                reset_peak_rss(pid)
        self.load = (loadavg(), 0.0)
        for memory in self.memory.values():
            memory.__enter__()
        self._cpu0 = {name: cpu_seconds(pattern) for name, pattern in self.groups.items()}
        self._self0, self.start = time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
        self.cpu_s = {name: cpu_delta(self._cpu0[name], cpu_seconds(pattern)) for name, pattern in self.groups.items()}
        self.self_cpu_s = time.process_time() - self._self0
        for memory in self.memory.values():
            memory.__exit__(*exc)
        self.load = (self.load[0], loadavg())

    @property
    def peak_mb(self) -> dict[str, float]:
        """The largest peak of any one process of each group (MB)."""
        return {name: memory.peak_mb for name, memory in self.memory.items()}

    @property
    def self_peak_mb(self) -> float:
        return next(iter(self.memory.values())).self_peak_mb if self.include_self and self.memory else 0.0

    @property
    def seen(self) -> dict[str, int]:
        """How many processes of each group were seen (a check that the pattern matched what ran)."""
        return {name: len([k for k in memory.peaks if k != "self"]) for name, memory in self.memory.items()}


class TreeCPU:
    """Wall clock and CPU seconds of this process and of every process under it during a block, by group
    (cmdline patterns), polled every POLL_S: a process that exits inside the block keeps the CPU it was last seen
    with (Spark kills a Python worker idle for a minute and forks a new one: a reading at the start and the end
    only would lose the CPU of those that did the work and exited). The polling thread's own CPU is taken out of
    this process's: walking /proc under a JVM of ~100 threads is not the side's work, and a side with more
    processes or threads would pay more of it. machine_cpu is the whole machine's busy CPU over the block: on a
    quiet machine, tree CPU well under it means processes were missed (or something else ran)."""

    POLL_S = 0.1

    def __init__(self, groups: dict[str, str]):
        self.groups = {k: re.compile(v) for k, v in groups.items()}
        self.base, self.last, self.group_of = {}, {}, {}
        self.seconds = self.self_cpu = self.poll_cpu = self.machine_cpu = 0.0
        self._stop, self._thread = threading.Event(), threading.Thread(target=self._loop, daemon=True)

    def _poll(self, first=False):
        for pid in descendants(os.getpid()):
            t = process_cpu_seconds(pid)
            if t is None:
                continue
            if pid not in self.group_of:
                line = cmdline(pid)
                self.group_of[pid] = [g for g, rx in self.groups.items() if rx.search(line)]
                self.base[pid] = t if first else 0.0
            self.last[pid] = t

    def _loop(self):
        while not self._stop.wait(self.POLL_S):
            self._poll()
        self.poll_cpu = time.thread_time()

    def __enter__(self):
        self.load = (loadavg(), 0.0)
        self._poll(first=True)
        self._self0, self._t0, self._machine0 = time.process_time(), time.perf_counter(), machine_cpu_seconds()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self._t0
        self.machine_cpu = machine_cpu_seconds() - self._machine0
        self._stop.set()
        self._thread.join()
        self.self_cpu = time.process_time() - self._self0 - self.poll_cpu
        self._poll()
        self.load = (self.load[0], loadavg())

    @property
    def cpu_s(self) -> dict[str, float]:
        return {g: sum(self.last[p] - self.base[p] for p, gs in self.group_of.items() if g in gs) for g in self.groups}
