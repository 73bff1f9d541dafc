"""The one SparkSession builder: every job and test gets its session here, with settings from conf/."""
from __future__ import annotations

import logging
import os
import sys
from typing import Any, Mapping
from urllib.parse import urlsplit

log = logging.getLogger(__name__)


def _submitted_master() -> str | None:
    """The --master given to spark-submit, if the driver runs under it (its JVM is already up)."""
    if "PYSPARK_GATEWAY_PORT" not in os.environ:
        return None
    from pyspark import SparkConf, SparkContext

    SparkContext._ensure_initialized()
    return SparkConf().get("spark.master", None)


def _conf_value(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _ensure_event_log_dir(settings: Mapping[str, Any]) -> None:
    """Spark refuses to start when event logging is on and its directory is missing: create a local one."""
    if _conf_value(settings.get("spark.eventLog.enabled", False)) != "true":
        return
    target = str(settings.get("spark.eventLog.dir", "/tmp/spark-events"))
    parts = urlsplit(target)
    if parts.scheme in ("", "file"):
        os.makedirs(parts.path if parts.scheme else target, exist_ok=True)


def get_spark(config: Mapping[str, Any], master: str | None = None, app_name: str | None = None,
              extra_conf: Mapping[str, Any] | None = None):
    """Build (or reuse) the session. Precedence for the master: argument, spark-submit's --master, conf."""
    from pyspark.sql import SparkSession

    spark_conf = config["spark"]
    chosen = master or _submitted_master() or spark_conf.get("master", "local[*]")
    if chosen.startswith("local"):
        # Local workers are forked from this interpreter's environment: make them run this venv's Python
        # and keep every socket on loopback. On a cluster these come from spark-submit / the packed env.
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    builder = SparkSession.builder.appName(app_name or spark_conf.get("app_name", "cxr-spark")).master(chosen)
    if chosen.startswith("local"):
        builder = builder.config("spark.driver.host", "127.0.0.1").config("spark.driver.bindAddress", "127.0.0.1")
    settings = {**spark_conf.get("conf", {}), **(extra_conf or {})}
    _ensure_event_log_dir(settings)
    for key, value in settings.items():
        builder = builder.config(key, _conf_value(value))
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel(spark_conf.get("log_level", "WARN"))
    log.info("Spark %s, master %s, app %s", spark.version, spark.sparkContext.master, spark.sparkContext.appName)
    return spark
