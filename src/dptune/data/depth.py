"""Depth data: folder and Hugging Face sources, the dataset, augmentations that keep depth exact,
and the standard evaluation crops (reading a depth file in metres: ``dptune.data.depth_files``).

Depth is float32 metres, 0 = no measurement. Geometry reaches depth by nearest-neighbour only (a
resize never averages a valid pixel with an invalid one, or two surfaces into a depth between
them); photometric changes touch the image only.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import albumentations as A
import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from dptune.data.dataset import check_same_size
from dptune.data.depth_files import (
    NegativeDepth,
    check_depth_size,
    check_negative,
    check_not_8bit,
    default_scale,
    effective_scale,
    read_raw_depth,
    to_metres,
)
from dptune.data.globs import match_images
from dptune.data.hf_sources import HFSplit, column_array, past_pils_limit, row_image
from dptune.data.images import apply_orientation, decoder_orientation, read_image, sensor_orientation
from dptune.data.order import reseed
from dptune.data.sources import read_paired_mask
from dptune.data.templates import paths_for
from dptune.data.transforms import MASK_RESIZE, PhotometricJitter, resize_like_processor
from dptune.errors import ConfigError, DataError
from dptune.labels import LabelSet

log = logging.getLogger(__name__)


class DepthFolderSource:
    """Images matched by a glob, each paired with a depth file found by a path template
    (``{stem}``, ``{name}``, ``{dir}``, ``{id}``, as for masks), and optionally with a mask too (a sample
    that carries both labels, for segmentation + depth in one model)."""

    def __init__(self, root: str, images: str, depth: str, scale: float | None = None, masks: str | None = None,
                 rgb_masks: bool = False, negative: NegativeDepth = "error") -> None:
        self.images = match_images(root, images)
        self.depths = paths_for(self.images, depth, root, "depth", images)
        self.masks = paths_for(self.images, masks, root, "mask", images) if masks else None
        self.scale, self.rgb_masks, self.negative = scale, rgb_masks, negative
        self.used_scales: dict[int, float] = {}  # each read map's stored value per metre: what checks report

    def __len__(self) -> int:
        return len(self.images)

    def name(self, i: int) -> str:
        return self.images[i]

    def _depth(self, i: int) -> np.ndarray:
        if not os.path.exists(self.depths[i]):
            raise DataError(f"{self.images[i]}: no depth map (expected {self.depths[i]})")
        raw = read_raw_depth(self.depths[i], self.scale)
        check_negative(self.depths[i], raw, self.negative)
        self.used_scales[i] = effective_scale(self.depths[i], raw, self.scale)
        return apply_orientation(to_metres(raw, self.used_scales[i]), self._turn(i))

    def _turn(self, i: int) -> int:
        """The map lines up with its image's pixels as stored (a sensor's): it is turned upright with them
        by the image's EXIF orientation (or a TIFF image's tag), as the image is read (and as a label drawn on
        the upright image lines up). A TIFF map's own tag, which OpenCV applies as it reads the map, is
        that turn already when it is the image's; another one would leave the two apart: named."""
        image, own = sensor_orientation(self.images[i]), decoder_orientation(self.depths[i])
        if own in (1, image):
            return image if own == 1 else 1
        raise DataError(f"{self.depths[i]}: carries orientation tag {own}, which its readers apply, while its image "
                        f"{self.images[i]} is turned by {image}: the two would not line up; store the map with "
                        "its image's pixels and no orientation tag")

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray, str]:
        return read_image(self.images[i]), self._depth(i), self.depths[i]

    def mask(self, i: int) -> tuple[np.ndarray, str]:
        """The raw mask of sample ``i`` and its path."""
        return read_paired_mask(self.images[i], self.masks[i], self.rgb_masks), self.masks[i]


class HFDepthSource(HFSplit):
    """A split of a Hugging Face dataset with an image column and a depth column (a 16-bit or
    float image, or an array), depth divided by ``scale`` (``None``: by type, see ``default_scale``)."""

    def __init__(self, dataset: str, split: str, image_column: str = "image", depth_column: str = "depth",
                 scale: float | None = None, config_name: str | None = None, negative: NegativeDepth = "error") -> None:
        super().__init__(dataset, split, image_column, depth_column, config_name)
        self.depth_column, self.scale, self.negative = depth_column, scale, negative
        self.used_scales: dict[int, float] = {}  # each read map's stored value per metre: what checks report

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray, str]:
        return past_pils_limit(lambda: self._load(i))

    def _load(self, i: int) -> tuple[np.ndarray, np.ndarray, str]:
        row, name = self.ds[i], self.name(i)
        # as stored, not turned by an EXIF orientation: the depth map (an array) is read as stored too
        image = row_image(row[self.image_column], name, upright=False, dtype=self.dtypes.get(self.image_column))
        raw = column_array(row[self.depth_column], self.dtypes.get(self.depth_column))
        if raw.ndim != 2 or raw.dtype.kind not in "uif":
            raise DataError(f"{name}: depth must be one channel of numbers, got {raw.dtype} {tuple(raw.shape)}")
        check_negative(name, raw, self.negative)
        if self.scale is None:
            check_not_8bit(name, raw)  # an 8-bit picture column (mode L) read as millimetres ends at 0.255 m
        self.used_scales[i] = self.scale if self.scale is not None else default_scale(raw)
        return image, to_metres(raw, self.used_scales[i]), name


