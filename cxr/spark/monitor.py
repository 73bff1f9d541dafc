"""Run monitoring's Spark side (cxr.monitor holds the statistics, the tests and the page, without Spark).

watch(): the statistics of the run's rows and the few rows the page lists, from the summaries its scoring tasks
computed in the scoring pass (cxr/score/summary.py: one partial per task, added up on the driver: a first run
over millions of files sends counts, not rows). finish(): after the run is in place, the
statistics are tested against the model's training reference and the last N runs of the same model
(runs/*.json), each drift is a WARN line, and PRED_DIR/reports/R.html is written. Returns the run record's
`monitoring` field.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import pandas as pd
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from cxr.image.pipeline import preprocess_bytes
from cxr.score.sources import UNSEEN
from cxr.monitor.assess import REFERENCE, assess, baselines
from cxr.monitor.drift import describe
from cxr.monitor.page import render
from cxr.monitor.plots import thumbnail_uri
from cxr.monitor.reference import read_reference
from cxr.monitor.stats import COLUMNS, run_statistics
from cxr.spark import fs
from cxr.spark.explain import read_bytes

log = logging.getLogger(__name__)


@dataclass
class Watch:
    """What the run's staging tables tell, gathered before the commit removes them."""
    stats: dict[str, Any]
    kept_out: list[dict] = field(default_factory=list)
    least_confident: list[dict] = field(default_factory=list)
    most_ood: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    error: str | None = None


def watch(summary: Mapping[str, Any] | None) -> Watch:
    """The run's statistics and page rows from its scoring tasks' summaries, added up on the driver
    (cxr.score.summary.combine): no pass of its own over the rows. Never raises: monitoring must not cost a
    night its predictions (a failure is recorded instead)."""
    started = time.perf_counter()
    try:
        if summary is None:
            return Watch(run_statistics(pd.DataFrame(columns=list(COLUMNS))))
        return Watch(dict(summary["stats"]), list(summary["kept_out"]), list(summary["least_confident"]),
                     list(summary["most_ood"]), round(time.perf_counter() - started, 3))
    except Exception as exc:
        log.exception("run statistics failed; the run goes on without monitoring")
        return Watch({}, error=f"{type(exc).__name__}: {exc}")


def _earlier_records(spark: SparkSession, out: str, model_id: str, run_id: str) -> list[dict]:
    """runs/*.json of this model's earlier monitored runs, oldest first."""
    records = []
    for name in sorted(fs.list_names(spark, f"{out}/runs")):
        if not name.endswith(".json") or name == f"{run_id}.json":
            continue
        try:
            rec = json.loads(fs.read_text(spark, f"{out}/runs/{name}"))
        except (OSError, ValueError):
            continue
        if (rec.get("model") or {}).get("model_id") == model_id and (rec.get("monitoring") or {}).get("stats"):
            records.append(rec)
    return sorted(records, key=lambda r: r.get("started") or "")


def _nights(records: list[dict], monitoring: Mapping[str, Any], run_id: str, n: int) -> list[tuple[str, dict]]:
    """(run id, {statistic: PSI}) over the last n nights and this one, for the statistics that drifted tonight
    (else the three with the highest PSI), against the reference (else the run-over-run baseline)."""
    table = [r for r in monitoring["drift"] if r["value"] is not None]
    if not table:
        return []
    baseline = REFERENCE if any(r["baseline"] == REFERENCE for r in table) else None
    tonight = {r["statistic"]: r["value"] for r in table if baseline is None or r["baseline"] == baseline}
    names = {r["statistic"] for r in table if r["drifted"]} or set(sorted(tonight, key=tonight.get)[-3:])

    def values(drift):
        return {r["statistic"]: r["value"] for r in drift if r["statistic"] in names and r["value"] is not None
                and (r["baseline"] == REFERENCE if baseline else r["baseline"] != REFERENCE)}

    points = [(rec["run_id"], values(rec["monitoring"].get("drift") or [])) for rec in records[-n:]]
    return [p for p in points if p[1]] + [(run_id, values(table))]


def _images(spark: SparkSession, items: list[dict], input_uri: str, mode: str, params) -> dict[str, np.ndarray]:
    """sha256 -> the preprocessed image the model saw (read again: raw files through pyarrow.fs on the
    driver, preprocessed input from its images table)."""
    shas = sorted({it["sha256"] for it in items})
    if not shas:
        return {}
    if mode == "preprocessed":
        rows = (spark.read.parquet(f"{fs.qualified(spark, input_uri)}/images").where(F.col("sha256").isin(shas))
                .select("sha256", "image", "height", "width").dropDuplicates(["sha256"]).collect())
        return {r["sha256"]: np.frombuffer(r["image"], np.uint8).reshape(r["height"], r["width"]) for r in rows}
    out = {}
    for it in items:
        try:
            out[it["sha256"]] = preprocess_bytes(read_bytes(it["path"]), params)[1]
        except Exception as exc:   # changed or gone since it was scored: the page says "(no image)"
            log.info("run page: no thumbnail for %s: %s", it["path"], exc)
    return out


