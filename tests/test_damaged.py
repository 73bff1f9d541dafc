"""Damaged images are not whole images: codec warnings per file, rejected by default, flagged on request.

Damage is made the way archives get it, from real X-rays where they are at hand: a run of zeros inside the
JPEG scan (libjpeg fills the rest with grey and only says so on stderr), a repeated chunk, a PNG whose
CRC no longer matches, a DICOM whose pixel data is shorter than Rows x Columns says. Then the real
preprocess and score jobs on a local[2] session: errors rows with the reason, or (on_damaged: flag)
images and predictions carrying decode_warnings.
"""
from __future__ import annotations

import io
import os
import struct
import time
import zlib
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
import pydicom
import pytest

from cxr.config import load_config
from cxr.image.badfiles import synthetic_dicom
from cxr.image.batch import process_file
from cxr.image.damage import damage_of, decoder_messages, png_crc_errors
from cxr.image.deadline import TimeLimitExceeded, time_limit, uninterrupted
from cxr.image.decode import decode_image
from cxr.image.pipeline import PreprocessParams
from cxr.image.rejection import RejectedImage
from tests.conftest import SHARED_DATA

SIZE = 32


def _xray() -> np.ndarray:
    """A real X-ray (downscaled) when ../shared is there; else a synthetic radiograph (the damage is the point)."""
    folder = SHARED_DATA / "cxr" / "COVID"
    files = sorted(folder.glob("*.jp*g")) if folder.is_dir() else []
    if files:
        gray = cv2.imdecode(np.fromfile(files[0], np.uint8), cv2.IMREAD_GRAYSCALE)
        return cv2.resize(gray, (400, 400 * gray.shape[0] // gray.shape[1]), interpolation=cv2.INTER_AREA)
    from cxr.datasets.synth import render_chest

    return np.round(render_chest("COVID", 400, 3) * 255).astype(np.uint8)


GRAY = _xray()
JPEG = cv2.imencode(".jpg", GRAY, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()
PNG = cv2.imencode(".png", GRAY)[1].tobytes()


def _zero_run(data: bytes, offset: int = 1500, length: int = 400) -> bytes:
    sos = data.rfind(b"\xff\xda")
    return data[:sos + offset] + bytes(length) + data[sos + offset + length:]


def _repeated_chunk(data: bytes) -> bytes:
    sos = data.rfind(b"\xff\xda")
    return data[:sos + 3000] + data[sos + 2000:]


def _bad_crc(data: bytes, kind: bytes = b"IDAT") -> bytes:
    """The first `kind` chunk's stored CRC changed; its data left intact."""
    pos = data.find(kind) - 4
    length = struct.unpack_from(">I", data, pos)[0]
    crc_at = pos + 8 + length
    return data[:crc_at] + bytes(b ^ 0xFF for b in data[crc_at:crc_at + 4]) + data[crc_at + 4:]


def _with_text_chunk(data: bytes) -> bytes:
    payload = b"Comment\0scanned 2019"
    chunk = struct.pack(">I", len(payload)) + b"tEXt" + payload + struct.pack(">I", zlib.crc32(b"tEXt" + payload))
    return data[:33] + chunk + data[33:]


def _short_dicom() -> bytes:
    ds = pydicom.dcmread(io.BytesIO(synthetic_dicom()))
    ds.PixelData = ds.PixelData[:len(ds.PixelData) * 7 // 10]
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _overlong_rle_dicom() -> bytes:
    """RLE DICOM whose segment has a run of repeat codes written over it: it decodes to too many bytes."""
    from pydicom.uid import RLELossless

    ds = pydicom.dcmread(io.BytesIO(synthetic_dicom()))
    ds.compress(RLELossless)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    data = buf.getvalue()
    at = data.rfind(b"\xe0\x7f\x10\x00") + 1000
    return data[:at] + b"\x81" * 64 + data[at + 64:]


DAMAGED = {   # name -> (bytes, words the reason must contain)
    "zero_run.jpg": (_zero_run(JPEG), "damaged: corrupt JPEG data, premature end of data segment"),
    "repeated_chunk.jpg": (_repeated_chunk(JPEG), "extraneous bytes before marker 0xd9"),
    "bad_crc.png": (_bad_crc(PNG), "damaged: PNG chunk IDAT at byte"),
    "bad_text_crc.png": (_bad_crc(_with_text_chunk(PNG), b"tEXt"), "CRC"),
    "short_pixels.dcm": (_short_dicom(), "damaged: truncated DICOM: pixel data has"),
    "overlong_rle.dcm": (_overlong_rle_dicom(), "damaged: DICOM RLE segment decodes to"),
}


def _rejected(data: bytes, **kwargs) -> RejectedImage:
    with pytest.raises(RejectedImage) as info:
        decode_image(data, **kwargs)
    return info.value


@pytest.mark.parametrize("name", list(DAMAGED))
def test_damage_is_rejected_by_default(name):
    data, words = DAMAGED[name]
    error = _rejected(data)
    assert error.stage == "decode" and words in error.reason, error.reason
    assert error.reason.startswith("damaged: ")


@pytest.mark.parametrize("name", list(DAMAGED))
def test_damage_is_kept_and_flagged_on_request(name):
    data, words = DAMAGED[name]
    result = decode_image(data, on_damaged="flag")
    assert result.warnings and words.replace("damaged: ", "") in "; ".join(result.warnings), result.warnings
    assert result.pixels.ndim == 2 and min(result.pixels.shape) >= 64


def test_flagged_png_with_only_a_bad_crc_has_its_real_pixels():
    result = decode_image(_bad_crc(PNG), on_damaged="flag")
    np.testing.assert_array_equal(result.pixels, GRAY)
    assert png_crc_errors(PNG) == [] and len(png_crc_errors(_bad_crc(PNG))) == 1


def test_flagged_jpeg_zero_run_really_is_damaged():
    """What the flag keeps is not the image: libjpeg filled the rest with grey."""
    whole = decode_image(JPEG).pixels.astype(int)
    damaged = decode_image(_zero_run(JPEG), on_damaged="flag").pixels.astype(int)
    assert np.abs(whole - damaged).mean() > 5


def test_whole_files_have_no_warnings():
    for data in (JPEG, PNG, synthetic_dicom(), cv2.imencode(".jpg", GRAY, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])[1]
                 .tobytes(), cv2.imencode(".tiff", GRAY)[1].tobytes()):
        assert decode_image(data, on_damaged="flag").warnings == ()


def test_shared_xrays_are_whole():
    """The 450 shared X-rays decode without a codec warning (a sample of them; reduced decode too)."""
    folder = SHARED_DATA / "cxr"
    if not folder.is_dir():
        pytest.skip(f"real data folder {folder} is absent (it lives in ../shared beside the project)")
    for path in sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[::15]:
        assert decode_image(path.read_bytes(), on_damaged="flag", reduce_to=64).warnings == (), path.name


def test_harmless_codec_notes_are_not_damage(capfd):
    lines = ["libpng warning: iCCP: known incorrect sRGB profile", "Corrupt JPEG data: bad Huffman code",
             "libpng warning: tEXt: CRC error"]
    assert damage_of(lines, "PNG") == ["corrupt JPEG data, bad Huffman code", "PNG tEXt: CRC error"]
    assert "known incorrect sRGB profile" in capfd.readouterr().err   # passed on, not swallowed


def test_stderr_is_restored_after_every_decode(capfd):
    before = os.fstat(2)
    for data, _ in DAMAGED.values():
        decode_image(data, on_damaged="flag")
    after = os.fstat(2)
    assert (before.st_ino, before.st_dev) == (after.st_ino, after.st_dev)
    os.write(2, b"still the real stderr\n")
    assert "still the real stderr" in capfd.readouterr().err


def test_a_slow_file_becomes_an_errors_row(monkeypatch):
    import cxr.image.batch as batch

    def slow(data, params):
        deadline = time.perf_counter() + 5
        while time.perf_counter() < deadline:   # Python-level work: the alarm interrupts it
            pass
        raise AssertionError("not interrupted")

    monkeypatch.setattr(batch, "preprocess_bytes", slow)
    started = time.perf_counter()
    row = process_file("/x/slow.png", PNG, "/x", PreprocessParams(size=SIZE, time_limit_s=0.3), {})
    assert time.perf_counter() - started < 2
    assert row["status"] == "error" and row["stage"] == "decode" and "took more than 0.3 s" in row["reason"]


def test_the_alarm_waits_for_an_uninterrupted_section():
    with pytest.raises(TimeLimitExceeded):
        with time_limit(0.1):
            with uninterrupted():
                time.sleep(0.3)   # the alarm lands here...
                reached = True    # ...and is raised only once the section is over
    assert reached
    with time_limit(1.0):          # no alarm left behind
        time.sleep(0.05)
    with decoder_messages() as lines:
        os.write(2, b"Corrupt JPEG data: premature end of data segment\n")
    assert lines == ["Corrupt JPEG data: premature end of data segment"]


# ------------------------------------------------------------------------------------- Spark jobs

@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    root = tmp_path_factory.mktemp("damaged")
    (root / "COVID").mkdir()
    for name, (data, _) in DAMAGED.items():
        (root / "COVID" / name).write_bytes(data)
    (root / "COVID" / "whole.jpg").write_bytes(JPEG)
    (root / "COVID" / "whole.png").write_bytes(cv2.imencode(".png", cv2.flip(GRAY, 1))[1].tobytes())
    return root


def _table(path: Path):
    return pq.read_table(path).to_pandas()


def _name(paths):
    return paths.str.rsplit("/", n=1).str[-1]


def test_preprocess_job_rejects_damage_by_default(spark, archive, tmp_path):
    from cxr.spark.preprocess import run

    result = run(spark, str(archive), str(tmp_path / "out"), load_config(overrides={"preprocess.size": SIZE}))
    images, errors = _table(tmp_path / "out" / "images"), _table(tmp_path / "out" / "errors")
    assert set(_name(images.path)) == {"whole.jpg", "whole.png"} and images.decode_warnings.isna().all()
    reasons = dict(zip(_name(errors.path), errors.reason))
    assert set(reasons) == set(DAMAGED)
    for name, (_, words) in DAMAGED.items():
        assert words in reasons[name], (name, reasons[name])
    assert result["accounted"] and result["params"]["on_damaged"] == "reject"


def test_preprocess_and_score_flag_damage_on_request(spark, archive, tmp_path):
    from cxr.models import store
    from cxr.models.onnx_export import export_onnx
    from cxr.nn import models
    from cxr.spark import preprocess, score
    from tests.scoring_models import model_metadata

    config = load_config(overrides={"preprocess.size": SIZE, "preprocess.on_damaged": "flag",
                                    "score.batch_size": 4})
    result = preprocess.run(spark, str(archive), str(tmp_path / "pre"), config)
    images = _table(tmp_path / "pre" / "images")
    warned = dict(zip(_name(images.path), images.decode_warnings))
    assert set(warned) == set(DAMAGED) | {"whole.jpg", "whole.png"} and result["counts"]["rejected"] == 0
    assert warned["whole.jpg"] is None and warned["whole.png"] is None
    for name, (_, words) in DAMAGED.items():
        assert words.replace("damaged: ", "") in warned[name], (name, warned[name])

    net = models.dnn((SIZE, SIZE, 1), 3, hidden=4, seed=0)
    model = store.save_scratch(net, tmp_path / "models" / "dnn", model_metadata("dnn", result["params"], SIZE))
    export_onnx(model)
    for kind, source in (("raw", archive), ("preprocessed", tmp_path / "pre")):
        out = tmp_path / f"pred-{kind}"
        record = score.run(spark, str(source), str(model), str(out), config)
        assert record["mode"] == kind and record["counts"]["scored"] == len(warned), record["counts"]
        pred = _table(out / "predictions")
        assert dict(zip(_name(pred.path), pred.decode_warnings)) == warned
    # the same model, a run that rejects: the damaged files become errors rows of the score job
    out = tmp_path / "pred-reject"
    record = score.run(spark, str(archive), str(model), str(out), load_config(overrides={"score.batch_size": 4}))
    assert record["counts"]["scored"] == 2 and record["counts"]["rejected"] == len(DAMAGED)
    errors = _table(out / "errors")
    assert errors.reason.str.startswith("damaged: ").all()
