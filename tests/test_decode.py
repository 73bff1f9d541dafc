"""cxr.image.decode and cxr.image.badfiles, without Spark.

Every decoded image is compared with an independent reading (Pillow for raster files, plain pydicom +
numpy for DICOM); every bad input must raise RejectedImage with the expected stage and a telling reason.
"""

from __future__ import annotations

import csv
import dataclasses
import struct
import time
import zlib
from functools import lru_cache
from io import BytesIO
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import FileMetaDataset
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from pydicom.uid import ImplicitVRLittleEndian

from cxr.image import decode as decode_module
from cxr.image.badfiles import UNICODE_NAME, bad_inputs, synthetic_dicom, write_bad_inputs
from cxr.image.decode import DecodedImage, decode_image, sniff_format
from cxr.image.rejection import RejectedImage

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DICOM_DIR = SHARED_DATA / "dicom"
NO_SHARED = f"shared data folder {SHARED_DATA} is absent (it holds the public DICOM samples)"


def _texture(height=150, width=120, seed=0, top=255) -> np.ndarray:
    """Smooth gradient + blob + mild noise: compresses like a photo, never blank."""
    y, x = np.mgrid[0:height, 0:width]
    picture = 0.3 + 0.4 * x / width + 0.25 * np.sin(y / 9.0) * np.cos(x / 13.0)
    picture += np.random.default_rng(seed).normal(0, 0.02, picture.shape)
    return (np.clip(picture, 0, 1) * top).astype(np.uint8 if top <= 255 else np.uint16)


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    buf = BytesIO()
    image.save(buf, fmt, **options)
    return buf.getvalue()


def _rejected(data: bytes, **kwargs) -> RejectedImage:
    with pytest.raises(RejectedImage) as info:
        decode_image(data, **kwargs)
    return info.value


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a[::3, ::3].ravel().astype(np.float64), b[::3, ::3].ravel().astype(np.float64))[0, 1])


# ------------------------------------------------------------------------------------------ raster

GRAY, GRAY16 = _texture(), _texture(top=60000)
RGB = np.dstack([_texture(seed=s) for s in (1, 2, 3)])
RGB[..., 2] = 255 - RGB[..., 2]  # channels differ, so the gray formula matters

# id: (file bytes, source_format, color_mode, dtype, max |diff| vs Pillow, max mean |diff|)
RASTER = {
    "png8": (_encode(Image.fromarray(GRAY), "PNG"), "PNG", "L", np.uint8, 0, 0),
    "png16": (_encode(Image.fromarray(GRAY16), "PNG"), "PNG", "I;16", np.uint16, 0, 0),
    "jpeg_gray": (_encode(Image.fromarray(GRAY), "JPEG", quality=92), "JPEG", "L", np.uint8, 1, 0.05),
    "bmp8": (_encode(Image.fromarray(GRAY), "BMP"), "BMP", "L", np.uint8, 0, 0),
    "bmp_rgb": (_encode(Image.fromarray(RGB), "BMP"), "BMP", "RGB", np.uint8, 1, 0.6),
    "tiff8": (_encode(Image.fromarray(GRAY), "TIFF"), "TIFF", "L", np.uint8, 0, 0),
    "tiff16": (_encode(Image.fromarray(GRAY16), "TIFF"), "TIFF", "I;16", np.uint16, 0, 0),
    "png_rgb": (_encode(Image.fromarray(RGB), "PNG"), "PNG", "RGB", np.uint8, 1, 0.6),
    "png_rgba": (_encode(Image.fromarray(np.dstack([RGB, GRAY]), "RGBA"), "PNG"), "PNG", "RGBA", np.uint8, 1, 0.6),
    "png_gray_alpha": (_encode(Image.merge("LA", [Image.fromarray(GRAY), Image.fromarray(255 - GRAY)]), "PNG"),
                       "PNG", "LA", np.uint8, 0, 0),
    "png_palette": (_encode(Image.fromarray(GRAY).convert("P"), "PNG"), "PNG", "P", np.uint8, 1, 0.6),
    # colour JPEG: OpenCV takes luma straight from the codec, Pillow goes through RGB: small differences
    "jpeg_rgb": (_encode(Image.fromarray(RGB), "JPEG", quality=92), "JPEG", "RGB", np.uint8, 6, 0.8),
    "jpeg_cmyk": (_encode(Image.fromarray(RGB).convert("CMYK"), "JPEG", quality=92), "JPEG", "CMYK", np.uint8, 6, 1.5),
    "webp_lossless": (_encode(Image.fromarray(RGB), "WEBP", lossless=True), "WEBP", "RGB", np.uint8, 1, 0.6),
    "gif": (_encode(Image.fromarray(GRAY), "GIF"), "GIF", "P", np.uint8, 0, 0),  # Pillow opens GIFs as palette
    "jpeg2000": (_encode(Image.fromarray(GRAY16), "JPEG2000"), "JPEG2000", "I;16", np.uint16, 0, 0),  # lossless
}


