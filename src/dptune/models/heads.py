"""DPT's segmentation head as dptune's forward passes run it: the head's own modules, with its final
bilinear upsampling swapped, while it runs, for the same function as matrix products where they pay
(``dptune.models.resize``: training in bf16 on a CPU) and in batch chunks where its output would pass
CUDA's element limit (``dptune.models.chunks``). The head is called as a module (its hooks run; a hook
on the upsampling module itself does not while the products stand in for it) and keeps its own layers
otherwise, so exports and the stock classes see no change. One model run from two threads at once
could interleave the swaps (as the chunks' swap could before)."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from dptune.models.chunks import InChunks, samples_per_chunk
from dptune.models.resize import ProductUpsample, bilinear_upsampling, products_may_run


@contextmanager
def _swapped(layers: nn.Sequential, index: int, layer: nn.Module) -> Iterator[None]:
    kept = layers[index]
    layers[index] = layer
    try:
        yield
    finally:
        layers[index] = kept


def run_head(head: nn.Module, features: Sequence[torch.Tensor]) -> torch.Tensor:
    """``head(features)`` for transformers' DPT segmentation head (a Sequential ending in an upsampling,
    bilinear in every DPT). The layers before the upsampling see the whole batch, so BatchNorm's batch
    statistics are the same with chunks."""
    layers = getattr(head, "head", None)
    if not (isinstance(layers, nn.Sequential) and isinstance(layers[-1], nn.Upsample)):
        return head(list(features))
    upsampling = layers[-1]
    x = features[head.config.head_in_index]
    scale = float(upsampling.scale_factor)
    h, w = (math.floor(n * scale) for n in x.shape[-2:])  # the layers before keep the size
    chunk = samples_per_chunk(head.config.num_labels * h * w)
    products = bilinear_upsampling(upsampling) and products_may_run(x.device)
    layer = ProductUpsample(upsampling) if products else upsampling
    if x.shape[0] > chunk:
        layer = InChunks(layer, chunk)
    if layer is upsampling:
        return head(list(features))
    with _swapped(layers, -1, layer):
        return head(list(features))
