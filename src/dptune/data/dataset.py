"""Torch dataset over a source: decode, encode the mask, augment, hand out uint8 tensors."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from dptune.data.base import check_each
from dptune.data.images import path_orientation
from dptune.data.order import reseed
from dptune.data.sources import Source
from dptune.data.transforms import resize_like_processor
from dptune.errors import DataError
from dptune.labels import LabelSet

log = logging.getLogger(__name__)


def encode_sample(image: np.ndarray, raw: np.ndarray, name: str, labels: LabelSet) -> tuple[np.ndarray, np.ndarray]:
    """(image, class-index mask); an unknown mask value or a mask of another size is a ``DataError``."""
    return image, encode_mask(raw, name, labels, image.shape[:2])


def encode_mask(raw: np.ndarray, name: str, labels: LabelSet, image_hw: tuple[int, int]) -> np.ndarray:
    """The class-index mask of ``raw``, whose image is ``image_hw`` (h, w); an unknown mask value or
    a mask of another size is a ``DataError``."""
    mask = labels.encode(raw, name)
    check_same_size(name, image_hw, mask)
    return mask


def read_sample(source: Source, i: int, decode_image: bool = True
                ) -> tuple[np.ndarray | None, tuple[int, int], np.ndarray, str]:
    """(image, or None when only its header was read; its (h, w); raw mask; name) of sample ``i``.
    Without ``decode_image`` a source that can ``probe`` (a folder) reads just the image header (and
    a JPEG's end marker; a label drawn on a turned photo's stored pixels is named there)."""
    probe = getattr(source, "probe", None)
    if decode_image or probe is None:
        image, raw, name = source.load(i)
        return image, image.shape[:2], raw, name
    image_hw, raw, name = probe(i)
    return None, image_hw, raw, name


def check_same_size(name: str, image_hw: tuple[int, int], mask: np.ndarray) -> None:
    """The mask (``name``: its file, where it has one) the size of its image; a mask whose own EXIF
    orientation turned it a quarter (as PIL's ``exif_transpose`` and Hugging Face datasets read it)
    into the other shape is named with that tag."""
    h, w = image_hw
    if (h, w) != mask.shape[:2]:
        turned = path_orientation(name) if mask.shape[:2] == (w, h) else 1
        if turned in (5, 6, 7, 8):
            raise DataError(f"{name}: mask is {mask.shape[1]}x{mask.shape[0]} as shown but its image is {w}x{h}: "
                            f"the mask's own EXIF orientation ({turned}) turns its stored {w}x{h} pixels a quarter, "
                            "as every viewer and Hugging Face datasets do; remove the orientation tag from the "
                            "mask (or store it turned like the tag says)")
        raise DataError(f"{name}: mask is {mask.shape[1]}x{mask.shape[0]} but its image is {w}x{h}")



def make_item(image: np.ndarray, mask: np.ndarray, index: int, transform: Callable[..., dict[str, Any]] | None,
              image_size: Sequence[int] | None) -> dict[str, Any]:
    """A dataset item: augmented (training) or resized like the exported processor (evaluation)."""
    if transform is not None:
        out = transform(image=image, mask=mask)
        image, mask = out["image"], out["mask"]
    elif image_size is not None:
        image = resize_like_processor(image, image_size)
    return {
        "image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
        "mask": torch.from_numpy(np.ascontiguousarray(mask)),
        "index": index,
    }


class SegmentationDataset(Dataset):
    """Items are ``{"image": uint8 (3, H, W), "mask": uint8 (h, w), "index": int}``.

    With ``transform`` (training) image and mask go through albumentations together. Without
    it (evaluation) the image is resized to ``image_size`` exactly like the exported image
    processor and the mask keeps its original size: metrics are computed on the original
    labels. ``indices`` restricts the dataset to the samples that passed the checks.
    """

    def __init__(
        self,
        source: Source,
        labels: LabelSet,
        transform: Callable[..., dict[str, Any]] | None = None,
        image_size: Sequence[int] | None = None,
        indices: Sequence[int] | None = None,
        cache: dict[int, tuple[np.ndarray, np.ndarray]] | None = None,
    ) -> None:
        self.source, self.labels, self.transform, self.image_size = source, labels, transform, image_size
        self.indices = list(range(len(source))) if indices is None else list(indices)
        self.cache = cache

    def __len__(self) -> int:
        return len(self.indices)

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Decoded image (uint8 HxWx3) and encoded mask (uint8 HxW) of sample ``i`` of the source."""
        if self.cache is not None and i in self.cache:
            return self.cache[i]
        image, raw, name = self.source.load(i)
        return encode_sample(image, raw, name, self.labels)

    def inspect(self, i: int, decode_image: bool = True) -> tuple[np.ndarray | None, np.ndarray, int]:
        """Check sample ``i``: (decoded image, or None when only its header was read; encoded mask;
        raw pixels read as "no label" only because 255 is implied). Raises ``DataError`` if unusable.

        Without ``decode_image`` a folder source reads just the image header (and a JPEG's end
        marker): fast, but a corrupt image body then surfaces only when training reaches it."""
        image, image_hw, raw, name = read_sample(self.source, i, decode_image)
        return image, encode_mask(raw, name, self.labels, image_hw), self.labels.implicit_ignore_pixels(raw)

    def __getitem__(self, k: int) -> dict[str, Any]:
        i = self.indices[k]
        reseed(self.transform, k)
        return make_item(*self.load(i), i, self.transform, self.image_size)


@dataclass
class ScanResult:
    good: list[int] = field(default_factory=list)  # indices that passed
    problems: list[str] = field(default_factory=list)  # one line per bad sample
    cache: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # with ``keep``
    class_pixels: np.ndarray = field(default_factory=lambda: np.zeros(256, np.int64))  # encoded values
    implicit_ignore: int = 0  # raw 255 pixels read as "no label" without the label file saying so


def scan(
    dataset: SegmentationDataset, desc: str, keep: bool, workers: int = 2, store: Any = None,
    decode_images: bool = True,
) -> ScanResult:
    """Check every sample once: good indices, one problem line per bad sample, per-class pixel
    counts and, when ``keep``, the decoded samples (the in-memory cache). Masks are always decoded
    (their values must be known); images too unless ``decode_images`` is off (header only).
    With ``store`` (a ``DiskCache``) samples already in it pass (they were checked when written,
    under the same label set) and count their cached masks; the others are decoded, checked and
    written to it."""
    result = ScanResult()

    def one(i: int) -> tuple[np.ndarray | None, np.ndarray, int]:
        if store is not None and i in store:
            return None, store[i][1], 0
        image, mask, implicit = dataset.inspect(i, decode_images or keep or store is not None)
        if store is not None:
            store.put(i, image, mask)
        return image, mask, implicit

    for i, outcome, problem in check_each(dataset.indices, one, desc, workers):
        if problem is not None:
            result.problems.append(problem)
            continue
        image, mask, implicit = outcome
        result.good.append(i)
        result.class_pixels += np.bincount(mask.ravel(), minlength=256)
        result.implicit_ignore += implicit
        if keep:
            result.cache[i] = (image, mask)
    return result
