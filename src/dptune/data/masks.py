"""Mask files and hub mask values read as class values: palette indices or colours, upright like their images
(an EXIF orientation applied), and never read as other values than stored: JPEG or lossy WebP coding, colour
channels of more than 8 bits and labels under transparent pixels are one line naming the file."""

from __future__ import annotations

import numpy as np
from PIL import Image

from dptune.data.images import apply_orientation, exif_orientation, pil_image, pixel_limit, too_many_pixels
from dptune.errors import DataError


def pil_to_mask(im: Image.Image, rgb: bool, path: str) -> np.ndarray:
    """A PIL mask to an array: palette masks give their indices (index format) or colours (rgb)."""
    if im.mode in ("RGBA", "LA", "PA"):
        # masks are read by colour (or value), transparency aside: a transparent background an editor saved as
        # one colour reads as that colour; transparent pixels over several colours (labels hidden, or edges
        # blended) are refused, as their colours would count as labels the mask does not show
        pixels = np.asarray(im)
        clear = pixels[..., -1] < 255
        colours = np.unique(pixels[..., :-1][clear], axis=0) if clear.any() else ()
        if len(colours) > 1:
            raise DataError(f"{path}: {int(clear.sum())} of {clear.size} pixels are transparent and hold "
                            f"{len(colours)} different colours or values under it; a mask's labels are its colours "
                            "or values, not its transparency: give unlabelled pixels one colour or value the label "
                            "file ignores (save the mask without transparency)")
    if rgb:
        if im.mode in ("I;16", "I", "F"):
            raise DataError(f"{path}: RGB mask expected, got a {im.mode} single-channel image")
        return np.asarray(im.convert("RGB"))
    if im.mode == "1":  # a bilevel mask: 0 and 1
        return np.asarray(im).astype(np.uint8)
    if im.mode in ("LA", "PA"):  # grey (or palette index) with alpha: the values, transparency checked above
        return np.asarray(im.getchannel(0))
    if im.mode in ("L", "P", "I;16", "I;16B", "I;16L"):
        arr = np.asarray(im)
        return arr.astype(np.uint16) if arr.dtype.kind == "u" and arr.dtype.itemsize > 1 else arr
    if im.mode == "I":
        return np.asarray(im)
    if im.mode in ("RGB", "RGBA"):
        return np.asarray(im)  # LabelSet.encode accepts grey-as-RGB, refuses real colour
    raise DataError(f"{path}: unsupported mask mode {im.mode}")


def check_mask_coding(im: Image.Image, name: str, head: bytes = b"") -> None:
    """One line naming the mask when its file's coding changes its values as read: JPEG's or lossy WebP's
    compression (edge noise read as classes; ``head``: the file's first 16 bytes, where WebP says which), or
    colour channels of more than 8 bits (PIL keeps each one's high byte). Before ``im.load()``: the
    decoder's description is gone after it."""
    if im.format in ("JPEG", "MPO") or (im.format == "WEBP" and head[12:16] == b"VP8 "):
        raise DataError(f"{name}: a {'JPEG' if im.format != 'WEBP' else 'lossy WebP'} mask; lossy coding changes "
                        "label values at every edge (into values of no class, or of another): save masks as PNG")
    bits = _stored_bits(im) if im.format in ("PNG", "TIFF") else 8  # (a BMP's ;16 is 5-6-5 packed)
    if bits > 8 and im.mode in ("RGB", "RGBA", "LA"):
        raise DataError(f"{name}: {bits} bits per colour channel, which are read as 8; save the mask with "
                        "8-bit channels (index or colour), or as one channel of 16 bits")


def _stored_bits(im: Image.Image) -> int:
    """Bits per channel the file stores, from its decoder's raw mode (``RGB;16B``: 16); 8 where it says none."""
    import re

    for tile in im.tile or ():
        args = tile[3] if len(tile) > 3 else None
        raw = args if isinstance(args, str) else args[0] if isinstance(args, tuple) and args else ""
        found = re.search(r";(\d+)", raw if isinstance(raw, str) else "")
        if found:
            return int(found.group(1))
    return 8


def read_mask(path: str, rgb: bool) -> np.ndarray:
    """Decode a mask file, upright as ``read_image`` reads images (an EXIF orientation applied; label
    PNGs rarely carry one). PIL, not OpenCV: OpenCV cannot return a palette PNG's indices."""
    try:
        with pil_image(path) as im:
            if im.size[0] * im.size[1] > pixel_limit():
                raise DataError(f"{path}: not a readable mask ({too_many_pixels()})")
            with open(path, "rb") as f:
                check_mask_coding(im, path, f.read(16))
            im.load()
            # turned upright like its image (and like Hugging Face datasets decode masks)
            return apply_orientation(pil_to_mask(im, rgb, path), exif_orientation(im, decoded=True))
    except FileNotFoundError:
        raise DataError(f"{path}: mask file not found") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: not a readable mask ({e})") from None
