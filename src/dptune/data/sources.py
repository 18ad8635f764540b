"""Where samples come from: folder pairs, Hugging Face datasets, or synthetic shapes.

A source is a sized, indexable collection whose items are ``(image, raw_mask, name)``:
``image`` is uint8 HxWx3 RGB, ``raw_mask`` is the mask as stored (index HxW or RGB HxWx3),
and ``name`` identifies the sample in error messages (usually the mask's file path).
"""

from __future__ import annotations

import fnmatch
import glob
import logging
import os
from collections.abc import Sequence
from typing import Any, BinaryIO, Protocol

import cv2
import numpy as np
from PIL import Image

from dptune.data.templates import paths_for
from dptune.errors import DataError

log = logging.getLogger(__name__)


class Source(Protocol):
    def __len__(self) -> int: ...

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray, str]: ...

    def name(self, i: int) -> str: ...


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
        with Image.open(io.BytesIO(data)) as im:
            return exif_orientation(im, data)
    except Exception:  # a format only OpenCV reads: no EXIF to follow
        return 1


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
        raise DataError(f"{path}: not a readable image ({str(e).strip().splitlines()[-1]})") from None
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
    return apply_orientation(img, file_orientation(data))


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
        with Image.open(path) as im:
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


def pil_to_mask(im: Image.Image, rgb: bool, path: str) -> np.ndarray:
    """A PIL mask to an array: palette masks give their indices (index format) or colours (rgb)."""
    if rgb:
        if im.mode in ("I;16", "I", "F"):
            raise DataError(f"{path}: RGB mask expected, got a {im.mode} single-channel image")
        return np.asarray(im.convert("RGB"))
    if im.mode in ("L", "P", "I;16", "I;16B", "I;16L"):
        arr = np.asarray(im)
        return arr.astype(np.uint16) if arr.dtype.kind == "u" and arr.dtype.itemsize > 1 else arr
    if im.mode == "I":
        return np.asarray(im)
    if im.mode in ("RGB", "RGBA", "LA"):
        return np.asarray(im)  # LabelSet.encode accepts grey-as-RGB, refuses real colour
    raise DataError(f"{path}: unsupported mask mode {im.mode}")


def read_mask(path: str, rgb: bool) -> np.ndarray:
    """Decode a mask file, upright as ``read_image`` reads images (an EXIF orientation applied; label
    PNGs rarely carry one). PIL, not OpenCV: OpenCV cannot return a palette PNG's indices."""
    try:
        with Image.open(path) as im:
            im.load()
            # turned upright like its image (and like Hugging Face datasets decode masks)
            return apply_orientation(pil_to_mask(im, rgb, path), exif_orientation(im, decoded=True))
    except FileNotFoundError:
        raise DataError(f"{path}: mask file not found") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: not a readable mask ({e})") from None


# ---------------------------------------------------------------------------- folder pairs
def any_case_extension(pattern: str) -> str:
    """``pattern`` with the letters of its literal file extension matching either case: ``*.jpg``
    finds ``.JPG`` and ``.Jpg`` too (cameras and phones write upper case), ``*.jp*g`` ``.JPEG``.
    Wildcards stay wildcards; an extension holding brackets is left as it is."""
    head, tail = os.path.split(pattern)
    stem, dot, ext = tail.rpartition(".")
    if not dot or not stem or not ext or any(c in ext for c in "[]"):
        return pattern
    letters = "".join(f"[{c.lower()}{c.upper()}]" if c.isalpha() and c.lower() != c.upper() else c for c in ext)
    return os.path.join(head, f"{stem}.{letters}")


# spellings of one format's extension: a glob naming one leaves out the files named with another
SAME_FORMAT_EXTENSIONS = ({"jpg", "jpeg", "jpe", "jfif"}, {"tif", "tiff"})
_warned_spellings: set[str] = set()


