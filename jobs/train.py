"""spark-submit jobs/train.py --data PRE_OUT --out MODELS_DIR [...]: train the study's models on the driver,
then evaluate them across the cluster and write MODELS_DIR/report.md."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from cxr.cli import base_parser, run_job  # noqa: E402


def main(argv=None) -> int:
    parser = base_parser(__doc__)
    parser.add_argument("--data", required=True, help="the preprocess job's output folder (images/, manifest.json)")
    parser.add_argument("--out", required=True, help="models folder: one sub-folder per model, report.md")
    parser.add_argument("--models", help="comma list of cnn,dnn,dwsep,scratch-cnn,scratch-dnn (default: conf)")
    parser.add_argument("--optimizers", help="comma list of rmsprop,sgd,adadelta,adagrad,adam for the CNN")
    parser.add_argument("--epochs", type=int, help="epochs per model")
    parser.add_argument("--batch-size", type=int, help="minibatch size")
    parser.add_argument("--seed", type=int, help="seed for Python, NumPy and TensorFlow")
    parser.add_argument("--split", help="split to evaluate on at the end (default: conf evaluate.split)")
    parser.add_argument("--no-evaluate", action="store_true", help="train only")
    parser.add_argument("--overwrite", action="store_true", help="replace model folders of the same name")
    parser.add_argument("--engine", choices=("onnx", "keras"),
                        help="inference engine of the evaluation: onnx (model.onnx in ONNX Runtime) or keras (the "
                             "model's own framework); default: conf inference.engine")
    args = parser.parse_args(argv)
    overrides = {"train.batch_size": args.batch_size, "train.seed": args.seed, "evaluate.split": args.split,
                 "inference.engine": args.engine}

    def body(spark, config):
        from cxr.train import run

        result = run(args.data, args.out, config, models=args.models, optimizers=args.optimizers,
                     epochs=args.epochs, overwrite=args.overwrite)
        print(f"train: {len(result['models'])} models in {result['total_s']:.0f}s -> {args.out}")
        for m in result["models"]:
            final = " ".join(f"{k} {v:.4f}" for k, v in m["final"].items())
            print(f"  {m['name']:<14} {m['train_s']:7.1f}s  {final}")
        if args.no_evaluate or not config["train"].get("evaluate_after", True):
            return 0
        from cxr.report import write_report
        from cxr.spark.evaluate import format_summary
        from cxr.spark.evaluate import run as evaluate

        evaluation = evaluate(spark, args.data, args.out, config, models=[m["name"] for m in result["models"]])
        print(format_summary(evaluation))
        print(f"report: {write_report(args.out, evaluation)}")

    return run_job(args, overrides, body)


if __name__ == "__main__":
    sys.exit(main())
