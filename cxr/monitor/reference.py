"""The training reference: a model's run statistics on the data it was trained on, written into the model
folder at training (monitor_reference.json, part of the model id), so that every score run can be compared
with what the model saw.

The held-out split (monitor.reference_split, val) goes through the score job's own worker function
(cxr.score.frames.score_preprocessed_frame) and the same statistics (cxr.monitor.stats), so a reference and a
run are measured one way. Rejections and out-of-scope files carry no split: their reasons and the status counts
come from the whole preprocess run (its errors/ and out_of_scope/ tables and manifest counts).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Mapping

import pandas as pd
import pyarrow.compute as pc

from cxr.data.loader import images_dataset, read_manifest, side_table
from cxr.models import store
from cxr.monitor.stats import run_statistics
from cxr.score.frames import Engine, score_preprocessed_frame

log = logging.getLogger(__name__)

SPLITS = ("val", "train", "test")
IMAGE_COLUMNS = ("path", "sha256", "label", "image", "height", "width", "source_format", "orig_dtype", "orig_height",
                 "orig_width", "bits_stored")


def _split_rows(data_dir: str, split: str, engine: Engine) -> pd.DataFrame:
    images = images_dataset(data_dir)
    columns = [c for c in IMAGE_COLUMNS if c in images.schema.names]
    frames = [score_preprocessed_frame(batch.to_pandas(), engine)
              for batch in images.to_batches(columns=columns, filter=pc.field("split") == split, batch_size=256)
              if batch.num_rows]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _kept_out_rows(data_dir: str) -> pd.DataFrame:
    parts = []
    for table, status in (("errors", "error"), ("out_of_scope", "out_of_scope")):
        dataset = side_table(data_dir, table)
        if dataset is not None:
            parts.append(dataset.to_table(columns=["stage", "reason"]).to_pandas().assign(status=status))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=["stage", "reason", "status"])


def choose_split(data_dir: str, preferred: str, min_rows: int) -> tuple[str, int]:
    """The preferred split, else the next of val, train, test with at least min_rows images."""
    counts = images_dataset(data_dir).to_table(columns=["split"]).to_pandas()["split"].value_counts()
    for split in (preferred, *[s for s in SPLITS if s != preferred]):
        if counts.get(split, 0) >= min_rows:
            return split, int(counts[split])
    return preferred, int(counts.get(preferred, 0))


def build_reference(model_dir: str | Path, data_dir: str, config: Mapping[str, Any]) -> dict[str, Any]:
    conf = config["monitor"]
    split, n = choose_split(data_dir, str(conf.get("reference_split", "val")), int(conf["min_rows"]))
    manifest, manifest_sha = read_manifest(data_dir)
    counts = manifest.get("counts") or {}
    rows = pd.concat([_split_rows(data_dir, split, Engine.from_config(str(model_dir), config)),
                      _kept_out_rows(data_dir)], ignore_index=True)
    status = {"scored": int(counts.get("written", n)), "rejected": int(counts.get("rejected", 0)),
              "out_of_scope": int(counts.get("out_of_scope", 0))}
    return {"schema": 1, "split": split, "images": n, "data": str(data_dir), "manifest_sha256": manifest_sha,
            "status_from": "the whole preprocess run (manifest counts)", "stats": run_statistics(rows, status)}


def write_reference(model_dir: str | Path, data_dir: str, config: Mapping[str, Any]) -> Path:
    """monitor_reference.json in model_dir (after calibration: its probabilities are the ones score writes)."""
    ref = build_reference(model_dir, data_dir, config)
    path = Path(model_dir) / store.MONITOR_FILE
    path.write_text(json.dumps(ref, indent=1, sort_keys=True) + "\n")
    log.info("monitor reference for %s: %d %s images", Path(model_dir).name, ref["images"], ref["split"])
    return path


def read_reference(model_dir: str | Path) -> dict[str, Any] | None:
    path = Path(model_dir) / store.MONITOR_FILE
    return json.loads(path.read_text()) if path.is_file() else None