def other_spellings(pattern: str, found: Sequence[str]) -> tuple[list[str], str] | None:
    """Files in the folders of ``found`` (the files ``pattern`` matched; one listing per folder;
    none matched: the pattern's own folder, when it names one) that the glob leaves out only for
    another spelling of its extension (``a.jpeg`` beside ``*.jpg``), and the extension of a glob
    that takes them (``jp*g``); None when there are none."""
    head, tail = os.path.split(pattern)
    stem, dot, ext = tail.rpartition(".")
    group = next((g for g in SAME_FORMAT_EXTENSIONS if ext.lower() in g), None)
    if not dot or group is None:
        return None
    folders = {os.path.dirname(p) for p in found}
    if not found and not glob.has_magic(head):
        folders = {head or "."}
    taken, missed = set(found), []
    for folder in sorted(folders):
        try:
            names = os.listdir(folder)
        except OSError:
            continue
        for name in names:
            base, _, other = name.rpartition(".")
            if (base and other.lower() in group and other.lower() != ext.lower()
                    and fnmatch.fnmatchcase(f"{base}.{ext}", tail) and os.path.join(folder, name) not in taken
                    and os.path.isfile(os.path.join(folder, name))):
                missed.append(os.path.join(folder, name))
    if not missed:
        return None
    return sorted(missed), {"jpg": "jp*g", "jpeg": "jp*g", "tif": "tif*", "tiff": "tif*"}.get(ext.lower(), "*")


def spelling_note(pattern: str, found: Sequence[str], shown: str | None = None) -> str | None:
    """The words for ``other_spellings`` (``shown``: the glob as the user wrote it), or None."""
    missed = other_spellings(pattern, found)
    if missed is None:
        return None
    files, wider = missed
    shown = shown or pattern
    head, tail = os.path.split(shown)
    return (f"{len(files)} image file(s) in the folders of {shown!r} do not match it (e.g. "
            f"{os.path.basename(files[0])}): another spelling of its extension; widen the glob, e.g. "
            f"{os.path.join(head, tail.rpartition('.')[0] + '.' + wider)!r}, to take them")


def glob_files(pattern: str, shown: str | None = None) -> list[str]:
    """The files a glob matches (``**`` recursive; the file extension in either case, see
    ``any_case_extension``), sorted, each once. Files beside them left out only for another
    spelling of the extension (``.jpeg`` beside ``*.jpg``, see ``other_spellings``) are counted in
    a warning, once per pattern (``shown``: as the user wrote it), never dropped without a word."""
    found = sorted({p for p in glob.glob(any_case_extension(pattern), recursive=True) if os.path.isfile(p)})
    if found and pattern not in _warned_spellings:
        note = spelling_note(pattern, found, shown)
        if note:
            _warned_spellings.add(pattern)
            log.warning("%s", note)
    return found


def match_images(root: str, images: str) -> list[str]:
    """The image files a glob (relative to ``root`` unless absolute) matches, sorted, the extension
    in any case (``*.jpg`` takes ``.JPG`` too; ``.jpeg`` files beside them are counted in a
    warning); none is an error (that names such files when the folder holds them)."""
    pattern = images if os.path.isabs(images) else os.path.join(root, images)
    found = glob_files(pattern, shown=images)
    if not found:
        note = spelling_note(pattern, [], images)
        raise DataError(f"{pattern}: no images match" + (f"; {note}" if note else ""))
    return found


def read_paired_mask(image: str, path: str, rgb: bool) -> np.ndarray:
    """The mask an image's template points to; a missing one is named against its image."""
    if not os.path.exists(path):
        raise DataError(f"{image}: no mask (expected {path})")
    return read_mask(path, rgb)


class FolderSource:
    """Image files matched by a glob, each paired with a mask found by a path template."""

    def __init__(self, root: str, images: str, masks: str, rgb_masks: bool = False) -> None:
        self.root = root
        self.images = match_images(root, images)
        self.masks = paths_for(self.images, masks, root, "mask", images)
        self.rgb_masks = rgb_masks

    def __len__(self) -> int:
        return len(self.images)

    def name(self, i: int) -> str:
        return self.images[i]

    def _mask(self, i: int) -> np.ndarray:
        return read_paired_mask(self.images[i], self.masks[i], self.rgb_masks)

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray, str]:
        # problems found in the mask (unknown values, size) are reported against the mask file
        mask = self._mask(i)
        image = read_image(self.images[i])
        check_turned_pair(self.images[i], image.shape[:2], self.masks[i], mask)
        return image, mask, self.masks[i]

    def probe(self, i: int) -> tuple[tuple[int, int], np.ndarray, str]:
        """Cheap check of sample ``i``: the image's size from its header (plus the JPEG end
        marker), the mask fully decoded (its values must be checked)."""
        mask = self._mask(i)
        hw = image_header_size(self.images[i])
        check_turned_pair(self.images[i], hw, self.masks[i], mask)
        return hw, mask, self.masks[i]


