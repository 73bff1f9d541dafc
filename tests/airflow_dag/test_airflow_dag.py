"""The nightly DAG as Airflow itself loads it (run by `make test-airflow` in .venv-airflow; the main suite does
not collect this folder: Airflow is not one of the project's dependencies)."""
from __future__ import annotations

import os
import re
import shlex
import tempfile
from pathlib import Path

os.environ.setdefault("AIRFLOW_HOME", tempfile.mkdtemp(prefix="cxr-airflow-"))
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
os.environ["AIRFLOW_CONN_SPARK_DEFAULT"] = "spark://spark-master:7077"   # a connection without a database

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DAG_FILE = ROOT / "scripts" / "airflow_score_dag.py"
RUN_TS = "20260102T023000"


def _dagbag():
    try:
        from airflow.dag_processing.dagbag import DagBag      # Airflow >= 3.1
    except ImportError:
        from airflow.models.dagbag import DagBag
    return DagBag(dag_folder=str(DAG_FILE))   # examples off: AIRFLOW__CORE__LOAD_EXAMPLES above


@pytest.fixture(scope="module")
def dag():
    bag = _dagbag()
    assert bag.import_errors == {}
    assert list(bag.dags) == ["cxr_nightly_score"]
    return bag.dags["cxr_nightly_score"]


def readme_nightly_command() -> list[str]:
    """The command the README says the nightly run submits (the block after its marker line)."""
    text = (ROOT / "README.md").read_text()
    block = text.split("# the nightly run (the Airflow DAG submits exactly this)", 1)[1].split("\n\n", 1)[0]
    return shlex.split(re.sub(r"\\\n\s*", " ", block))


def test_the_dag_loads_with_one_task_and_one_run_at_a_time(dag):
    assert len(dag.tasks) == 1 and dag.max_active_runs == 1 and dag.catchup is False
    task = dag.tasks[0]
    assert type(task).__name__ == "SparkSubmitOperator" and task.retries == 2


def test_the_rendered_command_is_the_readmes(dag):
    """The operator's own hook builds the command from the task's templates, rendered as a run would."""
    task = dag.tasks[0]
    task.render_template_fields({"params": {k: dag.params[k] for k in dag.params}, "ts_nodash": RUN_TS})
    command = task._get_hook()._build_spark_submit_command(task.application)
    assert command == readme_nightly_command()
    assert command[command.index("--model") + 1] == "models:/cxr@champion" and command[-1] == RUN_TS
