"""JPEG files cut short: the end-of-image marker after the main image's scan (``check_jpeg_end``),
which libjpeg would decode with a grey bottom and only a warning."""

from __future__ import annotations

import os
from typing import BinaryIO

from dptune.errors import DataError

JPEG_STANDALONE = {0x01, *range(0xD0, 0xD8)}  # TEM and RST0-7: markers without a length
JPEG_SOS, JPEG_EOI = 0xDA, 0xD9


def jpeg_scan_start(f: BinaryIO) -> int | None:
    """Where the main image's entropy-coded data begins (just past its first SOS marker) in a JPEG
    read from ``f`` (positioned anywhere; read from its SOI): each marker segment before it (APPn
    such as EXIF with its thumbnail, COM, DQT, DHT, SOFn, ...) is skipped by its length, so an end
    marker inside one does not count. None when the file ends (or an end marker comes) first.
    Fill bytes (0xFF runs) are skipped, and stray bytes between segments are passed over up to the
    next marker, as libjpeg does."""
    f.seek(2)
    while True:
        byte = f.read(1)
        if not byte:
            return None
        if byte != b"\xff":
            continue  # stray data between segments: libjpeg skips it with a warning
        marker = f.read(1)
        while marker == b"\xff":
            marker = f.read(1)
        if not marker:
            return None
        code = marker[0]
        if code == 0x00 or code in JPEG_STANDALONE or code == 0xD8:
            continue
        if code == JPEG_EOI:
            return None
        size = f.read(2)
        if len(size) < 2:
            return None
        length = int.from_bytes(size, "big")
        if code == JPEG_SOS:
            return f.tell() - 4
        if length < 2:
            return None
        start = f.tell()
        f.seek(length - 2, os.SEEK_CUR)
        if f.tell() != start + length - 2 or not f.read(1):  # a segment cut short: the file ends inside it
            return None
        f.seek(-1, os.SEEK_CUR)


def check_jpeg_end(f: BinaryIO, path: str, chunk: int = 1 << 20) -> None:
    """A JPEG (``f`` at any position) must hold an end-of-image marker after the start of its main
    image's scan (``jpeg_scan_start``): a file cut short in its compressed data, which libjpeg
    decodes with a grey bottom and only a warning, is one line. Data after the end marker (the video
    of a Motion Photo, the second picture of an MPO, any other trailer) is left alone, as every
    reader leaves it. Reads the header, the last bytes and, only when the file does not end with
    the marker, the rest."""
    scan = jpeg_scan_start(f)
    if scan is None:
        raise DataError(f"{path}: truncated JPEG (no image data: the file ends in its header)")
    end = f.seek(0, os.SEEK_END)
    f.seek(max(scan, end - 64))
    if f.read().rstrip(b"\x00").endswith(b"\xff\xd9"):
        return  # the usual file: its last bytes are the end marker
    f.seek(scan)
    tail = b""
    while block := f.read(chunk):
        if b"\xff\xd9" in tail[-1:] + block:
            return
        tail = block
    raise DataError(f"{path}: truncated JPEG (no end-of-image marker)")
