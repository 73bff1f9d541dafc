"""A corpus of damaged files made from real X-rays and DICOM samples: what a years-old archive really holds.

Bit rot, downloads cut short, headers overwritten, one file's header glued to another's body, chunks written
twice, runs of zeros from a bad sector. Each mutated file must end in exactly one of the preprocess job's
images / errors / duplicates tables, quickly, without taking a worker down (tests/test_fuzz.py). Sources
are downscaled before mutating (small files keep the corpus fast; the damage is the point, not the size)
and re-encoded in the ways archives store them: baseline, progressive and restart-marker JPEG, 8- and
16-bit PNG, uncompressed, RLE and JPEG 2000 DICOM, plus ACR-NEMA files as they are.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

__all__ = ["MUTATIONS", "Source", "mutate", "sources_from", "write_corpus"]

MUTATIONS = ("bit_flips", "truncate", "header_damage", "splice_header", "repeat_chunk", "zero_run")
_RASTER = (".jpg", ".jpeg", ".png")


@dataclass(frozen=True)
class Source:
    name: str  # file name stem + extension, e.g. "covid-02b76460-progressive.jpg"
    data: bytes


def _small(gray: np.ndarray, side: int) -> np.ndarray:
    h, w = gray.shape
    scale = side / min(h, w)
    if scale >= 1:
        return gray
    return cv2.resize(gray, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)


def _raster_sources(folder: Path, n: int, side: int) -> list[Source]:
    """n real X-rays spread over the folder, each as baseline / progressive / restart-marker JPEG and PNG."""
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in _RASTER)
    picked = files[:: max(1, len(files) // n)][:n]
    out = []
    for i, path in enumerate(picked):
        gray = cv2.imdecode(np.fromfile(path, np.uint8), cv2.IMREAD_GRAYSCALE)
        if gray is None:
            continue
        small = _small(gray, side)
        stem = f"{path.parent.name.lower()}-{path.stem[:24]}"
        variants = {
            "baseline.jpg": cv2.imencode(".jpg", small, [cv2.IMWRITE_JPEG_QUALITY, 90])[1],
            "progressive.jpg": cv2.imencode(".jpg", small, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])[1],
            "restart.jpg": cv2.imencode(".jpg", small, [cv2.IMWRITE_JPEG_RST_INTERVAL, 4])[1],
            "8bit.png": cv2.imencode(".png", small)[1],
        }
        if i % 3 == 0:  # 12 bits stored in 16, as hospital exports do
            variants["12bit.png"] = cv2.imencode(".png", (small.astype(np.uint16) * 16))[1]
        out += [Source(f"{stem}-{kind}", buf.tobytes()) for kind, buf in variants.items()]
    return out


def _dicom_sources(folder: Path, side: int) -> list[Source]:
    """Every DICOM sample downscaled and re-encoded uncompressed, as RLE and as JPEG 2000; small ones as they are."""
    import pydicom
    from pydicom.uid import JPEG2000Lossless, RLELossless

    out = []
    for path in sorted(folder.glob("*.dcm")):
        raw = path.read_bytes()
        stem = path.stem[-24:]
        if len(raw) < 500_000:
            out.append(Source(f"{stem}-asis.dcm", raw))
        try:
            ds = pydicom.dcmread(io.BytesIO(raw), force=True)
            frame = ds.pixel_array
        except Exception:
            continue
        if frame.ndim != 2:
            continue
        small = np.ascontiguousarray(_small(frame, side))
        for kind, syntax in (("plain", None), ("rle", RLELossless), ("j2k", JPEG2000Lossless)):
            try:
                copy = pydicom.dcmread(io.BytesIO(raw), force=True)
                copy.Rows, copy.Columns = small.shape
                if syntax is None:
                    if copy.file_meta.TransferSyntaxUID.is_compressed:
                        copy.decompress()
                        copy.Rows, copy.Columns = small.shape
                    copy.PixelData = small.astype(frame.dtype).tobytes()
                else:
                    copy.compress(syntax, small)
                buf = io.BytesIO()
                copy.save_as(buf, enforce_file_format=False)
                out.append(Source(f"{stem}-{kind}.dcm", buf.getvalue()))
            except Exception:  # an encoder plugin missing here: fewer variants, not a broken corpus
                continue
    return out


def sources_from(cxr_dir: Path | str, dicom_dir: Path | str | None = None, n_images: int = 12,
                 side: int = 160) -> list[Source]:
    """Seed files for mutation: downscaled real X-rays in several encodings, and DICOM samples."""
    sources = _raster_sources(Path(cxr_dir), n_images, side)
    if dicom_dir is not None and Path(dicom_dir).is_dir():
        sources += _dicom_sources(Path(dicom_dir), side)
    return sources


def _header_len(data: bytes) -> int:
    """Bytes before the pixel data, roughly: where header damage hurts and where a splice is cut."""
    if data[:3] == b"\xff\xd8\xff":
        sos = data.find(b"\xff\xda")
        return sos + 2 if sos > 0 else min(len(data), 600)
    if data[:4] == b"\x89PNG":
        idat = data.find(b"IDAT")
        return idat + 4 if idat > 0 else 33
    pixel = data.rfind(b"\xe0\x7f\x10\x00")  # DICOM (7FE0,0010) little endian
    return pixel + 12 if pixel > 0 else min(len(data), 400)


def mutate(data: bytes, mutation: str, rng: np.random.Generator, other: bytes | None = None) -> bytes:
    """One damaged copy of `data`; `other` (another file) is needed for splice_header."""
    n = len(data)
    buf = bytearray(data)
    head = max(8, min(_header_len(data), n - 1))
    if mutation == "bit_flips":
        for pos in rng.integers(0, n, size=int(rng.integers(1, 9))):
            buf[pos] ^= 1 << int(rng.integers(0, 8))
    elif mutation == "truncate":
        return bytes(buf[:int(rng.integers(1, n))])
    elif mutation == "header_damage":
        for pos in rng.integers(0, head, size=int(rng.integers(1, 9))):
            buf[pos] = int(rng.integers(0, 256))
    elif mutation == "splice_header":
        donor = other if other is not None else data
        cut = max(8, min(_header_len(donor), len(donor)))
        return bytes(donor[:cut]) + bytes(buf[min(head, n):])
    elif mutation == "repeat_chunk":
        length = int(rng.integers(16, min(4096, max(17, n // 4))))
        start = int(rng.integers(0, max(1, n - length)))
        return bytes(buf[:start + length]) + bytes(buf[start:])
    elif mutation == "zero_run":
        length = int(rng.integers(16, min(2048, max(17, n // 4))))
        start = int(rng.integers(head, max(head + 1, n - length)))
        buf[start:start + length] = bytes(min(length, n - start))
    else:
        raise ValueError(f"unknown mutation {mutation!r}; expected one of {MUTATIONS}")
    return bytes(buf)


def write_corpus(out_dir: Path | str, sources: list[Source], n: int = 1000, seed: int = 0) -> list[dict]:
    """n mutated files in out_dir, every mutation applied to every source in turn; returns one record per file."""
    if not sources:
        raise ValueError("no source files to mutate")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        source = sources[i % len(sources)]
        mutation = MUTATIONS[(i // len(sources)) % len(MUTATIONS)]
        other = sources[int(rng.integers(0, len(sources)))].data
        data = mutate(source.data, mutation, rng, other)
        name = f"{i:04d}-{mutation}-{source.name}"
        (out / name).write_bytes(data)
        records.append({"name": name, "source": source.name, "mutation": mutation, "bytes": len(data)})
    return records
