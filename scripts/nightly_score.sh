#!/usr/bin/env bash
# Nightly incremental scoring: files unchanged since the last run (path, size, mtime) are not even opened, only
# new or changed ones are read; a failed night is simply rerun (no duplicates). Exit code 3: the previous run
# still holds PRED_DIR's lease (nothing was written; try again later). Example crontab line (02:30 every night, log kept per day):
#   30 2 * * * cd /opt/cxr-spark && scripts/nightly_score.sh /data/xray-archive models/cnn-adam /data/predictions >> /var/log/cxr/score-$(date +\%F).log 2>&1
# Extra spark-submit options go in SPARK_SUBMIT_OPTS_CXR, e.g. "--master spark://host:7077 --archives dist/cxr-env.tar.gz#environment".
set -euo pipefail
[ $# -ge 3 ] || { echo "usage: $0 ARCHIVE_DIR MODEL_DIR PRED_DIR [extra score.py flags]" >&2; exit 2; }
archive=$1 model=$2 predictions=$3; shift 3
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC2086
exec "$here/scripts/submit.sh" ${SPARK_SUBMIT_OPTS_CXR:-} "$here/jobs/score.py" \
  --input "$archive" --model "$model" --output "$predictions" "$@"
