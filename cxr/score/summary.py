"""What a score task tells the driver beside its rows, computed in the scoring pass itself.

The run record's counts and the run monitoring's statistics used to cost a pass each over the run's results
after the scoring (a group-by for the counts, a mapInPandas for the statistics, three sorted collects for the
page's rows: five Spark jobs, the rows converted to pandas again). Now each scoring task adds up what it saw:
its counts, bytes, the monitoring statistics of its rows (cxr.monitor.stats, counts that pool by adding up),
and its first rows for the run page (the first `page_rows` kept out by (status, path), the `thumbnails` least
confident and most out-of-distribution scored images), as JSON in one row of its output (`task_summary`, null
in the others). The driver collects that one column and combines the tasks: the same numbers, no second pass.
"""
from __future__ import annotations

import json
from typing import Any, Iterable, Iterator, Mapping

import numpy as np
import pandas as pd

from cxr.common.manifest import NO_SOURCE
from cxr.monitor.stats import COLUMNS as STAT_COLUMNS, pooled, run_statistics
from cxr.scope.frontal import NOT_FRONTAL, UNLIKE_TRAINING
from cxr.scope.rules import STAGE as SCOPE_STAGE
from cxr.score.frames import PROB_COLUMNS
from cxr.score.known import ALREADY_SCORED

SUMMARY_COLUMN = "task_summary"
COUNTED = {"ok": "scored", "error": "rejected", "out_of_scope": "out_of_scope", ALREADY_SCORED: ALREADY_SCORED}
PAGE_STATUS = {"out_of_scope": "out of scope"}   # how the run page names a kept-out row's status (else rejected)
PICK = ("path", "sha256", "label", "p", "ood_distance")
NEEDED = tuple(dict.fromkeys(("path", "sha256", "status", "stage", "reason", "size", "ood_distance", "ood_reason",
                              "source", *PROB_COLUMNS, *STAT_COLUMNS)))
SCOPE_REASONS = ("header_rules", "not_frontal", "unlike_training")


def _plain(value):
    if value is None or (isinstance(value, float) and np.isnan(value)) or value is pd.NA:
        return None
    return value.item() if isinstance(value, np.generic) else value


def _records(frame: pd.DataFrame, columns) -> list[dict]:
    return [{c: _plain(v) for c, v in zip(columns, values)} for values in frame[list(columns)].itertuples(False)]


def task_summary(rows: pd.DataFrame, thumbnails: int, page_rows: int) -> dict[str, Any]:
    """rows: one task's result rows. Counts by status, bytes of the files behind them, scored images flagged out
    of distribution, the monitoring statistics (rows of already-scored content left out: they were not looked
    at), and the task's candidates for the run page."""
    status = rows["status"]
    counts = {name: int((status == s).sum()) for s, name in COUNTED.items()}
    looked = rows[status != ALREADY_SCORED]
    ok = looked["status"] == "ok"
    away = ok & looked["in_distribution"].eq(False).fillna(False).astype(bool)
    kept = looked[~ok].assign(status=looked.loc[~ok, "status"].map(lambda s: PAGE_STATUS.get(s, "rejected")))
    kept = kept.sort_values(["status", "path"]).head(page_rows)
    scored = looked[ok].assign(p=looked.loc[ok, list(PROB_COLUMNS)].astype(float).max(axis=1))
    least = scored.sort_values(["p", "path"]).head(thumbnails) if thumbnails else scored.head(0)
    far = scored[scored["ood_distance"].notna()]
    most = (far.assign(neg=-far["ood_distance"].astype(float)).sort_values(["neg", "path"]).head(thumbnails)
            if thumbnails else far.head(0))
    reason = looked["ood_reason"].fillna("").astype(str) if "ood_reason" in looked else pd.Series("", looked.index)
    scope = {"header_rules": int(((looked["status"] == "out_of_scope") & (looked["stage"] == SCOPE_STAGE)).sum()),
             "not_frontal": int(reason.str.contains(NOT_FRONTAL, regex=False).sum()),
             "unlike_training": int(reason.str.contains(UNLIKE_TRAINING, regex=False).sum())}
    sources = (looked.loc[ok, "source"] if "source" in looked else pd.Series(None, looked.index[ok], dtype=object))
    by_source = {str(k): int(v) for k, v in sources.fillna(NO_SOURCE).value_counts().items()}
    return {"counts": counts, "bytes": int(pd.to_numeric(rows["size"]).fillna(0).sum()), "flagged": int(away.sum()),
            "scope_reasons": scope, "sources": by_source,
            "stats": run_statistics(looked.reindex(columns=list(STAT_COLUMNS))) if len(looked) else None,
            "kept_out": _records(kept, ("status", "path", "stage", "reason")),
            "least_confident": _records(least, PICK), "most_ood": _records(most, PICK)}


def with_summaries(frames: Iterable[pd.DataFrame], thumbnails: int, page_rows: int) -> Iterator[pd.DataFrame]:
    """A task's result frames, unchanged but for the `task_summary` column: null, except in the first row of
    the task's last non-empty frame, which carries the task's summary (held back one frame to know it is the
    last)."""
    parts, pending = [], None
    for frame in frames:
        frame = frame.assign(**{SUMMARY_COLUMN: None})
        if not len(frame):
            yield frame
            continue
        parts.append(frame[[c for c in NEEDED if c in frame.columns]])
        if pending is not None:
            yield pending
        pending = frame
    if pending is None:
        return
    summary = task_summary(pd.concat(parts, ignore_index=True), thumbnails, page_rows)
    column = [None] * len(pending)
    column[0] = json.dumps(summary)
    pending[SUMMARY_COLUMN] = pd.Series(column, index=pending.index, dtype=object)
    yield pending


def combine(summaries: list[Mapping[str, Any]], extra_rows: pd.DataFrame | None, thumbnails: int,
            page_rows: int) -> dict[str, Any]:
    """The run's counts, bytes, flagged images, statistics and page rows from its tasks' summaries, plus rows the
    driver holds itself (extra_rows: files listed but never read, rejected)."""
    parts = list(summaries)
    if extra_rows is not None and len(extra_rows):
        parts.append(task_summary(extra_rows.reindex(columns=list(NEEDED)), thumbnails, page_rows))
    counts = {name: sum(s["counts"].get(name, 0) for s in parts) for name in COUNTED.values()}
    stats = pooled([s["stats"] for s in parts if s["stats"]])
    if stats is None:
        stats = run_statistics(pd.DataFrame(columns=list(STAT_COLUMNS)))
    stats.pop("runs", None)

    def merged(key, order):
        return sorted((r for s in parts for r in s[key]), key=order)

    kept = merged("kept_out", lambda r: (r["status"], r["path"]))[:page_rows]
    least = merged("least_confident", lambda r: (r["p"], r["path"]))[:thumbnails]
    most = merged("most_ood", lambda r: (-r["ood_distance"], r["path"]))[:thumbnails]
    stats["scope_reasons"] = {k: sum(s["scope_reasons"][k] for s in parts) for k in SCOPE_REASONS}
    sources: dict[str, int] = {}
    for part in parts:
        for name, n in part["sources"].items():
            sources[name] = sources.get(name, 0) + n
    return {"counts": counts, "bytes": sum(s["bytes"] for s in parts), "flagged": sum(s["flagged"] for s in parts),
            "sources": sources, "stats": stats, "kept_out": kept, "least_confident": least, "most_ood": most}