def _gradcam(spark: SparkSession, explained: Mapping[str, Any] | None, shas: list[str]) -> dict[str, np.ndarray]:
    """sha256 -> the Grad-CAM overlay --explain wrote for it (RGB), where it did."""
    import cv2

    table = (explained or {}).get("table")
    if not table or not shas or not fs.exists(spark, table):
        return {}
    out = {}
    for r in (spark.read.parquet(table).where(F.col("sha256").isin(shas) & F.col("explain_png").isNotNull())
              .select("sha256", "explain_png").collect()):
        try:
            bgr = cv2.imdecode(np.frombuffer(read_bytes(r["explain_png"]), np.uint8), cv2.IMREAD_COLOR)
            out[r["sha256"]] = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        except Exception as exc:
            log.info("run page: Grad-CAM overlay %s unreadable: %s", r["explain_png"], exc)
    return out


def _thumbnails(spark, w: Watch, record, input_uri, mode, params) -> tuple[list[dict], list[dict]]:
    chosen = w.least_confident + w.most_ood
    images = _images(spark, chosen, input_uri, mode, params)
    cams = _gradcam(spark, record.get("explain"), sorted({it["sha256"] for it in chosen}))

    def card(it):
        cam = cams.get(it["sha256"])
        img = cam if cam is not None else images.get(it["sha256"])
        return {**it, "uri": thumbnail_uri(img, 240 if cam is not None else 160) if img is not None else None,
                "gradcam": cam is not None}

    return [card(it) for it in w.least_confident], [card(it) for it in w.most_ood]


def finish(spark: SparkSession, out: str, record: Mapping[str, Any], w: Watch, model_dir: str,
           config: Mapping[str, Any], input_uri: str, mode: str, params) -> dict[str, Any]:
    """The record's `monitoring` field. Never raises: the run is committed by then and its record must be
    written (a run without runs/R.json counts as crashed), so a failure is recorded instead."""
    if w.error:
        return {"error": w.error, "drifted": [], "drift": []}
    try:
        return _finish(spark, out, record, w, model_dir, config, input_uri, mode, params)
    except Exception as exc:
        log.exception("run monitoring failed; the run's tables are unaffected")
        return {"error": f"{type(exc).__name__}: {exc}", "drifted": [], "drift": []}


def _finish(spark: SparkSession, out: str, record: Mapping[str, Any], w: Watch, model_dir: str,
            config: Mapping[str, Any], input_uri: str, mode: str, params) -> dict[str, Any]:
    conf, started = config["monitor"], time.perf_counter()
    run_id, model_id = record["run_id"], record["model"]["model_id"]
    reference = read_reference(model_dir)
    earlier = _earlier_records(spark, out, model_id, run_id)
    history = [(r["run_id"], r["monitoring"]["stats"]) for r in earlier]
    monitoring = assess(w.stats, reference, history, conf)
    if (record.get("sources") or {}).get("unseen"):   # films from a site the model never saw: a drift of its own
        monitoring["drifted"].append(f"{UNSEEN} ({', '.join(record['sources']['unseen'])})")
        monitoring["notes"] = [*(monitoring.get("notes") or []), *record["sources"]["warnings"]]
    for row in monitoring["drift"]:
        if row["drifted"]:
            log.warning("drift: %s", describe(row))
    if conf.get("page", True):
        page = f"{str(record['output']).rstrip('/')}/reports/{run_id}.html"
        try:
            drawn = {(f"training reference ({reference.get('split')})" if label == REFERENCE else label): stats
                     for label, stats in baselines(reference, history, int(conf["history_runs"])).items()}
            least, most = _thumbnails(spark, w, record, input_uri, mode, params)
            html = render(record, monitoring, drawn, w.kept_out, least, most,
                          _nights(earlier, monitoring, run_id, int(conf["plot_nights"])))
            fs.write_text(spark, f"{out}/reports/{run_id}.html", html)
            monitoring["page"] = page
        except Exception as exc:   # the run's tables are in place and valid without their page
            log.exception("run page %s not written", page)
            monitoring["page_error"] = f"{type(exc).__name__}: {exc}"
    monitoring["seconds"] = {"statistics": w.seconds, "tests_and_page": round(time.perf_counter() - started, 3)}
    return monitoring
