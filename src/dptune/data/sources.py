"""Where samples come from: folder pairs, Hugging Face datasets, or synthetic shapes.

A source is a sized, indexable collection whose items are ``(image, raw_mask, name)``:
``image`` is uint8 HxWx3 RGB, ``raw_mask`` is the mask as stored (index HxW or RGB HxWx3),
and ``name`` identifies the sample in error messages (usually the mask's file path).
"""

from __future__ import annotations

import glob
import json
import logging
import os
from collections.abc import Sequence
from typing import Any, Protocol

import cv2
import numpy as np
from PIL import Image

from dptune.data.globs import match_images
from dptune.data.images import (
    apply_orientation,
    exif_orientation,
    image_header_size,
    path_orientation,
    pil_to_mask,
    read_image,
    read_mask,
)
from dptune.data.templates import paths_for
from dptune.errors import ConfigError, DataError, first_line

log = logging.getLogger(__name__)


class Source(Protocol):
    def __len__(self) -> int: ...

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray, str]: ...

    def name(self, i: int) -> str: ...

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

    local = None
    if os.path.isfile(dataset):
        local = "a file, not a directory"
    elif os.path.isdir(dataset) and not any(os.path.exists(os.path.join(dataset, f))
                                            for f in ("dataset_dict.json", "dataset_info.json")):
        local = "a directory not written by save_to_disk"
    if local:
        raise DataError(f"{dataset}: {local}; data.hf.dataset takes a hub name or a directory written by "
                        "save_to_disk (load other files, such as parquet or an image folder, with datasets."
                        "load_dataset and save them with save_to_disk)")
    if not os.path.isdir(dataset):
        if dataset.startswith((".", "/", "~")):  # a path, not a hub name (owner/name): looked up on the Hub, a traceback
            raise DataError(f"data.hf.dataset {dataset}: no such directory (from {os.getcwd()})")
        try:
            return datasets.load_dataset(dataset, config_name, split=split, streaming=streaming)
        except (ConnectionError, FileNotFoundError, OSError) as e:  # DatasetNotFoundError is a FileNotFoundError
            raise DataError(f"data.hf.dataset {dataset}: no such directory here ({os.getcwd()}), and the Hugging Face "
                            f"Hub gave no such dataset ({first_line(e)})") from None
    try:
        ds = datasets.load_from_disk(dataset)
    except (IndexError, ValueError, KeyError) as e:  # datasets' own errors on a split saved with no rows
        empty = _empty_saved_splits(dataset)
        if empty:
            raise DataError(f"{dataset}: split {empty[0]!r} holds no rows (its folder has no data files)") from None
        raise DataError(f"{dataset}: not readable as a save_to_disk dataset ({first_line(e)})") from None
    if not isinstance(ds, datasets.DatasetDict):  # one Dataset: no split names, every split would be its rows
        raise DataError(f"{dataset}: holds one Dataset, not a DatasetDict of named splits: it has no split {split!r} "
                        "(each split asked of it would be the same rows); save a DatasetDict, e.g. "
                        "datasets.DatasetDict({'train': ..., 'validation': ...}).save_to_disk(...)")
    if split not in ds:
        raise DataError(f"{dataset}: no split {split!r} (has {sorted(ds)})")
    ds = ds[split]
    if streaming:  # no more shards than rows (datasets refuses to cut 4 rows into 8)
        return ds.to_iterable_dataset(num_shards=max(1, min(num_shards, len(ds))))
    return ds


def _empty_saved_splits(folder: str) -> list[str]:
    """The splits of a saved DatasetDict whose folders hold no data file (saved with no rows)."""
    try:
        with open(os.path.join(folder, "dataset_dict.json")) as f:
            names = json.load(f).get("splits") or []
    except (OSError, ValueError, AttributeError):
        return []
    return [n for n in names if not glob.glob(os.path.join(folder, str(n), "*.arrow"))]


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
        self.dtypes = array_dtypes(ds.features)

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
        return decode_row(self.ds[i], self.name(i), self.image_column, self.mask_column, self.rgb_masks, self.dtypes)


def array_dtypes(features: Any) -> dict[str, str]:
    """The declared element type of each array column of a dataset (``Array2D(..., "uint8")`` and
    the like): ``datasets`` returns such a column's rows as lists of Python numbers, whose own type
    (int64, float64) says nothing of what was stored."""
    out = {}
    for name, feature in (dict(features) if features else {}).items():
        dtype = getattr(feature, "dtype", None)
        if hasattr(feature, "shape") and isinstance(dtype, str):
            out[name] = dtype
    return out


def column_array(value: Any, dtype: str | None) -> np.ndarray:
    """A row's array value as stored: in its column's declared type where it has one."""
    return np.asarray(value, dtype=dtype) if dtype and isinstance(value, (list, tuple)) else np.asarray(value)


