"""How an image is prepared for a model, defined once: ``Preprocessing`` (size, resample, mean/std,
backend, and what a third-party ``DPTImageProcessor`` may add: aspect-ratio keeping, a size
multiple, another rescale factor, no normalisation, padding). A task builds its spec from its
settings (``Preprocessing.of_task``); an export's processor gives one (``from_processor``), and
everything else reads that spec: validation's resize (``resize``, in the loader workers), the
task's fused normalisation (``scale_shift``), sliding windows and test-time views (``resize``,
``output_size``), the predictors, unpacked checkpoints and exports (``processor``: the
``DPTImageProcessor`` plain ``transformers`` loads with the model)."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from dptune.errors import ConfigError

# PIL's filters, each a torchvision interpolation under transformers' own mapping (torchvision_interpolation)
RESAMPLES = ("nearest", "box", "bilinear", "hamming", "bicubic", "lanczos")
RGB = "a uint8 HxWx3 RGB array"


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


def torchvision_interpolation(resample: str, device_type: str = "cpu"):
    """The torchvision ``InterpolationMode`` a torchvision ``DPTImageProcessor`` resizes with for
    PIL's ``resample``: transformers' own mapping (``image_utils.pil_torch_interpolation_mapping``:
    NEAREST is NEAREST_EXACT, the others by name) and its fallback of LANCZOS to BICUBIC where
    torchvision is older than 0.27 or the images are not on the CPU."""
    from transformers import image_utils
    from transformers.utils.import_utils import is_torchvision_greater_or_equal

    mode = image_utils.pil_torch_interpolation_mapping[image_utils.PILImageResampling[resample.upper()]]
    if mode.name == "LANCZOS" and (not is_torchvision_greater_or_equal("0.27") or device_type != "cpu"):
        mode = type(mode).BICUBIC
    return mode


def check_image(image: Any, what: str = "image") -> None:
    """An image the predictors take: ``RGB`` (what ``np.asarray(PIL.Image.open(f).convert("RGB"))``
    gives). Anything else is one clear ``ValueError``: no guess whether floats are 0-1 or 0-255,
    nor how a grey or RGBA image should become RGB."""
    import numpy as np

    if not isinstance(image, np.ndarray):
        raise ValueError(f"{what}: expected {RGB}, got {type(image).__name__} (give np.asarray(pil_image.convert('RGB')))")
    if image.dtype != np.uint8:
        raise ValueError(f"{what}: expected {RGB}, got dtype {image.dtype} (floats are not guessed 0-1 or 0-255: "
                         "convert to uint8 0-255 first)")
    if image.ndim != 3 or image.shape[2] != 3 or 0 in image.shape:
        raise ValueError(f"{what}: expected {RGB}, got shape {image.shape} (a grey or RGBA image: convert it to RGB "
                         "first, e.g. np.asarray(pil_image.convert('RGB')))")


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


class _Shape:
    """What transformers' ``get_resize_output_image_size`` reads of an image: its shape."""

    def __init__(self, height: int, width: int) -> None:
        self.shape = (height, width)


