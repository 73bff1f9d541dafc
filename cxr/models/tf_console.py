"""TensorFlow's import without its start-up chatter on the console.

Why: importing TensorFlow prints absl's "All log messages before absl::InitializeLog() is called are written to
STDERR" and oneDNN's note from C++, which TF_CPP_MIN_LOG_LEVEL does not reach; in a job's console (and in Spark's
worker logs) they bury the project's own lines. Installed by the jobs (cxr.cli) and wherever a Spark worker is
about to import TensorFlow (cxr.models.store); the import itself stays lazy: nothing here imports TensorFlow.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys


def quiet_tensorflow_import() -> None:
    """From now on, the first `import tensorflow` (keras imports it too) drops those lines."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if "tensorflow" not in sys.modules and not any(isinstance(f, QuietTensorFlow) for f in sys.meta_path):
        sys.meta_path.insert(0, QuietTensorFlow())


class QuietTensorFlow(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports TensorFlow (when a job first needs it) with the C++ side's stderr captured, dropping the start-up
    lines that TF_CPP_MIN_LOG_LEVEL does not reach (absl's "All log messages before absl::InitializeLog()" and
    oneDNN's note) and passing every other line on: the jobs' console shows the project's lines."""

    NOISE = ("All log messages before absl::InitializeLog()", "oneDNN custom operations are on")

    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow":
            return None
        sys.meta_path.remove(self)   # once; the real finders do the finding
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            self.loader, spec.loader = spec.loader, self
        return spec

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        from cxr.image.damage import decoder_messages

        lines: list[str] = []
        try:
            with decoder_messages() as lines:
                self.loader.exec_module(module)
        finally:
            for line in lines:
                if not any(noise in line for noise in self.NOISE):
                    print(line, file=sys.stderr)
