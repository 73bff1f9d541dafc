"""What a Python worker does before a task's own work."""
from __future__ import annotations

import functools
import gc


def with_frozen_heap(fn):
    """fn (a mapInPandas/mapInArrow function) with the worker's long-lived heap frozen first.

    pyspark's daemon runs a full gc.collect() after every task of a reused worker, and the automatic collections
    walk the old objects too: a worker holding pandas, Arrow, OpenCV, ONNX Runtime and a model has ~10^5 of them,
    35-75 ms a walk, ~2% of a score run's CPU. What is alive when a task starts (modules, cached models; the last
    task's garbage is already collected) lives as long as the worker, so it is frozen (gc.freeze) and the
    collections walk only the task's own objects. Frozen objects are still freed when their count drops."""
    @functools.wraps(fn)
    def run(batches):
        gc.freeze()
        yield from fn(batches)
    return run
