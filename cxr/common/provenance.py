"""What produced an output: package versions and content hashes, recorded next to every result."""
from __future__ import annotations

import hashlib
import platform
import sys
from importlib import metadata
from pathlib import Path

PACKAGES = ("cxr-spark", "pyspark", "numpy", "pandas", "pyarrow", "opencv-python-headless", "pydicom",
            "pylibjpeg", "pylibjpeg-libjpeg", "pylibjpeg-openjpeg", "pillow", "tensorflow-cpu", "keras")


def package_versions() -> dict[str, str]:
    versions = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
