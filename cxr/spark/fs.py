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


def list_dirs(spark, uri: str) -> list[str]:
    """Sub-directories of uri (qualified), [] when uri does not exist."""
    fs, path = _fs_and_path(spark, uri)
    if not fs.exists(path):
        return []
    return sorted(str(s.getPath()) for s in fs.listStatus(path) if s.isDirectory())
