"""Print the runtime dependencies the executors need, one name a line (versions come from a constraints file).

    python scripts/build_dist_requirements.py pyproject.toml full|slim

pyspark is left out (Spark puts its own pyspark.zip on the executors' PYTHONPATH); `slim` also leaves out
TensorFlow, matplotlib and scikit-learn, MLflow (driver-only: tracking and the registry), deltalake (driver-only: the commit), and tf2onnx + onnx (driver-only: they export model.onnx at training;
onnxruntime, which stays, does not need them). Enough for preprocessing and for scoring or evaluating any model
with the ONNX engine (and scratch NumPy models with either engine).
"""
import re
import sys
import tomllib

SLIM_DROP = {"tensorflow-cpu", "tensorflow", "matplotlib", "scikit-learn", "tf2onnx", "onnx", "mlflow", "deltalake"}


def main(pyproject: str, kind: str) -> int:
    with open(pyproject, "rb") as fh:
        deps = tomllib.load(fh)["project"]["dependencies"]
    drop = {"pyspark"} | (SLIM_DROP if kind == "slim" else set())
    for dep in deps:
        name = re.split(r"[<>=!~\[ ;]", dep, maxsplit=1)[0].strip()
        if name.lower() not in drop:
            print(name)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
