"""DPT's heads as dptune's forward passes run them: the head's own modules, with its bilinear
upsampling swapped, while it runs, for the same function as a faster kernel
(``dptune.models.resize``) and, for a segmentation head, in batch chunks where its output would pass
CUDA's element limit (``dptune.models.chunks``). The head is called as a module (its hooks run) and
keeps its own layers otherwise, so exports and the stock classes see no change."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from dptune.models.chunks import InChunks, samples_per_chunk
from dptune.models.resize import ProductUpsample, bilinear_upsampling


@contextmanager
def _swapped(layers: nn.Sequential, index: int, layer: nn.Module) -> Iterator[None]:
    kept = layers[index]
    layers[index] = layer
    try:
        yield
    finally:
        layers[index] = kept


def run_head(head: nn.Module, features: Sequence[torch.Tensor]) -> torch.Tensor:
    """``head(features)`` for transformers' DPT segmentation head (a Sequential ending in a bilinear
    upsampling). The layers before the upsampling see the whole batch, so BatchNorm's batch statistics
    are the same with chunks."""
    layers = getattr(head, "head", None)
    if not (isinstance(layers, nn.Sequential) and bilinear_upsampling(layers[-1])):
        return head(list(features))
    upsampling = layers[-1]
    x = features[head.config.head_in_index]
    scale = float(upsampling.scale_factor)
    h, w = (math.floor(n * scale) for n in x.shape[-2:])  # the layers before keep the size
    chunk = samples_per_chunk(head.config.num_labels * h * w)
    layer = ProductUpsample(upsampling)
    with _swapped(layers, -1, layer if x.shape[0] <= chunk else InChunks(layer, chunk)):
        return head(list(features))

