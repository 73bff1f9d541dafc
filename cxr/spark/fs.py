"""Output-directory operations through Hadoop's FileSystem, so that local paths, HDFS and S3 behave alike."""
from __future__ import annotations


def _fs_and_path(spark, uri: str):
    jvm = spark.sparkContext._jvm
    path = jvm.org.apache.hadoop.fs.Path(uri)
    return path.getFileSystem(spark.sparkContext._jsc.hadoopConfiguration()), path


def qualified(spark, uri: str) -> str:
    """The fully qualified form Spark writes in its `path` columns (e.g. file:/abs/dir)."""
    fs, path = _fs_and_path(spark, uri)
    return str(fs.makeQualified(path))


def exists(spark, uri: str) -> bool:
    fs, path = _fs_and_path(spark, uri)
    return bool(fs.exists(path))


def is_nonempty_dir(spark, uri: str) -> bool:
    fs, path = _fs_and_path(spark, uri)
    if not fs.exists(path):
        return False
    if not fs.getFileStatus(path).isDirectory():
        return True
    return len(fs.listStatus(path)) > 0


def delete(spark, uri: str) -> None:
    fs, path = _fs_and_path(spark, uri)
    if fs.exists(path):
        fs.delete(path, True)


def rename(spark, src: str, dst: str) -> None:
    fs, src_path = _fs_and_path(spark, src)
    _, dst_path = _fs_and_path(spark, dst)
    parent = dst_path.getParent()
    if parent is not None and not fs.exists(parent):
        fs.mkdirs(parent)
    if not fs.rename(src_path, dst_path):
        raise OSError(f"could not rename {src} to {dst}")


def write_text(spark, uri: str, text: str) -> None:
    fs, path = _fs_and_path(spark, uri)
    stream = fs.create(path, True)
    try:
        stream.write(bytearray(text.encode("utf-8")))
    finally:
        stream.close()


def read_text(spark, uri: str) -> str:
    fs, path = _fs_and_path(spark, uri)
    stream = fs.open(path)
    jvm = spark.sparkContext._jvm
    try:
        return str(jvm.org.apache.commons.io.IOUtils.toString(stream, "UTF-8"))
    finally:
        stream.close()


def list_names(spark, uri: str) -> set[str]:
    """Names of the entries directly under uri (set() when uri does not exist): one listing call."""
    fs, path = _fs_and_path(spark, uri)
    if not fs.exists(path):
        return set()
    return {s.getPath().getName() for s in fs.listStatus(path)}


def list_dirs(spark, uri: str) -> list[str]:
    """Sub-directories of uri (qualified), [] when uri does not exist."""
    fs, path = _fs_and_path(spark, uri)
    if not fs.exists(path):
        return []
    return sorted(str(s.getPath()) for s in fs.listStatus(path) if s.isDirectory())


class HadoopLeaseFiles:
    """cxr.score.lease's file operations on any Hadoop file system. create(overwrite=false) and rename are
    atomic on HDFS; object stores (s3a, gs) give no atomic create-if-absent, so two runs started within the
    same second may both take a lease there (use a local or HDFS output folder for scheduled runs)."""

    def __init__(self, spark):
        self.spark = spark

    def create_new(self, uri, text):
        fs, path = _fs_and_path(self.spark, uri)
        if fs.exists(path):
            return False
        try:
            stream = fs.create(path, False)
        except Exception as exc:  # py4j: FileAlreadyExistsException from a racing creator
            if "AlreadyExists" in str(exc):
                return False
            raise
        try:
            stream.write(bytearray(text.encode("utf-8")))
        finally:
            stream.close()
        return True

    def read_text_or_none(self, uri):
        return read_text(self.spark, uri) if exists(self.spark, uri) else None

    def write_text(self, uri, text):
        write_text(self.spark, uri, text)

    def rename_if_exists(self, src, dst):
        fs, src_path = _fs_and_path(self.spark, src)
        _, dst_path = _fs_and_path(self.spark, dst)
        return bool(fs.rename(src_path, dst_path))

    def delete(self, uri):
        delete(self.spark, uri)
