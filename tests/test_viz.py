"""cxr.explain.viz: Figure-1 panels and contact sheets are real PNGs of the documented pixel size; bad input is one
clear line and exit status 2. Small images, no Spark, no TensorFlow."""
from __future__ import annotations

import json
import subprocess
import sys

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from cxr import CLASSES
from cxr.explain import viz
from cxr.image.pipeline import PreprocessParams, preprocess_bytes
from tests.conftest import ROOT
from tests.train_data import write_pre_out

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _chest(label: str, size: int, seed: int) -> np.ndarray:
    from cxr.datasets.synth import render_chest

    return render_chest(label, size, seed)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """An 8-bit PNG and a 16-bit PNG (not square, so the resize step shows)."""
    root = tmp_path_factory.mktemp("viz_files")
    a = (_chest("COVID", 96, 1) * 255).astype(np.uint8)
    b = (_chest("VIRAL", 96, 2) * 65535).astype(np.uint16)[:, 8:88]
    cv2.imwrite(str(root / "a.png"), a)
    cv2.imwrite(str(root / "b16.png"), b)
    return [root / "a.png", root / "b16.png"]


def _write_pre_out_with_sources(root, files, params: PreprocessParams, manifest_params: PreprocessParams):
    """A PRE_OUT whose rows point at real source files (what --from-parquet re-reads)."""
    rows = []
    for i, f in enumerate(files):
        img = preprocess_bytes(f.read_bytes(), params)[1]
        rows.append({"path": f"file:{f}", "sha256": f"{i:064d}", "label": CLASSES[i % 3], "split": "train",
                     "patient_id": f"P{i}", "image": img.tobytes(), "height": img.shape[0], "width": img.shape[1]})
    (root / "images").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), root / "images" / "part-00000.parquet")
    (root / "manifest.json").write_text(json.dumps({"params": manifest_params.to_dict()}))
    return root


def _png_size(path) -> tuple[int, int]:
    with open(path, "rb") as fh:
        assert fh.read(8) == PNG_MAGIC
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        return im.size


def test_figure1_from_files_is_a_png_of_the_documented_size(files, tmp_path, capsys):
    out = tmp_path / "fig1.png"
    assert viz.main(["preprocess", *map(str, files), "--size", "48", "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert _png_size(out) == viz.figure1_size(2)


def test_figure1_from_parquet_recomputes_and_flags_drift(files, tmp_path):
    params = PreprocessParams(size=32, min_side=64)
    same = _write_pre_out_with_sources(tmp_path / "same", files, params, params)
    items, notes, _ = viz.recompute_from_parquet(str(same), 5)
    assert len(items) == 2 and notes == ["", ""]  # only 2 rows exist
    assert items[0][1]["resized"].shape == (32, 32)
    drift = _write_pre_out_with_sources(tmp_path / "drift", files, params,
                                        PreprocessParams(size=32, min_side=64, brightness_beta=40.0))
    assert all(viz.recompute_from_parquet(str(drift), 2)[1])
    out = tmp_path / "fig1p.png"
    assert viz.main(["preprocess", "--from-parquet", str(same), "--n", "2", "--out", str(out)]) == 0
    assert _png_size(out) == viz.figure1_size(2)


def test_contact_sheet_is_a_png_of_the_documented_size(tmp_path):
    pre = write_pre_out(tmp_path / "pre", per_class=10, size=32)
    out = tmp_path / "sheet.png"
    assert viz.main(["samples", str(pre), "--per-class", "2", "--out", str(out)]) == 0
    assert _png_size(out) == viz.sheet_size(9, 2)  # 3 splits x 3 classes
    chosen = viz.choose_samples(viz._rows_metadata(str(pre)), 2, ["val"])
    assert list(chosen) == [("val", c) for c in CLASSES] and all(len(r) == 2 for r in chosen.values())
    assert viz.main(["samples", str(pre), "--per-class", "3", "--splits", "test", "--out", str(out)]) == 0
    assert _png_size(out) == viz.sheet_size(3, 3)


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("cxr.explain.viz: error: ") and "\n" not in err, err
    return err


def test_missing_or_empty_inputs_fail_with_one_line(tmp_path, capsys):
    out = str(tmp_path / "x.png")
    assert viz.main(["preprocess", str(tmp_path / "nope.png"), "--out", out]) == 2
    assert "no such file" in _one_line_error(capsys)
    (tmp_path / "empty.png").write_bytes(b"")
    assert viz.main(["preprocess", str(tmp_path / "empty.png"), "--out", out]) == 2
    assert "empty" in _one_line_error(capsys)
    assert viz.main(["samples", str(tmp_path / "no_pre_out"), "--out", out]) == 2
    assert "no images/ folder" in _one_line_error(capsys)
    assert viz.main(["preprocess", "--from-parquet", str(tmp_path / "no_pre_out"), "--out", out]) == 2
    _one_line_error(capsys)
    empty = tmp_path / "empty_pre"
    (empty / "images").mkdir(parents=True)
    schema = pa.schema([(c, pa.string()) for c in ("path", "sha256", "label", "split")])
    pq.write_table(schema.empty_table(), empty / "images" / "part-00000.parquet")
    assert viz.main(["samples", str(empty), "--out", out]) == 2
    assert "holds no rows" in _one_line_error(capsys)
    assert viz.main(["preprocess", "--out", out]) == 2
    _one_line_error(capsys)
    assert not (tmp_path / "x.png").exists()


def test_module_exit_status_from_a_shell(tmp_path):
    """The real `python -m cxr.explain.viz`: status 2 and a single stderr line (no traceback)."""
    run = subprocess.run([sys.executable, "-m", "cxr.explain.viz", "samples", str(tmp_path / "missing"), "--out",
                          str(tmp_path / "s.png")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert len(run.stderr.strip().splitlines()) == 1 and "missing" in run.stderr
