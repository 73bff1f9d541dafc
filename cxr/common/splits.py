"""Deterministic train/val/test assignment by group key (patient id, or content hash when there is none).

Hashing the key, rather than shuffling rows, gives every image of one patient the same split, on any
cluster, in any order, and keeps earlier assignments when new images arrive.
"""
from __future__ import annotations

import hashlib
from typing import Mapping

SPLITS = ("train", "val", "test")


def validate_ratios(ratios: Mapping[str, float]) -> dict[str, float]:
    values = {name: float(ratios.get(name, 0.0)) for name in SPLITS}
    if any(v < 0 for v in values.values()) or abs(sum(values.values()) - 1.0) > 1e-6:
        raise ValueError(f"split ratios must be >= 0 and add up to 1, got {values}")
    return values


def unit_hash(key: str, seed: int) -> float:
    """A number in [0, 1) fixed by (seed, key): the same in every process and Python version."""
    digest = hashlib.sha256(f"{seed}:{key}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def assign_split(key: str, ratios: Mapping[str, float], seed: int) -> str:
    u = unit_hash(key, seed)
    edge = 0.0
    for name in SPLITS:
        edge += ratios[name]
        if u < edge:
            return name
    return SPLITS[-1]
