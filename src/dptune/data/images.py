"""Reading images and masks from files: the bytes, the EXIF orientation, truncated JPEGs, header
sizes, and masks as stored (index or RGB)."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator
from typing import BinaryIO

import cv2
import numpy as np
from PIL import Image

from dptune.data.jpeg import check_jpeg_end
from dptune.errors import DataError

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- decoding
def read_bytes(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None


DECODE_AS_STORED = cv2.IMREAD_COLOR | cv2.IMREAD_ANYDEPTH | cv2.IMREAD_IGNORE_ORIENTATION
ORIENTATION = 0x0112  # the EXIF tag: how a viewer turns the stored pixels to show the picture upright


# the file types dptune reads as images where it lists a folder or filters a glob (predict, export's
# calibration images); each is decoded by ``read_image`` (a file of several images: its first, said)
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif")


def exif_orientation(im: Image.Image, data: bytes | None = None, decoded: bool = False) -> int:
    """The EXIF orientation (1-8) still to apply to an opened image, read as
    ``PIL.ImageOps.exif_transpose`` reads it; 1 when there is none (or it cannot be parsed, or the
    decoders apply it themselves, as for TIFF). A PNG may keep its eXIf chunk after the
    pixels, where PIL finds it only by decoding them (``decoded``: already done): with ``data``
    (the file's bytes) that is done only when the bytes hold such a chunk; without either, such a
    late chunk is looked for in the file."""
    if im.format == "TIFF":
        return 1  # PIL (its size from the moment it opens one) and OpenCV turn a TIFF upright themselves
    if im.format == "PNG" and "exif" not in im.info and "Raw profile type exif" not in im.info:
        if decoded:
            return 1  # every chunk has been read: there is none
        if data is None:
            with open(im.filename, "rb") as f:  # type: ignore[arg-type]
                data = f.read()
        if b"eXIf" not in data:
            return 1
    try:
        value = im.getexif().get(ORIENTATION, 1)
    except Exception:  # a damaged EXIF block: the pixels as stored
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def apply_orientation(img: np.ndarray, orientation: int) -> np.ndarray:
    """``img`` (H, W[, C]) turned upright as ``PIL.ImageOps.exif_transpose`` turns an image whose EXIF
    orientation is ``orientation`` (2-8 mirror and/or rotate; 1 or anything else: unchanged)."""
    turned = {
        2: lambda a: a[:, ::-1],  # FLIP_LEFT_RIGHT
        3: lambda a: a[::-1, ::-1],  # ROTATE_180
        4: lambda a: a[::-1],  # FLIP_TOP_BOTTOM
        5: lambda a: a.swapaxes(0, 1),  # TRANSPOSE
        6: lambda a: np.rot90(a, -1),  # ROTATE_270 (a quarter turn clockwise)
        7: lambda a: a[::-1, ::-1].swapaxes(0, 1),  # TRANSVERSE
        8: lambda a: np.rot90(a, 1),  # ROTATE_90 (a quarter turn counter-clockwise)
    }.get(orientation)
    return img if turned is None else np.ascontiguousarray(turned(img))


def file_orientation(data: bytes) -> int:
    """The EXIF orientation of an image file's bytes (see ``exif_orientation``); 1 where PIL cannot open it."""
    import io

    try:
        with pil_image(io.BytesIO(data)) as im:
            return exif_orientation(im, data)
    except Exception:  # a format only OpenCV reads: no EXIF to follow
        return 1


def pixel_limit() -> int:
    """The most pixels an image or mask dptune reads may have: OpenCV's limit (2**30 unless the
    environment variable OPENCV_IO_MAX_IMAGE_PIXELS says otherwise)."""
    value = os.environ.get("OPENCV_IO_MAX_IMAGE_PIXELS", "")
    return int(value) if value.isdigit() else 1 << 30


def too_many_pixels() -> str:
    return (f"more pixels than OpenCV decodes ({pixel_limit():,}; set the environment variable "
            "OPENCV_IO_MAX_IMAGE_PIXELS higher to read it, memory permitting)")


def opencv_problem(error: Exception) -> str:
    """OpenCV's reason for not decoding a file, in words: the last line of its text, or, for a file
    past its pixel limit (a large aerial tile), the limit and how to raise it."""
    text = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
    return too_many_pixels() if "CV_IO_MAX_IMAGE_PIXELS" in text else text


@contextlib.contextmanager
def pil_image(src: str | BinaryIO) -> Iterator[Image.Image]:
    """``PIL.Image.open`` without PIL's own decompression-bomb limit (179 M pixels), which stopped
    the header, EXIF and mask reads of a large aerial tile that OpenCV decodes with a raw traceback:
    the files are the user's own, and every image and mask is held to one limit (``pixel_limit``;
    ``read_mask`` checks it). See ``pil_limit_lifted``."""
    with pil_limit_lifted(), Image.open(src) as im:
        yield im


@contextlib.contextmanager
def pil_limit_lifted() -> Iterator[None]:
    """PIL's decompression-bomb limit lifted in the block. PIL reads it from a module global (when it
    opens a file, and again when it decodes a TIFF), so the block holds a lock and PIL's setting is
    put back at its end: the data check reads files from several threads at once."""
    with _PIL_LIMIT:
        before = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = before


_PIL_LIMIT = threading.RLock()


def read_image(path: str) -> np.ndarray:
    """Decode an image file to uint8 HxWx3 RGB, upright: its EXIF orientation applied as
    ``PIL.ImageOps.exif_transpose`` (and so ``transformers``' ``load_image`` and ``pipeline``)
    applies it, so a phone photo stored turned comes out as it is shown. Grayscale, RGBA and
    16-bit are converted. The one reader of RGB image files: training, validation, predict,
    evaluate and inspect, for segmentation, depth and joint models."""
    data = read_bytes(path)
    if not data:
        raise DataError(f"{path}: empty file (0 bytes), not an image")
    if data[:2] == b"\xff\xd8":
        import io

        check_jpeg_end(io.BytesIO(data), path)  # libjpeg decodes a truncated JPEG with a grey bottom, only warning
    try:
        # the pixels as stored, in colour: the orientation is applied below, once, as PIL reads it
        # (OpenCV turns a TIFF upright itself, as PIL does: ``exif_orientation`` leaves TIFFs alone)
        img = cv2.imdecode(np.frombuffer(data, np.uint8), DECODE_AS_STORED)
    except cv2.error as e:
        raise DataError(f"{path}: not a readable image ({opencv_problem(e)})") from None
    if img is None:
        raise DataError(f"{path}: not a readable image")
    if img.dtype == np.uint16:
        img = (img >> 8).astype(np.uint8)
    elif img.dtype != np.uint8:
        raise DataError(f"{path}: unsupported image type {img.dtype}")
    if img.ndim == 2:
        img = cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
    elif img.shape[2] == 4:
        img = cv2.cvtColor(img, cv2.COLOR_BGRA2RGB)
    elif img.shape[2] == 3:
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    else:
        raise DataError(f"{path}: unsupported number of channels {img.shape[2]}")
    note_frames(data, path)
    return apply_orientation(img, file_orientation(data))


# the signatures of the formats that hold several images (TIFF pages, animated PNG / GIF / WebP)
_MULTI_FRAME = (b"II*\x00", b"MM\x00*", b"\x89PNG", b"GIF8", b"RIFF")
_said_frames: set[str] = set()


def note_frames(data: bytes, path: str) -> None:
    """A file that holds several images (a multi-page TIFF, an animated PNG, GIF or WebP) gives its
    first, as OpenCV decodes it: said once per file in a warning, never silently (the rest would be
    dropped without a word)."""
    if not data.startswith(_MULTI_FRAME) or path in _said_frames:
        return
    import io

    try:
        with pil_image(io.BytesIO(data)) as im:
            frames = getattr(im, "n_frames", 1)
    except Exception:  # noqa: BLE001 -- OpenCV read it; PIL's view of the frames is only for the warning
        return
    if frames > 1:
        _said_frames.add(path)
        log.warning("%s: holds %d images (pages or frames); the first is read", path, frames)


def image_header_size(path: str) -> tuple[int, int]:
    """(h, w) of the image as ``read_image`` returns it (EXIF orientation applied) from the file
    header, without decoding the pixels."""
    try:
        with open(path, "rb") as f:
            head = f.read(2)
            if not head:
                raise DataError(f"{path}: empty file (0 bytes), not an image")
            if head == b"\xff\xd8":
                check_jpeg_end(f, path)
        with pil_image(path) as im:
            if im.mode not in ("1", "L", "P", "RGB", "RGBA", "LA", "I;16", "I;16B", "I;16L", "I", "CMYK", "YCbCr"):
                raise DataError(f"{path}: unsupported image mode {im.mode}")
            h, w = im.size[1], im.size[0]
            return (w, h) if exif_orientation(im) in (5, 6, 7, 8) else (h, w)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (OSError, SyntaxError, ValueError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"{path}: not a readable image ({e})") from None


def sensor_orientation(path: str) -> int:
    """The orientation that turns the pixels an image file stores upright, whoever applies it: the
    EXIF orientation dptune applies (``exif_orientation``), or a TIFF's orientation tag, which its
    decoders apply themselves. A map stored with the image's pixels as a sensor stores them (depth)
    is turned by it, to line up with the image as it is read. One open of the file's header."""
    if not os.path.isfile(path):
        return 1
    try:
        with pil_image(path) as im:
            return tiff_tag(im) if im.format == "TIFF" else exif_orientation(im)
    except (OSError, SyntaxError, ValueError):
        return 1


def decoder_orientation(path: str) -> int:
    """The orientation a file's decoders apply themselves as they read it: a TIFF's orientation tag
    (OpenCV, any read mode, and PIL alike); 1 for every other format (dptune applies their EXIF),
    told from the file's first 4 bytes without opening it as an image."""
    try:
        with open(path, "rb") as f:
            if f.read(4) not in (b"II*\x00", b"MM\x00*"):
                return 1
        with pil_image(path) as im:
            return tiff_tag(im)
    except (OSError, SyntaxError, ValueError):
        return 1


def tiff_tag(im: Image.Image) -> int:
    """An opened TIFF's orientation tag (1-8), 1 where it has none or another value."""
    tag = im.getexif().get(ORIENTATION, 1)
    return tag if isinstance(tag, int) and 1 <= tag <= 8 else 1


def path_orientation(path: str) -> int:
    """The EXIF orientation an image or label file carries (see ``exif_orientation``); 1 when it
    has none, or is not a file PIL opens."""
    if not os.path.isfile(path):
        return 1
    try:
        with pil_image(path) as im:
            return exif_orientation(im)
    except (OSError, SyntaxError, ValueError):
        return 1
