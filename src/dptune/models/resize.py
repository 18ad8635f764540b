"""Bilinear resizing as two matrix products, where that is the faster kernel.

A bilinear resize of an (N, C, h, w) tensor to (H, W) is ``A @ x @ B.T``: ``A`` (H x h) and ``B``
(W x w) hold each output row's and column's two interpolation weights. PyTorch's own kernel
(``upsample_bilinear2d``) is slow in bfloat16 on a CPU, its backward most of all; the two products
run on the CPU's bf16 matrix units. dptune uses them in training (autograd recording, a backward to
follow), in bfloat16 on a CPU with native bf16, for the segmentation head's final 2x upsampling and the
loss's upsampling of the auxiliary logits (whose outputs go to the loss): a bench-tiny CamVid training
step ran 1.07-1.09x as fast (docs/benchmarks.md, "Bilinear upsampling as matrix products"; ``python -m
dptune.tools.resize_step``). Not used: in a forward alone (validation, prediction: the kernel was as
fast or faster there on the channels-last logits a convolution gives), in float32 (the products gained
little or lost, most under an AVX2 dispatch), on a GPU (not measured), in the depth head (its
upsampling feeds convolutions, which ran slower on the products' layout), and while a graph is traced
or compiled (an exported graph keeps its ``Resize`` and dynamic sizes).

Both compute the same function (``tests/test_resize.py``: values and gradients equal in float64). In
bfloat16 the products round once more than the kernel (their intermediate, and weights such as 95/191
that bf16 cannot hold): errors against the exact resize up to about twice the kernel's, within bf16's
rounding. They hold an (N, C, H, w) intermediate: about twice the kernel's memory for the resize.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from dptune.cores import cpu_native_bf16


@functools.lru_cache(maxsize=64)
def _weights(n_in: int, n_out: int, align_corners: bool, ratio: float | None, dtype: torch.dtype,
             device: torch.device) -> torch.Tensor:
    """(n_out, n_in): output position i reads input positions i0 and i1 with weights 1 - t and t,
    where PyTorch's bilinear kernel reads them (``area_pixel_compute_source_index``): the source
    position is clamped at 0 and i1 stays at the last input position past it."""
    with torch.inference_mode(False):  # cached: a tensor made under inference mode could not join a graph later
        dst = torch.arange(n_out, dtype=torch.float64)
        if align_corners:
            src = dst * ((n_in - 1) / (n_out - 1) if n_out > 1 else 0.0)
        else:
            scale = ratio if ratio is not None else n_in / n_out
            src = ((dst + 0.5) * scale - 0.5).clamp(min=0.0)
        i0 = src.floor().long().clamp(max=n_in - 1)
        i1 = (i0 + 1).clamp(max=n_in - 1)
        t = src - i0
        out = torch.zeros(n_out, n_in, dtype=torch.float64)
        rows = torch.arange(n_out)
        out.index_put_((rows, i0), 1 - t, accumulate=True)
        out.index_put_((rows, i1), t, accumulate=True)
        return out.to(dtype=dtype, device=device)


def products_may_run(device: torch.device) -> bool:
    """Whether resizes on ``device`` may run as products now: on a CPU with native bf16, with autograd
    recording (a backward will follow), outside tracing and compiling."""
    if not _ENABLED[0] or device.type != "cpu" or not torch.is_grad_enabled():
        return False
    if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling():
        return False
    return _native_bf16()


def products_pay(x: torch.Tensor) -> bool:
    """Whether resizing ``x`` as matrix products is the faster kernel: a bfloat16 (N, C, h, w) tensor that
    autograd tracks, where ``products_may_run``. The gain is the backward's: in a forward alone
    (validation, prediction) the kernel was as fast or faster on the channels-last logits a CPU
    convolution gives (150 classes, 2 x 192 x 192 -> 384 x 384: 38.1 against 80.9 ms, ``resize_step --sizes``)."""
    return x.dtype == torch.bfloat16 and x.dim() == 4 and x.requires_grad and products_may_run(x.device)


# the most multiply-adds per output element at which the products are used: on the 2-core AMX Xeon their
# forward + backward was faster than the kernel's at every size timed up to 576 (19 classes, 384 x 384 ->
# 768 x 768), on contiguous and on channels-last input, and 1.5x slower at 1024 on channels-last input
# (a 1024 x 2048 frame's logits; ``python -m dptune.tools.resize_step --sizes``)
MAX_COST = 576


@functools.cache
def _native_bf16() -> bool:
    return cpu_native_bf16()[0]


_ENABLED = [True]


@contextmanager
def kernel_only() -> Iterator[None]:
    """PyTorch's kernel for every resize while it lasts (to time the two against each other)."""
    _ENABLED[0] = False
    try:
        yield
    finally:
        _ENABLED[0] = True


