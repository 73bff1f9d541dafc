"""How many Spark jobs a block of driver code starts: every run records it, since each job costs the JVM and
the Python workers a fixed price (scheduling, tasks, a Python runner per task) whatever its size."""
from __future__ import annotations

from typing import Callable, Sequence

from cxr.spark.session import classic_context

_GROUP = "spark.jobGroup.id"


class JobCount:
    """`with JobCount(spark, "cxr-score-R") as jobs: ...; jobs.count()`: the jobs started from this thread inside
    the block, counted by Spark's own status tracker under a job group of that name (the caller's group is put
    back afterwards). Over Spark Connect there is no status tracker: count() is None."""

    def __init__(self, spark, group: str):
        self.sc = classic_context(spark)
        self.group, self._before = group, None

    def __enter__(self) -> "JobCount":
        if self.sc is not None:
            self._before = self.sc.getLocalProperty(_GROUP)
            self.sc.setLocalProperty(_GROUP, self.group)
        return self

    def __exit__(self, *exc):
        if self.sc is not None:
            self.sc.setLocalProperty(_GROUP, self._before)

    def count(self) -> int | None:
        if self.sc is None:
            return None
        return len(self.sc.statusTracker().getJobIdsForGroup(self.group))


def together(spark, actions: Sequence[Callable[[], object]]) -> None:
    """Run Spark actions side by side (each from its own thread, so their jobs share the cores) and wait for all;
    the first error is raised. The threads carry the caller's job group and other local properties
    (pyspark's InheritableThread), so JobCount still counts their jobs. Over Spark Connect: one after another."""
    if len(actions) < 2 or classic_context(spark) is None:
        for action in actions:
            action()
        return
    from pyspark import InheritableThread

    errors: list[BaseException] = []

    def guarded(action):
        try:
            action()
        except BaseException as e:   # raised in the caller's thread below
            errors.append(e)

    threads = [InheritableThread(target=guarded, args=(a,)) for a in actions]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
