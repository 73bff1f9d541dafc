"""cxr.quality.out_of_scope: every kind is written, the same on every run, and the scope gate gives the DICOM kinds
the reason their tags call for while the other kinds decode as plain images (only the OOD distance can judge them)."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from cxr.image.decode import decode_image
from cxr.quality.out_of_scope import KINDS, MANIFEST, write_material
from cxr.scope.dicom_header import HeaderReader
from cxr.scope.rules import ScopeGate, ScopeRules
from tests.conftest import SHARED_DATA

MNIST = SHARED_DATA / "mnist"
COUNTS = {k: 2 for k in KINDS}


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def material(tmp_path_factory):
    root = tmp_path_factory.mktemp("oos")
    rows = write_material(root / "one", mnist_dir=MNIST if MNIST.is_dir() else None, counts=COUNTS, seed=3,
                          shared_dir=SHARED_DATA if (SHARED_DATA / "cxr").is_dir() else None)
    return root, rows


def test_every_kind_written_and_listed(material):
    root, rows = material
    kinds = {r["kind"] for r in rows}
    expected = set(KINDS) - (set() if MNIST.is_dir() else {"mnist_digits"}) - (
        set() if (SHARED_DATA / "cxr").is_dir() else {k for k in KINDS if KINDS[k].group == "f"})
    assert kinds == expected
    pydicom_files = {r["relative_path"] for r in rows if r["kind"] == "pydicom_ct_mr_sc"}
    assert {"pydicom_ct_mr_sc/pydicom_ct_mr_sc_CT_small.dcm", "pydicom_ct_mr_sc/pydicom_ct_mr_sc_MR_small.dcm"} <= pydicom_files
    on_disk = {str(p.relative_to(root / "one")) for p in (root / "one").rglob("*") if p.is_file()}
    assert on_disk == {r["relative_path"] for r in rows} | {MANIFEST}
    for kind in set(COUNTS) & kinds - {"pydicom_ct_mr_sc", "tagless_png"}:
        assert sum(r["kind"] == kind for r in rows) == COUNTS[kind]


def test_deterministic(material, tmp_path):
    root, _ = material
    write_material(tmp_path / "two", mnist_dir=MNIST if MNIST.is_dir() else None, counts=COUNTS, seed=3,
                   shared_dir=SHARED_DATA if (SHARED_DATA / "cxr").is_dir() else None)
    assert _digests(tmp_path / "two") == _digests(root / "one")


def test_gate_reasons_and_decodable_pictures(material):
    root, rows = material
    gate = ScopeGate(HeaderReader(None), ScopeRules())
    for r in rows:
        data = (root / "one" / r["relative_path"]).read_bytes()
        _, reason = gate.check(data)
        if KINDS[r["kind"]].catch == "header":
            assert reason is not None and r["expected_words"] in reason, (r["relative_path"], reason)
        else:   # no tags: the gate lets them through, and they decode to images the model would be asked about
            assert reason is None, r["relative_path"]
            img = decode_image(data).pixels
            assert min(img.shape) >= 64, r["relative_path"]
