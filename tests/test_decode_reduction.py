"""preprocess.decode_reduction: decoding at 1/2, 1/4, 1/8 scale while the short side keeps 2x the output size.

Without Spark: the scale chosen, the sizes libjpeg gives, the original sizes still reported, outputs close to
the full decode's, and the parameter's round trip through the params every model records (old params
without the key mean `off`, so scoring an old model never changes its images).
"""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from cxr.config import load_config
from cxr.image.badfiles import synthetic_dicom
from cxr.image.decode import decode_image, reduction_factor
from cxr.image.pipeline import PreprocessParams, preprocess_bytes
from cxr.score.frames import params_mismatch, scoring_params
from tests.conftest import shared_data


def _picture(height: int, width: int, seed: int = 0) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    img = 0.3 + 0.3 * x / width + 0.2 * np.sin(y / 37.0) * np.cos(x / 23.0)
    img += 0.25 * ((((x - width / 2) / (0.35 * width)) ** 2 + ((y - height / 2) / (0.4 * height)) ** 2) < 1)
    img += np.random.default_rng(seed).normal(0, 0.02, img.shape)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


BIG = _picture(1600, 2000)   # short side 1600: 1/2 -> 800, 1/4 -> 400, 1/8 -> 200
JPEG = cv2.imencode(".jpg", BIG, [cv2.IMWRITE_JPEG_QUALITY, 92])[1].tobytes()
PNG = cv2.imencode(".png", BIG)[1].tobytes()


@pytest.mark.parametrize("short, reduce_to, factor", [
    (1600, 0, 1), (1600, 448, 2), (1600, 400, 4), (1600, 200, 8), (1600, 199, 8), (1600, 201, 4),
    (894, 448, 1), (895, 448, 2), (896, 448, 2), (1793, 448, 4), (3000, 64, 8), (100, 64, 1)])
def test_reduction_factor_keeps_the_short_side(short, reduce_to, factor):
    assert reduction_factor(short + 500, short, reduce_to) == factor
    assert reduction_factor(short, short + 500, reduce_to) == factor   # portrait: the same short side


