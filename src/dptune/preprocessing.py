"""How an image is prepared for a model, defined once: ``Preprocessing`` (size, resample, mean/std,
backend). A task builds its spec from its settings (``Preprocessing.of_task``) and everything else
reads that spec: validation's resize (``resize``, in the loader workers), the task's fused
normalisation (``scale_shift``), sliding windows and test-time views (``resize`` and
``pixel_values``), the predictors, unpacked checkpoints and exports (``processor``: the
``DPTImageProcessor`` plain ``transformers`` loads with the model)."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

RESAMPLES = ("nearest", "bilinear", "bicubic")


@functools.cache
def processor_backend() -> str:
    """The ``DPTImageProcessor`` backend that ``AutoImageProcessor.from_pretrained(export)`` and
    ``pipeline(...)`` resolve to in this environment: ``torchvision`` whenever torchvision is
    installed (transformers 5), else ``pil``. The exported config cannot pin it."""
    from transformers.utils import is_torchvision_available

    try:  # processors transformers keeps on PIL by default (their resample needs it)
        from transformers.models.auto.image_processing_auto import (
            DEFAULT_TO_PIL_BACKEND_IMAGE_PROCESSORS as on_pil,
        )
    except ImportError:
        on_pil = ()
    if "DPTImageProcessor" in on_pil:
        return "pil"
    return "torchvision" if is_torchvision_available() else "pil"


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


@dataclass(frozen=True)
class Preprocessing:
    """uint8 RGB image -> model input: resize to ``size`` (h, w; an int is square) with
    ``resample``, rescale to 0-1, normalise with ``mean``/``std``; done the way ``backend``'s
    ``DPTImageProcessor`` does it (``pil`` or ``torchvision``: whichever ``transformers`` resolves
    an export's processor to here, see ``processor_backend``)."""

    size: tuple[int, int]
    mean: tuple[float, ...] | None = None  # None: a spec that only resizes (a datamodule used without a task)
    std: tuple[float, ...] | None = None
    resample: str = "bicubic"
    backend: str = field(default_factory=processor_backend)

    def __post_init__(self) -> None:
        object.__setattr__(self, "size", _pair(self.size))
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(float(v) for v in value))
        if self.resample not in RESAMPLES:
            raise ValueError(f"resample must be one of {', '.join(RESAMPLES)}, got {self.resample!r}")
        if self.backend not in ("pil", "torchvision"):
            raise ValueError(f"backend must be pil or torchvision, got {self.backend!r}")

    # ------------------------------------------------------------------ where a spec comes from
    @classmethod
    def of_task(cls, image_size: int | Sequence[int], mean: Sequence[float], std: Sequence[float]) -> Preprocessing:
        """The spec of a model dptune trains or restores, from the task's settings (``image_size``,
        the normalisation it resolved): the one place dptune builds one."""
        return cls(_pair(image_size), tuple(mean), tuple(std))

    @classmethod
    def from_processor(cls, processor: Any) -> Preprocessing:
        """The spec of a loaded ``DPTImageProcessor`` (an export's ``preprocessor_config.json``)."""
        from transformers.image_utils import PILImageResampling

        size = processor.size
        resample = PILImageResampling(int(processor.resample)).name.lower()
        backend = "pil" if type(processor).__name__.endswith("Pil") else "torchvision"
        return cls((int(size["height"]), int(size["width"])), tuple(processor.image_mean),
                   tuple(processor.image_std), resample if resample in RESAMPLES else "bicubic", backend)

    # ------------------------------------------------------------------ what it gives
    def _stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        if self.mean is None or self.std is None:
            raise ValueError("this preprocessing spec has no mean/std (it only resizes)")
        return self.mean, self.std

    def processor(self):
        """The ``DPTImageProcessor`` (of this spec's backend) that plain ``transformers`` gets from
        an export: the same resize, rescale and normalisation."""
        from transformers import DPTImageProcessor, DPTImageProcessorPil
        from transformers.image_utils import PILImageResampling

        mean, std = self._stats()
        cls = DPTImageProcessor if self.backend == "torchvision" else DPTImageProcessorPil
        return cls(
            do_resize=True, size={"height": self.size[0], "width": self.size[1]},
            resample=PILImageResampling[self.resample.upper()], keep_aspect_ratio=False, ensure_multiple_of=1,
            do_rescale=True, rescale_factor=1 / 255, do_normalize=True, image_mean=list(mean), image_std=list(std),
            do_pad=False,
        )

    def resize(self, image, size: Sequence[int] | None = None):
        """uint8 image(s) resized to ``size`` (default: the spec's) exactly as the processor does:
        a HxWx3 array gives an array, a (3, H, W) or (B, 3, H, W) tensor a tensor. PIL's resample,
        or torchvision's antialiased one on uint8; the two differ by up to one grey level."""
        h, w = _pair(size if size is not None else self.size)
        if tuple(image.shape[-2:] if hasattr(image, "dim") else image.shape[:2]) == (h, w):
            return image
        if hasattr(image, "dim"):  # a tensor, channels first
            if self.backend == "torchvision":
                return self._tv_resize(image, (h, w))
            flat = image.reshape(-1, *image.shape[-3:]).cpu()
            out = [self.resize(np_image.permute(1, 2, 0).numpy(), (h, w)) for np_image in flat]
            import torch

            return torch.stack([torch.tensor(o).permute(2, 0, 1) for o in out]).reshape(
                *image.shape[:-2], h, w).to(image.device)
        import numpy as np

        if self.backend == "torchvision":
            import torch

            chw = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
            return self._tv_resize(chw, (h, w)).permute(1, 2, 0).numpy()
        from PIL import Image

        return np.asarray(Image.fromarray(image).resize((w, h), getattr(Image.Resampling, self.resample.upper())))

    def _tv_resize(self, chw, size: tuple[int, int]):
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms.v2.functional import resize

        return resize(chw, list(size), interpolation=InterpolationMode[self.resample.upper()], antialias=True)

    def pixel_values(self, images, resize: bool = True):
        """The model input of uint8 images (a HxWx3 array, or a (B, 3, H, W) tensor): resized to the
        spec's size (unless ``resize`` is False: sliding windows, already their size), rescaled
        and normalised with the processor's own arithmetic, ``(x / 255 - mean) / std`` in float32.
        A float32 (B, 3, h, w) tensor."""
        import torch

        mean, std = self._stats()
        if not hasattr(images, "dim"):
            import numpy as np

            images = torch.from_numpy(np.ascontiguousarray(images)).permute(2, 0, 1)[None]
        if resize:
            images = self.resize(images)
        m = torch.tensor(mean, device=images.device).view(1, -1, 1, 1)
        s = torch.tensor(std, device=images.device).view(1, -1, 1, 1)
        return (images.float() / 255 - m) / s

    def scale_shift(self):
        """(scale, shift), each (1, 3, 1, 1): ``x_uint8 * scale + shift == (x / 255 - mean) / std``
        fused into one multiply-add (what a task normalises batches with on the device; equal to
        ``pixel_values`` to within a float32 rounding)."""
        import torch

        mean, std = (torch.tensor(v) for v in self._stats())
        return (1.0 / (255.0 * std)).view(1, -1, 1, 1), (-mean / std).view(1, -1, 1, 1)