def _pillow_gray(data: bytes) -> np.ndarray:
    """Independent reading: Pillow, full depth for 16-bit, its own colour -> L conversion otherwise."""
    with Image.open(BytesIO(data)) as im:
        return np.asarray(im) if im.mode.startswith("I;16") else np.asarray(im.convert("L"))


@pytest.mark.parametrize("case", list(RASTER))
def test_raster_matches_pillow(case):
    data, fmt, mode, dtype, max_diff, mean_diff = RASTER[case]
    result = decode_image(data)
    ref = _pillow_gray(data)
    assert isinstance(result, DecodedImage)
    assert (result.source_format, result.color_mode, result.orig_dtype) == (fmt, mode, np.dtype(dtype).name)
    assert result.pixels.dtype == dtype and result.pixels.ndim == 2 and result.pixels.flags.c_contiguous
    assert result.pixels.shape == ref.shape == (result.orig_height, result.orig_width) == GRAY.shape
    diff = np.abs(result.pixels.astype(np.int64) - ref.astype(np.int64))
    assert diff.max() <= max_diff and diff.mean() <= mean_diff, (diff.max(), diff.mean())


@pytest.mark.parametrize("case", ["png16", "tiff16", "jpeg2000"])
def test_16bit_keeps_high_byte(case):
    result = decode_image(RASTER[case][0])
    assert result.pixels.max() > 255  # not truncated to the low byte, not scaled down to 8 bits
    np.testing.assert_array_equal(result.pixels, GRAY16)
    unchanged = cv2.imdecode(np.frombuffer(RASTER[case][0], np.uint8), cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(result.pixels, unchanged)


def test_16bit_rgb_png_becomes_16bit_gray():
    rgb16 = np.dstack([GRAY16, GRAY16 // 2, 65535 - GRAY16])
    data = cv2.imencode(".png", rgb16)[1].tobytes()
    result = decode_image(data)
    assert result.pixels.dtype == np.uint16 and result.orig_dtype == "uint16"
    expected = cv2.cvtColor(rgb16, cv2.COLOR_BGR2GRAY)  # libpng's own conversion differs by a few /65535
    assert np.abs(result.pixels.astype(np.int64) - expected).max() <= 8


def test_float_tiff_is_stretched_to_uint16():
    values = GRAY.astype(np.float32) * 0.01 - 0.5
    result = decode_image(_encode(Image.fromarray(values), "TIFF"))
    assert (result.orig_dtype, result.color_mode, result.pixels.dtype) == ("float32", "F", np.uint16)
    expected = np.rint((values - values.min()) / (values.max() - values.min()) * 65535)
    assert np.abs(result.pixels - expected).max() <= 1


def test_float_tiff_with_nan_is_rejected():
    values = GRAY.astype(np.float32)
    values[5, 5] = np.nan
    error = _rejected(_encode(Image.fromarray(values), "TIFF"))
    assert error.stage == "decode" and "NaN" in error.reason


def test_accepts_bytearray_and_memoryview_and_rejects_other_types():
    data = RASTER["png8"][0]
    for variant in (bytearray(data), memoryview(data)):
        np.testing.assert_array_equal(decode_image(variant).pixels, GRAY)
    for bad in (None, "a string", 42):
        assert _rejected(bad).stage == "read"


def test_result_is_frozen():
    result = decode_image(RASTER["png8"][0])
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.source_format = "PNG"


def test_size_limits_are_parameters():
    data = RASTER["png8"][0]  # 120 x 150
    assert _rejected(data, max_pixels=10_000).stage == "header"
    assert _rejected(data, min_side=121).stage == "validate"
    assert decode_image(data, min_side=120).pixels.shape == (150, 120)


# ------------------------------------------------------------------------------------------- sniff

@pytest.mark.parametrize("case", list(RASTER))
def test_sniff_raster(case):
    assert sniff_format(RASTER[case][0]) == RASTER[case][1]


def test_sniff_dicom_and_non_images():
    dicom = synthetic_dicom()
    assert sniff_format(dicom) == "DICOM"
    assert sniff_format(b"II*\x00" + dicom[4:]) == "DICOM"  # DICM at 128 wins over a TIFF-like preamble
    assert sniff_format(_acr_nema(dicom)) == "DICOM"
    for junk in (b"", b"BM", b"\xff\xd8", b"<html>", b"%PDF-1.7\n" + bytes(200), np.random.default_rng(0).bytes(999),
                 b"\x08\x00" + bytes(300)):
        assert sniff_format(junk) is None, junk[:12]


def _acr_nema(dicom: bytes, implicit: bool = True) -> bytes:
    """The same dataset written the ACR-NEMA way: no preamble, no 'DICM', no File Meta."""
    ds = pydicom.dcmread(BytesIO(dicom))
    ds.file_meta, ds.preamble = FileMetaDataset(), None
    buf = BytesIO()
    pydicom.dcmwrite(buf, ds, implicit_vr=implicit, little_endian=True)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------- DICOM


def _manifest() -> list[dict]:
    if not SHARED_DATA.is_dir():
        return [pytest.param(None, marks=pytest.mark.skip(reason=NO_SHARED), id="no-shared-data")]
    with open(DICOM_DIR / "MANIFEST.csv", newline="") as f:
        return [pytest.param(row, id=row["relative_path"][:24]) for row in csv.DictReader(f)]


@lru_cache(maxsize=None)
def _decoded(name: str) -> DecodedImage:
    return decode_image((DICOM_DIR / name).read_bytes())


def _pydicom_reading(path: Path):
    """Independent reading with plain pydicom: dataset and raw stored values."""
    ds = pydicom.dcmread(path, force=True)
    if "TransferSyntaxUID" not in ds.file_meta:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    return ds, ds.pixel_array


@pytest.mark.parametrize("row", _manifest())
def test_shared_dicom_samples_decode(row):
    result = _decoded(row["relative_path"])
    ds, raw = _pydicom_reading(DICOM_DIR / row["relative_path"])
    bits, photometric = int(row["BitsStored"]), row["PhotometricInterpretation"]
    top = 255 if bits <= 8 else 65535
    assert result.source_format == "DICOM" and result.color_mode == photometric
    assert result.pixels.shape == raw.shape == (int(row["height"]), int(row["width"]))
    assert (result.orig_height, result.orig_width) == raw.shape
    assert result.pixels.dtype == (np.uint8 if bits <= 8 else np.uint16)
    assert result.orig_dtype == ("uint8" if bits <= 8 else "uint16")
    assert result.pixels.flags.c_contiguous
    assert (int(result.pixels.min()), int(result.pixels.max())) == (0, top)  # stretched to the full range
    corr = _corr(result.pixels, raw)
    if photometric == "MONOCHROME1":
        assert corr < -0.9, corr  # inverted: bone (low stored values) is now bright
    else:
        assert corr > 0.9, corr

    # the same numbers as running pydicom's LUTs on the whole image, then a numpy min..max stretch
    shown = apply_voi_lut(apply_modality_lut(raw, ds), ds).astype(np.float64)
    shown = (shown - shown.min()) / (shown.max() - shown.min())
    expected = np.rint((1 - shown if photometric == "MONOCHROME1" else shown) * top)
    assert np.abs(result.pixels - expected).max() <= 1


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=NO_SHARED)
def test_same_radiograph_in_jpeg2000_and_jpeg_ls_decodes_alike():
    j2k, jls = _decoded("RG1_J2KI.dcm").pixels, _decoded("RG1_JLSN.dcm").pixels
    assert _corr(j2k, jls) > 0.99
    assert np.abs(j2k.astype(np.int64) - jls).mean() < 0.02 * 65535


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=NO_SHARED)
@pytest.mark.parametrize("name", ["RG1_J2KI.dcm", "dicom_00000001_000.dcm", "CR-MONO1-10-chest.dcm"])
def test_shared_dicom_cut_short_is_truncated(name):
    data = (DICOM_DIR / name).read_bytes()
    error = _rejected(data[: len(data) * 7 // 10])
    assert error.stage == "decode" and "truncated DICOM" in error.reason


def test_acr_nema_without_preamble_decodes_like_the_file_format():
    dicom = synthetic_dicom()
    reference = decode_image(dicom).pixels
    for implicit in (True, False):
        np.testing.assert_array_equal(decode_image(_acr_nema(dicom, implicit)).pixels, reference)


def test_monochrome1_is_the_inverse_of_monochrome2():
    stored = _texture(top=4095)
    mono1, mono2 = (decode_image(synthetic_dicom(stored, photometric=p)).pixels for p in ("MONOCHROME1", "MONOCHROME2"))
    np.testing.assert_array_equal(mono1.astype(np.int64) + mono2, 65535)
    assert _corr(mono2, stored) > 0.99


def _modified_dicom(**changes) -> bytes:
    ds = pydicom.dcmread(BytesIO(synthetic_dicom(_texture(top=4095), photometric="MONOCHROME2")))
    for key, value in changes.items():
        setattr(ds, key, value)
    buf = BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def test_dicom_multiframe_gives_first_frame():
    first, second = _texture(top=4095), _texture(seed=9, top=4095)[::-1].copy()
    data = _modified_dicom(NumberOfFrames=2, PixelData=first.astype("<u2").tobytes() + second.astype("<u2").tobytes())
    single = decode_image(synthetic_dicom(first, photometric="MONOCHROME2")).pixels
    np.testing.assert_array_equal(decode_image(data).pixels, single)


def test_dicom_window_and_rescale_are_applied():
    stored = _texture(top=4095)
    # a narrow window clips: more pixels at the extremes than in the unwindowed image
    narrow = decode_image(_modified_dicom(WindowCenter=2000, WindowWidth=400)).pixels
    assert (narrow == 0).mean() + (narrow == 65535).mean() > 0.2
    # a negative rescale slope flips the modality values, so the display flips too
    flipped = decode_image(_modified_dicom(RescaleSlope=-1, RescaleIntercept=4095, WindowCenter=2048)).pixels
    assert _corr(flipped, stored) < -0.99
    # a window that misses every pixel is ignored instead of blanking a real image
    missed = decode_image(_modified_dicom(WindowCenter=60000, WindowWidth=10)).pixels
    assert _corr(missed, stored) > 0.99


def test_colour_dicom_becomes_gray():
    rgb = RGB
    data = _modified_dicom(SamplesPerPixel=3, PhotometricInterpretation="RGB", PlanarConfiguration=0,
                           BitsAllocated=8, BitsStored=8, HighBit=7, PixelData=rgb.tobytes())
    result = decode_image(data)
    assert result.pixels.shape == rgb.shape[:2] and result.pixels.dtype == np.uint8 and result.color_mode == "RGB"
    assert _corr(result.pixels, cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)) > 0.99


def test_dicom_bomb_is_refused_from_the_header(monkeypatch):
    monkeypatch.setattr(decode_module, "pixel_array", _must_not_decode)
    error = _rejected(_modified_dicom(Rows=65535, Columns=65535))
    assert error.stage == "header" and "decompression bomb" in error.reason


def _must_not_decode(*args, **kwargs):
    raise AssertionError("pixels decoded although the header already says no")


# -------------------------------------------------------------------------------------- bad inputs

CORPUS = bad_inputs()
TELLING_WORDS = {
    "empty.png": "empty",
    "truncated.jpg": "truncated JPEG",
    "truncated.png": "truncated PNG",
    "error_page.png": "<!DOCTYPE html",
    "random_bytes.jpg": "not a recognised image format",
    "bomb_100000x100000.png": "decompression bomb",
    "corrupt.dcm": "corrupt DICOM",
    "truncated_pixels.dcm": "truncated DICOM",
    "no_pixel_data.dcm": "DICOM file has no pixel data",
    "tiny_1x1.png": "smaller than the 64-pixel minimum",
    "thin_8x3000.png": "smaller than the 64-pixel minimum",
    "blank.png": "blank (every pixel is 200)",
}


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("bad inputs")
    return directory, write_bad_inputs(directory)


@pytest.mark.parametrize("name", list(CORPUS))
def test_bad_input_corpus(corpus_dir, name):
    directory, expected = corpus_dir
    data = (directory / name).read_bytes()  # read back from disk: non-ASCII names must survive
    if expected[name] == "ok":
        result = decode_image(data)
        assert result.pixels.ndim == 2 and min(result.pixels.shape) >= 64
    else:
        error = _rejected(data)
        assert error.stage == expected[name], error
        assert TELLING_WORDS[name] in error.reason, error.reason
        assert str(error) == f"{error.stage}: {error.reason}"


def test_corpus_covers_the_brief(corpus_dir):
    directory, expected = corpus_dir
    assert sorted(p.name for p in directory.iterdir()) == sorted(expected)
    assert set(TELLING_WORDS) == {name for name, stage in expected.items() if stage != "ok"}
    assert {"gray16.png", "rgba.png", "cmyk.jpg", UNICODE_NAME} <= {n for n, s in expected.items() if s == "ok"}
    assert " " in UNICODE_NAME and not UNICODE_NAME.isascii()
    assert decode_image(CORPUS["gray16.png"][0]).pixels.max() > 255
    assert decode_image(CORPUS["cmyk.jpg"][0]).color_mode == "CMYK"
    assert decode_image(CORPUS["rgba.png"][0]).color_mode == "RGBA"


def test_bomb_png_is_well_formed_and_refused_before_decoding(monkeypatch):
    bomb = CORPUS["bomb_100000x100000.png"][0]
    length, kind = struct.unpack_from(">I4s", bomb, 8)
    assert kind == b"IHDR" and struct.unpack_from(">II", bomb, 16) == (100_000, 100_000)
    assert struct.unpack_from(">I", bomb, 16 + length)[0] == zlib.crc32(bomb[12:16 + length])  # valid CRC
    monkeypatch.setattr(decode_module.cv2, "imdecode", _must_not_decode)
    start = time.perf_counter()
    error = _rejected(bomb)
    assert error.stage == "header" and "100000x100000" in error.reason
    assert time.perf_counter() - start < 0.5


# ------------------------------------------------------------------------------------------ fuzzing

def test_damaged_files_only_ever_raise_rejected_image():
    """Cut, overwrite and splice valid files: the result is an image or a RejectedImage, never a crash."""
    sources = [RASTER[c][0] for c in ("png8", "png16", "jpeg_rgb", "bmp8", "tiff16", "webp_lossless", "gif")]
    sources += [synthetic_dicom(), _acr_nema(synthetic_dicom())]
    rng = np.random.default_rng(2024)
    outcomes = {"ok": 0}
    for source in sources:
        for _ in range(12):
            data = bytearray(source)
            cut = int(rng.integers(1, len(data)))
            action = rng.integers(3)
            if action == 0:
                data = data[:cut]
            elif action == 1:
                data[cut:cut + 8] = rng.bytes(8)
            else:
                data = data[:cut] + rng.bytes(int(rng.integers(1, 64))) + data[cut:]
            try:
                decode_image(bytes(data), max_pixels=2_000_000)
                outcomes["ok"] += 1
            except RejectedImage as error:
                assert error.stage in {"read", "sniff", "header", "decode", "validate"}
                assert error.reason and "object at 0x" not in error.reason
                outcomes[error.stage] = outcomes.get(error.stage, 0) + 1
    assert len(outcomes) >= 3, outcomes
