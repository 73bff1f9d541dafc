"""Drift tests: a run's statistics against a baseline (the training reference, or the pooled last N runs).

Every statistic gets two numbers: the population stability index (PSI, an effect size: how far the shares
moved) and the chi-square test of homogeneity on the counts (p-value: could chance alone move them that far
with this few rows). A statistic has drifted only when both say so: PSI >= monitor.psi_threshold and
p <= monitor.p_value. PSI alone flags noise on a run of twenty images (16 bins, a few images each); the p-value
alone flags harmless shifts on a run of 20,000.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from cxr.monitor.stats import BINNED, CATEGORICAL, counts_of

TEST = "PSI + chi-square"
SMOOTHING = 0.5   # added to every cell before PSI's logarithm (an empty bin would make it infinite)


def aligned(run: Mapping[str, Any], base: Mapping[str, Any], name: str) -> tuple[list[str], np.ndarray, np.ndarray] | None:
    """(categories, run counts, baseline counts) of one statistic; None when the two are binned differently."""
    if name in BINNED and (run["binned"].get(name) or {}).get("edges") != (base["binned"].get(name) or {}).get("edges"):
        return None
    a, b = counts_of(run, name), counts_of(base, name)
    keys = list(a) if name in BINNED else sorted(set(a) | set(b))
    return keys, np.array([a.get(k, 0) for k in keys], float), np.array([b.get(k, 0) for k in keys], float)


def psi(run: np.ndarray, base: np.ndarray) -> float:
    p = (run + SMOOTHING) / (run.sum() + SMOOTHING * len(run))
    q = (base + SMOOTHING) / (base.sum() + SMOOTHING * len(base))
    return float(np.sum((p - q) * np.log(p / q)))


def chi2_p(run: np.ndarray, base: np.ndarray) -> float:
    """p-value of the chi-square test that both count vectors come from one distribution (1.0 when there is a
    single category: nothing to compare)."""
    from scipy.stats import chi2_contingency

    table = np.vstack([run, base])
    table = table[:, table.sum(axis=0) > 0]
    if table.shape[1] < 2:
        return 1.0
    return float(chi2_contingency(table, correction=False).pvalue)


def compare(run: Mapping[str, Any], base: Mapping[str, Any], baseline: str, conf: Mapping[str, Any]) -> list[dict]:
    """One row per statistic: (statistic, baseline, value = PSI, test, threshold, drifted) and the rest."""
    psi_max, p_max, min_rows = float(conf["psi_threshold"]), float(conf["p_value"]), int(conf["min_rows"])
    rows = []
    for name in (*CATEGORICAL, *BINNED):
        row = {"statistic": name, "baseline": baseline, "test": TEST, "value": None, "p_value": None,
               "threshold": psi_max, "p_threshold": p_max, "drifted": False, "n_run": 0, "n_baseline": 0,
               "note": None}
        counts = aligned(run, base, name)
        if counts is None:
            row["note"] = "binned differently: not compared"
        else:
            _, a, b = counts
            row.update(n_run=int(a.sum()), n_baseline=int(b.sum()))
            if a.sum() < min_rows or b.sum() < min_rows:
                row["note"] = f"fewer than {min_rows} values on a side (monitor.min_rows): not tested"
            else:
                row.update(value=round(psi(a, b), 4), p_value=float(f"{chi2_p(a, b):.3g}"))
                row["drifted"] = bool(row["value"] >= psi_max and row["p_value"] <= p_max)
        rows.append(row)
    return rows


def describe(row: Mapping[str, Any]) -> str:
    """One line for the console: which statistic moved against which baseline, by how much."""
    return (f"{row['statistic']} vs {row['baseline']}: PSI {row['value']:.3f} >= {row['threshold']:g} and "
            f"chi-square p {row['p_value']:.2g} <= {row['p_threshold']:g} ({row['n_run']} values in the run, "
            f"{row['n_baseline']} in the baseline)")
