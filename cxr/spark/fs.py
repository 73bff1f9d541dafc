"""Driver-side file operations on the jobs' input and output folders, through pyarrow.fs.

No JVM is involved, so they work the same with a classic session and over Spark Connect (where the driver
program has no SparkContext): local paths and `file:` URIs (as Spark prints them: file:/abs/dir), hdfs://,
s3:// (s3a:// and s3n:// are read as s3://) and gs:// (gcs://). A path without a scheme is a local path.

Atomicity: `rename` is pyarrow's `move`, a rename(2) on the local file system and a NameNode rename on HDFS
(both atomic). Object stores have no rename: a directory is copied file by file and then deleted, so a reader
may see a half-moved folder and a crash may leave both; the score job's lease (`LeaseFiles`) has no atomic
create-if-absent there either. Use a local or HDFS output folder where that matters.

Every function keeps `spark` as its first argument (unused: the file system comes from the URI) so that the
callers read as before and a session-dependent resolution could come back without touching them.
"""
from __future__ import annotations

import os
import posixpath
import re
import threading
from typing import Any

_SCHEMES = {"s3a": "s3", "s3n": "s3", "gcs": "gs"}
_FILESYSTEMS: dict[str, Any] = {}
_LOCK = threading.Lock()
_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://([^/]*)(/.*)?$")


def _local(uri: str) -> str | None:
    """The absolute local path for a plain path or a file: URI (file:/a, file:///a), else None."""
    if uri.startswith("file:"):
        rest = uri[len("file:"):]
        path = "/" + rest.lstrip("/") if rest.startswith("//") else rest
    elif _URI.match(uri):
        return None
    else:
        path = uri
    return os.path.abspath(path)


class _Target:
    """A URI resolved to (pyarrow file system, path inside it), plus how to name its children."""

    def __init__(self, uri: str):
        import pyarrow.fs as pafs

        self.uri = uri
        local = _local(uri)
        if local is not None:
            self.fs, self.path, self.prefix, self.kind = pafs.LocalFileSystem(), local, "file:", "local"
            return
        match = _URI.match(uri)
        scheme, netloc, path = match.group(1).lower(), match.group(2), (match.group(3) or "/")
        arrow_scheme = _SCHEMES.get(scheme, scheme)
        key = f"{arrow_scheme}://{netloc}"
        with _LOCK:
            if key not in _FILESYSTEMS:
                _FILESYSTEMS[key] = pafs.FileSystem.from_uri(f"{key}/")[0]
        self.fs = _FILESYSTEMS[key]
        path = posixpath.normpath(path) if path not in ("", "/") else "/"
        if arrow_scheme in ("s3", "gs"):   # bucket/key
            self.path = f"{netloc}{path}".rstrip("/") or netloc
        else:
            self.path = path
        self.prefix = f"{scheme}://{netloc}"
        self.kind = arrow_scheme

    @property
    def atomic_rename(self) -> bool:
        return self.kind in ("local", "hdfs", "viewfs")

    def uri_of(self, path: str) -> str:
        """The URI (in the caller's scheme) of a path inside this file system."""
        if self.kind == "local":
            return f"file:{path}"
        if self.kind in ("s3", "gs"):
            return f"{self.prefix.split('://', 1)[0]}://{path}"
        return f"{self.prefix}{path}"

    def info(self):
        return self.fs.get_file_info(self.path)

    def children(self):
        import pyarrow.fs as pafs

        return self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True, recursive=False))


def _target(uri: str) -> _Target:
    return _Target(str(uri))


def _type(t: _Target):
    import pyarrow.fs as pafs

    kind = t.info().type
    return {pafs.FileType.NotFound: None, pafs.FileType.Directory: "dir"}.get(kind, "file")


def _parent_dirs(t: _Target) -> None:
    parent = posixpath.dirname(t.path)
    if parent and parent != t.path and t.kind != "s3" and t.kind != "gs":
        t.fs.create_dir(parent, recursive=True)


def qualified(spark, uri: str) -> str:
    """The form Spark writes in its `path` columns: file:/abs/dir for local paths (no trailing slash);
    other URIs as given, without a trailing slash."""
    t = _target(uri)
    if t.kind == "local":
        return f"file:{t.path}"
    return str(uri).rstrip("/") if not str(uri).endswith("://") else str(uri)