@dataclass(frozen=True)
class Preprocessing:
    """uint8 RGB image -> model input, as a ``DPTImageProcessor`` does it: resize to ``size`` (h, w;
    an int is square) with ``resample`` (with ``keep_aspect_ratio`` / ``ensure_multiple_of``, to
    the size transformers computes from it, see ``output_size``), rescale by ``rescale_factor``,
    normalise with ``mean``/``std`` (unless ``do_normalize`` is False), centre-pad to a multiple
    of ``size_divisor`` (when set); done the way ``backend``'s processor does it (``pil`` or
    ``torchvision``: whichever ``transformers`` resolves an export's processor to here, see
    ``processor_backend``). dptune's own models use the first five fields only."""

    size: tuple[int, int]
    mean: tuple[float, ...] | None = None  # None: a spec that only resizes (a datamodule used without a task)
    std: tuple[float, ...] | None = None
    resample: str = "bicubic"
    backend: str = field(default_factory=processor_backend)
    keep_aspect_ratio: bool = False
    ensure_multiple_of: int = 1
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    size_divisor: int | None = None  # do_pad: the model input centre-padded to a multiple of it

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
        if int(self.ensure_multiple_of) < 1 or (self.size_divisor is not None and int(self.size_divisor) < 1):
            raise ValueError("ensure_multiple_of and size_divisor must be positive")

    # ------------------------------------------------------------------ where a spec comes from
    @classmethod
    def of_task(cls, image_size: int | Sequence[int], mean: Sequence[float], std: Sequence[float]) -> Preprocessing:
        """The spec of a model dptune trains or restores, from the task's settings (``image_size``,
        the normalisation it resolved): the one place dptune builds one."""
        return cls(_pair(image_size), tuple(mean), tuple(std))

    @classmethod
    def from_processor(cls, processor: Any, source: str = "the image processor") -> Preprocessing:
        """The spec of a loaded ``DPTImageProcessor`` (an export's ``preprocessor_config.json``),
        every setting that changes the model input carried; what the spec cannot express (another
        processor class, no resize, a size that is not height and width, no rescale) is one
        ``ConfigError`` naming ``source``."""
        from transformers.image_utils import PILImageResampling

        def refuse(why: str) -> ConfigError:
            return ConfigError(f"{source}: its image processor {why}, which dptune cannot prepare images by "
                               "(it prepares every view at one height x width with a DPTImageProcessor)")

        if not {c.__name__ for c in type(processor).__mro__} & {"DPTImageProcessor", "DPTImageProcessorPil"}:
            raise refuse(f"is a {type(processor).__name__}, not a DPTImageProcessor")
        if not processor.do_resize:
            raise refuse("does not resize (do_resize false)")
        size = processor.size or {}
        size = {k: v for k, v in (size.items() if isinstance(size, dict) else vars(size).items()) if v is not None}
        if not size.get("height") or not size.get("width"):
            raise refuse(f"gives its size as {size} (not height and width)")
        if not processor.do_rescale:
            raise refuse("does not rescale the pixel values (do_rescale false)")
        divisor = processor.size_divisor if getattr(processor, "do_pad", False) else None
        return cls(
            (int(size["height"]), int(size["width"])), tuple(processor.image_mean), tuple(processor.image_std),
            PILImageResampling(int(processor.resample)).name.lower(),
            "pil" if type(processor).__name__.endswith("Pil") else "torchvision",
            keep_aspect_ratio=bool(processor.keep_aspect_ratio), ensure_multiple_of=int(processor.ensure_multiple_of or 1),
            rescale_factor=float(processor.rescale_factor), do_normalize=bool(processor.do_normalize),
            size_divisor=int(divisor) if divisor else None,
        )

    # ------------------------------------------------------------------ what it gives
    def _stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        if self.mean is None or self.std is None:
            raise ValueError("this preprocessing spec has no mean/std (it only resizes)")
        if not self.do_normalize:
            return (0.0,) * len(self.mean), (1.0,) * len(self.std)
        return self.mean, self.std

    @functools.cached_property
    def _processor(self):
        from transformers import DPTImageProcessor, DPTImageProcessorPil
        from transformers.image_utils import PILImageResampling

        if self.mean is None or self.std is None:
            raise ValueError("this preprocessing spec has no mean/std (it only resizes)")
        cls = DPTImageProcessor if self.backend == "torchvision" else DPTImageProcessorPil
        return cls(
            do_resize=True, size={"height": self.size[0], "width": self.size[1]},
            resample=PILImageResampling[self.resample.upper()], keep_aspect_ratio=self.keep_aspect_ratio,
            ensure_multiple_of=self.ensure_multiple_of, do_rescale=True, rescale_factor=self.rescale_factor,
            do_normalize=self.do_normalize, image_mean=list(self.mean), image_std=list(self.std),
            do_pad=self.size_divisor is not None, size_divisor=self.size_divisor,
        )

    def processor(self):
        """The ``DPTImageProcessor`` (of this spec's backend) that plain ``transformers`` gets from
        an export: the same resize, rescale, normalisation and padding."""
        return self._processor

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """The size the processor resizes an image of ``height`` x ``width`` to: ``size``, or with
        ``keep_aspect_ratio`` / ``ensure_multiple_of`` what transformers' DPT computes (its own function)."""
        from transformers.models.dpt.image_processing_pil_dpt import get_resize_output_image_size

        out = get_resize_output_image_size(_Shape(int(height), int(width)), self.size, self.keep_aspect_ratio,
                                           self.ensure_multiple_of)
        return int(out.height), int(out.width)

    def resize(self, image, size: Sequence[int] | None = None):
        """uint8 image(s) resized exactly as the processor does, to ``size``, by default the
        processor's own size for the image (``output_size``): a HxWx3 array gives an array, a
        (3, H, W) or (B, 3, H, W) tensor a tensor. PIL's resample, or torchvision's antialiased one
        on uint8 (the interpolation transformers maps the resample to); the two differ by up to
        one grey level."""
        shape = tuple(image.shape[-2:] if hasattr(image, "dim") else image.shape[:2])
        h, w = _pair(size) if size is not None else self.output_size(*shape)
        if shape == (h, w):
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
        from torchvision.transforms.v2.functional import resize

        return resize(chw, list(size), interpolation=torchvision_interpolation(self.resample, chw.device.type),
                      antialias=True)

    def pixel_values(self, images, resize: bool = True):
        """The model input of uint8 images (a HxWx3 array, or a (B, 3, H, W) tensor): resized as
        the processor does (unless ``resize`` is False: sliding windows, already their size),
        rescaled and normalised, ``(x * rescale_factor - mean) / std`` in float32 (never padded:
        the benchmarks' loaders; the predictors call the processor itself). A float32
        (B, 3, h, w) tensor."""
        import torch

        mean, std = self._stats()
        if not hasattr(images, "dim"):
            import numpy as np

            images = torch.from_numpy(np.ascontiguousarray(images)).permute(2, 0, 1)[None]
        if resize:
            images = self.resize(images)
        m = torch.tensor(mean, device=images.device).view(1, -1, 1, 1)
        s = torch.tensor(std, device=images.device).view(1, -1, 1, 1)
        x = images.float() / 255 if self.rescale_factor == 1 / 255 else images.float() * self.rescale_factor
        return (x - m) / s

    def scale_shift(self):
        """(scale, shift), each (1, 3, 1, 1): ``x_uint8 * scale + shift == (x * rescale_factor -
        mean) / std`` fused into one multiply-add (what a task normalises batches with on the
        device; equal to ``pixel_values`` to within a float32 rounding)."""
        import torch

        mean, std = (torch.tensor(v) for v in self._stats())
        return (1.0 / ((1.0 / self.rescale_factor) * std)).view(1, -1, 1, 1), (-mean / std).view(1, -1, 1, 1)
