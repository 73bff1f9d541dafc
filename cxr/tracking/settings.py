"""Where runs go: `--tracking-uri`, else $MLFLOW_TRACKING_URI, else conf `tracking.uri`, else MLflow's own
default (`sqlite:///mlflow.db` in the working directory: an embedded store, no server)."""
from __future__ import annotations

import fcntl
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping


class TrackingUnavailableError(ValueError):
    """The tracking store cannot be opened: the job stops before any work (exit 2) rather than after it."""


INPUT_EXAMPLES = ("synthetic", "none", "real")


@dataclass(frozen=True)
class TrackingSettings:
    enabled: bool
    uri: str | None
    experiment: str
    model_cache: Path
    input_example: str = "synthetic"   # the logged model's input example: synthetic | none | real (cxr.tracking.mirror)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "TrackingSettings":
        conf = config.get("tracking") or {}
        uri = os.environ.get("MLFLOW_TRACKING_URI") or conf.get("uri")
        if conf.get("uri_flag"):        # --tracking-uri beats the environment
            uri = conf["uri_flag"]
        cache = Path(os.path.expanduser(str(conf.get("model_cache") or "~/.cache/cxr-spark/models")))
        example = str(conf.get("log_input_example") or "synthetic")
        if example not in INPUT_EXAMPLES:
            raise ValueError(f"tracking.log_input_example must be one of {', '.join(INPUT_EXAMPLES)}, got {example!r}")
        return cls(enabled=bool(conf.get("enabled", True)), uri=uri or None,
                   experiment=str(conf.get("experiment") or "cxr-spark"), model_cache=cache, input_example=example)

    def activate(self, attempts: int = 3):
        """Point MLflow at the store and experiment; returns the mlflow module. Fails early and clearly (after a
        few tries: a server restarting, a sqlite store busy)."""
        import mlflow

        if self.uri:
            mlflow.set_tracking_uri(self.uri)
        for attempt in range(attempts):
            try:
                with self._sqlite_lock(mlflow):
                    self._use_experiment(mlflow)
                return mlflow
            except Exception as exc:  # a server down, a bad URI, a read-only folder: one line, not a traceback
                if attempt + 1 < attempts:
                    time.sleep(2 ** attempt)
                    continue
                raise TrackingUnavailableError(
                    f"MLflow tracking store {mlflow.get_tracking_uri()} cannot be used ({type(exc).__name__}: "
                    f"{str(exc).splitlines()[0] if str(exc) else ''}); fix --tracking-uri / MLFLOW_TRACKING_URI "
                    f"or pass --no-tracking") from exc

    def _use_experiment(self, mlflow) -> None:
        if mlflow.get_experiment_by_name(self.experiment) is None:
            try:
                mlflow.create_experiment(self.experiment, artifact_location=self._artifact_root(mlflow))
            except mlflow.exceptions.MlflowException:
                pass             # created meanwhile by another job; set_experiment below checks
        mlflow.set_experiment(self.experiment)

    @staticmethod
    @contextmanager
    def _sqlite_lock(mlflow):
        """One process at a time opens a sqlite store here: MLflow creates a new store's tables with alembic
        migrations that two processes must not run at once (measured: three jobs starting together on a new
        mlflow.db all failed and left it half-migrated, `_alembic_tmp_experiments already exists`)."""
        uri = mlflow.get_tracking_uri()
        if not uri.startswith("sqlite:///"):
            yield
            return
        db = Path(uri[len("sqlite:///"):]).resolve()
        db.parent.mkdir(parents=True, exist_ok=True)
        with open(f"{db}.lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    @staticmethod
    def _artifact_root(mlflow) -> str | None:
        """Artifacts beside a sqlite store's file (mlruns/), not in whatever directory the job ran from."""
        uri = mlflow.get_tracking_uri()
        if not uri.startswith("sqlite:///"):
            return None              # a server, or a file store: it decides
        return (Path(uri[len("sqlite:///"):]).resolve().parent / "mlruns").as_uri()
