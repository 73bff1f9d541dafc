#!/usr/bin/env bash
# spark-submit with this project's venv: `scripts/submit.sh jobs/preprocess.py --input ... --output ...`.
# Sets what local runs need (workers on the venv's Python, loopback only, quiet Spark logs); any
# spark-submit option may come first, e.g. `scripts/submit.sh --master spark://host:7077 jobs/score.py ...`.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${CXR_VENV:-$here/.venv}"
[ -x "$venv/bin/spark-submit" ] || { echo "no venv at $venv: run 'make venv' first" >&2; exit 2; }
export PYSPARK_PYTHON="${PYSPARK_PYTHON:-$venv/bin/python}"
export PYSPARK_DRIVER_PYTHON="${PYSPARK_DRIVER_PYTHON:-$venv/bin/python}"
export SPARK_LOCAL_IP="${SPARK_LOCAL_IP:-127.0.0.1}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
# conf/default.yaml's spark.driver.extraJavaOptions (the JVM's quick C1 JIT only, ...): spark-submit starts the
# driver JVM before a job reads conf/, so a session setting cannot reach it; given here, it does.
java_opts="$(PYTHONPATH="$here" "$venv/bin/python" -c 'from cxr.config import load_config
print(load_config()["spark"]["conf"].get("spark.driver.extraJavaOptions") or "")')"
exec "$venv/bin/spark-submit" \
  --driver-java-options "-Dlog4j2.configurationFile=file:$here/conf/log4j2.properties $java_opts" \
  "$@"
