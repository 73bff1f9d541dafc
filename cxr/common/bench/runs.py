"""Timing, rounds and child processes of the benchmarks: the parts every bench script used to write for itself.

The machine is shared, so a single timing is noise: sides are measured in rounds, interleaved so that other
jobs' load hits every side alike, and a median or the fastest run is kept. Anything that must start clean
(TensorFlow's thread pools, a JVM's options, a process's own peak RSS) runs in a child process.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from cxr.common.bench.proc import loadavg, status_kb


class Timer:
    """Wall clock around a block: `with Timer() as t: ...; t.seconds`."""

    def __enter__(self):
        self.start = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start


def rotations(sides: list, rounds: int, rotate: bool = True):
    """(round, side) in the order to run them: each round runs every side once, the order rotated by one each
    round (with two sides: alternated), so that each side goes first as often as the others."""
    for r in range(rounds):
        k = r % len(sides) if rotate and sides else 0
        for side in sides[k:] + sides[:k]:
            yield r, side


def interleaved(sides: dict[str, Callable[[], Any]], rounds: int, rotate: bool = True) -> dict[str, list]:
    """{side: [its result of each round]}: every side's function called once a round, in rotations() order."""
    runs: dict[str, list] = {name: [] for name in sides}
    for _, name in rotations(list(sides), rounds, rotate):
        runs[name].append(sides[name]())
    return runs


def fastest_cpu(fn: Callable[[], Any], rounds: int, per: int = 1, clock: Callable[[], float] = time.process_time
                ) -> float:
    """The least CPU seconds (clock: this process, all threads; time.thread_time for this thread only) of `rounds`
    calls of fn, divided by `per` (the items a call handles): the least is the run the other jobs on the machine
    disturbed least."""
    best = float("inf")
    for _ in range(rounds):
        t0 = clock()
        fn()
        best = min(best, (clock() - t0) / per)
    return best


def throughput(fn: Callable[[], Any], items: int) -> tuple[float, float]:
    """(items per second, items per CPU second of this process) of one call of fn: the CPU rate is what a
    dedicated core would do, and does not move with the machine's other load as the wall-clock rate does."""
    t0, cpu0 = time.perf_counter(), time.process_time()
    fn()
    return items / (time.perf_counter() - t0), items / (time.process_time() - cpu0)


def deadline_seconds(hhmm: str) -> float:
    """Seconds from now until HH:MM today (local time): how long a bench may still run."""
    now = time.localtime()
    h, m = (int(x) for x in hhmm.split(":"))
    return time.mktime((now.tm_year, now.tm_mon, now.tm_mday, h, m, 0, 0, 0, -1)) - time.time()


# ----------------------------------------------------------------------------- one-shot child processes
@dataclass
class ChildRun:
    """What run_child saw of a child: its answer (the JSON on its last stdout line), wall and CPU seconds
    (getrusage of the waited child and its descendants), and, when sampled, its RSS and the load average."""
    answer: Any
    wall_s: float
    cpu_s: float
    rss_mb: list[float] = field(default_factory=list)
    loads: list[float] = field(default_factory=list)


def run_child(cmd: list, log: Path, *, env: dict | None = None, cwd: Path | None = None, answer: bool = True,
              sample: float = 0.0, append: bool = False) -> ChildRun:
    """Run cmd to the end; stderr, then stdout, go to log. With answer=True its last stdout line is parsed as JSON;
    with sample > 0 its VmRSS and the load average are read every `sample` seconds while it runs."""
    log = Path(log)
    log.parent.mkdir(parents=True, exist_ok=True)
    rss, loads = [], []
    with open(log, "a" if append else "w") as err, tempfile.TemporaryFile("w+") as out:
        err.write(f"== {' '.join(map(str, cmd))}\n")
        err.flush()
        cpu0, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
        proc = subprocess.Popen([str(c) for c in cmd], stdout=out, stderr=err, text=True, cwd=cwd,
                                env={**os.environ, **(env or {})})
        while sample and proc.poll() is None:
            rss.append(status_kb(proc.pid, "VmRSS:") / 1024)
            loads.append(loadavg())
            time.sleep(sample)
        proc.wait()
        wall, cpu1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_CHILDREN)
        out.seek(0)
        stdout = out.read()
        err.write(stdout)
    if proc.returncode:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"{' '.join(map(str, cmd[1:]))[:300]} failed (exit {proc.returncode}), see {log}:\n{tail}")
    lines = stdout.strip().splitlines()
    return ChildRun(json.loads(lines[-1]) if answer and lines else None, wall,
                    cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime, rss, loads)


def child_run(script: str | Path, request, log: Path, **kw) -> ChildRun:
    """`python SCRIPT --child JSON(request)` in a fresh process (run_child's keywords, e.g. sample). The script's
    main hands --child to answer_child(); a fresh process is how a bench keeps TensorFlow, thread settings and
    peak RSS apart."""
    return run_child([sys.executable, Path(script).resolve(), "--child", json.dumps(request)], log, append=True, **kw)


def child_answer(script: str | Path, request, log: Path, **kw) -> Any:
    """child_run's answer: what the child printed as JSON."""
    return child_run(script, request, log, **kw).answer


def answer_child(handle: Callable[[Any], Any], request_json: str) -> int:
    """The child's side of child_answer: handle(request) printed as JSON on the last line."""
    print(json.dumps(handle(json.loads(request_json)), default=str))
    return 0


# ----------------------------------------------------------------------------- long-lived child processes
class ChildServer:
    """A child process that keeps its state (e.g. a Spark session) between requests: `python SCRIPT --serve ARG
    --reply-fd N`, requests as JSON lines on its stdin, replies as JSON lines on a pipe of their own (its stdout
    and stderr, Spark's and the JVM's noise included, go to log). The script's main hands --serve to serve()."""

    def __init__(self, script: str | Path, label: str, arg, log: Path, cwd: Path | None = None,
                 python: str | None = None):
        """python: the interpreter of the child (default this one's; another venv's, e.g. .venv-peers)."""
        self.label, self.log = label, Path(log)
        self.log.parent.mkdir(parents=True, exist_ok=True)
        read_fd, write_fd = os.pipe()
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(
                [python or sys.executable, str(Path(script).resolve()), "--serve", json.dumps(arg), "--reply-fd",
                 str(write_fd)], stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT, pass_fds=(write_fd,),
                text=True, cwd=cwd)
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


def serve(handle: Callable[[dict], dict], reply_fd: int, close: Callable[[], None] | None = None) -> int:
    """The child's side of ChildServer: each stdin line is a request, handle(request) its reply; an exception is
    replied as {"error": traceback} so that the parent says what failed instead of hanging."""
    with os.fdopen(reply_fd, "w") as replies:
        for line in sys.stdin:
            try:
                reply = handle(json.loads(line))
            except Exception:
                reply = {"error": traceback.format_exc()}
            replies.write(json.dumps(reply) + "\n")
            replies.flush()
    if close is not None:
        close()
    return 0


def run_parts(parts: list[str], run: Callable[[str], Any], loads: list[float]) -> list[str]:
    """run(part) for each part in turn, the 1-minute load average noted before and after each into loads. A part
    that fails has its traceback printed and is returned among the failed; the others still run (each saves its
    result as soon as it has it, so nothing measured is lost)."""
    failed = []
    for part in parts:
        print(f"\n== part {part} ({time.strftime('%H:%M:%S')})", flush=True)
        loads.append(loadavg())
        try:
            run(part)
        except Exception:
            traceback.print_exc()
            failed.append(part)
        loads.append(loadavg())
    return failed
