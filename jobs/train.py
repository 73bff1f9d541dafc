"""spark-submit jobs/train.py --data PRE_OUT --out MODELS_DIR [...]: train the study's models on the driver,
then evaluate them across the cluster and write MODELS_DIR/report.md."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from cxr.cli import add_tracking_flags, base_parser, run_job, start_tracking, tracking_overrides  # noqa: E402


def main(argv=None) -> int:
    parser = base_parser(__doc__)
    parser.add_argument("--data", required=True, help="the preprocess job's output folder (images/, manifest.json)")
    parser.add_argument("--out", required=True, help="models folder: one sub-folder per model, report.md")
    parser.add_argument("--models", help="comma list of cnn,dnn,dwsep,scratch-cnn,scratch-dnn (default: conf)")
    parser.add_argument("--optimizers", help="comma list of rmsprop,sgd,adadelta,adagrad,adam for the CNN")
    parser.add_argument("--epochs", type=int, help="epochs per model")
    parser.add_argument("--batch-size", type=int, help="minibatch size")
    parser.add_argument("--seed", type=int, help="seed for Python, NumPy and TensorFlow")
    parser.add_argument("--ensemble", type=int, metavar="K",
                        help="train K members per model (seeds seed..seed+K-1), saved as one model predicting the "
                             "mean of their probabilities (default: conf train.ensemble)")
    parser.add_argument("--shuffle-buffer", type=int, metavar="IMAGES",
                        help="images held on the driver to shuffle the streamed split (default: conf "
                             "train.shuffle_buffer)")
    parser.add_argument("--split", help="split to evaluate on at the end (default: conf evaluate.split)")
    parser.add_argument("--no-evaluate", action="store_true", help="train only")
    parser.add_argument("--overwrite", action="store_true", help="replace model folders of the same name")
    parser.add_argument("--crossval", action="append", metavar="DIR",
                        help="a jobs/crossval.py output of this profile (patient-grouped and/or --group-by source): "
                             "its per-source results go into the model cards; repeatable")
    parser.add_argument("--engine", choices=("onnx", "keras"),
                        help="inference engine of the evaluation: onnx (model.onnx in ONNX Runtime) or keras (the "
                             "model's own framework); default: conf inference.engine")
    add_tracking_flags(parser)
    parser.add_argument("--register", metavar="NAME", help="register the trained model in MLflow's model registry "
                        "as a new version of NAME (score it as models:/NAME/VERSION or models:/NAME@ALIAS)")
    parser.add_argument("--register-model", metavar="MODEL",
                        help="which trained model --register registers (needed when more than one is trained)")
    parser.add_argument("--alias", help="with --register: point this alias (e.g. champion) at the new version")
    args = parser.parse_args(argv)
    overrides = {"train.batch_size": args.batch_size, "train.seed": args.seed, "evaluate.split": args.split,
                 "train.ensemble": args.ensemble, "train.shuffle_buffer": args.shuffle_buffer,
                 "inference.engine": args.engine, **tracking_overrides(args)}

    def body(spark, config):
        from cxr.train import run

        if args.register:   # before hours of training, not after
            if not config["tracking"].get("enabled", True):
                raise ValueError("--register needs MLflow tracking: drop --no-tracking")
            from cxr.tracking.mirror import model_to_register

            args.register_model = model_to_register(config, args.models, args.optimizers, args.register_model)
        tracking = start_tracking(config)

        result = run(args.data, args.out, config, models=args.models, optimizers=args.optimizers,
                     epochs=args.epochs, overwrite=args.overwrite)
        print(f"train: {len(result['models'])} models in {result['total_s']:.0f}s -> {args.out}")
        for m in result["models"]:
            final = " ".join(f"{k} {v:.4f}" for k, v in m["final"].items())
            print(f"  {m['name']:<14} {m['train_s']:7.1f}s  {final}")
        evaluation = None
        if not args.no_evaluate and config["train"].get("evaluate_after", True):
            from cxr.evaluate.report import write_report
            from cxr.spark.evaluate import format_summary
            from cxr.spark.evaluate import run as evaluate

            evaluation = evaluate(spark, args.data, args.out, config, models=[m["name"] for m in result["models"]])
            print(format_summary(evaluation))
        if evaluation or args.crossval:   # the model cards get the numbers (before the report and MLflow read them)
            from cxr.models.card import record_results

            record_results(args.out, evaluation, args.crossval or ())
        if evaluation:
            print(f"report: {write_report(args.out, evaluation)}")
        if tracking:
            from cxr.tracking.mirror import log_train

            logged = log_train(tracking, args.data, args.out, result, evaluation, config, args.register,
                               args.register_model, args.alias)
            print(f"mlflow: run {logged['run_id']} in {logged['tracking_uri']}")
            if logged["registered"]:
                r = logged["registered"]
                alias = f", alias {r['alias']}" if r["alias"] else ""
                print(f"mlflow: {r['model']} registered as models:/{r['name']}/{r['version']}{alias}")

    return run_job(args, overrides, body)


if __name__ == "__main__":
    sys.exit(main())
