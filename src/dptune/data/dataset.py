"""Torch dataset over a source: decode, encode the mask, augment, hand out uint8 tensors."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from dptune.data.sources import Source
from dptune.data.transforms import resize_like_processor
from dptune.errors import DataError
from dptune.labels import IGNORE_INDEX, LabelSet

log = logging.getLogger(__name__)


def encode_sample(image: np.ndarray, raw: np.ndarray, name: str, labels: LabelSet) -> tuple[np.ndarray, np.ndarray]:
    """(image, class-index mask); an unknown mask value or a mask of another size is a ``DataError``."""
    mask = labels.encode(raw, name)
    check_same_size(name, image.shape[:2], mask)
    return image, mask


def check_same_size(name: str, image_hw: tuple[int, int], mask: np.ndarray) -> None:
    h, w = image_hw
    if (h, w) != mask.shape[:2]:
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

    def check(self, i: int) -> None:
        """Raise ``DataError`` if sample ``i`` is unusable, reading as little as the source allows."""
        probe = getattr(self.source, "probe", None)
        if probe is None:
            self.load(i)
            return
        image_hw, raw, name = probe(i)
        check_same_size(name, image_hw, self.labels.encode(raw, name))

    def __getitem__(self, k: int) -> dict[str, Any]:
        i = self.indices[k]
        return make_item(*self.load(i), i, self.transform, self.image_size)


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack a batch; masks (and images) of different sizes are padded (masks with 255).

    ``sizes`` keeps each mask's true (h, w) so predictions can be resized per sample.
    """
    sizes = [tuple(it["mask"].shape) for it in items]
    images = [it["image"] for it in items]
    if len({tuple(im.shape) for im in images}) == 1:
        image = torch.stack(images)
    else:
        hh = max(im.shape[1] for im in images)
        ww = max(im.shape[2] for im in images)
        image = torch.zeros(len(images), 3, hh, ww, dtype=images[0].dtype)
        for b, im in enumerate(images):
            image[b, :, : im.shape[1], : im.shape[2]] = im
    if len(set(sizes)) == 1:
        mask = torch.stack([it["mask"] for it in items])
    else:
        hh, ww = max(s[0] for s in sizes), max(s[1] for s in sizes)
        mask = torch.full((len(items), hh, ww), IGNORE_INDEX, dtype=items[0]["mask"].dtype)
        for b, it in enumerate(items):
            mask[b, : sizes[b][0], : sizes[b][1]] = it["mask"]
    return {
        "image": image,
        "mask": mask,
        "index": torch.tensor([it["index"] for it in items]),
        "sizes": sizes,
    }


def scan(
    dataset: SegmentationDataset, desc: str, keep: bool, workers: int = 2, store: Any = None
) -> tuple[list[int], list[str], dict[int, tuple[np.ndarray, np.ndarray]]]:
    """Check every sample once: return good indices, one problem line per bad sample, and,
    when ``keep``, the decoded samples (the in-memory cache). Without ``keep`` images are only
    checked from their headers; masks are always decoded (their values must be known).
    With ``store`` (a ``DiskCache``) samples already in it pass (they were checked when
    written), the others are decoded, checked and written to it."""
    good: list[int] = []
    problems: list[str] = []
    cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def one(i: int) -> tuple[int, Any]:
        try:
            if store is not None:
                if i not in store:
                    store.put(i, *dataset.load(i))
                return i, None
            if keep:
                return i, dataset.load(i)
            dataset.check(i)
            return i, None
        except DataError as e:
            return i, str(e)

    quiet = os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) != "0"  # one progress bar per job
    with ThreadPoolExecutor(max(1, workers)) as pool:
        results = pool.map(one, dataset.indices)
        for i, result in tqdm(results, total=len(dataset.indices), desc=desc, leave=False, disable=quiet):
            if isinstance(result, str):
                problems.append(result)
                continue
            good.append(i)
            if keep:
                cache[i] = result
    return good, problems, cache