@pytest.mark.parametrize("reduce_to, factor", [(0, 1), (448, 2), (400, 4), (200, 8)])
def test_jpeg_is_decoded_at_the_dct_scale(reduce_to, factor):
    result = decode_image(JPEG, reduce_to=reduce_to)
    assert result.scale == factor
    assert result.pixels.shape == (-(-1600 // factor), -(-2000 // factor))
    assert (result.orig_height, result.orig_width) == (1600, 2000)   # the file's size, not the decoded one
    if factor > 1:
        full = cv2.resize(decode_image(JPEG).pixels, result.pixels.shape[::-1], interpolation=cv2.INTER_AREA)
        assert np.abs(full.astype(int) - result.pixels).mean() < 1.5


def test_other_formats_are_area_shrunk_by_the_same_power_of_two():
    result = decode_image(PNG, reduce_to=400)
    assert result.scale == 4 and result.pixels.shape == (400, 500) and result.pixels.dtype == np.uint8
    np.testing.assert_array_equal(result.pixels, cv2.resize(BIG, (500, 400), interpolation=cv2.INTER_AREA))
    big16 = (BIG.astype(np.uint16) * 257)
    result16 = decode_image(cv2.imencode(".png", big16)[1].tobytes(), reduce_to=448)
    assert result16.scale == 2 and result16.pixels.dtype == np.uint16 and result16.pixels.shape == (800, 1000)


def test_dicom_is_area_shrunk_after_its_display_values():
    pixels = (_picture(600, 520).astype(np.uint16) * 16)
    data = synthetic_dicom(pixels, photometric="MONOCHROME2")
    full, reduced = decode_image(data), decode_image(data, reduce_to=150)
    assert reduced.scale == 2 and reduced.pixels.shape == (300, 260)
    assert (reduced.orig_height, reduced.orig_width) == (600, 520)
    expected = cv2.resize(full.pixels, (260, 300), interpolation=cv2.INTER_AREA)
    np.testing.assert_array_equal(reduced.pixels, expected)


def test_exif_rotated_jpeg_reports_its_stored_size_either_way():
    from io import BytesIO

    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = 6   # rotate 90 degrees on display
    buf = BytesIO()
    Image.fromarray(BIG).save(buf, "JPEG", quality=90, exif=exif.tobytes())
    full, reduced = decode_image(buf.getvalue()), decode_image(buf.getvalue(), reduce_to=448)
    assert full.pixels.shape == (2000, 1600) and reduced.pixels.shape == (1000, 800)   # rotated by OpenCV
    assert (reduced.orig_height, reduced.orig_width) == (full.orig_height, full.orig_width) == (2000, 1600)


@pytest.mark.parametrize("data", [JPEG, PNG], ids=["jpeg", "png"])
def test_auto_output_is_close_to_the_full_decode(data):
    off = preprocess_bytes(data, PreprocessParams(size=224))[1]
    auto = preprocess_bytes(data, PreprocessParams(size=224, decode_reduction="auto"))[1]
    assert off.shape == auto.shape == (224, 224)
    corr = np.corrcoef(off.ravel().astype(float), auto.ravel().astype(float))[0, 1]
    assert corr > 0.99 and np.abs(off.astype(int) - auto).mean() < 4, corr
    assert not np.array_equal(off, auto)   # the reduced decode really ran


def test_small_images_are_never_reduced():
    small = cv2.imencode(".jpg", _picture(400, 500))[1].tobytes()
    a = preprocess_bytes(small, PreprocessParams(size=224))[1]
    b = preprocess_bytes(small, PreprocessParams(size=224, decode_reduction="auto"))[1]
    np.testing.assert_array_equal(a, b)


def test_params_round_trip_and_old_params_mean_off():
    params = PreprocessParams(size=128, decode_reduction="auto", on_damaged="flag")
    record = json.loads(json.dumps(params.to_dict()))   # as metrics.json / manifest.json keep it
    assert PreprocessParams.from_dict(record) == params
    old = {k: v for k, v in record.items() if k not in ("decode_reduction", "on_damaged", "time_limit_s")}
    assert PreprocessParams.from_dict(old).decode_reduction == "off"
    assert PreprocessParams.from_dict(old).on_damaged == "reject"
    # scoring repeats the model's reduction; the damage policy is the run's own
    run = scoring_params(record, {"preprocess": {"on_damaged": "reject", "time_limit_s": 3}})
    assert (run.decode_reduction, run.on_damaged, run.time_limit_s) == ("auto", "reject", 3.0)
    assert params_mismatch(old, {**old, "decode_reduction": "off"}) == {}
    assert params_mismatch(old, {**old, "decode_reduction": "auto"}) == {"decode_reduction": ("off", "auto")}
    with pytest.raises(ValueError, match="decode_reduction"):
        PreprocessParams(decode_reduction="half")


def test_config_and_cli_set_it():
    assert PreprocessParams.from_config(load_config()["preprocess"]).decode_reduction in ("off", "auto")
    conf = load_config(overrides={"preprocess.decode_reduction": "auto", "preprocess.on_damaged": "flag"})
    params = PreprocessParams.from_config(conf["preprocess"])
    assert (params.decode_reduction, params.on_damaged, params.reduce_to) == ("auto", "flag", 2 * params.size)


def test_real_jpegs_keep_their_look():
    """The shared X-rays (1-2.6 MP JPEGs): auto vs off outputs at 224 px stay nearly identical."""
    folder = shared_data("cxr")
    files = sorted(folder.rglob("*.jp*g"))[::40]
    off, auto = PreprocessParams(size=224), PreprocessParams(size=224, decode_reduction="auto")
    scales = []
    for path in files:
        data = path.read_bytes()
        decoded, a = preprocess_bytes(data, auto)
        b = preprocess_bytes(data, off)[1]
        scales.append(decoded.scale)
        assert np.corrcoef(a.ravel().astype(float), b.ravel().astype(float))[0, 1] > 0.99, path.name
    assert max(scales) >= 2, scales
