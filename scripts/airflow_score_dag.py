"""Example Airflow DAG: score the X-ray archive every night with jobs/score.py (incremental by default).

Copy into your DAGs folder and set the Airflow Variables cxr_home, cxr_archive, cxr_model, cxr_predictions
(and a Spark connection `spark_default` pointing at your master). Needs apache-airflow and
apache-airflow-providers-apache-spark; cxr-spark itself does not depend on Airflow.
"""
from __future__ import annotations

import pendulum
from airflow import DAG
from airflow.models import Variable
from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator

CXR_HOME = Variable.get("cxr_home", default_var="/opt/cxr-spark")

with DAG(
    dag_id="cxr_nightly_score",
    schedule="30 2 * * *",
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,          # each run scores whatever is new; there is nothing to backfill
    max_active_runs=1,      # one run at a time per predictions folder
    tags=["cxr", "spark"],
) as dag:
    SparkSubmitOperator(
        task_id="score_archive",
        conn_id="spark_default",
        application=f"{CXR_HOME}/jobs/score.py",
        application_args=[
            "--input", Variable.get("cxr_archive", default_var="/data/xray-archive"),
            "--model", Variable.get("cxr_model", default_var=f"{CXR_HOME}/models/cnn-adam"),
            "--output", Variable.get("cxr_predictions", default_var="/data/predictions"),
            "--run-id", "{{ ts_nodash }}",
        ],
        conf={"spark.sql.execution.arrow.maxRecordsPerBatch": "16"},
        retries=2,          # a rerun is safe: crashed runs are cleaned up and scored files skipped
    )
