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


def check_exportable(model: nn.Module, processor, size: tuple[int, int], half: str | None = None) -> None:
    """A ``ModelOutputError`` (NaN/inf weights or output) or ``ConfigError`` (out of float16's range
    where ``half``, the option asking for float16 weights -- ``--fp16`` or ``--onnx-fp16`` -- is
    given) naming what is wrong, before anything of the export is written. ``model`` is float32
    (what export writes from). One forward pass at the processor's size; with ``half`` every layer's
    output in it is compared with float16's range, which a float16 model on a GPU would overflow (a
    float16 pass itself takes minutes on a CPU without native float16, and ONNX Runtime's CPU
    provider computes an fp16 graph's nodes in float32, where nothing overflows)."""
    from dptune.export.onnx import TaskOutput

    for name, t in model.state_dict().items():
        if not t.is_floating_point():
            continue
        if not bool(torch.isfinite(t).all()):
            raise ModelOutputError(f"weight {name} holds NaN or infinite values (a run that diverged); "
                                   "nothing exported")
        if half and not bool(torch.isfinite(t.half()).all()):
            raise ConfigError(f"{half}: weight {name} holds values up to {float(t.abs().max()):g}, beyond float16's "
                              f"range ({FP16_MAX:g}): float16 cannot hold them; leave {half} out")
    x = processor(images=probe_image(size), return_tensors="pt", input_data_format="channels_last")["pixel_values"]
    wrapper = TaskOutput(model).eval()
    where = f"on a {size[0]}x{size[1]} image"
    with torch.no_grad(), largest_outputs(model, bool(half)) as largest:
        require_finite(wrapper(x.float()), f"the model's output ({wrapper.output}) {where}")
    if largest:
        layer, top = largest[0]
        raise ConfigError(f"{half}: the output of layer {layer} reaches {top:g} {where}, beyond float16's range "
                          f"({FP16_MAX:g}): a float16 model computes inf there; leave {half} out")


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