def row_image(image: Any, name: str, upright: bool = True, dtype: str | None = None) -> np.ndarray:
    """uint8 HxWx3 from a dataset row's image (a PIL image or an array, ``dtype`` its column's
    declared type; grey, 2-D or H x W x 1, becomes RGB). With ``upright`` a PIL image is turned by
    its EXIF orientation (``datasets`` applies it itself; older versions did not), as its label is
    (``decode_row``)."""
    if isinstance(image, Image.Image):
        image.load()
        turned = exif_orientation(image, decoded=True) if upright else 1
        image = apply_orientation(np.asarray(image.convert("RGB")), turned)
    else:
        if image is None or isinstance(image, (str, bytes, dict)):
            what = ("no image (None)" if image is None else "a string (a file path?)" if isinstance(image, str)
                    else "encoded bytes" if isinstance(image, bytes) else "a mapping (encoded bytes or a path?)")
            raise DataError(f"{name}: the image is {what}, not pixels; give the column the datasets.Image() feature "
                            "(dataset.cast_column(column, datasets.Image())) so that rows decode to pictures")
        image = column_array(image, dtype)
        if image.ndim == 3 and image.shape[2] == 1:
            image = image[..., 0]
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=2)
    if image.dtype != np.uint8:
        raise DataError(f"{name}: image must be uint8, got {image.dtype}"
                        + ("" if dtype else " (an array column declared as Array2D/Array3D of uint8 is read as such)"))
    if image.ndim != 3 or image.shape[2] < 3:
        raise DataError(f"{name}: image must be H x W x 3 (or grey), got shape {tuple(image.shape)}")
    return np.ascontiguousarray(image[..., :3])


def decode_row(
    row: dict[str, Any], name: str, image_column: str, mask_column: str, rgb_masks: bool,
    dtypes: dict[str, str] | None = None,
) -> tuple[np.ndarray, np.ndarray, str]:
    """(uint8 HxWx3 image, raw mask, name) from a Hugging Face dataset row (PIL images or arrays;
    ``dtypes``: the declared types of array columns, ``array_dtypes``); both upright (their EXIF
    orientation applied)."""
    dtypes = dtypes or {}
    try:
        image, mask = row[image_column], row[mask_column]
    except KeyError as e:
        raise DataError(f"{name}: no column {e} (has {sorted(row)})") from None
    image = row_image(image, name, dtype=dtypes.get(image_column))
    if isinstance(mask, Image.Image):
        mask.load()
        mask = apply_orientation(pil_to_mask(mask, rgb_masks, name), exif_orientation(mask, decoded=True))
    else:
        if mask is None or isinstance(mask, (str, bytes, dict)):
            what = ("no mask (None)" if mask is None else "a string (a file path?)" if isinstance(mask, str)
                    else "encoded bytes" if isinstance(mask, bytes) else "a mapping (encoded bytes or a path?)")
            raise DataError(f"{name}: the mask in column {mask_column!r} is {what}, not pixels; give the column the "
                            "datasets.Image() feature (dataset.cast_column(column, datasets.Image()))")
        mask = column_array(mask, dtypes.get(mask_column))
        if mask.ndim not in (2, 3) or mask.dtype.kind not in "uif":  # a class number: a classification dataset?
            raise DataError(f"{name}: the mask in column {mask_column!r} is {_short_value(mask)}, not a label map "
                            "(H x W, or H x W x 3 for RGB masks); is mask_column the column of the masks?")
    return image, mask, name


def _short_value(a: np.ndarray) -> str:
    """An array as a mask column's error says it: a number, or its shape and type."""
    return f"the {a.dtype} value {a.item()!r}" if a.ndim == 0 else f"an array of shape {tuple(a.shape)} ({a.dtype})"


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


# settings of ``data.hf`` that only a stream reads (``dptune.data.streaming``)
STREAM_SETTINGS = ("streaming", "shuffle_buffer", "num_shards")
HF_SETTINGS = {"segmentation": ("dataset", "config_name", "image_column", "mask_column", *STREAM_SETTINGS),
               "depth": ("dataset", "config_name", "image_column", "depth_column", *STREAM_SETTINGS)}


def check_hf_settings(hf: dict[str, Any], task: str, where: str = "data") -> None:
    """``data.hf``'s keys and the stream's settings, before anything is read: a misspelt key was dropped
    when streaming (the run trained on the default column) and named a Python class otherwise;
    ``num_shards abc`` was a traceback, 0 or -3 and ``streaming: maybe`` passed for something else."""
    import difflib

    known = HF_SETTINGS[task]
    for key in hf:
        if key not in known:
            near = difflib.get_close_matches(str(key), known, n=1)
            raise ConfigError(f"{where}.hf.{key}: no such setting ({'did you mean ' + near[0] + '? ' if near else ''}"
                              f"data.hf takes {', '.join(known)})")
    if "streaming" in hf and not isinstance(hf["streaming"], bool):
        raise ConfigError(f"{where}.hf.streaming {hf['streaming']!r}: true or false")
    for key in ("shuffle_buffer", "num_shards"):
        value = hf.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"{where}.hf.{key} {value!r}: a whole number >= 1")


def build_source(kind: str, spec: dict[str, Any], root: str, rgb_masks: bool, stage: str, hf: dict[str, Any]) -> Source:
    """One split's source from its YAML spec (see ``SegmentationDataModule``): the whole split, also
    of a config that streams its training data (``inspect`` and ``evaluate`` read whole splits)."""
    try:
        if kind == "folder":
            return FolderSource(root, spec["images"], spec["masks"], rgb_masks)
        if kind == "hf":
            whole = {k: v for k, v in hf.items() if k not in STREAM_SETTINGS}
            return HFSource(split=spec.get("split", stage), rgb_masks=rgb_masks, **whole)
        if kind == "synthetic":
            return SyntheticSource(**spec)
    except KeyError as e:
        raise DataError(f"data.splits.{stage}: missing key {e} for source {kind!r}") from None
    except TypeError as e:
        raise DataError(f"data.splits.{stage}: {e}") from None
    raise DataError(f"data.source must be folder, hf or synthetic, got {kind!r}")
