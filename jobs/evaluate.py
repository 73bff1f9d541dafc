"""spark-submit jobs/evaluate.py --data PRE_OUT --models MODELS_DIR [--split test]: score every model on the
split across the executors, then write MODELS_DIR/evaluation_<split>.json and MODELS_DIR/report.md."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from cxr.cli import base_parser, run_job  # noqa: E402


def main(argv=None) -> int:
    parser = base_parser(__doc__)
    parser.add_argument("--data", help="the preprocess job's output folder (evaluates its --split)")
    parser.add_argument("--external", metavar="ARCHIVE",
                        help="instead of --data: a labelled archive of another site (raw files in class folders, "
                             "preprocessed here with the models' own params, or a preprocess output); every "
                             "labelled image is evaluated and MODELS_DIR/external_<name>/external.md puts the "
                             "numbers beside the cross-validated estimate")
    parser.add_argument("--manifest", action="append", help="with --external raw files: patient_id/source CSV")
    parser.add_argument("--crossval", action="append", metavar="DIR",
                        help="with --external: the models' jobs/crossval.py output, for the estimate beside")
    parser.add_argument("--external-out", help="with --external: output folder (default MODELS_DIR/external_<name>)")
    parser.add_argument("--models", required=True, help="models folder written by jobs/train.py")
    parser.add_argument("--split", help="split to evaluate (default: conf evaluate.split, i.e. test)")
    parser.add_argument("--only", help="comma list of model names to evaluate (default: all in --models)")
    parser.add_argument("--partitions", type=int, help="Spark partitions for the split's rows")
    parser.add_argument("--engine", choices=("onnx", "keras"),
                        help="inference engine on the executors: onnx (model.onnx in ONNX Runtime) or keras (the "
                             "model's own framework: Keras or cxr.nn); default: conf inference.engine")
    args = parser.parse_args(argv)
    overrides = {"evaluate.split": args.split, "evaluate.partitions": args.partitions,
                 "inference.engine": args.engine}

    def body(spark, config):
        from cxr.evaluate.report import write_report
        from cxr.spark.evaluate import format_summary, run

        only = [m.strip() for m in args.only.split(",")] if args.only else None
        if args.external:
            from cxr.spark.external import run as external

            evaluation = external(spark, args.external, args.models, config, args.external_out, args.manifest or (),
                                  only, args.crossval or ())
            print(format_summary(evaluation))
            print(f"external: {evaluation['report']}")
            return
        if not args.data:
            parser.error("give --data (a preprocess output) or --external (another site's archive)")
        evaluation = run(spark, args.data, args.models, config, models=only)
        print(format_summary(evaluation))
        print(f"report: {write_report(args.models, evaluation, split=evaluation['split'])}")

    return run_job(args, overrides, body)


if __name__ == "__main__":
    sys.exit(main())
