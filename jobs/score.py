"""spark-submit jobs/score.py --input ARCHIVE_OR_PREPROCESSED --model MODELS_DIR/NAME --output PRED_DIR [...]

Exit codes: 0 done, 2 bad input or arguments, 3 another run holds PRED_DIR's lease, or (Delta) committed to
PRED_DIR after this run started: nothing of this run was committed; 4 (only with --fail-on-drift or conf
monitor.fail_on_drift) the run is complete and committed, with its record, MLflow run and page, but a monitored
statistic drifted beyond its threshold (README "Monitoring")."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from cxr.cli import (add_scope_flags, add_tracking_flags, base_parser, run_job, scope_overrides,  # noqa: E402
                     start_tracking, tracking_overrides)


def main(argv=None) -> int:
    parser = base_parser(__doc__)
    parser.add_argument("--input", required=True, help="raw image folder, or a preprocess job's output folder")
    parser.add_argument("--model", required=True,
                        help="a model folder written by jobs/train.py, or a model it logged to MLflow: "
                             "models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/model")
    parser.add_argument("--output", required=True, help="predictions folder (grows run by run)")
    parser.add_argument("--batch-size", type=int, help="images per model call")
    parser.add_argument("--full", action="store_true", help="rescore files already scored by this model")
    parser.add_argument("--retry-errors", action="store_true",
                        help="read again the files earlier runs rejected, although they did not change")
    parser.add_argument("--engine", choices=["onnx", "keras"],
                        help="onnx: model.onnx in ONNX Runtime (conf inference.engine); keras: the model's own "
                             "framework (Keras, or NumPy for the scratch models)")
    parser.add_argument("--run-id", help="name of this run (default: UTC time + random suffix)")
    parser.add_argument("--explain", metavar="N|all", help="Grad-CAM overlays for N images per predicted class "
                        "(or all) -> PRED_DIR/explain/run_id=R/, indexed in PRED_DIR/explanations/")
    parser.add_argument("--table-format", choices=["parquet", "delta"],
                        help="PRED_DIR's tables: Parquet folders, or Delta tables committed by delta-rs (conf "
                             "score.table_format)")
    parser.add_argument("--staging-dir", help="where Spark writes the run's files before the commit (conf "
                        "score.staging_dir; a local folder when PRED_DIR is on S3 and Spark has no hadoop-aws)")
    parser.add_argument("--on-damaged", choices=["reject", "flag"],
                        help="files the codec reports damaged: errors rows, or predictions with decode_warnings")
    parser.add_argument("--source", help="the source (site, dataset) of this archive's files, for those whose DICOM "
                        "header names no site: counted per source and checked against the model card (conf "
                        "score.source)")
    parser.add_argument("--fail-on-drift", action="store_true", default=None,
                        help="exit 4 when a monitored statistic drifted (after everything is written; conf "
                             "monitor.fail_on_drift)")
    add_scope_flags(parser)
    add_tracking_flags(parser)
    args = parser.parse_args(argv)

    def body(spark, config):
        from cxr.spark.score import run
        from cxr.tracking.registry import is_model_uri, resolve
        from cxr.tracking.settings import TrackingSettings

        tracking = start_tracking(config)
        model_dir, registry = args.model, None
        if is_model_uri(args.model):   # resolved once, here on the driver
            registry = resolve(args.model, tracking or TrackingSettings.from_config(config)).record()
            model_dir = registry["dir"]
            version = f" version {registry['version']}" if registry["version"] else ""
            print(f"score: {args.model} ->{version} {model_dir}")
        r = run(spark, args.input, model_dir, args.output, config, batch_size=args.batch_size, full=args.full,
                run_id=args.run_id, explain=args.explain, engine=args.engine, retry_errors=args.retry_errors,
                registry=registry)
        if tracking:
            from cxr.tracking.mirror import log_score

            print(f"mlflow: run {log_score(tracking, r)}")
        c = r["counts"]
        print(f"score: run {r['run_id']}: {c['input']} files -> {c['scored']} scored, {c['rejected']} rejected, "
              f"{c['out_of_scope']} out of scope, "
              f"{c['skipped_unchanged']} unchanged (not read), {c['skipped_already_scored']} already scored; "
              f"{r['images_per_s']} images/s; {r['scored_out_of_distribution']} scored images out of distribution; "
              f"output {args.output}")
        if r.get("explain"):
            e = r["explain"]
            print(f"explain: {e.get('images', 0)} overlays in {e.get('png_dir')}" if "error" not in e
                  else f"explain: failed ({e['error']}); predictions are unaffected")
        for warning in r["sources"]["warnings"]:
            print(f"score: WARNING {warning}")
        m = r["monitoring"]
        print(f"monitor: failed ({m['error']}); predictions are unaffected" if "error" in m else
              f"monitor: {'WARN drift in ' + ', '.join(m['drifted']) if m['drifted'] else 'no drift'} "
              f"({sum(t['value'] is not None for t in m['drift'])} tests); page {m.get('page', 'not written')}")
        if m["drifted"] and config["monitor"].get("fail_on_drift"):
            return 4

    return run_job(args, {"score.batch_size": args.batch_size, "score.table_format": args.table_format,
                          "score.staging_dir": args.staging_dir, "preprocess.on_damaged": args.on_damaged,
                          "monitor.fail_on_drift": args.fail_on_drift, "score.source": args.source,
                          **scope_overrides(args), **tracking_overrides(args)}, body)


if __name__ == "__main__":
    sys.exit(main())