def exists(spark, uri: str) -> bool:
    return _type(_target(uri)) is not None


def is_nonempty_dir(spark, uri: str) -> bool:
    """True for a directory with at least one entry, and for a file; False when uri does not exist."""
    t = _target(uri)
    kind = _type(t)
    if kind is None:
        return False
    if kind == "file":
        return True
    return len(t.children()) > 0


def delete(spark, uri: str) -> None:
    """Remove a file or a directory tree; nothing when uri does not exist."""
    t = _target(uri)
    kind = _type(t)
    if kind == "dir":
        t.fs.delete_dir(t.path)
    elif kind == "file":
        t.fs.delete_file(t.path)


def rename(spark, src: str, dst: str) -> None:
    """Move src to dst (dst must not exist), creating dst's parent folders. Atomic on local and HDFS; on
    object stores a directory is copied file by file, then deleted (not atomic)."""
    s, d = _target(src), _target(dst)
    kind = _type(s)
    if kind is None:
        raise FileNotFoundError(f"could not rename {src} to {dst}: {src} does not exist")
    if _type(d) is not None:
        raise OSError(f"could not rename {src} to {dst}: {dst} exists")
    _parent_dirs(d)
    if s.kind != d.kind or s.prefix != d.prefix:
        raise OSError(f"could not rename {src} to {dst}: not on one file system")
    try:
        s.fs.move(s.path, d.path)
        return
    except (NotImplementedError, OSError):
        if s.atomic_rename or kind != "dir":
            raise
    _copy_tree(s, d)
    s.fs.delete_dir(s.path)


def _copy_tree(s: _Target, d: _Target) -> None:
    import pyarrow.fs as pafs

    for info in s.fs.get_file_info(pafs.FileSelector(s.path, recursive=True)):
        if info.type == pafs.FileType.File:
            s.fs.copy_file(info.path, d.path + info.path[len(s.path):])


def write_text(spark, uri: str, text: str) -> None:
    """Create or replace a text file (UTF-8), creating its parent folders."""
    t = _target(uri)
    _parent_dirs(t)
    with t.fs.open_output_stream(t.path) as stream:
        stream.write(text.encode("utf-8"))


def read_text(spark, uri: str) -> str:
    t = _target(uri)
    with t.fs.open_input_stream(t.path) as stream:
        return stream.read().decode("utf-8")


def list_names(spark, uri: str) -> set[str]:
    """Names of the entries directly under uri (set() when uri does not exist): one listing call."""
    return {info.base_name for info in _target(uri).children()}


def list_dirs(spark, uri: str) -> list[str]:
    """Sub-directories of uri (qualified URIs), [] when uri does not exist."""
    import pyarrow.fs as pafs

    t = _target(uri)
    return sorted(t.uri_of(info.path) for info in t.children() if info.type == pafs.FileType.Directory)


class FsLeaseFiles:
    """cxr.score.lease's file operations through pyarrow.fs, for output folders that are not local paths
    (LocalLeaseFiles, with O_EXCL and rename(2), serves those).

    create_new checks that the file is absent and then writes it: two steps, so not atomic. On HDFS the
    window is one NameNode round trip; on object stores (s3, gs) there is no create-if-absent at all, so two
    runs started within the same second may both take a lease there (use a local or HDFS output folder for
    scheduled runs). rename_if_exists is atomic on HDFS only."""

    def __init__(self, spark=None):
        self.spark = spark

    def create_new(self, uri, text):
        t = _target(uri)
        if _type(t) is not None:
            return False
        write_text(self.spark, uri, text)
        return True

    def read_text_or_none(self, uri):
        try:
            return read_text(self.spark, uri)
        except FileNotFoundError:
            return None

    def write_text(self, uri, text):
        write_text(self.spark, uri, text)

    def rename_if_exists(self, src, dst):
        s, d = _target(src), _target(dst)
        if _type(s) is None:
            return False
        try:
            s.fs.move(s.path, d.path)
        except OSError:
            if _type(s) is None:   # another taker moved it first
                return False
            raise
        return True

    def delete(self, uri):
        delete(self.spark, uri)


HadoopLeaseFiles = FsLeaseFiles   # its former name