def resize_bilinear(x: torch.Tensor, size: tuple[int, int], align_corners: bool = False) -> torch.Tensor:
    """``F.interpolate(x, size, mode="bilinear", align_corners=align_corners)``, as matrix products
    where they pay (``use_products``)."""
    if use_products(x, size):
        return bilinear_products(x, size, align_corners)
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=align_corners)


def use_products(x: torch.Tensor, size: tuple[int, int]) -> bool:
    """Whether resizing ``x`` to ``size`` runs as products: where they pay (``products_pay``), up to
    ``MAX_COST`` multiply-adds per output element."""
    return products_pay(x) and products_cost(x.shape[-2:], size) <= MAX_COST


def bilinear_products(x: torch.Tensor, size: tuple[int, int], align_corners: bool = False,
                      scale_factor: tuple[float, float] | None = None) -> torch.Tensor:
    """The bilinear resize of (N, C, h, w) ``x`` to ``size`` as ``A @ x @ B.T``, in ``x``'s dtype."""
    (h, w), (big_h, big_w) = x.shape[-2:], (int(size[0]), int(size[1]))
    ratios = (None, None) if scale_factor is None else (1.0 / scale_factor[0], 1.0 / scale_factor[1])
    rows = _weights(h, big_h, align_corners, ratios[0], x.dtype, x.device)
    cols = _weights(w, big_w, align_corners, ratios[1], x.dtype, x.device)
    with torch.autocast(x.device.type, enabled=False):  # in x's dtype, as the kernel they replace
        if h * w * big_w + big_h * h * big_w < big_h * h * w + big_h * w * big_w:  # the cheaper order
            return rows @ (x @ cols.T)
        return (rows @ x) @ cols.T


def products_cost(small: tuple[int, int], big: tuple[int, int]) -> float:
    """Multiply-adds per output element of the products (in their cheaper order): each output element
    reads two inputs, the products a whole row and column of the matrices, so their cost grows with the
    sizes where the kernel's does not."""
    (h, w), (big_h, big_w) = small, big
    return min(h * w / big_w + w, h * w / big_h + h)


class ProductUpsample(nn.Module):
    """Stands in for a bilinear ``nn.Upsample`` of a head while dptune's forward runs it (the head keeps
    its own module otherwise, so exports and the stock classes see no change): the same function, as
    matrix products where they pay."""

    def __init__(self, layer: nn.Upsample) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up = self.layer
        if up.size is not None:
            size, scale = _pair(up.size), None
        else:
            scale = _pair(up.scale_factor)
            size = (math.floor(x.shape[-2] * scale[0]), math.floor(x.shape[-1] * scale[1]))
        if not use_products(x, size):
            return up(x)
        return bilinear_products(x, size, bool(up.align_corners), None if up.recompute_scale_factor else scale)


def _pair(value) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def bilinear_upsampling(layer: nn.Module) -> bool:
    """Whether ``layer`` is an ``nn.Upsample`` a ``ProductUpsample`` can stand in for."""
    return isinstance(layer, nn.Upsample) and layer.mode == "bilinear"
