"""A run's `monitoring` record: its statistics, the baselines it was tested against, the drift table, and the
numbers MLflow charts night over night."""
from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

from cxr.monitor.drift import compare
from cxr.monitor.stats import pooled, shares

REFERENCE = "reference"


def history_label(n: int) -> str:
    return f"last {n} runs" if n != 1 else "last run"


def recent_runs(history: Sequence[tuple[str, Mapping[str, Any]]], n_last: int) -> list[tuple[str, Mapping[str, Any]]]:
    """The last n_last earlier runs that looked at files (an unchanged night has nothing to compare)."""
    return [(rid, s) for rid, s in history if s and s.get("rows")][-n_last:] if n_last > 0 else []


def baselines(reference: Mapping[str, Any] | None, history: Sequence[tuple[str, Mapping[str, Any]]],
              n_last: int) -> dict[str, Mapping[str, Any]]:
    """{label: statistics} a run is compared with: the training reference, the pooled last N runs."""
    out = {REFERENCE: reference["stats"]} if reference else {}
    recent = recent_runs(history, n_last)
    if recent:
        out[history_label(len(recent))] = pooled([s for _, s in recent])
    return out


def assess(stats: Mapping[str, Any], reference: Mapping[str, Any] | None,
           history: Sequence[tuple[str, Mapping[str, Any]]], conf: Mapping[str, Any]) -> dict[str, Any]:
    """stats: this run's (cxr.monitor.stats.run_statistics); reference: the model's training reference (the
    monitor_reference.json dict, None when the model has none); history: (run id, statistics) of earlier runs of
    this model, oldest first; conf: the `monitor:` section."""
    n_last = int(conf["history_runs"])
    notes, table, described = [], [], {}
    for label, base in baselines(reference, history, n_last).items():
        table += compare(stats, base, label, conf)
        described[label] = ({"split": reference.get("split"), "rows": base["rows"], "scored": base["scored"]}
                            if label == REFERENCE else
                            {"runs": [rid for rid, _ in recent_runs(history, n_last)], "rows": base["rows"]})
    if not reference:
        notes.append(f"the model has no training reference (monitor_reference.json): compared with the "
                     f"{history_label(n_last)} only")
    if len(described) == (1 if reference else 0):
        notes.append("no earlier run of this model looked at files: no run-over-run comparison")
    if not stats.get("rows"):
        notes.append("this run looked at no new files (an unchanged night): nothing to test")
    drifted = [f"{r['statistic']} vs {r['baseline']}" for r in table if r["drifted"]]
    return {"stats": stats, "baselines": described, "drift": table, "drifted": drifted, "notes": notes,
            "thresholds": {k: conf[k] for k in ("psi_threshold", "p_value", "min_rows", "history_runs")}}


def _metric_name(text: str) -> str:
    """MLflow metric names allow letters, digits, _ - . / and spaces."""
    return re.sub(r"[^A-Za-z0-9_.\-/ ]", "_", text)[:120]


def metric_values(monitoring: Mapping[str, Any]) -> dict[str, float]:
    """monitor.count.*, monitor.share.* and monitor.psi.* / monitor.p.* per baseline ('reference' or
    'history'): what a score run logs to MLflow so that its UI charts them night over night."""
    stats = monitoring.get("stats") or {}
    out = {"monitor.rows": float(stats.get("rows", 0)), "monitor.drifted": float(len(monitoring.get("drifted") or []))}
    for name, counts in (stats.get("categorical") or {}).items():
        top = sorted(counts.items(), key=lambda kv: -kv[1])[:10] if name == "reasons" else counts.items()
        for key, v in top:
            out[_metric_name(f"monitor.count.{name}.{key}")] = float(v)
        for key, v in shares(dict(top)).items() if name != "reasons" else ():
            out[_metric_name(f"monitor.share.{name}.{key}")] = v
    for row in monitoring.get("drift") or []:
        if row["value"] is None:
            continue
        base = "reference" if row["baseline"] == REFERENCE else "history"
        out[f"monitor.psi.{row['statistic']}.{base}"] = float(row["value"])
        out[f"monitor.p.{row['statistic']}.{base}"] = float(row["p_value"])
    return out
