"""Losses of each task, and the resizing of predictions to label sizes that losses and metrics share."""

from __future__ import annotations

from collections.abc import Callable

import torch


def resize_per_sample(pred: torch.Tensor, sizes: list[tuple[int, int]], padded: torch.Size,
                      resize: Callable[[torch.Tensor, tuple[int, int]], torch.Tensor]) -> torch.Tensor:
    """Predictions (B, ..., h, w) to each sample's label size with ``resize``, in a batch padded to
    ``padded``: padded regions get zeros (their labels are "no label")."""
    if len(set(sizes)) == 1:
        return resize(pred, sizes[0])
    out = pred.new_zeros(*pred.shape[:-2], *padded)
    for b, (h, w) in enumerate(sizes):
        out[b, ..., :h, :w] = resize(pred[b : b + 1], (h, w))[0]
    return out
