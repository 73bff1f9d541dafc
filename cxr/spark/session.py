"""The one SparkSession builder: every job and test gets its session here, with settings from conf/.

Two kinds of session come out of it: a classic one (`--master local[2]`, `--master spark://...`, or
spark-submit's --master), whose driver runs a JVM in this process, and a Spark Connect client session
(`--remote sc://host:port` or the SPARK_REMOTE environment variable), which talks to a Spark Connect server
over gRPC: no SparkContext, no JVM in the driver program. Nothing else in cxr/ needs to know which it has:
use `spark.conf`, `master_url(spark)` and `default_parallelism(spark)` from here instead of the SparkContext.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
from typing import Any, Mapping
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

# Settings a Connect client cannot (or must not) set on the server's shared Spark: the server owns them.
_SERVER_OWNED = ("spark.eventLog.", "spark.ui.", "spark.driver.", "spark.executor.", "spark.master",
                 "spark.submit.", "spark.app.", "spark.log.", "spark.local.", "spark.pyspark.")


class ConnectUnsupportedError(RuntimeError):
    """Something this project needs is not available over Spark Connect (the message names it)."""


def not_on_connect(feature: str) -> ConnectUnsupportedError:
    return ConnectUnsupportedError(f"not available over Spark Connect: {feature}; run this job with --master "
                                   f"(a classic session) instead")


def is_connect(spark) -> bool:
    """True for a Spark Connect client session (pyspark.sql.connect.session.SparkSession)."""
    return type(spark).__module__.startswith("pyspark.sql.connect")


def _submitted_master() -> str | None:
    """The --master given to spark-submit, if the driver runs under it (its JVM is already up). Classic only:
    never called for a Connect session."""
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


def classic_context(spark):
    """The SparkContext of a classic session, None over Spark Connect (which has none): for what only a classic
    session offers (broadcast variables, the status tracker), each caller keeping a Connect path of its own."""
    return None if is_connect(spark) else spark.sparkContext   # the one JVM handle in cxr/ (tests/test_connect.py)


def master_url(spark) -> str:
    """The session's master URL (local[2], spark://..., yarn); over Connect, the server's."""
    try:
        return spark.conf.get("spark.master", None) or "unknown"
    except Exception:   # a server that hides it
        return "unknown"


def default_parallelism(spark) -> int:
    """What SparkContext.defaultParallelism gives, without a SparkContext: spark.default.parallelism when
    set; else the cores of a local[N] / local[*] master; else the executors' cores from the conf (at least 2,
    as Spark's own default for clusters)."""
    def conf(key):
        try:
            return spark.conf.get(key, None)
        except Exception:
            return None

    value = conf("spark.default.parallelism")
    if value:
        return max(1, int(value))
    url = master_url(spark)
    match = re.match(r"^local(?:-cluster)?\[(\*|\d+)(?:\s*,\s*\d+)*", url)
    if url == "local":
        return 1
    if match:
        if url.startswith("local-cluster"):
            parts = [int(p) for p in re.findall(r"\d+", url)]
            return max(1, parts[0] * parts[1]) if len(parts) >= 2 else 2
        return (os.cpu_count() or 1) if match.group(1) == "*" else max(1, int(match.group(1)))
    cores = conf("spark.cores.max")
    if cores:
        return max(2, int(cores))
    instances, per = conf("spark.executor.instances"), conf("spark.executor.cores")
    if instances and per:
        return max(2, int(instances) * int(per))
    return 2


def _submitted_remote() -> str | None:
    """spark-submit's own --remote URL: it hands the Python driver its settings in PYSPARK_REMOTE_INIT_CONF_<i>."""
    import json

    for i in range(int(os.environ.get("PYSPARK_REMOTE_INIT_CONF_LEN") or 0)):
        try:
            url = json.loads(os.environ.get(f"PYSPARK_REMOTE_INIT_CONF_{i}") or "{}").get("spark.remote")
        except ValueError:
            continue
        if url:
            return url
    return None


def _resolve_remote(master_arg: str | None, remote: str | None) -> str | None:
    if master_arg and remote:
        raise ValueError(f"give either --master ({master_arg}) or --remote ({remote}), not both")
    if remote:
        return remote
    submitted = _submitted_remote()
    if submitted:
        return submitted
    env = os.environ.get("SPARK_REMOTE")
    if env and master_arg:
        # pyspark's builder would follow SPARK_REMOTE whatever the master: an explicit --master wins
        log.warning("--master %s given: ignoring SPARK_REMOTE=%s", master_arg, env)
        os.environ.pop("SPARK_REMOTE")
        return None
    return env or None


