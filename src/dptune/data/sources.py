"""Where samples come from: folder pairs, Hugging Face datasets (``dptune.data.hf_sources``), or
synthetic shapes.

A source is a sized, indexable collection whose items are ``(image, raw_mask, name)``:
``image`` is uint8 HxWx3 RGB, ``raw_mask`` is the mask as stored (index HxW or RGB HxWx3),
and ``name`` identifies the sample in error messages (usually the mask's file path).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any, Protocol

import cv2
import numpy as np

from dptune.data.globs import match_images
from dptune.data.hf_sources import STREAM_SETTINGS, HFSource
from dptune.data.images import image_header_size, path_orientation, read_image
from dptune.data.masks import read_mask
from dptune.data.templates import paths_for
from dptune.errors import DataError

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
