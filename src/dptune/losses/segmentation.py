"""Losses on segmentation logits; 255 in the target means "no label" and never counts."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dptune.errors import ConfigError
from dptune.labels import IGNORE_INDEX
from dptune.models.chunks import samples_per_chunk
from dptune.models.resize import resize_bilinear


def check_loss_weight(key: str, value: float, what: str) -> None:
    """A loss weight as set (``model.<key>``): a finite number >= 0 (0 turns its term off). A
    negative one would push that term's error up, unnoticed."""
    if isinstance(value, bool) or not math.isfinite(float(value)) or value < 0:
        raise ConfigError(f"model.{key} {value}: {what}, a finite number >= 0 (0 turns it off)")


def check_class_weights(weights: list[float] | None, classes: int) -> None:
    """``model.class_weights``: one finite weight >= 0 per class, at least one above 0."""
    if weights is None:
        return
    if len(weights) != classes:
        raise ConfigError(f"model.class_weights has {len(weights)} values for {classes} classes")
    if not all(math.isfinite(float(w)) and w >= 0 for w in weights) or not any(w > 0 for w in weights):
        raise ConfigError(f"model.class_weights {list(weights)}: each class's weight in the cross-entropy, a finite "
                          "number >= 0 (a negative one would push its error up), at least one above 0")


def upsample(logits: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """Bilinear resize to ``size``, in batch chunks when the result would pass the 2**31-element
    limit of CUDA's upsampling kernels (large batches of many-class logits)."""
    size = tuple(size)
    if tuple(logits.shape[-2:]) == size:
        return logits
    chunk = samples_per_chunk(logits.shape[1] * size[0] * size[1])
    parts = [resize_bilinear(x, size) for x in logits.split(chunk)]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy over labelled pixels of logits upsampled to the target's size.

    A batch with no labelled pixel gives 0, not NaN (mean reduction would divide by zero).
    """
    total, labelled = cross_entropy_terms(logits, target, weight)
    return total / labelled.clamp(min=1)


def cross_entropy_terms(logits: torch.Tensor, target: torch.Tensor,
                        weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The summed cross-entropy of the labelled pixels and what the mean divides it by: their count,
    or with class ``weight`` their summed weights (as ``F.cross_entropy``'s mean does). A split's
    mean is the sum of the batches' first terms over the sum of their second. Computed in batch
    chunks where the upsampled logits would pass 2**31 elements (CUDA's softmax kernels index with 32
    bits: an H200 stopped at an illegal memory access on 64 x 150 x 512 x 512)."""
    # in at least float32 whatever the logits' dtype: a sum over a batch's pixels in bfloat16 (bf16-true, where
    # the class weights are bfloat16 too) came out 0.2-0.7% off (8 significant bits); autocast runs it in float32
    dtype = torch.promote_types(logits.dtype, torch.float32)  # float64 stays (64-true)
    if weight is not None:
        weight = weight.to(dtype)
    chunk = samples_per_chunk(logits.shape[1] * target.shape[-2] * target.shape[-1])
    total = sum(F.cross_entropy(upsample(x, target.shape[-2:]).to(dtype), t, weight=weight, ignore_index=IGNORE_INDEX,
                                reduction="sum") for x, t in zip(logits.split(chunk), target.split(chunk), strict=True))
    valid = target != IGNORE_INDEX
    if weight is None:
        return total, valid.sum()
    return total, (weight[target.clamp(max=logits.shape[1] - 1)] * valid).sum()


def dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - mean soft Dice over the classes present in the target (ignore excluded).

    Per-class sums come from scatter-adds over the true class, not a one-hot tensor.
    """
    num_classes = logits.shape[1]
    chunk = samples_per_chunk(num_classes * target.shape[-2] * target.shape[-1])  # see cross_entropy_terms
    inter = label_sum = prob_sum = 0
    for x, y in zip(logits.split(chunk), target.split(chunk), strict=True):
        sums = _dice_sums(upsample(x, y.shape[-2:]), y)
        inter, label_sum, prob_sum = inter + sums[0], label_sum + sums[1], prob_sum + sums[2]
    present = label_sum > 0
    dice = (2 * inter + 1.0) / (prob_sum + label_sum + 1.0)
    return 1 - (dice * present).sum() / present.sum().clamp(min=1)


def _dice_sums(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per class: the labelled pixels' probability of their true class, their count, and the
    probabilities summed over labelled pixels."""
    num_classes = logits.shape[1]
    probs = logits.float().softmax(1)
    valid = (target != IGNORE_INDEX).float()
    t = target.clamp(max=num_classes - 1)
    zeros = probs.new_zeros(num_classes)
    p_true = probs.gather(1, t.unsqueeze(1)).squeeze(1) * valid
    inter = zeros.scatter_add(0, t.flatten(), p_true.flatten())
    label_sum = zeros.scatter_add(0, t.flatten(), valid.flatten())
    return inter, label_sum, (probs * valid.unsqueeze(1)).sum((0, 2, 3))


def lovasz_loss(logits: torch.Tensor, target: torch.Tensor, stride: int = 1) -> torch.Tensor:
    """Lovasz-softmax (Berman et al., 2018): a convex surrogate of 1 - IoU per class, averaged
    over the classes present in the target (ignore excluded). For one-hot probabilities it is
    exactly 1 - IoU of each class over the whole batch.

    ``stride`` > 1 scores every ``stride``-th pixel in both directions: the per-class sort over
    all pixels of a batch is the costly part.
    """
    logits = upsample(logits, target.shape[-2:])
    if stride > 1:
        logits, target = logits[..., ::stride, ::stride], target[..., ::stride, ::stride]
    num_classes = logits.shape[1]
    probs = logits.float().softmax(1).permute(0, 2, 3, 1).reshape(-1, num_classes)
    target = target.reshape(-1)
    keep = target != IGNORE_INDEX
    probs, target = probs[keep], target[keep]
    losses = []
    for c in target.unique().tolist():
        fg = (target == c).float()
        errors, order = (fg - probs[:, c]).abs().sort(descending=True)
        fg = fg[order]
        # gradient of the Lovasz extension of the Jaccard loss at the sorted errors
        inter = fg.sum() - fg.cumsum(0)
        union = fg.sum() + (1 - fg).cumsum(0)
        jaccard = 1 - inter / union
        jaccard = torch.cat([jaccard[:1], jaccard[1:] - jaccard[:-1]])
        losses.append(torch.dot(errors, jaccard))
    return torch.stack(losses).mean() if losses else logits.sum() * 0