def eval_crop_mask(shape: tuple[int, int], crop: str) -> np.ndarray | None:
    """The standard evaluation crops as a boolean mask of an (h, w) depth map: ``eigen`` (NYU Depth
    v2, rows 45-470 and columns 41-600 of 480x640, scaled to other sizes) and ``garg`` (KITTI:
    rows 40.8%-99.2%, columns 3.6%-96.4%); ``none`` gives None."""
    h, w = shape
    if crop == "none":
        return None
    mask = np.zeros((h, w), bool)
    if crop == "eigen":
        mask[round(45 / 480 * h) : round(471 / 480 * h), round(41 / 640 * w) : round(601 / 640 * w)] = True
    elif crop == "garg":
        mask[int(0.40810811 * h) : int(0.99189189 * h), int(0.03594771 * w) : int(0.96405229 * w)] = True
    else:
        raise ConfigError(f"data.eval_crop must be none, eigen or garg, got {crop!r}")
    return mask


def depth_train_transforms(size: Sequence[int], crop: Sequence[int] | None, jitter: bool = True) -> A.Compose:
    """Resize to ``size`` (h, w) (image area-averaged, depth centred nearest), optional random ``crop``,
    horizontal flip, and photometric jitter of the image. No random rescale: zooming an image
    changes the depth it shows, so metric depth would have to change with it."""
    h, w = int(size[0]), int(size[1])
    steps: list[Any] = [A.Resize(h, w, interpolation=cv2.INTER_AREA, mask_interpolation=MASK_RESIZE)]
    if crop is not None and tuple(crop) != (h, w):
        steps.append(A.RandomCrop(int(crop[0]), int(crop[1])))
    steps.append(A.HorizontalFlip(p=0.5))
    if jitter:
        steps.append(PhotometricJitter(p=0.8))
    return A.Compose(steps, additional_targets={"depth": "mask"})


class DepthDataset(Dataset):
    """Items ``{"image": uint8 (3, H, W), "depth": float32 (h, w) metres, "index": int}``: augmented
    (training) or, for evaluation, the image resized like the exported processor and the depth at
    its own resolution (metrics are computed on the original ground truth). With ``labels`` (a
    source whose samples carry masks too) items also hold ``"mask"``: uint8 class indices, 255 =
    no label, moved by the same geometry as the depth map."""

    def __init__(self, source, transform: Callable[..., dict[str, Any]] | None = None,
                 image_size: Sequence[int] | None = None, labels: LabelSet | None = None) -> None:
        self.source, self.transform, self.image_size, self.labels = source, transform, image_size, labels
        if labels is not None and getattr(source, "masks", None) is None:
            raise ConfigError("a depth source with labels needs a masks template in its splits")
        self.indices = list(range(len(source)))
        self.cache: dict[int, tuple[np.ndarray, ...]] | None = None

    def __len__(self) -> int:
        return len(self.indices)

    def load(self, i: int) -> tuple[np.ndarray, ...]:
        """(image, depth) or, with labels, (image, depth, mask)."""
        if self.cache is not None and i in self.cache:
            return self.cache[i]
        image, depth, name = self.source.load(i)
        check_depth_size(name, image.shape[:2], depth)
        if self.labels is None:
            return image, depth
        raw, mask_name = self.source.mask(i)
        mask = self.labels.encode(raw, mask_name)
        check_same_size(mask_name, image.shape[:2], mask)
        return image, depth, mask

    def __getitem__(self, k: int) -> dict[str, Any]:
        i = self.indices[k]
        reseed(self.transform, k)
        image, depth, *mask = self.load(i)
        targets = {"depth": depth, **({"mask": mask[0]} if mask else {})}
        if self.transform is not None:
            out = self.transform(image=image, **targets)
            image, targets = out["image"], {key: out[key] for key in targets}
        elif self.image_size is not None:
            image = resize_like_processor(image, self.image_size)
        item = {"image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
                "depth": torch.from_numpy(np.ascontiguousarray(targets["depth"], dtype=np.float32)), "index": i}
        if mask:
            item["mask"] = torch.from_numpy(np.ascontiguousarray(targets["mask"]))
        return item
