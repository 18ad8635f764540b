"""Albumentations pipelines: segmentation defaults, YAML-defined pipelines, validation resize.

Images stay uint8 until the module normalises them on the device. Mask geometry is always
nearest-neighbour and every pixel a transform invents (padding, rotation borders) is 255.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import albumentations as A
import cv2
import numpy as np

from dptune.errors import ConfigError
from dptune.labels import IGNORE_INDEX
from dptune.preprocessing import Preprocessing, processor_backend

# how masks and depth maps are resized: the nearest neighbour of each output pixel's centre, as the image's
# area and bilinear resizes place it (OpenCV's INTER_NEAREST samples at floor(i * scale): a mask shrunk 2.5x
# sat 0.75 source pixels up and left of its image); no value is averaged or invented
MASK_RESIZE = cv2.INTER_NEAREST_EXACT


class RandomScaleCrop(A.DualTransform):
    """Rescale, then take a random ``crop`` window, padding with 255 where the image is smaller.

    Done as one resize of just the cropped region (crop before heavy ops): the image is never
    rescaled as a whole. ``base_size`` (h, w), when given, is the size the whole image would be
    resized to at scale 1 (the size evaluation uses); otherwise scale 1 is the native size.
    The scale factor is drawn uniformly from ``scale``.

    ``cat_max_ratio`` < 1 redraws the window (up to 10 tries, as MMSegmentation's RandomCrop
    does) while one class covers more than that fraction of its labelled pixels, so crops of
    large images are not mostly the dominant class.
    """

    def __init__(
        self,
        crop: Sequence[int] = (512, 512),
        scale: Sequence[float] = (0.5, 2.0),
        base_size: Sequence[int] | None = None,
        fill_mask: int = IGNORE_INDEX,
        cat_max_ratio: float = 1.0,
        p: float = 1.0,
    ) -> None:
        super().__init__(p=p)
        if not 0 < cat_max_ratio <= 1:
            raise ConfigError(f"RandomScaleCrop: cat_max_ratio must be in (0, 1], got {cat_max_ratio}")
        self.cat_max_ratio = float(cat_max_ratio)
        self.crop = (int(crop[0]), int(crop[1]))
        self.scale = (float(scale[0]), float(scale[1]))
        self.base_size = None if base_size is None else (int(base_size[0]), int(base_size[1]))
        self.fill_mask = fill_mask

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("crop", "scale", "base_size", "fill_mask", "cat_max_ratio")

    def _axis(self, length: int, factor: float, out: int) -> tuple[int, int, int, int]:
        """(src_start, src_len, dst_start, dst_len) along one axis."""
        region = max(1, round(out / factor))  # source pixels that fill the output window
        if region <= length:
            start = int(self.py_random.randint(0, length - region))
            return start, region, 0, out
        dst_len = max(1, min(out, round(length * factor)))
        dst_start = int(self.py_random.randint(0, out - dst_len))
        return 0, length, dst_start, dst_len

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        h, w = params["shape"][:2]
        s = self.py_random.uniform(*self.scale)
        fy, fx = (s * self.base_size[0] / h, s * self.base_size[1] / w) if self.base_size else (s, s)
        mask = data.get("mask")
        tries = 10 if self.cat_max_ratio < 1 and mask is not None else 1
        for _ in range(tries):
            ys, xs = self._axis(h, fy, self.crop[0]), self._axis(w, fx, self.crop[1])
            if tries == 1 or self._balanced(mask, ys, xs):
                break
        return {"ys": ys, "xs": xs}

    def _balanced(self, mask: np.ndarray, ys: tuple, xs: tuple) -> bool:
        """Whether no class covers more than ``cat_max_ratio`` of the window's labelled pixels
        (counted on every 4th pixel of the source region)."""
        region = mask[ys[0] : ys[0] + ys[1] : 4, xs[0] : xs[0] + xs[1] : 4]
        counts = np.bincount(region[region != self.fill_mask].ravel())
        return counts.sum() == 0 or len(np.flatnonzero(counts)) > 1 and counts.max() < self.cat_max_ratio * counts.sum()

    def _apply(self, arr: np.ndarray, ys: tuple, xs: tuple, fill: int, interp: int) -> np.ndarray:
        sy, sh, dy, dh = ys
        sx, sw, dx, dw = xs
        region = arr[sy : sy + sh, sx : sx + sw]
        if (sh, sw) != (dh, dw):
            region = cv2.resize(region, (dw, dh), interpolation=interp)
        if (dh, dw) == self.crop:
            return np.ascontiguousarray(region)
        out = np.full((*self.crop, *arr.shape[2:]), fill, dtype=arr.dtype)
        out[dy : dy + dh, dx : dx + dw] = region.reshape(dh, dw, *arr.shape[2:])
        return out

    def apply(self, img: np.ndarray, ys: tuple = (), xs: tuple = (), **params: Any) -> np.ndarray:
        shrinking = ys[1] > ys[3] or xs[1] > xs[3]
        return self._apply(img, ys, xs, 0, cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)

    def apply_to_mask(self, mask: np.ndarray, ys: tuple = (), xs: tuple = (), **params: Any) -> np.ndarray:
        return self._apply(mask, ys, xs, self.fill_mask, MASK_RESIZE)


class PhotometricJitter(A.ImageOnlyTransform):
    """Brightness, contrast and saturation jitter in one lookup-table pass on uint8 images.

    The cheap core of MMSegmentation's PhotoMetricDistortion (hue shifts, the expensive part,
    are left to ``A.HueSaturationValue`` for pipelines that want them).
    """

    def __init__(
        self, brightness: float = 32, contrast: float = 0.5, saturation: float = 0.5, p: float = 0.8
    ) -> None:
        super().__init__(p=p)
        self.brightness, self.contrast, self.saturation = brightness, contrast, saturation

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("brightness", "contrast", "saturation")

    def get_params(self) -> dict[str, Any]:
        r = self.py_random
        return {
            "delta": r.uniform(-self.brightness, self.brightness),
            "alpha": r.uniform(1 - self.contrast, 1 + self.contrast),
            "sat": r.uniform(1 - self.saturation, 1 + self.saturation),
        }

    def apply(self, img: np.ndarray, delta: float = 0, alpha: float = 1, sat: float = 1, **params: Any) -> np.ndarray:
        lut = np.clip((np.arange(256, dtype=np.float32) - 128) * alpha + 128 + delta, 0, 255).astype(np.uint8)
        img = cv2.LUT(img, lut)
        if sat != 1:
            grey = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)[..., None].astype(np.float32)
            img = np.clip(grey + (img.astype(np.float32) - grey) * sat, 0, 255).astype(np.uint8)
        return img


CUSTOM = {"RandomScaleCrop": RandomScaleCrop, "PhotometricJitter": PhotometricJitter}


def default_train_transforms(
    crop_size: Sequence[int], scale_range: Sequence[float] = (0.5, 2.0), image_size: Sequence[int] | None = None
) -> list[dict[str, Any]]:
    """The default training pipeline, as the YAML list a user would write."""
    return [
        {"name": "RandomScaleCrop", "crop": list(crop_size), "scale": list(scale_range),
         "base_size": list(image_size) if image_size else None},
        {"name": "HorizontalFlip", "p": 0.5},
        {"name": "PhotometricJitter", "p": 0.8},
    ]


def _enforce_mask_rules(name: str, kwargs: dict[str, Any], cls: type) -> dict[str, Any]:
    import inspect

    params = inspect.signature(cls.__init__).parameters
    if "mask_interpolation" in params:
        if kwargs.get("mask_interpolation", MASK_RESIZE) not in (cv2.INTER_NEAREST, MASK_RESIZE):
            raise ConfigError(f"{name}: mask_interpolation must be nearest (0) or centred nearest (6); masks hold "
                              "class indices")
        kwargs.setdefault("mask_interpolation", MASK_RESIZE)
    if "fill_mask" in params:
        kwargs.setdefault("fill_mask", IGNORE_INDEX)
    return kwargs


def _built(cls: type, kwargs: dict[str, Any], given: dict[str, Any]) -> Any:
    """``cls(**kwargs)``; a warp whose albumentations class takes only OpenCV's first five flags (Rotate,
    Affine) keeps OpenCV's nearest where the centred one was chosen for it (the only one it takes)."""
    try:
        return cls(**kwargs)
    except ValueError as e:
        chosen = "mask_interpolation" not in given and kwargs.get("mask_interpolation") == MASK_RESIZE
        if not chosen or "mask_interpolation" not in str(e):
            raise
        return cls(**{**kwargs, "mask_interpolation": cv2.INTER_NEAREST})