def path_orientation(path: str) -> int:
    """The EXIF orientation an image or label file carries (see ``exif_orientation``); 1 when it
    has none, or is not a file PIL opens."""
    if not os.path.isfile(path):
        return 1
    try:
        with Image.open(path) as im:
            return exif_orientation(im)
    except (OSError, SyntaxError, ValueError):
        return 1


def check_turned_pair(image_path: str, image_hw: tuple[int, int], label_path: str, label: np.ndarray) -> None:
    """A label map whose size is its image's with the sides swapped, beside an image that its EXIF
    orientation turns a quarter: one line that says so (the label was drawn on the pixels as
    stored, not as the photo is shown). Any other size difference is left to the size check."""
    h, w = image_hw
    if label.shape[:2] != (w, h) or (h, w) == (w, h):
        return
    if path_orientation(label_path) in (5, 6, 7, 8):
        return  # the label's own tag turned it: the size check names that tag (``check_same_size``)
    orientation = path_orientation(image_path)
    if orientation in (5, 6, 7, 8):
        raise DataError(f"{label_path}: is {h}x{w} but its image {image_path} is {w}x{h} as shown: the image's "
                        f"EXIF orientation ({orientation}) turns its stored {h}x{w} pixels a quarter, as every "
                        "viewer and transformers' pipeline do; draw the label on the upright image (or save the "
                        "image upright, without the orientation tag)")


# ---------------------------------------------------------------------------- Hugging Face datasets
def open_hf_split(dataset: str, split: str, config_name: str | None = None, streaming: bool = False,
                  num_shards: int = 8):
    """One split of a hub dataset or a ``save_to_disk`` directory. With ``streaming`` an
    ``IterableDataset``: streamed from the hub, or a directory's Arrow files read as ``num_shards`` shards."""
    import datasets

    if not os.path.isdir(dataset):
        return datasets.load_dataset(dataset, config_name, split=split, streaming=streaming)
    ds = datasets.load_from_disk(dataset)
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{dataset}: no split {split!r} (has {sorted(ds)})")
        ds = ds[split]
    return ds.to_iterable_dataset(num_shards=num_shards) if streaming else ds


class HFSplit:
    """A split of a Hugging Face dataset (a hub name or a ``save_to_disk`` directory) whose rows
    hold an image and a label column; sample ``i`` is named ``dataset[split]#i``. The sources of
    each task say how a row's label is read (``load``)."""

    def __init__(self, dataset: str, split: str, image_column: str, label_column: str,
                 config_name: str | None = None) -> None:
        ds = open_hf_split(dataset, split, config_name)
        for col in (image_column, label_column):
            if col not in ds.column_names:
                raise DataError(f"{dataset}[{split}]: no column {col!r} (has {ds.column_names})")
        self.ds, self.label, self.image_column = ds, f"{dataset}[{split}]", image_column

    def __len__(self) -> int:
        return len(self.ds)

    def name(self, i: int) -> str:
        return f"{self.label}#{i}"


class HFSource(HFSplit):
    """A split of a Hugging Face dataset with an image and a mask column."""

    def __init__(
        self,
        dataset: str,
        split: str,
        image_column: str = "image",
        mask_column: str = "label",
        rgb_masks: bool = False,
        config_name: str | None = None,
    ) -> None:
        super().__init__(dataset, split, image_column, mask_column, config_name)
        self.mask_column, self.rgb_masks = mask_column, rgb_masks

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray, str]:
        return decode_row(self.ds[i], self.name(i), self.image_column, self.mask_column, self.rgb_masks)


def row_image(image: Any, name: str, upright: bool = True) -> np.ndarray:
    """uint8 HxWx3 from a dataset row's image (a PIL image or an array; grey becomes RGB). With
    ``upright`` a PIL image is turned by its EXIF orientation (``datasets`` applies it itself; older
    versions did not), as its label is (``decode_row``)."""
    if isinstance(image, Image.Image):
        image.load()
        turned = exif_orientation(image, decoded=True) if upright else 1
        image = apply_orientation(np.asarray(image.convert("RGB")), turned)
    else:
        image = np.asarray(image)
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=2)
    if image.dtype != np.uint8:
        raise DataError(f"{name}: image must be uint8, got {image.dtype}")
    return np.ascontiguousarray(image[..., :3])


