"""What an export refuses to ship before it writes a file: weights that are NaN/inf, an output that
is NaN/inf on an image like the ones it will serve, and ``--fp16`` weights or activations beyond
float16's range (they would be stored, or computed, as inf)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from dptune.errors import ConfigError, ModelOutputError
from dptune.metrics import require_finite

FP16_MAX = float(torch.finfo(torch.float16).max)  # 65504, the largest float16
FP16_INF = 65520.0  # the smallest value float16 rounds to inf (65504 < x < 65520 rounds to 65504)


def probe_image(size: tuple[int, int], seed: int = 0) -> np.ndarray:
    """A uint8 RGB image of random pixels: as the processor prepares it, the served model's input
    spans the whole range a real image can give (a normal-distributed tensor does not)."""
    return np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)


def check_exportable(model: nn.Module, processor, size: tuple[int, int], fp16: bool) -> None:
    """A ``ModelOutputError`` (NaN/inf weights or output) or ``ConfigError`` (``fp16`` out of
    float16's range) naming what is wrong, before anything of the export is written. ``model`` is
    float32 (what export writes from). One forward pass at the processor's size; with ``fp16`` every
    layer's output in it is compared with float16's range, which is what a float16 model on a GPU
    would overflow (a float16 pass itself would take minutes on a CPU without native float16)."""
    from dptune.export.onnx import TaskOutput

    for name, t in model.state_dict().items():
        if not t.is_floating_point():
            continue
        if not bool(torch.isfinite(t).all()):
            raise ModelOutputError(f"weight {name} holds NaN or infinite values (a run that diverged); "
                                   "nothing exported")
        if fp16 and not bool(torch.isfinite(t.half()).all()):
            raise ConfigError(f"--fp16: weight {name} holds values up to {float(t.abs().max()):g}, beyond float16's "
                              f"range ({FP16_MAX:g}): they would be stored as inf; export in float32 (leave --fp16 out)")
    x = processor(images=probe_image(size), return_tensors="pt", input_data_format="channels_last")["pixel_values"]
    wrapper = TaskOutput(model).eval()
    where = f"on a {size[0]}x{size[1]} image"
    with torch.no_grad(), largest_outputs(model, fp16) as largest:
        require_finite(wrapper(x.float()), f"the model's output ({wrapper.output}) {where}")
    if largest:
        layer, top = largest[0]
        raise ConfigError(f"--fp16: the output of layer {layer} reaches {top:g} {where}, beyond float16's range "
                          f"({FP16_MAX:g}): a float16 model computes inf there; export in float32 (leave --fp16 out)")


class largest_outputs:
    """Inside, ``(layer, largest |value|)`` of each layer of ``model`` whose output reaches float16's
    inf, in the order they ran (nothing is recorded unless ``on``)."""

    def __init__(self, model: nn.Module, on: bool) -> None:
        self.model, self.on, self.found, self.handles = model, on, [], []

    def __enter__(self) -> list[tuple[str, float]]:
        if self.on:
            for name, module in self.model.named_modules():
                if name:
                    self.handles.append(module.register_forward_hook(self._hook(name)))
        return self.found

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()

    def _hook(self, name: str):
        def hook(module, inputs, output) -> None:
            for t in _tensors(output):
                top = float(t.detach().abs().max()) if t.is_floating_point() and t.numel() else 0.0
                if top >= FP16_INF:  # NaN compares False: the output check names it
                    self.found.append((name, top))
                    return
        return hook


def _tensors(x) -> Iterator[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, dict):
        for v in x.values():
            yield from _tensors(v)
    elif isinstance(x, (tuple, list)):
        for v in x:
            yield from _tensors(v)
