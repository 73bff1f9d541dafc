"""spark-submit tests/cluster_probe.py OUT.json: what the executors' Python is (interpreter, modules, sys.path).

Run by tests/test_cluster.py on the standalone cluster with the packed environment; it writes one JSON
object per executor task to OUT.json so the test can check that nothing comes from the driver's venv.
"""
import json
import sys


def describe(_):
    import os
    import socket

    import cv2
    import numpy
    import pandas
    import pyarrow

    import cxr

    yield {"executable": sys.executable, "prefix": sys.prefix, "path": sys.path, "cwd": os.getcwd(),
           "pid": os.getpid(), "host": socket.gethostname(),
           "modules": {m.__name__: m.__file__ for m in (cxr, numpy, pandas, pyarrow, cv2)}}


def main() -> int:
    from pyspark.sql import SparkSession

    spark = SparkSession.builder.appName("cxr-cluster-probe").getOrCreate()
    try:
        rows = spark.sparkContext.parallelize(range(4), 4).mapPartitions(describe).collect()
        with open(sys.argv[1], "w") as fh:
            json.dump({"driver_executable": sys.executable, "master": spark.sparkContext.master,
                       "executors": rows}, fh)
    finally:
        spark.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
