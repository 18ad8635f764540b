"""Segmentation metrics from one confusion matrix, updated per batch on the device.

The confusion matrix is a sum of integer counts, so summing it across processes gives exactly
the single-process result (as long as no sample is counted twice; see the datamodule).
"""

from __future__ import annotations

import torch
from torchmetrics import Metric

from dptune.labels import IGNORE_INDEX
from dptune.metrics import finite_rows


def class_map(scores: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """The predicted class per pixel: the first class of highest score along ``dim`` (a NaN counts as
    the highest), as ``scores.argmax(dim)`` gives it. ``max(dim).indices`` computes the same faster
    on a CPU, where torch's argmax over a dimension that is not the innermost in memory is slow: about
    13x for one 720 x 960 image's 11-class logits (``predict``), 1.2x for the channels-last float32
    logits of a validation batch (``python -m dptune.tools.eval_kernels``; docs/benchmarks.md). Every
    caller passes float32 (on a bfloat16 tensor ``max`` is the slower one)."""
    return scores.max(dim).indices


def confusion_counts(preds: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(C, C) int64 counts, rows = ground truth, columns = prediction; 255 in ``target`` is skipped."""
    valid = target != IGNORE_INDEX
    t = target[valid].long()
    p = preds[valid].long()
    return torch.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


class ConfusionMatrix(Metric):
    """Accumulates a (C, C) confusion matrix; ``compute`` returns it summed over processes. ``images``
    counts the samples with a labelled pixel (``dptune.metrics.summed_state`` sums it over processes)."""

    full_state_update = False
    is_differentiable = False
    higher_is_better = None

    def __init__(self, num_classes: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_classes = num_classes
        self.add_state("confmat", default=torch.zeros(num_classes, num_classes, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("images", default=torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("nonfinite", default=torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor, scores: torch.Tensor | None = None) -> None:
        """``preds`` and ``target`` (B, H, W) class indices, 255 in ``target`` for no label. ``scores``
        (B, C, H, W), the logits ``preds`` came from: an image whose scores hold a NaN or inf is
        counted in ``nonfinite`` (its argmax is meaningless) and makes the whole result NaN."""
        if scores is not None:
            bad = ~finite_rows(scores)
            self.nonfinite += bad.sum()
        self.confmat += confusion_counts(preds, target, self.num_classes)
        self.images += (target != IGNORE_INDEX).reshape(target.shape[0], -1).any(1).sum()

    def compute(self) -> torch.Tensor:
        """The summed matrix; all NaN when an image's scores were non-finite (a model whose outputs
        overflow has no result, never the real-looking score of its NaN argmax)."""
        if self.nonfinite > 0:
            return torch.full(self.confmat.shape, float("nan"), dtype=torch.float64, device=self.confmat.device)
        return self.confmat


def metrics_from_confmat(confmat: torch.Tensor) -> dict[str, torch.Tensor]:
    """mIoU, per-class IoU, pixel accuracy, mean accuracy.

    Like MMSegmentation, a class that appears neither in the labels nor in the predictions has
    no IoU (NaN) and is left out of the mean; mean accuracy averages over classes present in
    the labels.
    """
    cm = confmat.double()
    tp = cm.diag()
    gt = cm.sum(1)
    pred = cm.sum(0)
    union = gt + pred - tp
    nan = torch.tensor(float("nan"), dtype=cm.dtype, device=cm.device)
    iou = torch.where(union > 0, tp / union.clamp(min=1), nan)
    acc = torch.where(gt > 0, tp / gt.clamp(min=1), nan)
    total = gt.sum()
    return {
        "mIoU": torch.nanmean(iou) if (union > 0).any() else nan,
        "pixel_acc": tp.sum() / total if total > 0 else nan,
        "mAcc": torch.nanmean(acc) if (gt > 0).any() else nan,
        "IoU": iou,
    }
