"""One way from a URI to a pyarrow file system, for the driver and the workers (no JVM, no Spark).

Local paths and file: URIs, hdfs://, s3:// (s3a:// and s3n:// are the same store for pyarrow) and gs:// (gcs://).
Credentials and endpoints come from the environment as pyarrow reads them (AWS_* variables, AWS_ENDPOINT_URL).
"""
from __future__ import annotations

import os

from cxr.image.source import local_path

NATIVE_SCHEMES = {"s3a": "s3", "s3n": "s3", "gcs": "gs"}


def filesystem(uri: str):
    """(pyarrow FileSystem, path inside it, prefix that turns its paths back into the URI form Spark writes)."""
    import pyarrow.fs as pafs

    local = local_path(uri)
    if local is not None:
        return pafs.LocalFileSystem(), os.path.abspath(local), "file:"
    scheme, rest = uri.split("://", 1)
    native = NATIVE_SCHEMES.get(scheme, scheme)
    fs, path = pafs.FileSystem.from_uri(f"{native}://{rest}")
    if native in ("s3", "gs"):
        return fs, path.rstrip("/"), f"{scheme}://"
    return fs, path.rstrip("/"), f"{scheme}://{rest.split('/', 1)[0]}"
