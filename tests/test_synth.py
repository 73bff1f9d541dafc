"""The synthetic archive: deterministic, mixed formats that really decode, broken files that really are
broken, a truthful MANIFEST, and classes that texture separates while brightness alone does not."""

import csv
import hashlib
import json
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from PIL import Image

from cxr import CLASSES
from cxr.datasets import synth

PER_CLASS = 40
SIZE = 256


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "archive"
    summary = synth.generate_archive(out, per_class=PER_CLASS, size=SIZE, seed=0)
    return out, summary


def _file_hashes(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _decode(path: Path, fmt: str) -> np.ndarray:
    """Decoded pixels, as stored (DICOM: raw stored values; no inversion)."""
    if fmt.startswith("dicom"):
        return pydicom.dcmread(path).pixel_array
    arr = cv2.imdecode(np.fromfile(path, np.uint8), cv2.IMREAD_UNCHANGED)
    assert arr is not None, f"cv2 cannot decode {path}"
    return arr


def _to_unit_gray(arr: np.ndarray, fmt: str) -> np.ndarray:
    """Display-oriented gray in [0, 1] (white = bone), from the format's nominal range."""
    if arr.ndim == 3:
        arr = cv2.cvtColor(arr[..., :3], cv2.COLOR_BGR2GRAY)
    x = arr.astype(np.float32)
    if fmt in ("dicom_mono2", "png16_12bit"):
        x /= 4095.0
    elif fmt == "dicom_mono1":
        x = 1.0 - x / 4095.0
    elif fmt == "png16":
        x /= 65535.0
    else:
        x /= 255.0
    return x


# --- determinism -------------------------------------------------------------------------------------

def test_same_seed_gives_byte_identical_files(archive, tmp_path):
    out, summary = archive
    again = synth.generate_archive(tmp_path / "again", per_class=PER_CLASS, size=SIZE, seed=0)
    assert again == summary
    first, second = _file_hashes(out), _file_hashes(tmp_path / "again")
    assert first == second
    assert len(first) >= 3 * PER_CLASS


def test_different_seed_gives_different_files(archive, tmp_path):
    out, _ = archive
    other = synth.generate_archive(tmp_path / "other", per_class=8, size=SIZE, seed=1)
    first, second = _file_hashes(out), _file_hashes(tmp_path / "other")
    common = [p for p in second if p in first and p.split("/")[0] in CLASSES
              and p not in {b["path"] for b in other["broken"]}]
    assert common, "no file names in common to compare"
    assert all(first[p] != second[p] for p in common)


def test_dicom_uids_derive_from_the_seed(archive, tmp_path):
    out, summary = archive
    dcm = next(d for d in summary["images"] if d["format"] == "dicom_mono2")
    ds = pydicom.dcmread(out / dcm["path"])
    other = synth.generate_archive(tmp_path / "other", per_class=PER_CLASS, size=64, seed=5)
    ds5 = pydicom.dcmread(tmp_path / "other" / next(d for d in other["images"] if d["format"] == "dicom_mono2")["path"])
    assert ds.SOPInstanceUID != ds5.SOPInstanceUID
    assert ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID
    assert ds.StudyInstanceUID != ds.SeriesInstanceUID != ds.SOPInstanceUID


# --- layout, formats ---------------------------------------------------------------------------------

def test_layout_and_counts(archive):
    out, s = archive
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == list(CLASSES)
    assert (out / "MANIFEST.csv").is_file()
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == ["MANIFEST.csv"]
    broken = {b["path"] for b in s["broken"]}
    assert len(broken) == 6 and {b["class"] for b in s["broken"]} == set(CLASSES)
    for cls in CLASSES:
        files = [p for p in (out / cls).iterdir() if p.is_file()]
        valid = [p for p in files if f"{cls}/{p.name}" not in broken]
        extra = 1 if cls == "COVID" else 0  # the duplicate
        assert len(valid) == PER_CLASS + extra == s["classes"][cls]
    assert s["n_valid"] == 3 * PER_CLASS + 1
    assert sum(s["formats"].values()) == s["n_valid"]
    assert s["seed"] == 0


def test_format_mix(archive):
    out, s = archive
    f = s["formats"]
    assert f["png8"] + f["jpeg"] > s["n_valid"] / 2
    assert f["png16"] + f["png16_12bit"] >= 2
    assert 1 <= f["jpeg_rgb"] <= 2
    assert f["png_rgba"] == 1 and f["bmp"] == 1 and f["tiff"] == 1
    assert f["dicom_mono1"] == 1
    for cls in CLASSES:
        assert any(d["format"].startswith("dicom") for d in s["images"] if d["class"] == cls)
    names = [d["path"] for d in s["images"]]
    assert any(n.endswith(".PNG") for n in names) and any(n.endswith(".JPG") for n in names)
    assert any(" " in n for n in names)


def test_every_valid_file_decodes_to_the_expected_size_and_depth(archive):
    out, s = archive
    for d in s["images"]:
        path = out / d["path"]
        arr = _decode(path, d["format"])
        assert list(arr.shape) == d["shape"], d
        assert arr.dtype == np.dtype(d["dtype"]), d
        if d["format"] == "png16":
            assert arr.max() > 4095
        if d["format"] in ("png16_12bit", "dicom_mono2", "dicom_mono1"):
            assert 255 < arr.max() <= 4095
        if d["format"] == "jpeg_rgb":
            b, g, r = (arr[..., i].astype(int) for i in range(3))
            assert (r - b).mean() > 2, "RGB JPEG should carry a slight tint"
        if d["format"] == "png_rgba":
            assert (arr[..., 3] == 255).all()
        if not d["format"].startswith("dicom"):
            with Image.open(path) as im:  # Pillow agrees on the size
                im.load()
                assert im.size == (SIZE, SIZE)


def test_dicom_files_are_proper(archive):
    out, s = archive
    dicoms = [d for d in s["images"] if d["format"].startswith("dicom")]
    assert len(dicoms) >= 4
    for d in dicoms:
        raw = (out / d["path"]).read_bytes()
        assert raw[128:132] == b"DICM"
        ds = pydicom.dcmread(out / d["path"])
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert ds.file_meta.MediaStorageSOPClassUID == ds.SOPClassUID
        assert ds.BitsAllocated == 16 and ds.SamplesPerPixel == 1 and ds.PixelRepresentation == 0
        assert ds.PatientID == d["patient_id"]
        assert ds.PhotometricInterpretation == ("MONOCHROME1" if d["format"] == "dicom_mono1" else "MONOCHROME2")
        px = ds.pixel_array.astype(np.float32)
        # air outside the body (the bottom corners) is black when displayed: low values in MONOCHROME2,
        # high in MONOCHROME1, so a reader that ignores the photometric interpretation gets a negative
        corners = np.concatenate([px[-8:, :8].ravel(), px[-8:, -8:].ravel()])
        if d["format"] == "dicom_mono1":
            assert corners.mean() > px.mean()
        else:
            assert corners.mean() < px.mean()


def test_duplicate_is_a_byte_copy(archive):
    out, s = archive
    assert len(s["duplicates"]) == 1
    dup = s["duplicates"][0]
    assert dup["path"] != dup["original"]
    assert Path(dup["path"]).parent == Path(dup["original"]).parent
    assert (out / dup["path"]).read_bytes() == (out / dup["original"]).read_bytes()


# --- broken files ------------------------------------------------------------------------------------

def test_broken_files_are_really_broken(archive):
    out, s = archive
    broken = {Path(b["path"]).name: out / b["path"] for b in s["broken"]}
    assert all(b["problem"] for b in s["broken"])

    def cv2_decode(p):
        return cv2.imdecode(np.fromfile(p, np.uint8), cv2.IMREAD_UNCHANGED) if p.stat().st_size else None

    for name in ("empty.png", "truncated.jpg", "download_error.png", "random_bytes.jpg", "bomb_100000x100000.png"):
        assert cv2_decode(broken[name]) is None, name
        with pytest.raises(Exception):
            with Image.open(broken[name]) as im:
                im.load()

    assert broken["empty.png"].stat().st_size == 0
    trunc = broken["truncated.jpg"].read_bytes()
    assert trunc[:3] == b"\xff\xd8\xff" and not trunc.endswith(b"\xff\xd9")
    assert broken["download_error.png"].read_bytes().lstrip().lower().startswith(b"<!doctype html")
    junk = broken["random_bytes.jpg"].read_bytes()
    assert len(junk) == 4096 and junk[:2] != b"\xff\xd8"

    # the bomb: a true PNG signature and IHDR (correct CRC) whose claimed size is a lie
    bomb = broken["bomb_100000x100000.png"].read_bytes()
    assert bomb[:8] == b"\x89PNG\r\n\x1a\n" and bomb[12:16] == b"IHDR"
    (length,) = struct.unpack(">I", bomb[8:12])
    ihdr = bomb[16:16 + length]
    (crc,) = struct.unpack(">I", bomb[16 + length:20 + length])
    assert crc == zlib.crc32(b"IHDR" + ihdr)
    w, h = struct.unpack(">II", ihdr[:8])
    assert (w, h) == (100_000, 100_000) and len(bomb) < 100
    assert b"IDAT" not in bomb

    tiny = cv2_decode(broken["tiny_8x8.png"])
    assert tiny is not None and tiny.shape[:2] == (8, 8)


def test_no_broken(tmp_path):
    s = synth.generate_archive(tmp_path / "a", per_class=4, size=64, seed=3, broken=False)
    assert s["broken"] == []
    files = [p for p in (tmp_path / "a").rglob("*") if p.is_file() and p.parent.name in CLASSES]
    assert len(files) == s["n_valid"] == 3 * 4 + 1


# --- manifest ----------------------------------------------------------------------------------------

def test_manifest_matches_files(archive):
    out, s = archive
    with open(out / "MANIFEST.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == ["relative_path", "class", "patient_id", "sha256"]
        rows = list(reader)
    broken = {b["path"] for b in s["broken"]}
    on_disk = {p.relative_to(out).as_posix() for c in CLASSES for p in (out / c).iterdir()} - broken
    assert {r["relative_path"] for r in rows} == on_disk
    assert len(rows) == len(on_disk) == s["n_valid"]
    for r in rows:
        assert r["class"] == r["relative_path"].split("/")[0]
        assert r["sha256"] == hashlib.sha256((out / r["relative_path"]).read_bytes()).hexdigest()
    # patients: one class each, and some with 2-3 images so that patient-grouped splits matter
    by_patient = {}
    for r in rows:
        by_patient.setdefault(r["patient_id"], set()).add((r["relative_path"], r["class"]))
    assert all(len({c for _, c in v}) == 1 for v in by_patient.values())
    sizes = [len({p for p, _ in v}) for v in by_patient.values()]
    assert max(sizes) >= 2 and sum(n >= 2 for n in sizes) >= 5
    assert s["n_patients"] == len(by_patient)


# --- learnability ------------------------------------------------------------------------------------

def _features(img: np.ndarray) -> np.ndarray:
    """Texture on a 64x64 downsample, per image z-scored (so exposure cannot matter): block means of the
    image and of |Laplacian| on an 8x8 grid."""
    small = cv2.resize(img, (64, 64), interpolation=cv2.INTER_AREA)
    z = (small - small.mean()) / (small.std() + 1e-6)
    lap = np.abs(cv2.Laplacian(z, cv2.CV_32F))

    def grid(a):
        return a.reshape(8, 8, 8, 8).mean(axis=(1, 3)).ravel()

    return np.concatenate([grid(z), grid(lap)])


def _softmax_regression(Xtr, ytr, Xte, lam=1e-2, iters=500, lr=0.1):
    mu, sd = Xtr.mean(0), Xtr.std(0) + 1e-6
    A, B = (Xtr - mu) / sd, (Xte - mu) / sd
    W, b = np.zeros((A.shape[1], 3)), np.zeros(3)
    Y = np.eye(3)[ytr]
    for _ in range(iters):
        Z = A @ W + b
        P = np.exp(Z - Z.max(1, keepdims=True))
        P /= P.sum(1, keepdims=True)
        G = (P - Y) / len(A)
        W -= lr * (A.T @ G + lam * W)
        b -= lr * G.sum(0)
    return np.argmax(B @ W + b, 1)


def _nearest_centroid(Xtr, ytr, Xte):
    mu, sd = Xtr.mean(0), Xtr.std(0) + 1e-6
    A, B = (Xtr - mu) / sd, (Xte - mu) / sd
    C = np.stack([A[ytr == k].mean(0) for k in range(3)])
    return np.argmin(((B[:, None, :] - C[None]) ** 2).sum(-1), 1)


def test_texture_separates_classes_but_brightness_does_not(archive):
    out, s = archive
    dups = {d["path"] for d in s["duplicates"]}
    imgs, labels, patients = [], [], []
    for d in s["images"]:
        if d["path"] in dups:
            continue
        imgs.append(_to_unit_gray(_decode(out / d["path"], d["format"]), d["format"]))
        labels.append(CLASSES.index(d["class"]))
        patients.append(d["patient_id"])
    y = np.array(labels)
    # patient-grouped split: train on half the patients, test on the other half
    pids = sorted(set(patients))
    test_pids = set(np.random.default_rng(0).permutation(pids)[: len(pids) // 2])
    te = np.array([p in test_pids for p in patients])
    tr = ~te
    assert 0.3 < te.mean() < 0.7

    feats = np.stack([_features(im) for im in imgs])
    acc_texture = (_softmax_regression(feats[tr], y[tr], feats[te]) == y[te]).mean()
    bright = np.array([[im.mean()] for im in imgs])
    acc_bright = (_nearest_centroid(bright[tr], y[tr], bright[te]) == y[te]).mean()
    acc_bright_lr = (_softmax_regression(bright[tr], y[tr], bright[te]) == y[te]).mean()
    assert acc_texture > 0.6, acc_texture
    assert acc_bright < 0.6 and acc_bright_lr < 0.6, (acc_bright, acc_bright_lr)


# --- library odds and ends ---------------------------------------------------------------------------

def test_render_and_sample_dataset():
    img = synth.render_chest("VIRAL", 96, 1)
    assert img.shape == (96, 96) and img.dtype == np.float32
    assert 0.0 <= img.min() and img.max() <= 1.0
    assert np.array_equal(img, synth.render_chest("VIRAL", 96, 1))
    X, y = synth.sample_dataset(per_class=2, size=64, seed=0)
    assert X.shape == (6, 64, 64) and list(y) == [0, 0, 1, 1, 2, 2]
    with pytest.raises(ValueError):
        synth.render_chest("PNEUMONIA", 64, 0)


def test_small_archive_and_rerun_replaces_earlier_output(tmp_path):
    out = tmp_path / "small"
    s1 = synth.generate_archive(out, per_class=12, size=64, seed=2)
    s2 = synth.generate_archive(out, per_class=2, size=64, seed=2)  # rerun into its own output
    assert s2["n_valid"] == 3 * 2 + 1 and s1["n_valid"] == 3 * 12 + 1
    files = [p for p in out.rglob("*") if p.is_file() and p.parent.name in CLASSES]
    assert len(files) == s2["n_valid"] + len(s2["broken"])


def test_refuses_foreign_non_empty_directory(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        synth.generate_archive(tmp_path, per_class=2, size=64)
    (tmp_path / "COVID").mkdir()
    (tmp_path / "COVID" / "real.png").write_bytes(b"x")
    (tmp_path / "MANIFEST.csv").write_text("path,label\n")
    with pytest.raises(FileExistsError):
        synth.generate_archive(tmp_path, per_class=2, size=64)
    assert (tmp_path / "precious.txt").read_text() == "keep me"
    assert (tmp_path / "COVID" / "real.png").read_bytes() == b"x"


def test_cli(tmp_path, capsys):
    assert synth.main([str(tmp_path / "cli"), "--per-class", "3", "--size", "64", "--seed", "4", "--no-broken"]) == 0
    printed = capsys.readouterr().out
    assert "valid images" in printed and "0 broken" in printed
    assert synth.main([str(tmp_path / "cli2"), "--per-class", "3", "--size", "64", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["seed"] == 0 and len(s["broken"]) == 6
