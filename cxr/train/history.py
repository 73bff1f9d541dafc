"""Per-epoch numbers in the form metrics.json records (Keras' and cxr.nn's History alike)."""
from __future__ import annotations

from typing import Mapping, Sequence

KEYS = ("loss", "accuracy", "val_loss", "val_accuracy")


def history_dict(raw: Mapping[str, Sequence[float]]) -> dict[str, list[float]]:
    return {k: [float(v) for v in raw[k]] for k in KEYS if k in raw}
