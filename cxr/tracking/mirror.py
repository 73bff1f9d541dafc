"""MLflow runs that mirror what the jobs already write (metrics.json, evaluation_*.json, crossval.json, runs/R.json).

The JSON files stay the record; a run makes them searchable and comparable (`mlflow ui`). Mirroring after the
job, from those files, keeps one path for all five model kinds (Keras autologging would cover only three, and
would log while the JSON is being written). train logs a parent run and one nested run per model, with the model
itself (ONNX flavour, signature, one real input image) and the cxr model folder beside it (artifact `cxr/`).
"""
from __future__ import annotations

import json
import logging
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from cxr.models import store
from cxr.monitor.assess import metric_values
from cxr.tracking.registry import CXR_ARTIFACT, register
from cxr.tracking.settings import TrackingSettings

log = logging.getLogger(__name__)

MAX_PARAM_CHARS = 6000        # MLflow's limit on one parameter value
SKIP_KEYS = {"predictions", "confusion", "proba", "accuracy_ci95"}   # lists: in the JSON artifacts, not metrics


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> dotted keys; lists stay whole (as JSON text when they become parameters)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(flatten(value, name))
        else:
            flat[name] = value
    return flat


def as_params(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    return {k: (v if isinstance(v, str) else json.dumps(v, default=str))[:MAX_PARAM_CHARS]
            for k, v in flatten(tree, prefix).items()}


def as_metrics(tree: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The numeric leaves of a results dict (booleans and lists left out)."""
    out = {}
    for key, value in flatten({k: v for k, v in tree.items() if k not in SKIP_KEYS}, prefix).items():
        if isinstance(value, (int, float, np.number)) and not isinstance(value, bool) and np.isfinite(value):
            out[key] = float(value)
    return out


def _log_history(mlflow, history: Mapping[str, list]) -> None:
    """Keras-style history {metric: [per epoch]} -> one step per epoch."""
    epochs = max((len(v) for v in history.values()), default=0)
    for step in range(epochs):
        values = {k: float(v[step]) for k, v in history.items() if step < len(v) and v[step] is not None}
        mlflow.log_metrics(values, step=step)


def example_input(data_dir: str, shape: tuple[int, int], kind: str = "synthetic") -> np.ndarray | None:
    """The logged model's input example, (1, H, W, 1) float32 as the model sees it. Everyone who can read the
    tracking server can download it, so by default it is a rendered synthetic chest (cxr.datasets.synth), never a patient's
    image; "none" logs no example; "real" the first preprocessed training image (only where that is allowed)."""
    if kind == "none":
        return None
    if kind == "synthetic":
        from cxr.datasets.synth import render_chest

        h, w = shape
        img = render_chest("NORMAL", size=max(h, w), rng=0).astype(np.float32)
        return store.resize_batch(img[None, ..., None], (h, w)) if img.shape != (h, w) else img[None, ..., None]
    import pyarrow.dataset as ds

    table = ds.dataset(f"{data_dir}/images", format="parquet").head(1, columns=["image", "height", "width"])
    row = table.to_pylist()[0]
    x = np.frombuffer(row["image"], np.uint8).reshape(1, row["height"], row["width"]).astype(np.float32) / 255.0
    x = x[..., None]
    if tuple(x.shape[1:3]) != tuple(shape):
        x = store.resize_batch(x, tuple(shape))
    return x


def log_onnx_model(model_dir: str | Path, data_dir: str, input_example: str = "synthetic"):
    """The model as MLflow's ONNX flavour (loads with mlflow.pyfunc / spark_udf: probabilities only) + the cxr
    folder as `cxr/` (its model.onnx also gives features and ood_distance)."""
    import mlflow
    import mlflow.onnx
    import onnx
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    model_dir = Path(model_dir)
    proto = onnx.load(str(model_dir / store.ONNX_FILE))
    del proto.graph.output[1:]   # pyfunc returns every graph output: keep the probabilities, as the signature says
    inp, out = proto.graph.input[0], proto.graph.output[0]
    dims = [d.dim_value or -1 for d in inp.type.tensor_type.shape.dim]
    out_dims = [d.dim_value or -1 for d in out.type.tensor_type.shape.dim]
    signature = ModelSignature(Schema([TensorSpec(np.dtype(np.float32), (-1, *dims[1:]), inp.name)]),
                               Schema([TensorSpec(np.dtype(np.float32), (-1, *out_dims[1:]), out.name)]))
    info = mlflow.onnx.log_model(
        proto, name="model", signature=signature, input_example=example_input(data_dir, tuple(dims[1:3]), input_example),
        pip_requirements=[f"onnxruntime=={package_version('onnxruntime')}", f"onnx=={package_version('onnx')}"],
        onnx_execution_providers=["CPUExecutionProvider"],
        metadata={"cxr_model_id": store_model_id(model_dir)})
    mlflow.MlflowClient().log_model_artifacts(info.model_id, str(model_dir), artifact_path=CXR_ARTIFACT)
    return info


def store_model_id(model_dir: str | Path) -> str:
    from cxr.score.frames import model_id

    return model_id(str(model_dir))


def _model_params(meta: Mapping[str, Any]) -> dict[str, str]:
    training = meta.get("training") or {}
    return {**as_params({"name": meta.get("name"), "family": meta.get("family"),
                         "optimizer": (meta.get("optimizer") or {}).get("name"),
                         "epochs": training.get("epochs"), "batch_size": training.get("batch_size"),
                         "seed": (training.get("seeds") or {}).get("seed"),
                         "augment": (training.get("augment") or {}).get("enabled"),
                         "ensemble": len((training.get("ensemble") or {}).get("seeds") or []) or 1,
                         "input": meta.get("input"),
                         "manifest_sha256": (meta.get("data") or {}).get("manifest_sha256")}),
            **as_params(meta.get("architecture") or {}, "architecture"),
            **as_params(meta.get("preprocess") or {}, "preprocess")}


def model_to_register(config: Mapping[str, Any], models, optimizers, chosen: str | None) -> str:
    """The one model `--register` registers: the only one trained, or the one --register-model names."""
    from cxr.train import _as_list, plan

    conf = config["train"]
    names = [t["name"] for t in plan(_as_list(models) or _as_list(conf["models"]),
                                     _as_list(optimizers) or _as_list(conf["optimizers"]),
                                     conf.get("default_optimizer", "adam"))]
    chosen = chosen or (names[0] if len(names) == 1 else None)
    if chosen not in names:
        raise ValueError(f"--register needs --register-model naming one of the models trained here "
                         f"({', '.join(names)})")
    return chosen


def log_train(settings: TrackingSettings, data_dir: str, out_dir: str, result: Mapping[str, Any],
              evaluation: Mapping[str, Any] | None, config: Mapping[str, Any], register_as: str | None = None,
              register_model: str | None = None, alias: str | None = None) -> dict:
    """A parent run for the job, a nested run per model; returns {run_id, models: {name: model URI}, registered}."""
    mlflow = settings.activate()
    out = Path(out_dir)
    logged: dict[str, Any] = {}
    with mlflow.start_run(run_name=f"train {out.name}", tags={"cxr.job": "train", "cxr.out": str(out.resolve())}) \
            as parent:
        mlflow.log_params({**as_params({"data": str(data_dir), "out": str(out_dir), "epochs": result["epochs"],
                                        "seed": result["seed"], "models": [m["name"] for m in result["models"]],
                                        "manifest_sha256": result["data"].get("manifest_sha256")}),
                           **as_params({k: v for k, v in config["train"].items() if k not in ("keras", "scratch")},
                                       "train")})
        split = (evaluation or {}).get("split", "test")
        for name in ("report.md", f"evaluation_{split}.json"):
            if (out / name).is_file():
                mlflow.log_artifact(str(out / name))
        if (out / "plots").is_dir():
            mlflow.log_artifacts(str(out / "plots"), "plots")
        for m in result["models"]:
            model_dir = Path(m["dir"])
            meta = store.read_metadata(model_dir)
            with mlflow.start_run(run_name=m["name"], nested=True,
                                  tags={"cxr.job": "train", "cxr.model": m["name"]}) as child:
                mlflow.log_params(_model_params(meta))
                _log_history(mlflow, meta.get("history") or {})
                mlflow.log_metric("train_seconds", float(m["train_s"]))
                scores = ((evaluation or {}).get("models") or {}).get(m["name"])
                if scores:
                    mlflow.log_metrics(as_metrics(scores, split))
                mlflow.log_artifact(str(model_dir / "metrics.json"))
                for name in ("model_card.md", store.CARD_FILE):   # what the model knows (cxr.models.card)
                    if (model_dir / name).is_file():
                        mlflow.log_artifact(str(model_dir / name))
                info = log_onnx_model(model_dir, data_dir, settings.input_example)
                mlflow.set_tag("cxr.model_id", store_model_id(model_dir))
                logged[m["name"]] = {"run_id": child.info.run_id, "model_uri": info.model_uri}
        registered = None
        if register_as:
            chosen = register_model or next(iter(logged))
            version = register(logged[chosen]["model_uri"], register_as, alias,
                               tags={"cxr.model": chosen, "cxr.model_id": store_model_id(out / chosen)})
            registered = {"name": register_as, "version": version, "alias": alias, "model": chosen}
            mlflow.set_tags({"cxr.registered": f"{register_as}/{version}"})
        return {"run_id": parent.info.run_id, "models": logged, "registered": registered,
                "tracking_uri": mlflow.get_tracking_uri()}


def log_crossval(settings: TrackingSettings, data_dir: str, out_dir: str, result: Mapping[str, Any]) -> str:
    mlflow = settings.activate()
    out = Path(out_dir)
    with mlflow.start_run(run_name=f"crossval {out.name}", tags={"cxr.job": "crossval"}) as run:
        settings_keys = {k: v for k, v in result.items()
                         if k in ("folds", "seeds", "epochs", "models", "data", "preprocess", "train")}
        mlflow.log_params(as_params({"data_dir": str(data_dir), "out": str(out_dir), **settings_keys}))
        mlflow.log_metrics(as_metrics(result.get("summary") or {}))
        mlflow.log_metrics(as_metrics(result.get("probes") or {}, "probe"))
        for path in sorted(out.glob("crossval.*")):
            mlflow.log_artifact(str(path))
        return run.info.run_id


def log_score(settings: TrackingSettings, record: Mapping[str, Any]) -> str:
    mlflow = settings.activate()
    model = record.get("model") or {}
    with mlflow.start_run(run_name=f"score {record['run_id']}", tags={"cxr.job": "score", "cxr.run_id":
                                                                      record["run_id"]}) as run:
        mlflow.log_params(as_params({k: record.get(k) for k in ("input", "output", "mode", "full", "retry_errors",
                                                                "batch_size", "run_id")}))
        mlflow.log_params(as_params({k: v for k, v in model.items() if v is not None}, "model"))
        mlflow.log_params(as_params(record.get("engine") or {}, "engine"))
        mlflow.log_metrics(as_metrics({k: record.get(k) for k in ("counts", "bytes_read", "seconds", "images_per_s",
                                                                  "scored_out_of_distribution")}))
        if record.get("sources"):      # films from sources the model card does not list (cxr.score.sources)
            mlflow.log_metric("sources_unseen", float(len(record["sources"]["unseen"])))
            if record["sources"]["unseen"]:
                mlflow.set_tag("cxr.unseen_sources", ", ".join(record["sources"]["unseen"])[:5000])
        if record.get("monitoring"):   # shares, counts, PSI and p-values: charted night over night
            mlflow.log_metrics(metric_values(record["monitoring"]))
        mlflow.log_dict(dict(record), f"runs/{record['run_id']}.json")
        return run.info.run_id
