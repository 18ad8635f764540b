"""Batch chunks for outputs past the 2**31-element limit of CUDA's upsampling kernels.

A segmentation head ends in a 2x bilinear upsampling of its logits, so at 512 x 512 with 150 classes
a batch of 55 or more makes a tensor that ``upsample_bilinear2d`` refuses on a GPU (a batch that
fits in memory with gradient checkpointing). Chunking by samples computes the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

ELEMENT_LIMIT = 2**31 - 1


def samples_per_chunk(per_sample: int) -> int:
    """How many samples of ``per_sample`` elements one kernel call may hold (at least one)."""
    return max(1, ELEMENT_LIMIT // max(1, per_sample))


class _InChunks(nn.Module):
    """A layer run on ``chunk`` samples at a time (stands in for the head's upsampling while it runs)."""

    def __init__(self, layer: nn.Module, chunk: int) -> None:
        super().__init__()
        self.layer, self.chunk = layer, chunk

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.layer(part) for part in x.split(self.chunk)])


def run_head(head: nn.Module, features: Sequence[torch.Tensor]) -> torch.Tensor:
    """``head(features)`` for transformers' DPT segmentation head (a Sequential ending in a bilinear
    upsampling), with that last upsampling in batch chunks when its output would pass the limit. The
    layers before it see the whole batch, so BatchNorm's batch statistics are the same; the head is
    called as a module (its hooks run) with the upsampling swapped for the chunked one meanwhile."""
    layers = getattr(head, "head", None)
    if not (isinstance(layers, nn.Sequential) and isinstance(layers[-1], nn.Upsample)):
        return head(list(features))
    x = features[head.config.head_in_index]
    scale = float(layers[-1].scale_factor)
    h, w = (math.floor(n * scale) for n in x.shape[-2:])  # the layers before keep the size
    chunk = samples_per_chunk(head.config.num_labels * h * w)
    if x.shape[0] <= chunk:
        return head(list(features))
    upsampling = layers[-1]
    layers[-1] = _InChunks(upsampling, chunk)
    try:
        return head(list(features))
    finally:
        layers[-1] = upsampling
