#!/usr/bin/env bash
# A Spark standalone cluster on this machine, on loopback only: one master and two workers.
#
#   scripts/cluster.sh up|down|status
#
# Master spark://127.0.0.1:$CXR_MASTER_PORT (default 17077, web UI $CXR_MASTER_UI_PORT, default 18080),
# workers with $CXR_WORKER_CORES core(s) and $CXR_WORKER_MEMORY each (default 1 core, 2g; web UIs 18081, 18082).
# State (pid files, logs, the workers' work dirs) lives in $CXR_CLUSTER_DIR (default build/cluster).
# `down` stops exactly the processes `up` started (their pid files), nothing else.
# pip's pyspark has no sbin/start-master.sh: the daemons run through $SPARK_HOME/bin/spark-class
# (which execs java, so the recorded pid is the JVM's).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${CXR_VENV:-$here/.venv}"
dir="${CXR_CLUSTER_DIR:-$here/build/cluster}"
master_port="${CXR_MASTER_PORT:-17077}"
master_ui="${CXR_MASTER_UI_PORT:-18080}"
worker_ui_base="${CXR_WORKER_UI_PORT:-18081}"
workers="${CXR_WORKERS:-2}"
cores="${CXR_WORKER_CORES:-1}"
memory="${CXR_WORKER_MEMORY:-2g}"
timeout="${CXR_CLUSTER_TIMEOUT:-120}"
host=127.0.0.1
master_url="spark://$host:$master_port"

spark_home() {
  if [ -n "${SPARK_HOME:-}" ]; then echo "$SPARK_HOME"; return; fi
  "$venv/bin/python" -c 'import os, pyspark; print(os.path.dirname(pyspark.__file__))'
}

# A pid file's process, if it is still the Spark daemon we started (a stale file's pid may have been reused).
alive() {
  [ -f "$1" ] || return 1
  local pid; pid="$(cat "$1")"
  kill -0 "$pid" 2>/dev/null && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q 'org.apache.spark.deploy'
}

master_json() {
  "$venv/bin/python" - "$master_ui" <<'EOF'
import json, sys, urllib.request
try:
    with urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/json/", timeout=5) as r:
        state = json.load(r)
except Exception:
    sys.exit(1)
alive = [w for w in state.get("workers", []) if w.get("state") == "ALIVE"]
print(f"{state.get('status')} {len(alive)} {sum(w.get('cores', 0) for w in alive)}")
EOF
}

start_daemon() {  # name, class, args...
  local name="$1" cls="$2"; shift 2
  local pidfile="$dir/$name.pid"
  if alive "$pidfile"; then echo "$name already running (pid $(cat "$pidfile"))"; return; fi
  SPARK_HOME="$SPARK_HOME_DIR" SPARK_LOCAL_IP=$host SPARK_PUBLIC_DNS=$host \
    SPARK_CONF_DIR="$dir/conf" SPARK_LOG_DIR="$dir/logs" \
    nohup "$SPARK_HOME_DIR/bin/spark-class" "$cls" "$@" >"$dir/logs/$name.out" 2>&1 </dev/null &
  echo $! >"$pidfile"
  echo "$name: pid $!, log $dir/logs/$name.out"
}

up() {
  SPARK_HOME_DIR="$(spark_home)"
  mkdir -p "$dir/logs" "$dir/conf"
  # Daemon settings: loopback only, no REST submission server, executors' work dirs cleaned after apps.
  cat >"$dir/conf/spark-defaults.conf" <<EOF
spark.master.rest.enabled false
spark.ui.reverseProxy false
EOF
  start_daemon master org.apache.spark.deploy.master.Master \
    --host $host --port "$master_port" --webui-port "$master_ui"
  for i in $(seq 1 "$workers"); do
    mkdir -p "$dir/work/worker$i"
    start_daemon "worker$i" org.apache.spark.deploy.worker.Worker \
      --host $host --cores "$cores" --memory "$memory" --webui-port $((worker_ui_base + i - 1)) \
      --work-dir "$dir/work/worker$i" "$master_url"
  done
  local t0=$SECONDS waited=0 state=""
  while [ "$waited" -lt "$timeout" ]; do
    state="$(master_json || true)"
    if [ "${state%% *}" = "ALIVE" ] && [ "$(echo "$state" | cut -d' ' -f2)" -ge "$workers" ]; then
      echo "cluster up in ${waited}s: $master_url, $workers workers x $cores core(s), UI http://$host:$master_ui"
      return 0
    fi
    for name in master $(seq -f "worker%g" 1 "$workers"); do
      alive "$dir/$name.pid" || { echo "$name died; see $dir/logs/$name.out" >&2; tail -20 "$dir/logs/$name.out" >&2; down; exit 1; }
    done
    sleep 1; waited=$((SECONDS - t0))
  done
  echo "cluster not ready after ${timeout}s (master: ${state:-no answer}); see $dir/logs" >&2
  down
  exit 1
}

down() {
  local pids=() name pid
  for pidfile in "$dir"/worker*.pid "$dir"/master.pid; do
    [ -f "$pidfile" ] || continue
    pid="$(cat "$pidfile")"
    if alive "$pidfile"; then kill "$pid" 2>/dev/null && pids+=("$pid"); fi
  done
  for _ in $(seq 1 20); do
    local left=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && left=1; done
    [ "$left" = 0 ] && break
    sleep 0.5
  done
  for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null; done
  rm -f "$dir"/master.pid "$dir"/worker*.pid
  echo "cluster down (stopped ${#pids[@]} processes)"
}

status() {
  local rc=0
  for pidfile in "$dir"/master.pid "$dir"/worker*.pid; do
    [ -f "$pidfile" ] || continue
    name="$(basename "$pidfile" .pid)"
    if alive "$pidfile"; then echo "$name: running (pid $(cat "$pidfile"))"; else echo "$name: dead"; rc=1; fi
  done
  [ -f "$dir/master.pid" ] || { echo "not started"; return 3; }
  state="$(master_json || echo "no answer")"
  echo "master $master_url: ${state%% *}, alive workers: $(echo "$state" | cut -d' ' -f2), cores: $(echo "$state" | cut -d' ' -f3)"
  return $rc
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
