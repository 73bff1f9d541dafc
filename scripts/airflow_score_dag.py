"""Airflow DAG: score the X-ray archive every night with jobs/score.py (incremental: a night costs what changed).

Copy it into your DAGs folder. It submits, through the Spark connection `spark_default` (your master), the
README's nightly command. The model is a registry URI, `models:/cxr@champion` by default: promoting another
version (`python -m cxr.tracking.registry promote cxr VERSION`) changes what the next night scores, with no edit
here. Paths and URIs are DAG params: change their defaults below or per run (trigger with config). Nothing is
looked up when the file is parsed (no Variables, no connections): the scheduler parses it often.

Exit codes of jobs/score.py (spark-submit passes them on in client deploy mode, the default): 0 done; 2 bad input
or arguments; 3 the previous night still holds PRED_DIR's lease (nothing written: the retries below are meant for
this); 4 only with `--fail-on-drift` (or conf monitor.fail_on_drift): the night is scored and committed, with its
runs/R.json, MLflow run and page PRED_DIR/reports/R.html, but a monitored statistic drifted (README "Monitoring").
This DAG does not pass the flag: drift is a WARN line in the task log and `monitoring.drifted` in the run record.
If you add it, alert on the failure (email_on_failure, on_failure_callback): a retry after exit 4 finds nothing new
to score, so it has nothing to test and succeeds.

`make test-airflow` loads this file with Airflow's DagBag and checks the command it renders against the README.
Needs apache-airflow 3 and apache-airflow-providers-apache-spark (the project's `airflow` extra).
"""
from __future__ import annotations

import pendulum
from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator

try:                                    # Airflow 3
    from airflow.sdk import DAG, Param
except ImportError:                     # Airflow 2.x
    from airflow import DAG
    from airflow.models.param import Param

with DAG(
    dag_id="cxr_nightly_score",
    schedule="30 2 * * *",
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,          # each run scores whatever is new; there is nothing to backfill
    max_active_runs=1,      # one run at a time per predictions folder (a second would exit 3 on the lease)
    tags=["cxr", "spark"],
    params={
        "cxr_home": Param("/opt/cxr-spark", type="string", description="the cxr-spark checkout (jobs/)"),
        "archive": Param("/data/xray-archive", type="string", description="raw archive (grows every night)"),
        "model": Param("models:/cxr@champion", type="string",
                       description="models:/NAME@ALIAS, models:/NAME/VERSION or a model folder"),
        "predictions": Param("/data/predictions", type="string", description="PRED_DIR"),
        "tracking_uri": Param("sqlite:////opt/cxr-spark/mlflow.db", type="string",
                              description="the MLflow store train registered the model in"),
    },
) as dag:
    SparkSubmitOperator(
        task_id="score_archive",
        conn_id="spark_default",
        name="cxr-nightly-score",   # the Spark application's name (history server, cluster UI)
        application="{{ params.cxr_home }}/jobs/score.py",
        application_args=[
            "--input", "{{ params.archive }}",
            "--model", "{{ params.model }}",
            "--output", "{{ params.predictions }}",
            "--tracking-uri", "{{ params.tracking_uri }}",
            "--run-id", "{{ ts_nodash }}",
        ],
        conf={"spark.sql.execution.arrow.maxRecordsPerBatch": "16"},
        retries=2,          # a rerun is safe: crashed runs are cleaned up and scored files skipped (exit 3: the
                            # lease is held, try later; exit 4 with --fail-on-drift: see the docstring)
        retry_delay=pendulum.duration(minutes=10),
    )
