#!/usr/bin/env bash
# A Spark Connect server on this machine, on loopback only, from pip's pyspark.
#
#   scripts/connect.sh up|down|status
#
# Listens on sc://127.0.0.1:$CXR_CONNECT_PORT (default 15002); its master is $CXR_CONNECT_MASTER (default
# local[2]; e.g. spark://127.0.0.1:17077 for the standalone cluster of scripts/cluster.sh). Its Python workers
# run this venv's Python ($PYSPARK_PYTHON, default $CXR_VENV/bin/python), so they import cv2, onnxruntime and cxr.
# Driver memory: $CXR_CONNECT_DRIVER_MEMORY (default 2g). Web UI: off unless $CXR_CONNECT_UI_PORT is set.
# State (pid file, logs, conf) lives in $CXR_CONNECT_DIR (default build/connect).
# `up` runs $SPARK_HOME/sbin/start-connect-server.sh (spark-daemon.sh: it records the server JVM's pid);
# `down` stops exactly that process (its pid file), nothing else. `status` exits 0 when it runs, 3 when not.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${CXR_VENV:-$here/.venv}"
dir="${CXR_CONNECT_DIR:-$here/build/connect}"
port="${CXR_CONNECT_PORT:-15002}"
master="${CXR_CONNECT_MASTER:-local[2]}"
memory="${CXR_CONNECT_DRIVER_MEMORY:-2g}"
timeout="${CXR_CONNECT_TIMEOUT:-120}"
host=127.0.0.1
ident="cxr-connect-$port"
class=org.apache.spark.sql.connect.service.SparkConnectServer
pidfile="$dir/spark-$ident-$class-1.pid"

spark_home() {
  if [ -n "${SPARK_HOME:-}" ]; then echo "$SPARK_HOME"; return; fi
  "$venv/bin/python" -c 'import os, pyspark; print(os.path.dirname(pyspark.__file__))'
}

# The pid file's process, if it is still the Connect server we started (a stale file's pid may have been reused).
alive() {
  [ -f "$pidfile" ] || return 1
  local pid; pid="$(cat "$pidfile")"
  kill -0 "$pid" 2>/dev/null && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q "$class"
}

listening() {
  "$venv/bin/python" - "$port" <<'EOF'
import socket, sys
try:
    socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=2).close()
except OSError:
    sys.exit(1)
EOF
}

log_file() { ls -t "$dir"/logs/spark-"$ident"-*.out 2>/dev/null | head -1; }

up() {
  if alive; then echo "Spark Connect server already running (pid $(cat "$pidfile")): sc://$host:$port"; return 0; fi
  if listening; then echo "port $port on $host is taken by another process" >&2; exit 1; fi
  local spark_home_dir; spark_home_dir="$(spark_home)"
  mkdir -p "$dir/logs" "$dir/conf"
  rm -f "$pidfile"
  local ui=(--conf spark.ui.enabled=false)
  [ -n "${CXR_CONNECT_UI_PORT:-}" ] && ui=(--conf spark.ui.enabled=true --conf "spark.ui.port=$CXR_CONNECT_UI_PORT")
  # Empty conf dir: no spark-defaults.conf of the machine's user leaks in.
  SPARK_HOME="$spark_home_dir" SPARK_CONF_DIR="$dir/conf" SPARK_LOG_DIR="$dir/logs" SPARK_PID_DIR="$dir" \
    SPARK_IDENT_STRING="$ident" SPARK_LOCAL_IP=$host SPARK_PUBLIC_DNS=$host \
    PYSPARK_PYTHON="${PYSPARK_PYTHON:-$venv/bin/python}" PYSPARK_DRIVER_PYTHON="${PYSPARK_PYTHON:-$venv/bin/python}" \
    "$spark_home_dir/sbin/start-connect-server.sh" \
      --master "$master" --driver-memory "$memory" \
      --conf spark.connect.grpc.binding.address=$host --conf "spark.connect.grpc.binding.port=$port" \
      --conf spark.driver.host=$host --conf spark.driver.bindAddress=$host \
      --conf "spark.pyspark.python=${PYSPARK_PYTHON:-$venv/bin/python}" \
      "${ui[@]}" >/dev/null
  local t0=$SECONDS
  while [ $((SECONDS - t0)) -lt "$timeout" ]; do
    if ! alive; then
      echo "Spark Connect server died; see $(log_file)" >&2; tail -20 "$(log_file)" >&2 || true; rm -f "$pidfile"; exit 1
    fi
    if listening; then
      echo "Spark Connect server up in $((SECONDS - t0))s: sc://$host:$port (pid $(cat "$pidfile"), master $master, log $(log_file))"
      return 0
    fi
    sleep 1
  done
  echo "Spark Connect server not listening after ${timeout}s; see $(log_file)" >&2
  down
  exit 1
}

down() {
  local stopped=0 pid
  if alive; then
    pid="$(cat "$pidfile")"
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null
    stopped=1
  fi
  rm -f "$pidfile"
  echo "Spark Connect server down (stopped $stopped process)"
}

status() {
  if alive; then
    echo "Spark Connect server: running (pid $(cat "$pidfile")), sc://$host:$port, $(listening && echo listening || echo "not listening yet")"
    return 0
  fi
  [ -f "$pidfile" ] && { echo "Spark Connect server: dead (stale pid file $pidfile)"; return 1; }
  echo "Spark Connect server: not started"
  return 3
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
