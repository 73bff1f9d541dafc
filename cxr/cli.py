"""What every spark-submit entry point shares: common flags, logging, config, the session, exit codes."""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Any, Callable, Mapping

from cxr.config import load_config
from cxr.models.tf_console import quiet_tensorflow_import


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--conf", help="a YAML file (or a profile name in conf/) layered over conf/default.yaml")
    parser.add_argument("--master", help="Spark master URL; default: spark-submit's --master, else conf")
    parser.add_argument("--remote", metavar="sc://HOST:PORT",
                        help="run over Spark Connect against this server instead (default: $SPARK_REMOTE, if set "
                             "and no --master is given)")
    parser.add_argument("--log-level", default="INFO", help="log level of the job's own messages (default INFO)")
    parser.add_argument("--progress", action="store_const", const="on", default=None,
                        help="show Spark's progress bars (conf spark.console_progress; default: only on a terminal)")
    return parser


def add_tracking_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tracking-uri", help="MLflow tracking store (default: $MLFLOW_TRACKING_URI, else conf "
                        "tracking.uri, else sqlite:///mlflow.db in the working directory)")
    parser.add_argument("--no-tracking", action="store_true", help="log nothing to MLflow for this run")


def tracking_overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {"tracking.uri_flag": args.tracking_uri, "tracking.enabled": False if args.no_tracking else None}


def add_scope_flags(parser: argparse.ArgumentParser, ood: bool = True) -> None:
    """The scope rules of conf's `scope:` section, per run (README "Scope rules")."""
    lists = "comma-separated; an empty item (e.g. 'PA,AP,') allows files without the tag"
    parser.add_argument("--modalities", help=f"DICOM Modality values in scope (conf scope.modalities; {lists})")
    parser.add_argument("--body-parts", help=f"BodyPartExamined values in scope (conf scope.body_parts; {lists})")
    parser.add_argument("--views", help=f"ViewPosition values in scope (conf scope.views; {lists})")
    if ood:
        parser.add_argument("--ood", choices=["flag", "skip"],
                            help="out-of-distribution images: keep their probabilities with in_distribution "
                                 "false (flag), or make them out_of_scope rows (skip) (conf scope.ood)")


def scope_overrides(args: argparse.Namespace) -> dict[str, Any]:
    def items(value):
        return None if value is None else [v.strip() for v in value.split(",")]

    return {"scope.modalities": items(args.modalities), "scope.body_parts": items(args.body_parts),
            "scope.views": items(args.views), "scope.ood": getattr(args, "ood", None)}


def start_tracking(config: Mapping[str, Any]):
    """The job's TrackingSettings, checked against the store before any work (None when tracking is off)."""
    from cxr.tracking.settings import TrackingSettings

    settings = TrackingSettings.from_config(config)
    if not settings.enabled:
        return None
    settings.activate()
    return settings


def setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("py4j", "matplotlib", "PIL", "tf2onnx", "alembic", "mlflow.store.db.utils", "absl"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    quiet_tensorflow_import()


def run_job(args: argparse.Namespace, overrides: Mapping[str, Any], body: Callable[[Any, dict], int | None]) -> int:
    """Load config, start Spark, run body(spark, config); known user errors exit 2 with one clear line, a
    busy output folder (another run's lease) exits 3. A session the caller already had (a notebook, the tests)
    is used and left running."""
    from pyspark.sql import SparkSession

    from cxr.spark.session import get_spark, is_connect, not_on_connect

    setup_logging(args.log_level)
    config = load_config(args.conf, {**overrides, "spark.console_progress": getattr(args, "progress", None)})
    reused = SparkSession.getActiveSession() is not None
    try:
        spark = get_spark(config, master=args.master, remote=getattr(args, "remote", None))
    except ValueError as exc:   # --master and --remote together
        logging.getLogger("cxr").error("%s", exc)
        return 2
    except RuntimeError as exc:
        if type(exc).__name__ != "ConnectUnsupportedError":
            raise
        logging.getLogger("cxr").error("%s", exc)
        return 2
    try:
        return int(body(spark, config) or 0)
    except (AttributeError, NotImplementedError) as exc:
        if not is_connect(spark):
            raise
        # pyspark's JVM_ATTRIBUTE_NOT_SUPPORTED & co.: say what is missing rather than show an AttributeError
        logging.getLogger("cxr").error("%s", not_on_connect(str(exc).splitlines()[0] if str(exc) else repr(exc)))
        return 2
    except (FileNotFoundError, ValueError) as exc:
        logging.getLogger("cxr").error("%s", exc)
        return 2
    except RuntimeError as exc:
        code = {"OutputExistsError": 2, "LeaseHeldError": 3, "LeaseLostError": 3, "ConcurrentRunError": 3,
                "ConnectUnsupportedError": 2}.get(type(exc).__name__)
        if code is None:
            raise
        logging.getLogger("cxr").error("%s", exc)
        return code
    finally:
        if not reused:
            spark.stop()
