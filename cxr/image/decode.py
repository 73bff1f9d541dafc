"""Raw file bytes -> one grayscale array, or a `RejectedImage` that says in plain words what is wrong.

Runs once per file inside Spark pandas UDFs (and without Spark), so it never raises anything but
`RejectedImage`, checks the claimed size from the header before any pixel is decoded (a 40-byte PNG
can claim 10 gigapixels), and keeps 16-bit depth. Raster formats are decoded by OpenCV (fast, one
call, colour -> gray inside the codec); Pillow is used only to read headers. DICOM goes through pydicom
(+ pylibjpeg plugins for JPEG 2000 / JPEG-LS) and is brought to display values: Modality LUT, VOI
LUT / window, MONOCHROME1 inverted so bone is bright, then stretched to the full uint8/uint16 range.

Two optional behaviours ride along: `reduce_to` (decode a JPEG at a libjpeg DCT scale of 1/2, 1/4 or 1/8,
area-shrink other formats by the same power of two, while the short side stays >= reduce_to: the output is
224 px, decoding 2000 px is waste) and `on_damaged` (codec warnings mean a damaged file that decoded anyway,
see cxr/image/damage.py: "reject" raises, "flag" keeps the image with its `warnings`).
"""

from __future__ import annotations

import re
import struct
import warnings
from dataclasses import dataclass
from io import BytesIO

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from cxr.image.damage import (ON_DAMAGED, damage_of, damaged_reason, decoder_messages, png_crc_errors,
                               png_with_fixed_crcs)
from cxr.image.depth import png_significant_bits
from cxr.image.rejection import RejectedImage

cv2.setNumThreads(1)  # a Spark worker gets one core; OpenCV's own pool would oversubscribe it
Image.MAX_IMAGE_PIXELS = None  # our max_pixels decides, not Pillow's warning/bomb heuristics

__all__ = ["DecodedImage", "decode_image", "reduction_factor", "sniff_format"]


@dataclass(frozen=True)
class DecodedImage:
    pixels: np.ndarray  # 2-D, C-contiguous, grayscale, uint8 or uint16
    source_format: str  # "JPEG", "PNG", "BMP", "TIFF", "WEBP", "GIF", "JPEG2000", "DICOM"
    orig_dtype: str  # depth as stored: "uint8", "uint16", "float32", ...
    color_mode: str  # as stored: Pillow mode ("L", "RGB", "I;16", ...) or DICOM PhotometricInterpretation
    orig_height: int
    orig_width: int
    warnings: tuple[str, ...] = ()  # damage the codec reported (kept only with on_damaged="flag")
    significant_bits: int | None = None  # PNG sBIT: bits really used in a 16-bit file
    scale: int = 1  # pixels are 1/scale of the stored size on each side (reduced decode)


# --------------------------------------------------------------------------------------------- sniff

