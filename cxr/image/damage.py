"""Decoder warnings, per file: the difference between a whole image and a damaged one that decoded anyway.

libjpeg fills what it cannot decode with grey and only prints "Corrupt JPEG data: premature end of data
segment" to stderr; libpng prints its warnings there too, and OpenCV passes neither on. So each cv2.imdecode
runs with file descriptor 2 pointed at a scratch file (a Spark Python worker decodes one file at a time in its
main thread), and what the codecs wrote is read back and sorted: damage (kept as short readable warnings) or
harmless notes (an sRGB profile remark: written back to the real stderr). PNG chunk CRCs are checked in
Python only when libpng failed or warned, so whole files cost nothing extra.
"""
from __future__ import annotations

import atexit
import contextlib
import os
import re
import struct
import sys
import tempfile
import zlib
from typing import Iterator

from cxr.image.deadline import uninterrupted

__all__ = ["ON_DAMAGED", "decoder_messages", "damage_of", "png_crc_errors", "png_with_fixed_crcs",
           "damaged_reason"]

ON_DAMAGED = ("reject", "flag")

_DAMAGE = re.compile(r"corrupt|premature|extraneous|crc|too much|not enough|extra compressed|zlib|data check|"
                     r"truncat|huffman|invalid|bogus|inconsistent|bad |damaged|read error", re.I)
_HARMLESS = re.compile(r"profile|iccp|jfif revision|thumbnail|unknown field|unknown tag|exif", re.I)
_PREFIX = re.compile(r"^(libpng (warning|error)|libjpeg|libtiff|warning)\s*:\s*", re.I)

_SINK: dict[int, object] = {}  # pid -> scratch file (a forked worker must not share its parent's offset)


def _sink():
    pid = os.getpid()
    if pid not in _SINK:
        _SINK.clear()
        _SINK[pid] = tempfile.TemporaryFile()
        atexit.register(_SINK[pid].close)
    return _SINK[pid]


@contextlib.contextmanager
def decoder_messages() -> Iterator[list[str]]:
    """Collect what C code writes to fd 2 inside the block, one entry per line (filled when the block ends).

    The redirection is one uninterrupted section: a time-limit alarm is raised only after fd 2 is restored.
    """
    lines: list[str] = []
    with uninterrupted():
        try:
            sys.stderr.flush()
            fd = _sink().fileno()
            saved = os.dup(2)
        except (OSError, ValueError):  # no usable fd 2 (closed, odd host): decode without listening
            yield lines
            return
        os.dup2(fd, 2)
        try:
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            size = os.lseek(fd, 0, os.SEEK_CUR)
            if size:
                os.lseek(fd, 0, os.SEEK_SET)
                text = os.read(fd, min(size, 1 << 16)).decode("utf-8", "replace")
                os.ftruncate(fd, 0)
                os.lseek(fd, 0, os.SEEK_SET)
                lines.extend(line.strip() for line in text.splitlines() if line.strip())


def _readable(message: str) -> str:
    """'Corrupt JPEG data: premature end of data segment' -> 'corrupt JPEG data, premature end of data segment'."""
    text = _PREFIX.sub("", message).strip().rstrip(".")
    text = text.replace("Corrupt JPEG data: ", "corrupt JPEG data, ")
    return text[:1].lower() + text[1:] if text[:2] != text[:2].upper() else text


def damage_of(lines: list[str], codec: str) -> list[str]:
    """The damage among captured codec lines, as readable warnings; anything else goes back to stderr."""
    found, other = [], []
    for line in lines:
        (found if _DAMAGE.search(line) and not _HARMLESS.search(line) else other).append(line)
    if other:
        try:
            sys.stderr.write("".join(f"{line}\n" for line in other))
        except (OSError, ValueError):
            pass
    out = []
    for line in found:
        text = _readable(line)
        if codec == "PNG" and not re.search(r"png|jpeg", text, re.I):
            text = f"PNG {text}"
        if text not in out:
            out.append(text)
    return out


def _png_chunks(data: bytes) -> Iterator[tuple[int, bytes, int, int]]:
    """(offset, type, data length, stored crc) of each complete chunk after the signature."""
    pos, n = 8, len(data)
    while pos + 12 <= n:
        length, kind = struct.unpack_from(">I4s", data, pos)
        if pos + 12 + length > n:
            return
        yield pos, kind, length, struct.unpack_from(">I", data, pos + 8 + length)[0]
        if kind == b"IEND":
            return
        pos += 12 + length


def png_crc_errors(data: bytes) -> list[str]:
    """'PNG chunk IDAT at byte 57 fails its CRC check' for each chunk whose stored CRC is wrong."""
    bad = []
    for pos, kind, length, crc in _png_chunks(data):
        if zlib.crc32(data[pos + 4:pos + 8 + length]) != crc:
            name = kind.decode("latin-1") if kind.isalpha() else kind.hex()
            bad.append(f"PNG chunk {name} at byte {pos} fails its CRC check")
    if len(bad) > 2:  # a reason a person reads: the first two, then how many more
        bad = bad[:2] + [f"{len(bad) - 2} more chunks fail their CRC checks"]
    return bad


def png_with_fixed_crcs(data: bytes) -> bytes:
    """The same PNG with every chunk's CRC recomputed: lets libpng decode data whose only fault may be a CRC."""
    out = bytearray(data)
    for pos, kind, length, _ in _png_chunks(data):
        struct.pack_into(">I", out, pos + 8 + length, zlib.crc32(data[pos + 4:pos + 8 + length]))
    return bytes(out)


def damaged_reason(warnings: list[str] | tuple[str, ...]) -> str:
    return "damaged: " + "; ".join(warnings)
