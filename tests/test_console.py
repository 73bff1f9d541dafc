"""What a person sees on the console: the project's lines, not TensorFlow's start-up chatter or progress bars in logs."""
from __future__ import annotations

import subprocess
import sys

import pytest

from cxr.spark.session import console_progress
from tests.conftest import ROOT

_TRAIN_LIKE = """
from cxr.cli import setup_logging
setup_logging("INFO")
import keras, numpy as np
model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
print("shape", tuple(model(np.zeros((1, 4), np.float32)).shape))
import sys; print("tensorflow-loaded", "tensorflow" in sys.modules, file=sys.stderr)
"""


# a Spark worker about to run a Keras model (--engine keras, Grad-CAM) goes through store.limit_tf_threads
_WORKER_LIKE = """
from cxr.models import store
store.limit_tf_threads(1)
import keras, numpy as np
model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
print("shape", tuple(model(np.zeros((1, 4), np.float32)).shape))
import sys; print("tensorflow-loaded", "tensorflow" in sys.modules, file=sys.stderr)
"""


@pytest.mark.parametrize("code", [_TRAIN_LIKE, _WORKER_LIKE], ids=["job", "worker"])
def test_tensorflow_is_imported_without_its_start_up_lines(tmp_path, code):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}   # no TF_CPP_MIN_LOG_LEVEL from the caller: we set it
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "shape (1, 2)" in done.stdout and "tensorflow-loaded True" in done.stderr
    for noise in ("absl::InitializeLog", "oneDNN custom operations", "I0000 "):
        assert noise not in done.stderr, done.stderr
    # the same import without the job's set-up does print them: the check above can fail
    bare = subprocess.run([sys.executable, "-c", "import tensorflow"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert "absl::InitializeLog" in bare.stderr or "oneDNN" in bare.stderr


@pytest.mark.parametrize("conf, tty, want", [
    ({"console_progress": "auto"}, False, False), ({"console_progress": "auto"}, True, True),
    ({"console_progress": "on"}, False, True), ({"console_progress": "off"}, True, False),
    ({"console_progress": "auto", "conf": {"spark.ui.showConsoleProgress": True}}, False, True),
])
def test_progress_bars_only_on_a_terminal_unless_asked(monkeypatch, conf, tty, want):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: tty)
    assert console_progress(conf) is want


def test_progress_flag_reaches_the_config():
    from cxr.cli import base_parser
    from cxr.config import load_config

    args = base_parser("x").parse_args(["--progress"])
    assert load_config(None, {"spark.console_progress": args.progress})["spark"]["console_progress"] == "on"
    assert load_config()["spark"]["console_progress"] == "auto"
