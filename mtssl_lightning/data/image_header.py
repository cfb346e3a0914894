"""A JPEG's or PNG's size read from its header bytes, for screening large folders quickly.

Screening asks of every file: would Pillow open it? Pillow's answer costs about 140 µs per file
on a CPU core (its JPEG opener walks every marker segment in Python and parses the EXIF block),
which is most of a first screen of ImageNet. :func:`header_size` answers the common case in a few
microseconds by walking the same markers (JPEG) or chunks (PNG) up to the image data, and answers
only when sure: it returns the size when the bytes pass every check Pillow's opener makes on them,
and ``None`` for anything else (other formats, anything unusual, anything broken). The caller then
asks Pillow, whose reason is the one reported — so the fast path never accepts a file Pillow
refuses (``tests/data/test_image_header.py`` fuzzes headers against Pillow).

Not the ``imagesize`` package: it reads sizes but not what makes Pillow refuse a file (sample
precision, layer count, truncated segments, chunk checksums).
"""

from __future__ import annotations

import os
import struct
import zlib

from PIL import Image, JpegImagePlugin, PngImagePlugin

__all__ = ["header_size"]

#: bytes read at once; a typical header (and a camera's EXIF block, skipped by seeking) fits
_BLOCK = 4096

# What Pillow's JPEG opener does at each marker (its own table, so a Pillow upgrade is followed):
# ``length`` markers carry a segment that must be complete in the file; SOF and DQT are checked
# here as Pillow checks them; markers with no handler (RSTn, JPGn, SOI, EOI) and APP segments
# that Pillow parses in ways that can fail (MPF: MPO adoption, Photoshop resources) are left to it.
_SOF = frozenset(m & 0xFF for m, (_, _, h) in JpegImagePlugin.MARKER.items() if h is JpegImagePlugin.SOF)
_DQT = frozenset(m & 0xFF for m, (_, _, h) in JpegImagePlugin.MARKER.items() if h is JpegImagePlugin.DQT)
_APP = frozenset(m & 0xFF for m, (_, _, h) in JpegImagePlugin.MARKER.items() if h is JpegImagePlugin.APP)
_SEGMENT = frozenset(m & 0xFF for m, (_, _, h) in JpegImagePlugin.MARKER.items() if h is not None)
_SOS = 0xDA

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: PNG (bit depth, colour type) pairs Pillow opens: its own table, like the JPEG markers above
_PNG_MODES = frozenset(PngImagePlugin._MODES)
#: chunks that may come before the image data, with the least length Pillow's handler accepts;
#: any other chunk (or a text chunk over 1 MB) is left to Pillow
_PNG_CHUNKS = {b"PLTE": 0, b"gAMA": 4, b"cHRM": 32, b"sRGB": 1, b"pHYs": 9, b"tEXt": 0, b"tIME": 0, b"bKGD": 0, b"sBIT": 0}


class _Reader:
    """Random access to the start of a file through a small window (a skipped segment is never read)."""

    def __init__(self, file, head: bytes) -> None:
        self.file, self.base, self.data = file, 0, head

    def get(self, pos: int, n: int) -> bytes | None:
        """Bytes ``[pos, pos + n)``, or ``None`` when the file ends before."""
        start = pos - self.base
        if start < 0 or start + n > len(self.data):
            self.file.seek(pos)
            self.base, self.data = pos, self.file.read(max(n, _BLOCK))
            start = 0
        chunk = self.data[start : start + n]
        return chunk if len(chunk) == n else None


def header_size(path: str | os.PathLike) -> tuple[int, int] | None:
    """``(width, height)`` of a JPEG or PNG file that Pillow would open, read from its header;
    ``None`` when this cannot tell (other formats, unusual or broken headers: ask Pillow).

    Opening or reading errors propagate (``OSError``)."""
    with open(path, "rb", buffering=0) as file:
        head = file.read(_BLOCK)
        if head[:3] == b"\xff\xd8\xff":
            size = _jpeg(_Reader(file, head))
        elif head[:8] == _PNG_SIGNATURE:
            size = _png(_Reader(file, head))
        else:
            return None
    if size is None or size[0] < 1 or size[1] < 1 or size[0] * size[1] > (Image.MAX_IMAGE_PIXELS or float("inf")):
        return None  # Pillow refuses, warns about (decompression bomb) or would need to look closer
    return size


def _jpeg(reader: _Reader) -> tuple[int, int] | None:
    pos, size = 2, None  # Pillow starts at the third byte, the 0xFF of the first marker after SOI
    while True:
        mark = reader.get(pos, 4)
        if mark is None or mark[0] != 0xFF:
            return None  # the file ends before the image data, or junk between segments
        marker = mark[1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker not in _SEGMENT:
            return None
        length = (mark[2] << 8) | mark[3]
        if length < 2:
            return None
        if marker in _SOF or marker in _DQT or marker in _APP or marker == _SOS:
            body = reader.get(pos + 4, min(length - 2, 16) if marker in _APP else length - 2)
            if body is None:
                return None
            if marker in _SOF:
                if len(body) < 6 or body[0] != 8 or body[5] not in (1, 3, 4):
                    return None  # Pillow: "cannot handle n-bit layers" / "n-layer images"
                size = ((body[3] << 8) | body[4], (body[1] << 8) | body[2])
            elif marker in _DQT and not _dqt_ok(body):
                return None
            elif marker in _APP and not _app_ok(marker, body):
                return None
            elif marker == _SOS:
                return size
        # the whole segment must be in the file: the next marker's read checks that
        pos += 2 + length


def _dqt_ok(body: bytes) -> bool:
    """Pillow's DQT check: every table complete (65 bytes at 8-bit precision, 129 at 16-bit)."""
    at = 0
    while at < len(body):
        at += 1 + (64 if body[at] < 16 else 128)
    return at == len(body)


def _app_ok(marker: int, start: bytes) -> bool:
    """Whether Pillow's APP handler parses this segment (``start``: its first ≤ 16 bytes) safely."""
    if marker == 0xE0 and start.startswith(b"JFIF"):
        return len(start) >= 7  # the version at bytes 5-6
    if marker == 0xEE and start.startswith(b"Adobe"):
        return len(start) >= 7
    if marker == 0xE2 and start.startswith(b"MPF\0"):
        return False  # multi-picture: Pillow adopts it as MPO, which parses further
    if marker == 0xED and start.startswith(b"Photoshop 3.0\x00"):
        return False
    return True


def _png(reader: _Reader) -> tuple[int, int] | None:
    pos, size = 8, None
    while True:
        head = reader.get(pos, 8)
        if head is None:
            return None
        length, kind = struct.unpack(">I4s", head)
        if kind == b"IDAT":
            return size
        if size is None:
            if kind != b"IHDR" or length < 13:
                return None
        elif kind not in _PNG_CHUNKS or length < _PNG_CHUNKS[kind] or length > 1 << 20:
            return None
        body = reader.get(pos + 8, length + 4)
        if body is None or zlib.crc32(body[:length], zlib.crc32(kind)) != struct.unpack(">I", body[length:])[0]:
            return None  # truncated, or Pillow's "bad header checksum"
        if kind == b"IHDR":
            width, height, bits, colour, _, filter_method, _ = struct.unpack(">IIBBBBB", body[:13])
            if (bits, colour) not in _PNG_MODES or filter_method:
                return None
            size = (width, height)
        pos += 12 + length
