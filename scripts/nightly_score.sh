#!/usr/bin/env bash
# Nightly incremental scoring: files unchanged since the last run (path, size, mtime) are not even opened, only
# new or changed ones are read; a failed night is simply rerun (no duplicates). Exit code 3: the previous run
# still holds PRED_DIR's lease (nothing was written; try again later). Exit code 4 (only with --fail-on-drift or conf
# monitor.fail_on_drift): the night was scored and committed (predictions, runs/R.json, MLflow, the page
# PRED_DIR/reports/R.html) but a monitored statistic drifted beyond its threshold: look at the page, not a failure to
# rerun (a rerun finds nothing new and exits 0). Without the flag drift is only a WARN line. Example crontab line (02:30 every night, log kept per day):
#   30 2 * * * cd /opt/cxr-spark && scripts/nightly_score.sh /data/xray-archive models/cnn-adam /data/predictions >> /var/log/cxr/score-$(date +\%F).log 2>&1
# Sundays it then compacts and vacuums PRED_DIR's Delta tables (python -m cxr.score.maintain; CXR_MAINTAIN_WEEKDAY).
# Extra spark-submit options go in SPARK_SUBMIT_OPTS_CXR, e.g. "--master spark://host:7077 --archives dist/cxr-env.tar.gz#environment".
set -euo pipefail
[ $# -ge 3 ] || { echo "usage: $0 ARCHIVE_DIR MODEL_DIR PRED_DIR [extra score.py flags]" >&2; exit 2; }
archive=$1 model=$2 predictions=$3; shift 3
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
code=0
# shellcheck disable=SC2086
"$here/scripts/submit.sh" ${SPARK_SUBMIT_OPTS_CXR:-} "$here/jobs/score.py" \
  --input "$archive" --model "$model" --output "$predictions" "$@" || code=$?
# Once a week (CXR_MAINTAIN_WEEKDAY, 1-7 = Monday-Sunday, default Sunday; "never" to skip) after a committed
# night: compact and vacuum the Delta tables (README "Table format"). A maintenance failure does not change the code.
if { [ "$code" -eq 0 ] || [ "$code" -eq 4 ]; } && [ "$(date +%u)" = "${CXR_MAINTAIN_WEEKDAY:-7}" ]; then
  "${CXR_PYTHON:-$here/.venv/bin/python}" -m cxr.score.maintain "$predictions" || echo "maintenance failed" >&2
fi
exit "$code"
