"""Choosing images for an export's calibration and measurement: evenly spaced ones of a list, the
images a ``--calibration-images`` glob names, and a test of whether a file is a copy of one of them."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from dptune.errors import ConfigError, DataError

log = logging.getLogger(__name__)

MIN_IMAGES = 4  # fewer calibration images than this give activation ranges of no use


class CalibrationError(ConfigError):
    """Calibration or measurement data that cannot be used; the message names the file or glob."""


def spread(n: int, k: int) -> list[int]:
    """``k`` of ``range(n)`` evenly spaced (all when ``k >= n``)."""
    if k >= n:
        return list(range(n))
    return sorted({int(round(x)) for x in np.linspace(0, n - 1, k)})


def same_content(paths: list[str]):
    """A test of whether a file has the bytes of one of ``paths`` (a copy of a calibration image among the
    validation images): by size first, hashed only where a size matches."""
    import hashlib

    def digest(path: str) -> str:
        with open(path, "rb") as f:
            return hashlib.sha1(f.read()).hexdigest()

    by_size: dict[int, list[str]] = {}
    for p in paths:
        try:
            by_size.setdefault(os.path.getsize(p), []).append(p)
        except OSError:
            continue
    digests: dict[int, set[str]] = {}

    def same(path: str) -> bool:
        try:
            size = os.path.getsize(path)
            if size not in by_size:
                return False
            if size not in digests:
                digests[size] = {digest(p) for p in by_size[size]}
            return digest(path) in digests[size]
        except OSError:  # an unreadable file is said by the readability check
            return False

    return same


def glob_images(pattern: str, count: int) -> list[str]:
    from dptune.data.globs import glob_files
    from dptune.data.images import IMAGE_EXTS, image_header_size

    spec = os.path.expanduser(pattern)
    if Path(spec).is_dir():  # a folder: its images (as predict --images takes one)
        spec = os.path.join(spec, "*")
    matched = glob_files(spec)
    found = [p for p in matched if Path(p).suffix.lower() in IMAGE_EXTS]
    images = set(found)
    other = [p for p in matched if p not in images]
    if other and found:  # said, not dropped silently (predict --images calls such a file an unreadable image)
        log.info("--calibration-images %s: %d matched file%s not an image by its extension and left out (first: %s)",
                 pattern, len(other), " is" if len(other) == 1 else "s are", other[0])
    if not found:
        raise CalibrationError(f"--calibration-images {pattern}: no images match")
    if len(found) < MIN_IMAGES:
        raise CalibrationError(f"--calibration-images {pattern}: {len(found)} image{'s' if len(found) != 1 else ''} "
                               f"match; calibration needs at least {MIN_IMAGES} (a few dozen is better)")
    chosen = [found[i] for i in spread(len(found), count)]
    for path in chosen:  # each a readable image before the slow steps (its header, a JPEG's end)
        try:
            image_header_size(path)
        except DataError as e:
            raise CalibrationError(f"--calibration-images {pattern}: {e}") from None
    return chosen
