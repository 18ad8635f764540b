"""Samples from Hugging Face datasets: a hub name or a ``save_to_disk`` directory, one named split
per stage; rows decoded to ``(image, raw_mask, name)`` as ``dptune.data.sources`` describes (and to
depth by ``dptune.data.depth.HFDepthSource``), and the ``data.hf`` settings checked."""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
from PIL import Image

from dptune.data.images import apply_orientation, exif_orientation, pil_limit_lifted
from dptune.data.masks import check_mask_coding, pil_to_mask
from dptune.errors import ConfigError, DataError, first_line

T = TypeVar("T")


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
        self.ds = undecoded_masks(self.ds, mask_column)

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray, str]:
        return past_pils_limit(lambda: decode_row(self.ds[i], self.name(i), self.image_column, self.mask_column,
                                                  self.rgb_masks, self.dtypes))


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
            raise DataError(f"{name}: the image is {not_pixels(image, 'image')}, not pixels; give the column the "
                            "datasets.Image() feature (dataset.cast_column(column, datasets.Image())) so that rows "
                            "decode to pictures")
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


def not_pixels(value: Any, what: str) -> str:
    """What a row holds in place of an image's or mask's pixels (None, a path, encoded bytes, a dict)."""
    if value is None:
        return f"no {what} (None)"
    if isinstance(value, str):
        return "a string (a file path?)"
    return "encoded bytes" if isinstance(value, bytes) else "a mapping (encoded bytes or a path?)"


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
    if isinstance(mask, dict) and (mask.get("bytes") or isinstance(mask.get("path"), str) and os.path.isfile(mask["path"])):
        mask = _encoded_mask(mask, name)  # a mask column read undecoded (``undecoded_masks``): its coding checked
    elif isinstance(mask, Image.Image):
        check_mask_coding(mask, name)
        stored = getattr(mask, "filename", "")
        if not mask.tile and stored and os.path.isfile(stored):  # decoded already: its file says how it is stored
            with Image.open(stored) as raw, open(stored, "rb") as f:
                check_mask_coding(raw, name, f.read(16))
    if isinstance(mask, Image.Image):
        mask.load()
        mask = apply_orientation(pil_to_mask(mask, rgb_masks, name), exif_orientation(mask, decoded=True))
    else:
        if mask is None or isinstance(mask, (str, bytes, dict)):
            raise DataError(f"{name}: the mask in column {mask_column!r} is {not_pixels(mask, 'mask')}, not pixels; "
                            "give the column the datasets.Image() feature (dataset.cast_column(column, "
                            "datasets.Image()))")
        mask = column_array(mask, dtypes.get(mask_column))
        if mask.ndim not in (2, 3) or mask.dtype.kind not in "uif":  # a class number: a classification dataset?
            raise DataError(f"{name}: the mask in column {mask_column!r} is {_short_value(mask)}, not a label map "
                            "(H x W, or H x W x 3 for RGB masks); is mask_column the column of the masks?")
    return image, mask, name


def _encoded_mask(mask: dict[str, Any], name: str) -> Image.Image:
    """A mask a row holds as its file's bytes (or path), opened with its coding checked: decoded by ``datasets``,
    a mask's 16-bit colour channels or lossy WebP coding could no longer be told (``check_mask_coding``)."""
    import io

    try:
        data = mask.get("bytes") or open(mask["path"], "rb").read()
        im = Image.open(io.BytesIO(data))
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{name}: the mask is not a readable image ({e})") from None
    check_mask_coding(im, name, data[:16])
    return im


def undecoded_masks(ds: Any, column: str) -> Any:
    """``ds`` with its mask ``column`` read as the files' bytes (``decode_row`` opens them, their coding
    checked) where it is a ``datasets.Image`` column; else as it is."""
    import datasets

    feature = (getattr(ds, "features", None) or {}).get(column)
    if isinstance(feature, datasets.Image) and feature.decode:
        return ds.cast_column(column, datasets.Image(decode=False))
    return ds


def _short_value(a: np.ndarray) -> str:
    """An array as a mask column's error says it: a number, or its shape and type."""
    return f"the {a.dtype} value {a.item()!r}" if a.ndim == 0 else f"an array of shape {tuple(a.shape)} ({a.dtype})"


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


def past_pils_limit(read: Callable[[], T]) -> T:
    """``read()`` (a row of a Hugging Face dataset, decoded), and again with PIL's own 179 M-pixel
    decompression-bomb limit lifted where it stopped it (``datasets`` decodes with PIL): a large
    aerial tile reads as it does from a folder."""
    try:
        return read()
    except Image.DecompressionBombError:
        with pil_limit_lifted():
            return read()
