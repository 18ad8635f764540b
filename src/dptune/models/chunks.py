"""Batch chunks for outputs past the 2**31-element limit of CUDA's upsampling kernels.

A segmentation head ends in a 2x bilinear upsampling of its logits, so at 512 x 512 with 150 classes
a batch of 55 or more makes a tensor that ``upsample_bilinear2d`` refuses on a GPU (a batch that
fits in memory with gradient checkpointing). Chunking by samples computes the same numbers.
"""

from __future__ import annotations

import torch
from torch import nn

ELEMENT_LIMIT = 2**31 - 1


def samples_per_chunk(per_sample: int) -> int:
    """How many samples of ``per_sample`` elements one kernel call may hold (at least one)."""
    return max(1, ELEMENT_LIMIT // max(1, per_sample))


class InChunks(nn.Module):
    """A layer run on ``chunk`` samples at a time (stands in for a head's upsampling while it runs)."""

    def __init__(self, layer: nn.Module, chunk: int) -> None:
        super().__init__()
        self.layer, self.chunk = layer, chunk

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.layer(part) for part in x.split(self.chunk)])
