"""What an export refuses to ship before it writes a file: weights that are NaN/inf, an output that
is NaN/inf on an image like the ones it will serve, and ``--fp16`` weights or activations beyond
float16's range (they would be stored, or computed, as inf)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from dptune.errors import ConfigError, ModelOutputError
from dptune.metrics import require_finite

FP16_MAX = float(torch.finfo(torch.float16).max)  # 65504


def probe_image(size: tuple[int, int], seed: int = 0) -> np.ndarray:
    """A uint8 RGB image of random pixels: as the processor prepares it, the served model's input
    spans the whole range a real image can give (a normal-distributed tensor does not)."""
    return np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)


def check_exportable(model: nn.Module, processor, size: tuple[int, int], fp16: bool) -> None:
    """A ``ModelOutputError`` (NaN/inf weights or output) or ``ConfigError`` (``fp16`` out of
    float16's range) naming what is wrong, before anything of the export is written. One forward
    pass at the processor's size (two with ``fp16``: the float16 model, as a GPU will run it)."""
    from dptune.export.onnx import TaskOutput

    for name, t in model.state_dict().items():
        if not t.is_floating_point():
            continue
        if not bool(torch.isfinite(t).all()):
            raise ModelOutputError(f"weight {name} holds NaN or infinite values (a run that diverged); "
                                   "nothing exported")
        top = float(t.abs().max()) if t.numel() else 0.0
        if fp16 and top > FP16_MAX:
            raise ConfigError(f"--fp16: weight {name} holds values up to {top:.3g}, beyond float16's range "
                              f"({FP16_MAX:g}): they would be stored as inf; export in float32 (leave --fp16 out)")
    x = processor(images=probe_image(size), return_tensors="pt", input_data_format="channels_last")["pixel_values"]
    wrapper = TaskOutput(model).eval()
    dtype = next(model.parameters()).dtype
    with torch.no_grad():
        require_finite(wrapper(x.to(dtype)), f"the model's output ({wrapper.output}) on a {size[0]}x{size[1]} image")
        if fp16 and not bool(torch.isfinite(TaskOutput(_half_copy(model)).eval()(x.half())).all()):
            raise ConfigError(f"--fp16: the float16 model's output ({wrapper.output}) is NaN or infinite on a "
                              f"{size[0]}x{size[1]} image where its float32 output is finite (activations beyond "
                              f"float16's range, {FP16_MAX:g}); export in float32 (leave --fp16 out)")


def _half_copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model).half()