_MAGIC = [  # (prefix, format); checked after DICOM because a DICOM preamble may hold a TIFF header
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG2000"),
    (b"\xff\x4f\xff\x51", "JPEG2000"),
]
_BMP_DIB_SIZES = {12, 40, 52, 56, 64, 108, 124}  # "BM" alone is too weak a signature
_VR_LONG = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
_VR_SHORT = {b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FD", b"FL", b"IS", b"LO", b"LT",
             b"PN", b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US"}


def sniff_format(data: bytes) -> str | None:
    """Name the format from magic bytes (never from the file name, which may lie), or None."""
    if len(data) >= 132 and data[128:132] == b"DICM":
        return "DICOM"
    for magic, fmt in _MAGIC:
        if data.startswith(magic):
            return fmt
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[:2] == b"BM" and len(data) >= 18 and struct.unpack_from("<I", data, 14)[0] in _BMP_DIB_SIZES:
        return "BMP"
    if _looks_like_acr_nema(data):
        return "DICOM"
    return None


def _looks_like_acr_nema(data: bytes, n_elements: int = 4) -> bool:
    """DICOM without the 128-byte preamble (ACR-NEMA style, e.g. CR-MONO1-10-chest.dcm).

    Accept only if the first few little-endian data elements parse cleanly: first group 0x0002 or
    0x0008, even groups, strictly ascending tags, lengths that fit in the file.
    """
    pos, last = 0, (-1, -1)
    for _ in range(n_elements):
        if pos + 8 > len(data):
            return False
        tag = struct.unpack_from("<HH", data, pos)
        if (last[0] < 0 and tag[0] not in (0x0002, 0x0008)) or tag[0] % 2 or tag <= last:
            return False
        vr = data[pos + 4:pos + 6]
        if vr in _VR_LONG and data[pos + 6:pos + 8] == b"\0\0" and pos + 12 <= len(data):
            length, header = struct.unpack_from("<I", data, pos + 8)[0], 12  # explicit VR, 4-byte length
        elif vr in _VR_SHORT:
            length, header = struct.unpack_from("<H", data, pos + 6)[0], 8  # explicit VR, 2-byte length
        else:
            length, header = struct.unpack_from("<I", data, pos + 4)[0], 8  # implicit VR
        if length == 0xFFFFFFFF:  # undefined length (a sequence): the tags so far were plausible
            return True
        pos, last = pos + header + length, tag
        if pos > len(data):
            return False
    return True


def _describe_start(data: bytes) -> str:
    """The first bytes as a person would recognise them: text if they are text, else hex."""
    head = data[:16]
    if all(32 <= b < 127 or b in b"\t\r\n" for b in head):
        text = (head.decode("ascii").strip().splitlines() or [""])[0]
        hint = ": looks like a web page or XML, not an image" if text.startswith("<") else ""
        return f"file starts with {text!r}{hint}"
    return "file starts with bytes " + head.hex(" ")


# -------------------------------------------------------------------------------------------- decode

def decode_image(data: bytes, *, max_pixels: int = 100_000_000, min_side: int = 64, reduce_to: int = 0,
                 on_damaged: str = "reject") -> DecodedImage:
    """Decode one file's bytes to a 2-D grayscale uint8/uint16 array; raise RejectedImage otherwise.

    reduce_to > 0: decode at the smallest scale (1/2, 1/4, 1/8) keeping the short side >= reduce_to.
    """
    if on_damaged not in ON_DAMAGED:
        raise ValueError(f"on_damaged must be one of {ON_DAMAGED}, got {on_damaged!r}")
    if data is None or not isinstance(data, (bytes, bytearray, memoryview)):
        raise RejectedImage("read", f"no file content (got {type(data).__name__}, expected bytes)")
    data = bytes(data) if not isinstance(data, bytes) else data
    if not data:
        raise RejectedImage("read", "file is empty (0 bytes)")
    fmt = sniff_format(data)
    if fmt is None:
        raise RejectedImage("sniff", f"not a recognised image format ({_describe_start(data)})")
    try:
        if fmt == "DICOM":
            return _decode_dicom(data, max_pixels, min_side, reduce_to, on_damaged)
        return _decode_raster(data, fmt, max_pixels, min_side, reduce_to, on_damaged)
    except RejectedImage:
        raise
    except MemoryError:
        raise RejectedImage("decode", f"ran out of memory decoding this {fmt} file") from None
    except Exception as exc:  # a codec bug or an input nobody foresaw: still one clear row in `errors`
        raise RejectedImage("decode", f"unexpected error decoding {fmt}: {type(exc).__name__}: {exc}") from exc


def _check_size(width: int, height: int, max_pixels: int, min_side: int) -> None:
    """Refuse absurd or tiny claimed sizes before spending time (or memory) on the pixels."""
    if width <= 0 or height <= 0:
        raise RejectedImage("header", f"header claims {width}x{height} pixels: no image to decode")
    if width * height > max_pixels:
        raise RejectedImage(
            "header",
            f"header claims {width}x{height} pixels ({width * height / 1e6:g} megapixels), over the limit "
            f"of {max_pixels / 1e6:g} megapixels: refusing to decode (possible decompression bomb)")
    if min(width, height) < min_side:
        raise RejectedImage(
            "validate",
            f"image is {width}x{height} pixels, smaller than the {min_side}-pixel minimum side for an X-ray")


def _blank(value) -> RejectedImage:
    return RejectedImage("validate", f"image is blank (every pixel is {value:g})")


_CV_DTYPES = (np.uint8, np.int8, np.uint16, np.int16, np.int32, np.float32, np.float64)


def _cv_ready(arr: np.ndarray) -> np.ndarray:
    """OpenCV cannot take uint32 / int64 (e.g. 32-bit DICOM); everything else passes without a copy."""
    return arr if arr.dtype in _CV_DTYPES else arr.astype(np.float64)


def _min_max(arr: np.ndarray) -> tuple[float, float]:
    """Min and max in one C pass (numpy needs two)."""
    lo, hi, _, _ = cv2.minMaxLoc(arr)
    return lo, hi


def _is_constant(arr: np.ndarray) -> bool:
    lo, hi = _min_max(arr)
    return lo == hi


def _stretch(arr: np.ndarray, dtype, *, invert: bool = False) -> np.ndarray:
    """Map min..max linearly onto the full range of `dtype` (one C pass), inverting if asked.

    Used where values have no fixed display scale: DICOM after its LUTs, float / 32-bit rasters.
    """
    arr = _cv_ready(arr)
    lo, hi = _min_max(arr)
    if lo == hi:
        raise _blank(lo)
    out = cv2.normalize(arr, None, 0, np.iinfo(dtype).max, cv2.NORM_MINMAX,
                        dtype=cv2.CV_8U if dtype == np.uint8 else cv2.CV_16U)
    if invert:
        cv2.bitwise_not(out, out)  # max - x, in place
    return out


def reduction_factor(width: int, height: int, reduce_to: int) -> int:
    """The largest of 8, 4, 2 whose scaled short side (rounded up, as libjpeg does) is still >= reduce_to; else 1."""
    if reduce_to > 0:
        short = min(width, height)
        for factor in (8, 4, 2):
            if -(-short // factor) >= reduce_to:
                return factor
    return 1


_JPEG_REDUCED = {2: cv2.IMREAD_REDUCED_GRAYSCALE_2, 4: cv2.IMREAD_REDUCED_GRAYSCALE_4,
                 8: cv2.IMREAD_REDUCED_GRAYSCALE_8}


def _area_reduce(arr: np.ndarray, factor: int) -> np.ndarray:
    """Shrink by `factor` per side with pixel-area averaging, to the sizes libjpeg's scaling would give."""
    if factor == 1:
        return arr
    h, w = arr.shape
    return cv2.resize(arr, (-(-w // factor), -(-h // factor)), interpolation=cv2.INTER_AREA)


def _imdecode(data: bytes, flags: int, fmt: str) -> tuple[np.ndarray | None, list[str]]:
    """cv2.imdecode, with what the codec wrote to stderr sorted into damage warnings."""
    with decoder_messages() as lines:
        try:
            arr = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
        except cv2.error as exc:
            raise RejectedImage("decode", f"OpenCV failed to decode the {fmt} data: {exc}") from None
    return arr, damage_of(lines, fmt)


def _header(data: bytes, fmt: str) -> tuple[int, int, str]:
    """(width, height, Pillow mode) from the header alone (Pillow's open is lazy: no pixels are read)."""
    try:
        with Image.open(BytesIO(data), formats=[fmt]) as im:
            (width, height), mode = im.size, im.mode
    except Exception as exc:
        detail = "no valid header found" if isinstance(exc, UnidentifiedImageError) else f"{type(exc).__name__}: {exc}"
        raise RejectedImage("header", f"cannot read the {fmt} header: file truncated or corrupt ({detail})") from None
    return width, height, mode


def _decode_raster(data: bytes, fmt: str, max_pixels: int, min_side: int, reduce_to: int = 0,
                   on_damaged: str = "reject") -> DecodedImage:
    """Header via Pillow (lazy: reads no pixels), truncation check, then one cv2.imdecode call."""
    header_damage: list[str] = []
    try:
        width, height, mode = _header(data, fmt)
    except RejectedImage:
        header_damage = png_crc_errors(data) if fmt == "PNG" else []  # Pillow refuses chunks with a bad CRC
        if not header_damage:
            raise
        if on_damaged == "reject":
            raise RejectedImage("decode", damaged_reason(header_damage)) from None
        data = png_with_fixed_crcs(data)
        width, height, mode = _header(data, fmt)
    _check_size(width, height, max_pixels, min_side)
    _check_complete(data, fmt)
    factor = reduction_factor(width, height, reduce_to)
    jpeg_scaled = fmt == "JPEG" and factor > 1
    flags = _JPEG_REDUCED[factor] if jpeg_scaled else cv2.IMREAD_GRAYSCALE | cv2.IMREAD_ANYDEPTH
    arr, warnings = _imdecode(data, flags, fmt)
    warnings = header_damage + [w for w in warnings if not header_damage or "crc" not in w.lower()]
    if fmt == "PNG" and (arr is None or warnings) and not header_damage:
        crc = png_crc_errors(data)  # only now: whole files never pay for a second CRC pass
        warnings = crc + [w for w in warnings if "crc" not in w.lower()]
        if crc and arr is None and on_damaged == "flag":  # maybe only the CRC is wrong: let libpng try the data
            arr, more = _imdecode(png_with_fixed_crcs(data), flags, fmt)
            warnings += [w for w in more if w not in warnings]
    if arr is None:
        if warnings:
            raise RejectedImage("decode", f"{damaged_reason(warnings)} (the {fmt} data cannot be decoded)")
        raise RejectedImage("decode", f"OpenCV could not decode the {fmt} data (corrupt, truncated or an "
                                      f"unsupported {fmt} variant)")
    if warnings and on_damaged == "reject":
        raise RejectedImage("decode", damaged_reason(warnings))
    orig_dtype = str(arr.dtype)
    if arr.ndim != 2:
        raise RejectedImage("decode", f"decoder returned a {arr.ndim}-D array {arr.shape}, expected 2-D gray")
    if arr.dtype not in (np.uint8, np.uint16):  # float or 32-bit TIFF: no fixed scale -> stretch
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise RejectedImage("decode", f"{orig_dtype} image contains NaN or infinite values")
        arr = _stretch(arr, np.uint16)
    lo, hi = _min_max(arr)
    if lo == hi:
        raise _blank(lo)
    if jpeg_scaled:  # OpenCV applies EXIF orientation, which may swap the header's sides
        rotated = (arr.shape[0] > arr.shape[1]) != (height > width) and arr.shape[0] != arr.shape[1]
        orig_h, orig_w = (width, height) if rotated else (height, width)
    else:
        orig_h, orig_w = arr.shape
        arr = _area_reduce(arr, factor)
    sbit = png_significant_bits(data) if fmt == "PNG" and arr.dtype == np.uint16 else None
    return DecodedImage(np.ascontiguousarray(arr), fmt, orig_dtype, mode, orig_h, orig_w, tuple(warnings), sbit,
                        factor)


def _check_complete(data: bytes, fmt: str) -> None:
    """Reject files cut short; some decoders would fill the missing rows with grey instead of failing."""
    n = len(data)
    if fmt == "JPEG" and data.rfind(b"\xff\xd9") < data.rfind(b"\xff\xda"):
        # FF D9 cannot occur inside entropy-coded data, so the last scan (SOS) must be followed by EOI
        raise RejectedImage("decode", f"truncated JPEG: no end-of-image marker (FFD9) after the last scan "
                                      f"({n} bytes; the file was probably cut short)")
    if fmt == "PNG":
        pos = 8
        while pos + 8 <= n:  # hop over chunk headers only: length(4) type(4) data crc(4)
            length, kind = struct.unpack_from(">I4s", data, pos)
            pos += 12 + length
            if kind == b"IEND":
                if pos <= n:
                    return
                break
        raise RejectedImage("decode", f"truncated PNG: file ends before the IEND chunk ({n} bytes; the file "
                                      f"was probably cut short)")
    if fmt == "BMP":
        claimed = struct.unpack_from("<I", data, 2)[0]
        if claimed > n:
            raise RejectedImage("decode", f"truncated BMP: header says {claimed} bytes, file has {n}")


# --------------------------------------------------------------------------------------------- DICOM

def dicom():
    """pydicom with its pixel and UID modules, imported at the first DICOM: 0.3-0.5 s of CPU that every process
    decoding PNG/JPEG archives only (each Spark Python worker, the driver) would pay for nothing."""
    import pydicom
    import pydicom.multival
    import pydicom.pixels
    import pydicom.pixels.utils
    import pydicom.uid

    return pydicom


def pixel_array(ds, index: int = 0):
    """pydicom's pixel_array (through dicom(): imported at the first DICOM)."""
    return dicom().pixels.pixel_array(ds, index=index)


def _read_dicom(data: bytes, stop_before_pixels: bool):
    """pydicom dcmread of in-memory bytes; returns (dataset, offset of the pixel data element or None)."""
    fp = BytesIO(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns about every odd tag; we judge the result
            ds = dicom().dcmread(fp, force=True, stop_before_pixels=stop_before_pixels)
    except Exception as exc:
        raise RejectedImage("decode", f"corrupt DICOM: cannot parse the data elements ({type(exc).__name__}: "
                                      f"{exc})") from None
    return ds, (fp.tell() if fp.tell() < len(data) else None)


def _decode_dicom(data: bytes, max_pixels: int, min_side: int, reduce_to: int = 0,
                  on_damaged: str = "reject") -> DecodedImage:
    """Header first (sizes, no pixels), then the pixels of the first frame, then display values."""
    ds, pixel_offset = _read_dicom(data, stop_before_pixels=True)
    if not any(tag.group in (0x0008, 0x0028) for tag in ds.keys()):
        raise RejectedImage("decode", "corrupt DICOM: no valid data elements after the header "
                                      "(the bytes after 'DICM' are not DICOM)")
    if pixel_offset is None:  # the header read ran to the end of the file without meeting (7FE0,0010)
        raise RejectedImage("header", "DICOM file has no pixel data (no (7FE0,0010) element: not an image object)")
    rows, cols = ds.get("Rows"), ds.get("Columns")
    if not rows or not cols:
        raise RejectedImage("header", "DICOM header has no usable Rows/Columns, so the image size is unknown")
    _check_size(int(cols), int(rows), max_pixels, min_side)
    bits = int(ds.get("BitsStored") or ds.get("BitsAllocated") or 16)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()

    ds, _ = _read_dicom(data, stop_before_pixels=False)
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        # pydicom returns an empty dataset when encapsulated (compressed) pixel data is cut short
        raise RejectedImage("decode", f"truncated DICOM: pixel data element at byte {pixel_offset} "
                                      f"cannot be read to its end ({len(data)} bytes in file)")
    if "TransferSyntaxUID" not in ds.file_meta:  # ACR-NEMA / no File Meta: use the encoding pydicom found
        implicit, little = ds.original_encoding
        uid = dicom().uid
        ds.file_meta.TransferSyntaxUID = (uid.ImplicitVRLittleEndian if implicit else
                                          uid.ExplicitVRLittleEndian if little else uid.ExplicitVRBigEndian)
    tsyntax = ds.file_meta.TransferSyntaxUID
    damage: list[str] = []
    if not tsyntax.is_compressed and "PixelData" in ds:
        have, need = len(ds.PixelData), dicom().pixels.utils.get_expected_length(ds, unit="bytes")
        if have < need:
            damage.append(f"truncated DICOM: pixel data has {have} of the {need} bytes that Rows x Columns x "
                            f"Frames x Samples x BitsAllocated ({rows}x{cols}x{ds.get('NumberOfFrames') or 1}x"
                            f"{ds.get('SamplesPerPixel') or 1}x{ds.BitsAllocated}) need")
            if on_damaged == "reject":
                raise RejectedImage("decode", damaged_reason(damage))
            ds.PixelData = ds.PixelData + b"\0" * (need - have)  # flag: the missing part is shown as zeros
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            arr = pixel_array(ds, index=0)  # first frame only, YBR converted to RGB
    except Exception as exc:
        raise RejectedImage("decode", f"cannot decode DICOM pixel data ({tsyntax.name}): {exc}") from None
    damage += _dicom_codec_damage(str(w.message) for w in caught)
    if damage and on_damaged == "reject":
        raise RejectedImage("decode", damaged_reason(damage))

    out_dtype = np.uint8 if bits <= 8 else np.uint16
    orig_dtype = "uint8" if bits <= 8 else "uint16" if bits <= 16 else str(arr.dtype)
    if photometric == "PALETTE COLOR":
        arr = dicom().pixels.apply_color_lut(arr, ds)
    if arr.ndim == 3:  # colour: the LUTs below are for grayscale; just take luminance
        arr = cv2.cvtColor(np.ascontiguousarray(arr), cv2.COLOR_RGB2GRAY)
        pixels = _stretch(arr, out_dtype)
    else:
        pixels = _display_values(arr, ds, out_dtype, invert=photometric == "MONOCHROME1")
    factor = reduction_factor(int(cols), int(rows), reduce_to)
    return DecodedImage(np.ascontiguousarray(_area_reduce(pixels, factor)), "DICOM", orig_dtype, photometric,
                        int(rows), int(cols), tuple(damage), None, factor)


_RLE_LENGTH = re.compile(r"RLE segment .*?(\d+) vs\. (\d+) bytes expected")


def _dicom_codec_damage(messages) -> list[str]:
    """pydicom's RLE decoder only warns when a segment decodes to the wrong length (damaged data); a byte of
    padding is common and harmless, more is damage."""
    found = []
    for message in messages:
        m = _RLE_LENGTH.search(message)
        if m and abs(int(m.group(1)) - int(m.group(2))) > 1:
            found.append(f"DICOM RLE segment decodes to {m.group(1)} bytes, {m.group(2)} expected")
    return found


def _display_values(arr: np.ndarray, ds, dtype, *, invert: bool) -> np.ndarray:
    """Modality LUT (rescale), VOI LUT / window, min..max stretch to `dtype`, MONOCHROME1 inversion.

    For 8/16-bit stored values pydicom's LUT functions run once over the range of values present
    and a 256/65536-entry table applies the result: the same numbers as running them on the image,
    without several float64 passes over a 2000x2000 array (about 5x faster).
    """
    as_table = arr.dtype.kind in "ui" and arr.dtype.itemsize <= 2
    if as_table:
        lo, hi = _min_max(arr)
        src = np.arange(int(lo), int(hi) + 1).astype(arr.dtype)
    else:
        src = arr
    pixels = dicom().pixels
    values = pixels.apply_modality_lut(src, ds)  # stored values -> modality values (e.g. slope/intercept)
    shown = pixels.apply_voi_lut(values, ds, index=0)  # the window / VOI LUT the modality chose
    if shown is not values and "VOILUTSequence" not in ds and float(ds.get("RescaleSlope") or 1) < 0:
        shown = -shown  # pydicom 3.0 maps a window onto a range flipped by a negative slope: undo that
    shown = _cv_ready(shown)
    if _is_constant(shown):
        shown = values  # a window that misses every pixel would blank a real image: ignore it
    out = _stretch(shown, dtype, invert=invert)
    if not as_table:
        return out
    key = f"u{arr.dtype.itemsize}"  # signed values viewed as unsigned index the table directly
    table = np.zeros(256 ** arr.dtype.itemsize, dtype)
    table[src.view(key)] = out.ravel()
    return table[arr.view(key)]