def decode_row(
    row: dict[str, Any], name: str, image_column: str, mask_column: str, rgb_masks: bool
) -> tuple[np.ndarray, np.ndarray, str]:
    """(uint8 HxWx3 image, raw mask, name) from a Hugging Face dataset row (PIL images or arrays);
    both upright (their EXIF orientation applied)."""
    try:
        image, mask = row[image_column], row[mask_column]
    except KeyError as e:
        raise DataError(f"{name}: no column {e} (has {sorted(row)})") from None
    image = row_image(image, name)
    if isinstance(mask, Image.Image):
        mask.load()
        mask = apply_orientation(pil_to_mask(mask, rgb_masks, name), exif_orientation(mask, decoded=True))
    else:
        mask = np.asarray(mask)
    return image, mask, name


# ---------------------------------------------------------------------------- synthetic shapes
SYNTHETIC_NAMES = ["background", "disc", "box", "triangle"]
SYNTHETIC_COLORS = [[40, 40, 40], [230, 80, 60], [60, 160, 230], [240, 210, 60]]


class SyntheticSource:
    """Procedural shapes (discs, boxes, triangles) on textured backgrounds, seeded per sample.

    Each class has its own shape and a hue that varies from sample to sample, so a model has to
    use both colour and form. Used by the quickstart and the tests; needs no files.
    """

    def __init__(self, count: int = 200, size: Sequence[int] = (192, 192), seed: int = 0) -> None:
        self.count, self.size, self.seed = int(count), (int(size[0]), int(size[1])), int(seed)

    def __len__(self) -> int:
        return self.count

    def name(self, i: int) -> str:
        return f"synthetic(seed={self.seed})#{i}"

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray, str]:
        rng = np.random.default_rng([self.seed, i])
        h, w = self.size
        # low-frequency texture: upsampled noise, tinted
        noise = cv2.resize(rng.random((h // 16 + 1, w // 16 + 1, 3)).astype(np.float32), (w, h))
        base = rng.uniform(20, 120, 3).astype(np.float32)
        image = base + 70 * noise + rng.normal(0, 6, (h, w, 3)).astype(np.float32)
        mask = np.zeros((h, w), np.uint8)
        for _ in range(rng.integers(2, 6)):
            cls = int(rng.integers(1, 4))
            r = int(rng.integers(min(h, w) // 10, min(h, w) // 4))
            cy, cx = int(rng.integers(r, h - r)), int(rng.integers(r, w - r))
            shape = np.zeros((h, w), np.uint8)
            if cls == 1:
                cv2.circle(shape, (cx, cy), r, 1, -1)
            elif cls == 2:
                cv2.rectangle(shape, (cx - r, cy - r), (cx + r, cy + r), 1, -1)
            else:
                pts = np.array([[cx, cy - r], [cx - r, cy + r], [cx + r, cy + r]], np.int32)
                cv2.fillPoly(shape, [pts], 1)
            color = np.array(SYNTHETIC_COLORS[cls], np.float32) + rng.normal(0, 25, 3)
            image[shape == 1] = color + rng.normal(0, 10, (int(shape.sum()), 3))
            mask[shape == 1] = cls
        return np.clip(image, 0, 255).astype(np.uint8), mask, self.name(i)


def build_source(kind: str, spec: dict[str, Any], root: str, rgb_masks: bool, stage: str, hf: dict[str, Any]) -> Source:
    """One split's source from its YAML spec (see ``SegmentationDataModule``)."""
    try:
        if kind == "folder":
            return FolderSource(root, spec["images"], spec["masks"], rgb_masks)
        if kind == "hf":
            return HFSource(split=spec.get("split", stage), rgb_masks=rgb_masks, **hf)
        if kind == "synthetic":
            return SyntheticSource(**spec)
    except KeyError as e:
        raise DataError(f"data.splits.{stage}: missing key {e} for source {kind!r}") from None
    except TypeError as e:
        raise DataError(f"data.splits.{stage}: {e}") from None
    raise DataError(f"data.source must be folder, hf or synthetic, got {kind!r}")
