"""The score job's driver-side listing and plan (cxr/score/incremental.py) against Spark's own file listing."""
from __future__ import annotations

import os

import pandas as pd

from cxr.score.incremental import classify, list_archive


def _archive(root):
    from cxr.datasets.synth import generate_archive

    generate_archive(root, per_class=2, size=96, seed=3, broken=True)
    (root / "COVID" / ".hidden.png").write_bytes(b"x")         # hidden: not part of a dataset for Spark either
    (root / "_tmp").mkdir()
    (root / "_tmp" / "a.png").write_bytes(b"x")
    (root / "NORMAL" / "notes.txt").write_text("not an image")
    (root / "Viral Pneumonia" / "masks").mkdir(parents=True)
    (root / "Viral Pneumonia" / "masks" / "m.png").write_bytes(b"x" * 10)
    (root / "NORMAL" / "huge.png").write_bytes(b"x" * 5000)
    os.symlink(root / "nowhere.png", root / "NORMAL" / "dangling.png")
    return root


def test_listing_matches_spark_binaryfile(spark, tmp_path):
    from cxr.spark.images import list_files

    root = _archive(tmp_path / "a")
    exts, excluded, max_bytes = ["png", "jpg", "jpeg", "dcm", "tif", "tiff", "bmp"], ["masks"], 4096
    ours = list_archive(f"file:{root}", exts, excluded, max_bytes)
    with list_files(spark, f"file:{root}", exts, excluded, max_bytes) as listing:
        theirs = listing.select("path", "length", "kind").toPandas()
    live = ours.sort_values("path", ignore_index=True)
    theirs = theirs.sort_values("path", ignore_index=True)
    pd.testing.assert_frame_equal(live[["path", "kind"]], theirs[["path", "kind"]])
    assert (live.length.astype("int64") == theirs.length).all()
    assert {"empty", "too_large", "ignored_extension", "ignored_dir", "read"} <= set(ours.kind)
    assert not ours.path.str.endswith("dangling.png").any()   # like Hadoop's listing: a link to nothing is no file
    assert not ours.path.str.contains("/[._]", regex=True).any()


def test_classify_skips_only_what_matches_the_newest_state(tmp_path):
    listing = pd.DataFrame({"path": ["a", "b", "c", "d", "e"], "length": pd.array([1, 2, 3, 0, 5], "Int64"),
                            "mtime_ms": pd.array([10, 20, 30, 40, 50], "Int64"),
                            "kind": ["read", "read", "read", "empty", "ignored_extension"]})
    state = pd.DataFrame({"path": ["a", "b", "c", "d"], "s_size": pd.array([1, 2, 3, 0], "Int64"),
                          "s_mtime_ms": pd.array([10, 21, 30, 40], "Int64"),
                          "s_status": ["scored", "scored", "rejected", "rejected"]})
    plan = classify(listing, state, retry_errors=False).set_index("path")["todo"].to_dict()
    assert plan == {"a": "unchanged", "b": "read", "c": "unchanged", "d": "unchanged", "e": "ignored"}
    retry = classify(listing, state, retry_errors=True).set_index("path")["todo"].to_dict()
    assert retry == {"a": "unchanged", "b": "read", "c": "read", "d": "unread", "e": "ignored"}
    first = classify(listing, None, retry_errors=False).set_index("path")["todo"].to_dict()
    assert first == {"a": "read", "b": "read", "c": "read", "d": "unread", "e": "ignored"}