def seed_augmentations(transform, seed: int) -> None:
    """Seed a pipeline: one numpy and one Python random stream that all its transforms draw from in
    turn. (Albumentations' ``set_random_seed`` gives each transform its own stream from the same seed,
    so two transforms drew the same numbers: a horizontal flip came only with a vertical one.)"""
    import random

    if hasattr(transform, "set_random_state"):
        transform.set_random_state(np.random.default_rng(seed), random.Random(seed))
    elif hasattr(transform, "set_random_seed"):
        transform.set_random_seed(seed)


def build_transforms(spec: Sequence[dict[str, Any]], seed: int | None = None) -> A.Compose:
    """A ``Compose`` from a list of ``{name: <albumentations or dptune class>, **kwargs}``."""
    steps = []
    for i, item in enumerate(spec):
        if not isinstance(item, dict) or "name" not in item:
            raise ConfigError(f"transforms[{i}]: expected a mapping with 'name', got {item!r}")
        kwargs = dict(item)
        name = kwargs.pop("name")
        cls = CUSTOM.get(name) or getattr(A, name, None)
        if cls is None:
            raise ConfigError(f"transforms[{i}]: unknown transform {name!r} (not in albumentations or dptune)")
        try:
            steps.append(_built(cls, _enforce_mask_rules(name, dict(kwargs), cls), kwargs))
        except (TypeError, ValueError) as e:
            raise ConfigError(f"transforms[{i}] {name}: {e}") from None
    pipeline = A.Compose(steps)
    if seed is not None:
        seed_augmentations(pipeline, seed)
    return pipeline


def resize_like_processor(image: np.ndarray, size: Sequence[int] | Preprocessing,
                          backend: str | None = None) -> np.ndarray:
    """Resize for evaluation exactly as the exported ``DPTImageProcessor`` does: ``size`` is the
    task's ``Preprocessing`` (its size, resample and backend), or a bare (h, w) for the default
    spec (bicubic, the backend ``transformers`` resolves to here, see ``processor_backend``).

    Validation must see what a plain ``transformers`` user feeds the exported model; the two
    backends differ by up to one grey level (docs/benchmarks.md, "Image processor backends").
    """
    if not isinstance(size, Preprocessing):
        size = Preprocessing(size, backend=backend or processor_backend())
    return size.resize(image)


def eval_preprocessing(trainer: Any, image_size: Sequence[int]) -> Preprocessing:
    """What a datamodule resizes evaluation images with: the spec of the task the trainer runs
    (its size, resample and backend), else ``image_size`` with the default spec (a datamodule
    used on its own: the data tools, a loader benchmark)."""
    spec = getattr(getattr(trainer, "lightning_module", None), "preprocessing", None) if trainer is not None else None
    return spec if isinstance(spec, Preprocessing) else Preprocessing(image_size)