def _connect_session(url: str, app_name: str, spark_conf: Mapping[str, Any], settings: Mapping[str, Any]):
    from pyspark.sql import SparkSession

    try:
        import pyspark.sql.connect.session  # noqa: F401
    except ImportError as exc:   # grpcio & co. come with pyspark[connect] (a dependency of this project)
        raise RuntimeError(f"--remote {url} needs pyspark's Spark Connect client: pip install "
                           f"'pyspark[connect]' ({exc})") from exc
    active = SparkSession.getActiveSession()
    if active is not None and not is_connect(active):
        raise ConnectUnsupportedError(f"a Spark Connect session ({url}) in a process that already runs a classic "
                                      f"session: pyspark allows one kind per process; run the job in its own process")
    # `spark-submit jobs/X.py --remote ...` starts a classic driver JVM first and says so in MASTER (its --master,
    # local[*] by default): pyspark would refuse a master and a Connect URL together. The job asked for Connect.
    if "PYSPARK_GATEWAY_PORT" in os.environ and os.environ.pop("MASTER", None):
        log.info("under spark-submit: its master is not used, the job runs over Spark Connect at %s", url)
    # The generic builder (not pyspark.sql.connect's own) also switches pyspark.sql.functions to Connect mode.
    spark = SparkSession.builder.remote(url).appName(app_name).getOrCreate()
    skipped, rejected = [], []
    for key, value in settings.items():
        if not key.startswith("spark.sql.") or key.startswith(_SERVER_OWNED):
            skipped.append(key)
            continue
        try:
            spark.conf.set(key, _conf_value(value))
        except Exception as exc:   # static SQL confs and whatever the server's policy refuses
            rejected.append(key)
            log.info("Spark Connect server refused %s=%s: %s", key, value, str(exc).splitlines()[0])
    if skipped:
        log.info("over Spark Connect the server owns these settings; not set: %s", ", ".join(sorted(skipped)))
    if rejected:
        log.warning("settings the Spark Connect server refused: %s", ", ".join(sorted(rejected)))
    log.info("Spark %s over Spark Connect at %s (server master %s), app %s (log level: the server's)",
             spark.version, url, master_url(spark), app_name)
    return spark


def console_progress(spark_conf: Mapping[str, Any]) -> bool:
    """spark.console_progress: on, off, or auto (on only when stderr is a terminal: a progress bar redrawn with
    carriage returns turns a log file or a piped demo into one long line). An explicit spark.ui.showConsoleProgress
    in spark.conf wins."""
    explicit = (spark_conf.get("conf") or {}).get("spark.ui.showConsoleProgress")
    if explicit is not None:
        return _conf_value(explicit) == "true"
    mode = _conf_value(spark_conf.get("console_progress", "auto"))
    if mode in ("on", "true"):
        return True
    if mode in ("off", "false"):
        return False
    return sys.stderr.isatty()


def get_spark(config: Mapping[str, Any], master: str | None = None, app_name: str | None = None,
              extra_conf: Mapping[str, Any] | None = None, remote: str | None = None):
    """Build (or reuse) the session. A Connect session when `remote` (sc://host:port) or SPARK_REMOTE is given
    (and no explicit `master`); else classic, the master being: argument, spark-submit's --master, conf."""
    from pyspark.sql import SparkSession

    spark_conf = config["spark"]
    name = app_name or spark_conf.get("app_name", "cxr-spark")
    settings = {**spark_conf.get("conf", {}), **(extra_conf or {})}
    url = _resolve_remote(master, remote)
    if url:
        return _connect_session(url, name, spark_conf, settings)

    chosen = master or _submitted_master() or spark_conf.get("master", "local[*]")
    if chosen.startswith("local"):
        # Local workers are forked from this interpreter's environment: make them run this venv's Python
        # and keep every socket on loopback. On a cluster these come from spark-submit / the packed env.
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    builder = SparkSession.builder.appName(name).master(chosen)
    if chosen.startswith("local"):
        builder = builder.config("spark.driver.host", "127.0.0.1").config("spark.driver.bindAddress", "127.0.0.1")
    # spark.log.level: SparkContext.setLogLevel at startup, without touching the SparkContext
    builder = builder.config("spark.log.level", str(spark_conf.get("log_level", "WARN")).upper())
    builder = builder.config("spark.ui.showConsoleProgress", _conf_value(console_progress(spark_conf)))
    _ensure_event_log_dir(settings)
    for key, value in settings.items():
        builder = builder.config(key, _conf_value(value))
    spark = builder.getOrCreate()
    log.info("Spark %s, master %s, app %s", spark.version, master_url(spark),
             spark.conf.get("spark.app.name", name))
    return spark


@contextlib.contextmanager
def session_conf(spark, key: str, value):
    """A runtime SQL setting for the jobs of one block (e.g. the Arrow batch of one mapInPandas), the session's own
    value put back afterwards."""
    before = spark.conf.get(key, None)
    spark.conf.set(key, _conf_value(value))
    try:
        yield
    finally:
        if before is None:
            spark.conf.unset(key)
        else:
            spark.conf.set(key, before)
