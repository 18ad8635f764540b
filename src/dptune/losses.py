"""Losses on segmentation logits; 255 in the target means "no label" and never counts."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dptune.labels import IGNORE_INDEX


def upsample(logits: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """Bilinear resize to ``size``, in batch chunks when the result would pass the 2**31-element
    limit of CUDA's upsampling kernels (large batches of many-class logits)."""
    size = tuple(size)
    if tuple(logits.shape[-2:]) == size:
        return logits
    per_sample = logits.shape[1] * size[0] * size[1]
    chunk = max(1, (2**31 - 1) // per_sample)
    parts = [F.interpolate(x, size=size, mode="bilinear", align_corners=False) for x in logits.split(chunk)]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy over labelled pixels of logits upsampled to the target's size.

    A batch with no labelled pixel gives 0, not NaN (mean reduction would divide by zero).
    """
    logits = upsample(logits, target.shape[-2:])
    total = F.cross_entropy(logits, target, weight=weight, ignore_index=IGNORE_INDEX, reduction="sum")
    valid = target != IGNORE_INDEX
    if weight is None:
        denom = valid.sum()
    else:
        denom = (weight[target.clamp(max=logits.shape[1] - 1)] * valid).sum()
    return total / denom.clamp(min=1)


def dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - mean soft Dice over the classes present in the target (ignore excluded).

    Per-class sums come from scatter-adds over the true class, not a one-hot tensor.
    """
    logits = upsample(logits, target.shape[-2:])
    num_classes = logits.shape[1]
    probs = logits.float().softmax(1)
    valid = (target != IGNORE_INDEX).float()
    t = target.clamp(max=num_classes - 1)
    zeros = probs.new_zeros(num_classes)
    p_true = probs.gather(1, t.unsqueeze(1)).squeeze(1) * valid
    inter = zeros.scatter_add(0, t.flatten(), p_true.flatten())
    label_sum = zeros.scatter_add(0, t.flatten(), valid.flatten())
    prob_sum = (probs * valid.unsqueeze(1)).sum((0, 2, 3))
    present = label_sum > 0
    dice = (2 * inter + 1.0) / (prob_sum + label_sum + 1.0)
    return 1 - (dice * present).sum() / present.sum().clamp(min=1)
