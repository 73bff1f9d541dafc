"""Session fixtures for tests/test_cluster.py: a slim packed executor environment and a standalone Spark
cluster on loopback (scripts/cluster.sh), plus helpers to submit jobs to it and to inject faults.

The cluster gets free ports picked here (not 7077/8080), its own state dir under pytest's tmp dir, and is
always stopped in teardown (scripts/cluster.sh down kills exactly the pids it recorded).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
ENV_BUILD_TIMEOUT = 1200  # the first build of the slim environment (a cached one is reused instantly)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spark_home() -> str:
    """pip's pyspark package folder (spark-submit would look for it with whatever `python3` is on PATH)."""
    import pyspark

    return os.path.dirname(pyspark.__file__)


def _get_json(url: str, timeout: float = 5):
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.load(response)


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _ppid(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


@dataclass
class Submitted:
    proc: subprocess.Popen
    ui_port: int
    log: Path
    started: float = field(default_factory=time.perf_counter)

    def app_id(self) -> str | None:
        try:
            apps = _get_json(f"http://127.0.0.1:{self.ui_port}/api/v1/applications")
            return apps[0]["id"] if apps else None
        except Exception:
            return None

    def wait_for_stage(self, name_has: str = "parquet", min_tasks: int = 10, min_done: int = 2,
                       timeout: float = 300) -> tuple[str, dict]:
        """Block until an active stage whose name contains name_has, with >= min_tasks tasks, has finished
        min_done of them (and not all): the moment to inject a fault 'in the middle' of the job."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"the job ended (rc {self.proc.returncode}) before the fault could be injected:\n"
                                     + self.output()[-3000:])
            app = self.app_id()
            if app:
                try:
                    stages = _get_json(f"http://127.0.0.1:{self.ui_port}/api/v1/applications/{app}/stages?status=active")
                except Exception:
                    stages = []
                for stage in stages:
                    if (name_has in stage.get("name", "") and stage["numTasks"] >= min_tasks
                            and min_done <= stage["numCompleteTasks"] < stage["numTasks"]):
                        return app, stage
            time.sleep(0.3)
        raise AssertionError(f"no stage '{name_has}' with {min_tasks}+ tasks reached {min_done} done in {timeout}s")

    def wait(self, timeout: float = 600) -> tuple[int, str, float]:
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            raise AssertionError(f"job did not finish in {timeout}s:\n" + self.output()[-3000:])
        return self.proc.returncode, self.output(), time.perf_counter() - self.started

    def kill_driver(self) -> None:
        """SIGKILL the whole spark-submit process group (its JVM and the Python driver): a crashed driver."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=60)

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@dataclass
class Cluster:
    url: str
    ui_port: int
    state_dir: Path
    env_archive: Path
    event_dir: Path

    def worker_pids(self) -> list[int]:
        return [int(p.read_text()) for p in sorted(self.state_dir.glob("worker*.pid"))]

    def executor_pids(self, app_id: str) -> list[int]:
        """Executor JVMs of this app, started by this cluster's workers (nobody else's processes)."""
        workers = set(self.worker_pids())
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            cmd = _cmdline(int(entry.name))
            if ("org.apache.spark.executor.CoarseGrainedExecutorBackend" in cmd and app_id in cmd
                    and _ppid(int(entry.name)) in workers):
                pids.append(int(entry.name))
        return sorted(pids)

    def python_workers(self, app_id: str) -> list[dict]:
        """The Python processes the app's executors started (pyspark.daemon and its forked workers), as /proc
        shows them: the interpreter path they were started with, working dir, PYTHONPATH and the files of
        the extension modules they have loaded (numpy, cv2, pyarrow ...)."""
        executors = set(self.executor_pids(app_id))
        rows = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            pid = int(entry.name)
            cmd = _cmdline(pid)
            parent = _ppid(pid)
            if "pyspark.daemon" not in cmd or not (parent in executors or _ppid(parent or 0) in executors):
                continue
            try:
                cwd = os.readlink(f"/proc/{pid}/cwd")
                environ = dict(kv.split("=", 1) for kv in Path(f"/proc/{pid}/environ").read_bytes().decode(
                    errors="replace").split("\0") if "=" in kv)
                maps = {line.split()[-1] for line in Path(f"/proc/{pid}/maps").read_text().splitlines()
                        if line.split()[-1].endswith(".so") or ".so." in line.split()[-1]}
            except OSError:
                continue  # the worker ended meanwhile
            rows.append({"pid": pid, "executable": str((Path(cwd) / cmd[0]) if not cmd[0].startswith("/") else cmd[0]),
                         "cwd": cwd, "pythonpath": environ.get("PYTHONPATH", ""),
                         "libraries": sorted(m for m in maps if "site-packages" in m)})
        return rows

    def kill_one_executor(self, app_id: str) -> int:
        pids = self.executor_pids(app_id)
        assert pids, f"no executor JVM of {app_id} found"
        os.kill(pids[0], signal.SIGKILL)
        return pids[0]

    def master_state(self) -> dict:
        return _get_json(f"http://127.0.0.1:{self.ui_port}/json/")

    def submit(self, script: Path | str, *args: str, log: Path, conf: dict | None = None) -> Submitted:
        """spark-submit to this cluster with the packed environment; the executors never see the driver's venv."""
        ui_port = free_port()
        cmd = [str(VENV_BIN / "spark-submit"), "--master", self.url, "--deploy-mode", "client",
               "--archives", f"{self.env_archive}#environment",
               "--conf", "spark.pyspark.python=./environment/bin/python",
               "--conf", f"spark.pyspark.driver.python={sys.executable}",
               "--conf", "spark.driver.host=127.0.0.1", "--conf", "spark.driver.bindAddress=127.0.0.1",
               "--conf", f"spark.ui.port={ui_port}", "--conf", "spark.port.maxRetries=0",
               "--conf", "spark.ui.showConsoleProgress=false",
               "--executor-memory", "1g", "--total-executor-cores", "2",
               "--driver-java-options", f"-Dlog4j2.configurationFile=file:{ROOT}/conf/log4j2.properties"]
        for key, value in (conf or {}).items():
            cmd += ["--conf", f"{key}={value}"]
        cmd += [str(script), *args]
        env = {k: v for k, v in os.environ.items()
               if k not in ("PYSPARK_PYTHON", "PYSPARK_DRIVER_PYTHON", "PYTHONPATH", "VIRTUAL_ENV")}
        env.update(SPARK_LOCAL_IP="127.0.0.1", TF_CPP_MIN_LOG_LEVEL="2", SPARK_HOME=spark_home(),
                   PYSPARK_DRIVER_PYTHON=sys.executable)
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as fh:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        return Submitted(proc, ui_port, log)

    def run(self, script, *args, log: Path, conf: dict | None = None, timeout: float = 600):
        return self.submit(script, *args, log=log, conf=conf).wait(timeout)


def _timed(label: str, timings: dict, start: float) -> None:
    timings[label] = round(time.perf_counter() - start, 1)
    print(f"[cluster tests] {label}: {timings[label]}s", file=sys.stderr)


TIMINGS: dict[str, float] = {}


@pytest.fixture(scope="session")
def slim_env() -> Path:
    """build/envs/slim-<hash>/cxr-env.tar.gz: numpy/pandas/pyarrow/OpenCV/pydicom + the cxr wheel, no TF."""
    if os.environ.get("CXR_CLUSTER_TESTS") == "0":
        pytest.skip("CXR_CLUSTER_TESTS=0: standalone-cluster tests switched off for this run")
    start = time.perf_counter()
    done = subprocess.run(["bash", str(ROOT / "scripts" / "build_dist.sh"), "slim"], cwd=ROOT,
                          capture_output=True, text=True, timeout=ENV_BUILD_TIMEOUT)
    assert done.returncode == 0, done.stderr[-3000:]
    _timed("slim environment (build or cache)", TIMINGS, start)
    return Path(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def cluster(slim_env, tmp_path_factory):
    state = tmp_path_factory.mktemp("cluster")
    ports = {"CXR_MASTER_PORT": free_port(), "CXR_MASTER_UI_PORT": free_port()}
    ports["CXR_WORKER_UI_PORT"] = free_port()  # worker i uses this + i - 1
    env = {**{k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYSPARK_PYTHON")},
           **{k: str(v) for k, v in ports.items()}, "CXR_CLUSTER_DIR": str(state), "CXR_VENV": str(VENV_BIN.parent),
           "CXR_WORKER_MEMORY": "2g", "CXR_CLUSTER_TIMEOUT": "180"}
    script = str(ROOT / "scripts" / "cluster.sh")
    start = time.perf_counter()
    up = subprocess.run(["bash", script, "up"], env=env, capture_output=True, text=True, timeout=300)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        _timed("cluster up", TIMINGS, start)
        events = state / "events"
        events.mkdir()
        yield Cluster(f"spark://127.0.0.1:{ports['CXR_MASTER_PORT']}", ports["CXR_MASTER_UI_PORT"], state, slim_env,
                      events)
    finally:
        down = subprocess.run(["bash", script, "down"], env=env, capture_output=True, text=True, timeout=120)
        print(f"[cluster tests] {down.stdout.strip()}; timings: {TIMINGS}", file=sys.stderr)
