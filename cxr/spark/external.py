"""Checking a model on a labelled archive of one's own site before trusting it (jobs/evaluate.py --external).

Why: cross-validation estimates how a model does on new patients of the sources it was trained on; a hospital
needs to know how it does on its own films. The archive (raw files in class folders, preprocessed here exactly as
the model's training data was, or a preprocess output made with the same params) is evaluated whole, every
labelled image, on the executors; the numbers (with 95% intervals, per class and per source) are written beside the
model's cross-validated estimate, so a gap between the two is visible at a glance.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

from pyspark.sql import SparkSession

from cxr.evaluate.external import format_external
from cxr.models.store import list_models, read_metadata

log = logging.getLogger(__name__)


def model_preprocess(config: Mapping[str, Any], params: Mapping[str, Any]) -> dict[str, Any]:
    """config with its preprocess section set to a model's recorded image steps (its metrics.json)."""
    pre = dict(config["preprocess"])
    for key in ("size", "method", "clip_limit", "tile_grid", "resize_mode", "decode_reduction"):
        if params.get(key) is not None:
            pre[key] = params[key]
    pre["brightness"] = {"alpha": params.get("brightness_alpha", 1.0), "beta": params.get("brightness_beta", 0.0)}
    return {**config, "preprocess": pre}


def run(spark: SparkSession, archive: str, models_dir: str, config: Mapping[str, Any], out_dir: str | None = None,
        manifests: Sequence[str] = (), models: Sequence[str] | None = None,
        crossval_dirs: Sequence[str] = ()) -> dict[str, Any]:
    """Evaluate models_dir's models (or the named ones) on every labelled image of `archive`; writes
    OUT/evaluation.json and OUT/external.md (OUT default: MODELS_DIR/external_<archive folder name>)."""
    from cxr.spark.evaluate import ALL_SPLITS, run as evaluate
    from cxr.spark.preprocess import run as preprocess
    from cxr.spark.score import is_preprocessed

    dirs = [d for d in list_models(models_dir) if not models or d.name in set(models)]
    if not dirs:
        raise FileNotFoundError(f"no models to evaluate in {models_dir}")
    out = Path(out_dir or Path(models_dir) / f"external_{Path(archive.rstrip('/')).name}")
    out.mkdir(parents=True, exist_ok=True)
    params = read_metadata(dirs[0]).get("preprocess") or {}
    if is_preprocessed(spark, archive):
        data_dir = archive
    else:   # raw files: the model's own image steps, into OUT/preprocessed (replaced on every call)
        data_dir = str(out / "preprocessed")
        done = preprocess(spark, archive, data_dir, model_preprocess(config, params), manifest=list(manifests),
                          overwrite=True)
        log.info("external archive %s: %s", archive, done["counts"])
    evaluation = evaluate(spark, data_dir, models_dir, config, split=ALL_SPLITS,
                          models=[d.name for d in dirs], write=False)
    crossvals = [json.loads((Path(d) / "crossval.json").read_text()) for d in crossval_dirs]
    cards = {d.name: json.loads((d / "model_card.json").read_text()) for d in dirs if (d / "model_card.json").is_file()}
    (out / "evaluation.json").write_text(json.dumps(evaluation, indent=1, sort_keys=True, default=str) + "\n")
    (out / "external.md").write_text(format_external(archive, evaluation, crossvals, cards))
    evaluation["report"] = str(out / "external.md")
    return evaluation
