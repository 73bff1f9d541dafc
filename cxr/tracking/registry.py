"""Models by MLflow URI: `models:/NAME@ALIAS`, `models:/NAME/VERSION`, `runs:/RUN_ID/PATH`.

Resolved once, on the driver, into a local copy of the cxr model folder the train job logged beside the ONNX
flavour (artifact `cxr/`); the score job then reads that folder exactly as it reads a folder path, so the model id
(sha256 of the weight files) is the same either way. Versions are immutable, so each is downloaded once (per source) into
`tracking.model_cache` (which, like any `--model` folder, must be visible to the executors on a cluster).

    python -m cxr.tracking.registry promote NAME VERSION [--alias champion]   # what the nightly run will use
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from cxr.tracking.settings import TrackingSettings

CXR_ARTIFACT = "cxr"          # the model folder inside a logged model's artifacts
URI_SCHEMES = ("models:/", "runs:/")


class ModelNotFoundError(ValueError):
    """A registry URI that names nothing: exit 2 with one line."""


@dataclass(frozen=True)
class ResolvedModel:
    uri: str                   # as given
    dir: str                   # the local cxr model folder
    name: str | None = None    # registered model name (None for runs:/ URIs)
    version: int | None = None

    def record(self) -> dict:
        return asdict(self)


def is_model_uri(value: str) -> bool:
    return str(value).startswith(URI_SCHEMES)


def _parse_models_uri(uri: str) -> tuple[str, str | None, str | None]:
    """models:/NAME@ALIAS -> (NAME, ALIAS, None); models:/NAME/VERSION -> (NAME, None, VERSION)."""
    body = uri[len("models:/"):]
    match = re.fullmatch(r"([^/@]+)@([^/@]+)", body) or re.fullmatch(r"([^/@]+)/([^/@]+)", body)
    if not match:
        raise ModelNotFoundError(f"{uri}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    name, ref = match.groups()
    return (name, ref, None) if "@" in body else (name, None, ref)


def _lookup(client, uri: str) -> tuple[str, int, str]:
    """(name, version, source URI) of a registry URI; a missing name, alias or version is one clear line."""
    from mlflow.exceptions import MlflowException

    name, alias, version = _parse_models_uri(uri)
    try:
        if alias is not None:
            mv = client.get_model_version_by_alias(name, alias)
        elif version.isdigit():
            mv = client.get_model_version(name, version)
        else:
            raise ModelNotFoundError(f"{uri}: version must be a number or use an alias (models:/{name}@ALIAS)")
    except MlflowException as exc:
        what = f"alias '{alias}'" if alias is not None else f"version {version}"
        raise ModelNotFoundError(f"{uri}: the registry at {_store()} has no model '{name}' with {what} "
                                 f"({str(exc).splitlines()[0]})") from None
    return mv.name, int(mv.version), mv.source


def _store() -> str:
    import mlflow

    return mlflow.get_tracking_uri()


def _safe(part: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", part)


def resolve(uri: str, settings: TrackingSettings) -> ResolvedModel:
    """Download (once per version) and return the cxr model folder a registry or run URI names."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    settings.activate()
    name = version = None
    if uri.startswith("models:/"):
        name, version, source = _lookup(MlflowClient(), uri)
        # keyed by the source too: a registry made anew (mlflow.db deleted) numbers its versions from 1 again
        target = settings.model_cache / _safe(name) / f"v{version}-{_safe(source)}"
    else:
        source = uri
        target = settings.model_cache / "runs" / _safe(uri[len("runs:/"):])
    if not target.is_dir():
        import mlflow

        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=target.parent))
        try:
            mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(tmp))
        except MlflowException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise ModelNotFoundError(f"{uri}: cannot download it from {_store()} "
                                     f"({str(exc).splitlines()[0]})") from None
        try:
            os.replace(tmp, target)   # complete or absent: a crash never leaves half a model in the cache
        except OSError:               # another run got there first
            shutil.rmtree(tmp, ignore_errors=True)
    folder = target / CXR_ARTIFACT
    if not (folder / "metrics.json").is_file():
        raise ModelNotFoundError(f"{uri} was not logged by cxr-spark's train job: no {CXR_ARTIFACT}/metrics.json "
                                 f"in its artifacts ({target})")
    return ResolvedModel(uri=uri, dir=str(folder), name=name, version=version)


def register(model_uri: str, name: str, alias: str | None = None, tags: dict | None = None) -> int:
    """A new version of NAME from a logged model; `alias` (e.g. champion) moved to it when given."""
    import mlflow
    from mlflow import MlflowClient

    version = mlflow.register_model(model_uri, name, tags=tags)
    if alias:
        MlflowClient().set_registered_model_alias(name, alias, version.version)
    return int(version.version)


def promote(name: str, version: int, alias: str = "champion") -> None:
    """Point ALIAS at VERSION: the next run that scores models:/NAME@ALIAS uses it, with no other edit."""
    from mlflow import MlflowClient

    client = MlflowClient()
    client.get_model_version(name, str(version))   # fails clearly when the version does not exist
    client.set_registered_model_alias(name, alias, str(version))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Registry chores for cxr-spark models")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("promote", help="point an alias (default: champion) at a version")
    p.add_argument("name")
    p.add_argument("version", type=int)
    p.add_argument("--alias", default="champion")
    p.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI, else conf, else ./mlflow.db")
    args = parser.parse_args(argv)
    from mlflow.exceptions import MlflowException

    from cxr.config import load_config

    TrackingSettings.from_config(load_config(None, {"tracking.uri_flag": args.tracking_uri})).activate()
    try:
        promote(args.name, args.version, args.alias)
    except MlflowException as exc:
        print(f"promote: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    print(f"models:/{args.name}@{args.alias} -> version {args.version}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
