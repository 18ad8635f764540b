"""How an image is prepared for a model, in one place: the ``DPTImageProcessor`` that validation,
the predictors, unpacked checkpoints and exports share (size, bicubic resize, mean/std), and which
of its backends plain ``transformers`` resolves to here."""

from __future__ import annotations

import functools
from collections.abc import Sequence


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


def image_processor(size: int | Sequence[int], mean: Sequence[float], std: Sequence[float]):
    """The ``DPTImageProcessor`` that reproduces validation preprocessing for plain transformers:
    bicubic resize to ``size`` (an int is square), rescale to 0-1, normalise with ``mean``/``std``."""
    from transformers import DPTImageProcessor, DPTImageProcessorPil
    from transformers.image_utils import PILImageResampling

    h, w = (size, size) if isinstance(size, int) else size
    # the class AutoImageProcessor gives the export here, so a checkpoint predicts like its export
    cls = DPTImageProcessor if processor_backend() == "torchvision" else DPTImageProcessorPil
    return cls(
        do_resize=True, size={"height": int(h), "width": int(w)}, resample=PILImageResampling.BICUBIC,
        keep_aspect_ratio=False, ensure_multiple_of=1, do_rescale=True, rescale_factor=1 / 255,
        do_normalize=True, image_mean=list(mean), image_std=list(std), do_pad=False,
    )
