"""The benchmark harness of scripts/bench_*.py: each script holds what it measures, this package how.

proc: CPU seconds and peak RSS of process groups from /proc (Watch; TreeCPU for a tree of processes that come
and go); runs: timing, interleaved rounds, child processes; inputs: inputs and measurements made once under CACHE
(cached, State, synthetic archives); report: machine, versions, load, the command and the shared flags. The sections go into BENCHMARKS.md with
cxr.common.markdown.publish.
"""
from cxr.common.bench.inputs import (BASES, CACHE, State, cached, describe_files, input_files, job_config,
                                     kinds_text, linked_subset, random_cnn, synthetic_archive)
from cxr.common.bench.proc import (POOL_WORKERS, SPARK_JVM, SPARK_WORKERS, TreeCPU, Watch, WorkerMemory, cmdline, cpu_delta,
                                   cpu_seconds, descendants, loadavg, machine_cpu_seconds, matching, process_cpu_seconds, reset_peak_rss,
                                   status_kb)
from cxr.common.bench.report import (BENCHMARKS, ROOT, bench_parser, command_line, load_range, machine,
                                     quiet_logging, versions)
from cxr.common.bench.runs import (ChildRun, ChildServer, Timer, answer_child, child_answer, child_run,
                                   deadline_seconds, fastest_cpu, interleaved, rotations, run_child, run_parts, serve,
                                   throughput)

__all__ = [name for name in dir() if not name.startswith("_")]
