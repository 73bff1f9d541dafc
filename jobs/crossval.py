"""spark-submit jobs/crossval.py --data PRE_OUT --out DIR [--folds 5] [--seeds 3] [--models cnn]: grouped,
stratified k-fold cross-validation (models trained on the driver, held-out folds evaluated on the executors),
with the shortcut probes; writes DIR/crossval.json and DIR/crossval.md."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from cxr.cli import add_tracking_flags, base_parser, run_job, start_tracking, tracking_overrides  # noqa: E402


def main(argv=None) -> int:
    parser = base_parser(__doc__)
    parser.add_argument("--data", required=True, help="the preprocess job's output folder (all splits are pooled)")
    parser.add_argument("--out", required=True, help="folder for crossval.json and crossval.md")
    parser.add_argument("--folds", type=int, help="folds per seed (default: conf crossval.folds)")
    parser.add_argument("--group-by", choices=("patient", "source"),
                        help="patient: k folds grouped by patient (default); source: leave one source out, for "
                             "every class with images from more than one source (the `source` column)")
    parser.add_argument("--seeds", type=int, help="repetitions with different fold assignments and initialisations")
    parser.add_argument("--models", help="comma list of cnn,dnn,dwsep,scratch-cnn,scratch-dnn")
    parser.add_argument("--optimizers", help="comma list of optimizers for the CNN")
    parser.add_argument("--epochs", type=int, help="epochs per fit")
    parser.add_argument("--no-probes", action="store_true", help="skip the metadata and region-mask probes")
    parser.add_argument("--keep-models", action="store_true", help="keep every fold's model under DIR/models")
    parser.add_argument("--members", action="store_true",
                        help="also evaluate each member of a seed ensemble (train.ensemble > 1) as a model of its "
                             "own: single model and ensemble on the same folds (default: conf crossval.members)")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier cross-validation in DIR")
    parser.add_argument("--engine", choices=("onnx", "keras"),
                        help="inference engine on the executors: onnx (model.onnx in ONNX Runtime) or keras (the "
                             "model's own framework: Keras or cxr.nn); default: conf inference.engine")
    parser.add_argument("--train-fraction", type=float,
                        help="train on this fraction of each training fold's patients per class (a learning "
                             "curve's point; default: conf crossval.train_fraction, 1.0)")
    add_tracking_flags(parser)
    args = parser.parse_args(argv)
    overrides = {"crossval.keep_models": True if args.keep_models else None, "inference.engine": args.engine,
                 "crossval.train_fraction": args.train_fraction,
                 **tracking_overrides(args)}

    def body(spark, config):
        from cxr.evaluate.crossval import REPORT_FILE, run

        tracking = start_tracking(config)

        result = run(spark, args.data, args.out, config, folds=args.folds, seeds=args.seeds, models=args.models,
                     optimizers=args.optimizers, epochs=args.epochs, probes=False if args.no_probes else None,
                     overwrite=args.overwrite, members=True if args.members else None, group_by=args.group_by)
        pooled = result.get("group_by") != "source"   # leaving a source out, each fold holds one class
        for name, s in (result["summary"] if pooled else {}).items():
            print(f"crossval {name}: macro-F1 {s['macro_f1']['mean']:.3f} ± {s['macro_f1']['sd']:.3f}, "
                  f"accuracy {s['accuracy']['mean']:.3f} ± {s['accuracy']['sd']:.3f}, NORMAL vs VIRAL "
                  f"{s['normal_vs_viral']['mean']:.3f} ± {s['normal_vs_viral']['sd']:.3f} "
                  f"({s['runs']} held-out folds)")
        for name, s in ((result.get("per_seed") or {}) if pooled else {}).items():
            print(f"crossval {name} across {s['seeds']} seeds (each seed's CV mean): macro-F1 "
                  f"{s['macro_f1']['mean']:.3f} ± {s['macro_f1']['sd']:.3f}, NORMAL vs VIRAL "
                  f"{s['normal_vs_viral']['mean']:.3f} ± {s['normal_vs_viral']['sd']:.3f}")
        for r in result.get("by_source") or []:
            print(f"crossval {r['model']} {r['source']} {r['class']}: recall {r['recall']:.3f} ± {r['sd']:.3f} "
                  f"({int(r['n'])} images, {int(r['seeds'])} seeds)")
        for warning in [w for ws in (result.get("warnings") or {}).values() for w in ws]:
            print(warning)
        print(f"crossval: {result['timings_s']['total']:.0f}s -> {Path(args.out) / REPORT_FILE}")
        if tracking:
            from cxr.tracking.mirror import log_crossval

            print(f"mlflow: run {log_crossval(tracking, args.data, args.out, result)}")

    return run_job(args, overrides, body)


if __name__ == "__main__":
    sys.exit(main())
