import cv2
import numpy as np
import pytest

from cxr.image.enhance import adjust_brightness, clahe, equalize_hist, resize_square, to_square, to_uint8
from cxr.image.pipeline import PreprocessParams, preprocess_pixels, preprocess_stages


def _xray_like(rng, shape=(300, 240), dtype=np.uint8):
    top = 255 if dtype == np.uint8 else 65535
    y, x = np.mgrid[:shape[0], :shape[1]]
    base = 0.3 + 0.4 * np.exp(-((x - shape[1] / 2) ** 2) / (2 * (shape[1] / 5) ** 2))
    image = np.clip(base + 0.08 * rng.standard_normal(shape), 0, 1) * top * 0.7
    return image.astype(dtype)


@pytest.mark.parametrize("seed", range(6))
def test_study_histogram_equalization_equals_opencv(seed):
    rng = np.random.default_rng(seed)
    image = _xray_like(rng) if seed % 2 else rng.integers(20, 200, size=(97, 131), dtype=np.uint8)
    np.testing.assert_array_equal(equalize_hist(image), cv2.equalizeHist(image))


def test_study_formula_in_real_numbers_is_within_one_level():
    """The study's T(i) = (cdf - cdf_min) / (MN - cdf_min) * 255 in float64 differs from OpenCV by rounding only."""
    image = _xray_like(np.random.default_rng(3))
    hist = np.bincount(image.ravel(), minlength=256)
    cdf = np.cumsum(hist)
    cdf_min = cdf[np.flatnonzero(hist)[0]]
    exact = np.rint((cdf[image] - cdf_min) / (image.size - cdf_min) * 255)
    assert np.abs(exact - cv2.equalizeHist(image).astype(float)).max() <= 1


def test_equalization_of_constant_and_16_bit_images():
    flat = np.full((64, 64), 77, np.uint8)
    np.testing.assert_array_equal(equalize_hist(flat), cv2.equalizeHist(flat))
    deep = _xray_like(np.random.default_rng(1), dtype=np.uint16)
    out = equalize_hist(deep)
    assert out.dtype == np.uint16 and out.max() == 65535 and out.min() == 0
    # monotone: the mapping never swaps the order of two intensities
    order = np.argsort(deep.ravel(), kind="stable")
    assert np.all(np.diff(out.ravel()[order].astype(np.int64)) >= 0)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_clahe_equals_opencv_with_the_same_parameters(dtype):
    image = _xray_like(np.random.default_rng(2), dtype=dtype)
    expected = cv2.createCLAHE(clipLimit=3.0, tileGridSize=(4, 4)).apply(image)
    np.testing.assert_array_equal(clahe(image, 3.0, 4), expected)


def test_16_bit_keeps_its_high_byte():
    deep = np.array([[0, 257, 65535, 32896]], np.uint16)
    np.testing.assert_array_equal(to_uint8(deep), [[0, 1, 255, 128]])
    # a 16-bit ramp with every low byte 0 must not become black
    ramp = (np.arange(256, dtype=np.uint16) << 8).reshape(16, 16)
    assert to_uint8(ramp).max() >= 254


def test_brightness_is_saturating_linear():
    image = np.array([[0, 100, 250]], np.uint8)
    np.testing.assert_array_equal(adjust_brightness(image, 1.0, 10), [[10, 110, 255]])
    np.testing.assert_array_equal(adjust_brightness(image, 1.2, 0), [[0, 120, 255]])


def test_resize_modes():
    wide = np.zeros((100, 200), np.uint8)
    wide[:, 95:105] = 255                      # a bright bar in the centre
    assert resize_square(wide, 64, "stretch").shape == (64, 64)
    padded = to_square(wide, "pad")
    assert padded.shape == (200, 200) and padded[:50].max() == 0          # aspect kept: bands above and below
    cropped = to_square(wide, "crop")
    assert cropped.shape == (100, 100) and cropped[:, 45:55].min() == 255  # centre kept
    with pytest.raises(ValueError):
        to_square(wide, "zoom")


def test_pipeline_stages_follow_the_study_order():
    image = _xray_like(np.random.default_rng(4), dtype=np.uint16)
    params = PreprocessParams(size=64, clip_limit=2.0, tile_grid=8, brightness_beta=10)
    stages = preprocess_stages(image, params)
    np.testing.assert_array_equal(stages["equalized"], clahe(image, 2.0, 8))
    np.testing.assert_array_equal(stages["brightness"], adjust_brightness(to_uint8(stages["equalized"]), 1.0, 10))
    out = preprocess_pixels(image, params)
    assert out.shape == (64, 64) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, cv2.resize(stages["brightness"], (64, 64), interpolation=cv2.INTER_AREA))


def test_params_refuse_nonsense():
    with pytest.raises(ValueError):
        PreprocessParams(method="median")
    with pytest.raises(ValueError):
        PreprocessParams(resize_mode="zoom")
