"""Grouped, stratified k-fold assignment for cross-validation.

Every image of one patient (or, without a patient id, every copy of one image content) lands in the same
fold, so a fold's test part never holds a patient the model saw in training. Class proportions are kept
as even across folds as the groups allow (scikit-learn's StratifiedGroupKFold). A seed fixes the
assignment; different seeds give different partitions (repeated k-fold).
"""
from __future__ import annotations

import numpy as np
import pandas as pd


def group_keys(patient_id, sha256) -> np.ndarray:
    """The patient id where there is one, else the content hash (prefixed, so the two kinds never collide)."""
    pid = pd.Series(patient_id, dtype=object)
    sha = pd.Series(sha256, dtype=object)
    keys = np.where(pid.isna() | (pid.astype(str).str.len() == 0), "sha:" + sha.astype(str), "patient:" + pid.astype(str))
    return keys.astype(object)


def assign_folds(y: np.ndarray, groups: np.ndarray, k: int, seed: int) -> np.ndarray:
    """fold index (0..k-1) of every row.

    Raises ValueError when there are fewer groups than folds (some fold would be empty).
    """
    from sklearn.model_selection import StratifiedGroupKFold

    y = np.asarray(y)
    groups = np.asarray(groups, dtype=object)
    if k < 2:
        raise ValueError(f"need at least 2 folds, got {k}")
    n_groups = len(pd.unique(groups))
    if n_groups < k:
        raise ValueError(f"{n_groups} patients/images cannot fill {k} folds")
    folds = np.full(len(y), -1, dtype=np.int64)
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=int(seed))
    # StratifiedGroupKFold wants integer-coded groups; codes in first-seen order keep it deterministic
    codes = pd.factorize(pd.Series(groups), sort=True)[0]
    for fold, (_, test) in enumerate(splitter.split(np.zeros(len(y)), y, codes)):
        folds[test] = fold
    return folds


def check_grouping(folds: np.ndarray, groups: np.ndarray) -> None:
    """Every group in exactly one fold (the property cross-validation's numbers rest on)."""
    per_group = pd.DataFrame({"g": groups, "f": folds}).groupby("g")["f"].nunique()
    split = per_group[per_group > 1]
    if len(split):
        raise AssertionError(f"{len(split)} groups span several folds, e.g. {list(split.index[:3])}")


def fold_key(seed: int, fold: int) -> str:
    """How the models of one (seed, fold) are looked up on the executors."""
    return f"{int(seed)}:{int(fold)}"
