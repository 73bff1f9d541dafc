# The README's two commands: `make demo` and `make test`. Both build .venv first (again when pyproject.toml changes).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
DEMO_OUT ?= out/demo

# Spark's Python workers must run the venv's interpreter (else "No module named cv2"); local runs stay on loopback.
export PYSPARK_PYTHON        := $(abspath $(BIN)/python)
export PYSPARK_DRIVER_PYTHON := $(abspath $(BIN)/python)
export SPARK_LOCAL_IP        ?= 127.0.0.1
export TF_CPP_MIN_LOG_LEVEL  ?= 2

.PHONY: demo test test-cluster test-connect test-airflow bench-peers venv clean dist cluster-up cluster-down chromium

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP) chromium
	$(BIN)/python -m pytest -q

# Headless Chromium for the run-page test (tests/test_monitor.py): Debian's package, installed only when missing;
# where apt-get is unavailable (or fails: not root, no network) the test skips and says why.
chromium:
	@if [ -x /usr/bin/chromium ]; then :; \
	elif command -v apt-get >/dev/null 2>&1; then \
		(apt-get install -y --no-install-recommends chromium >/dev/null 2>&1 || \
		 (apt-get update >/dev/null 2>&1 && apt-get install -y --no-install-recommends chromium >/dev/null 2>&1)) || \
		echo "make chromium: could not install Debian's chromium (not root or offline): the run-page test will skip"; \
	else echo "make chromium: no apt-get here: install chromium yourself, or the run-page test skips"; fi

demo: $(STAMP)
	DEMO_OUT=$(DEMO_OUT) bash scripts/demo.sh

# Only the standalone-cluster tests (packed env, executor/driver kills); `make test` runs them too
# (CXR_CLUSTER_TESTS=0 make test leaves them out for a quick local run).
test-cluster: $(STAMP)
	$(BIN)/python -m pytest -q tests/test_cluster.py

# Only the Spark Connect tests (a Connect server on a free loopback port; CXR_CONNECT_TESTS=0 make test skips them).
test-connect: $(STAMP)
	$(BIN)/python -m pytest -q tests/test_connect.py

# The nightly DAG (scripts/airflow_score_dag.py) loaded by Airflow's own DagBag, in .venv-airflow: the `airflow`
# extra of pyproject.toml without the project (its pins are not ours). Built once, again when pyproject.toml changes.
AF_VENV  := .venv-airflow
AF_STAMP := $(AF_VENV)/.installed-stamp

$(AF_STAMP): pyproject.toml
	test -x $(AF_VENV)/bin/python || $(PYTHON) -m venv $(AF_VENV)
	$(AF_VENV)/bin/pip install --quiet --upgrade pip
	$(AF_VENV)/bin/python scripts/extra_requirements.py airflow | $(AF_VENV)/bin/pip install --quiet -r /dev/stdin
	touch $(AF_STAMP)

test-airflow: $(AF_STAMP)
	$(AF_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/airflow_dag

# The score job beside Pool(2), Daft and Ray Data on the same files and model.onnx (BENCHMARKS.md "Score: peers").
# The peers live in .venv-peers (the project + the `peers` extra of pyproject.toml), never in .venv.
PEERS_VENV  := .venv-peers
PEERS_STAMP := $(PEERS_VENV)/.installed-stamp

$(PEERS_STAMP): pyproject.toml
	test -x $(PEERS_VENV)/bin/python || $(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/pip install --quiet --upgrade pip
	$(PEERS_VENV)/bin/pip install --quiet -e '.[peers]'
	touch $(PEERS_STAMP)

bench-peers: $(STAMP) $(PEERS_STAMP)
	$(BIN)/python scripts/bench_peers.py $(BENCH_ARGS)

# Cluster packaging: dist/cxr-env.tar.gz (packed venv for the executors, TensorFlow included) + dist/cxr_spark-*.whl.
dist: $(STAMP)
	bash scripts/build_dist.sh full

# A standalone Spark cluster on this machine (loopback only): master spark://127.0.0.1:17077, two 1-core workers.
cluster-up: $(STAMP)
	bash scripts/cluster.sh up

cluster-down:
	bash scripts/cluster.sh down

clean:
	rm -rf $(VENV) $(AF_VENV) out .pytest_cache
