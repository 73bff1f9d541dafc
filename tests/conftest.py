"""Shared fixtures: one real local[2] SparkSession for the whole test session (a start costs ~10 s)."""
from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def load_job(name: str):
    """jobs/NAME.py's main(argv): the very entry point spark-submit runs, called in-process on the test session
    (run_job leaves a session it did not start running)."""
    spec = importlib.util.spec_from_file_location(f"job_{name}", ROOT / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def shared_data(name: str) -> Path:
    """A folder of ../shared/data, or skip the test saying why (only where ../shared is absent)."""
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"real data folder {path} is absent (it lives in ../shared beside the project)")
    return path


@pytest.fixture(scope="session")
def config():
    from cxr.config import load_config

    return load_config()


@pytest.fixture(scope="session")
def spark(config):
    from cxr.spark.session import get_spark

    session = get_spark(config, master="local[2]", app_name="cxr-tests",
                        extra_conf={"spark.sql.shuffle.partitions": 4, "spark.ui.enabled": False,
                                    "spark.ui.showConsoleProgress": False})
    yield session
    session.stop()


# Every job a test runs logs to MLflow (tracking is on by default): into one throwaway store per test session,
# never into ./mlflow.db or a developer's tracking server. Subprocess jobs (spark-submit) inherit it.
os.environ["MLFLOW_TRACKING_URI"] = "sqlite:///" + os.path.join(tempfile.mkdtemp(prefix="cxr-mlflow-"), "mlflow.db")

# tests/airflow_dag runs in .venv-airflow (`make test-airflow`); Airflow is not a dependency of the project.
collect_ignore = [] if importlib.util.find_spec("airflow") else ["airflow_dag"]
