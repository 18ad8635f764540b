"""Segmentation and depth in one DPT: one backbone, two DPT necks and heads.

The two task models stay the stock ``transformers`` classes (``DPTForSemanticSegmentation`` and
``DPTForDepthEstimation``, or dptune's backbone twin); the depth model's backbone is the
segmentation model's own module, so the backbone runs once and its weights are trained by both
tasks, and each model still saves and loads on its own (one exported directory per task).
Option: the necks' reassemble stage is shared too.

Each head runs only on the samples that carry its task's label: a batch mixing masks-only,
depth-only and both gives each task gradients (and BatchNorm statistics) from its own samples; a
head whose task has no sample in the batch runs on none (its running statistics unchanged).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers import PreTrainedModel

from dptune.models.build import input_side
from dptune.models.dpt_backbone import uses_backbone
from dptune.models.forward import backbone_features
from dptune.models.heads import run_head


def tie_backbones(seg: PreTrainedModel, depth: PreTrainedModel, share_reassemble: bool = False) -> None:
    """Make ``depth`` use ``seg``'s backbone module (and reassemble stage)."""
    if uses_backbone(seg.config) != uses_backbone(depth.config):
        raise ValueError("segmentation and depth models must have the same backbone family")
    if uses_backbone(seg.config):
        depth.backbone = seg.backbone
    else:
        depth.dpt = seg.dpt
    if share_reassemble:
        depth.neck.reassemble_stage = seg.neck.reassemble_stage


class JointDPT(nn.Module):
    """``forward(pixel_values, seg_rows, depth_rows) -> (logits, aux logits, depth)`` with one
    backbone pass; ``*_rows`` (indices or a boolean mask over the batch) pick the samples a head
    runs on (default: all)."""

    def __init__(self, seg: PreTrainedModel, depth: PreTrainedModel, share_reassemble: bool = False) -> None:
        super().__init__()
        tie_backbones(seg, depth, share_reassemble)
        self.seg, self.depth = seg, depth

    @property
    def config(self):
        """The segmentation model's config: the shared backbone's and input facts (patch size)."""
        return self.seg.config

    def gradient_checkpointing_enable(self) -> None:
        self.seg.gradient_checkpointing_enable()  # the shared backbone

    def features(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """The backbone's hidden states the necks read (tokens for ViT-like backbones)."""
        if uses_backbone(self.seg.config):
            return list(self.seg.backbone(pixel_values).feature_maps)
        return backbone_features(self.seg, pixel_values)

    def _neck(self, model: PreTrainedModel, states: list[torch.Tensor], h: int, w: int) -> list[torch.Tensor]:
        p = input_side(model) if not uses_backbone(model.config) else _patch(model)
        return model.neck(states, patch_height=h // p, patch_width=w // p)

    def forward(self, pixel_values: torch.Tensor, seg_rows: torch.Tensor | Sequence[int] | None = None,
                depth_rows: torch.Tensor | Sequence[int] | None = None, with_aux: bool = False):
        h, w = pixel_values.shape[-2:]
        states = self.features(pixel_values)

        def rows(sel):
            return states if sel is None else [s[sel] for s in states]

        # both heads always run, on no rows if need be (an empty batch leaves BatchNorm's running
        # mean and variance as they were, only num_batches_tracked counts it; every weight gets a zero
        # gradient), so that every process of a DDP run reduces the same parameters and runs the same
        # SyncBatchNorm collectives whatever its batch holds
        neck = self._neck(self.seg, rows(seg_rows), h, w)
        logits = run_head(self.seg.head, neck)
        aux = self.seg.auxiliary_head(neck[-1]) if with_aux and self.seg.auxiliary_head is not None else None
        depth = self.depth.head(self._neck(self.depth, rows(depth_rows), h, w))
        return logits, aux, depth


def labelled_rows(mask: torch.Tensor, depth_valid: torch.Tensor, ignore: int = 255,
                  min_valid: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the samples with a segmentation label (any pixel not ``ignore``) and of those with
    depth a loss can use (``depth_valid``: the pixels that count; at least ``min_valid`` of them): a
    source without masks fills them with 255, one without depth with 0."""
    seg = (mask != ignore).flatten(1).any(1).nonzero().flatten()
    dep = (depth_valid.flatten(1).sum(1) >= min_valid).nonzero().flatten()
    return seg, dep


def _patch(model: PreTrainedModel) -> int:
    p = model.config.backbone_config.patch_size
    return int(p if isinstance(p, int) else p[0])


class UncertaintyWeighting(nn.Module):
    """Learned task weights by homoscedastic uncertainty (Kendall, Gal and Cipolla 2018): with
    s_t = log sigma_t^2 learned, the total is sum_t exp(-s_t) L_t + s_t."""

    def __init__(self, tasks: Sequence[str]) -> None:
        super().__init__()
        self.tasks = list(tasks)
        self.log_vars = nn.Parameter(torch.zeros(len(self.tasks)))

    def forward(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        # a zero that reaches every log-variance: a batch without one task (or, on one process, without
        # any label a loss can use) still gives each a (zero) gradient, as DDP needs of every process
        total = self.log_vars.sum() * 0.0
        for i, task in enumerate(self.tasks):
            if task in losses:
                total = total + torch.exp(-self.log_vars[i]) * losses[task] + self.log_vars[i]
        return total

    def weights(self) -> dict[str, float]:
        return {t: float(torch.exp(-s)) for t, s in zip(self.tasks, self.log_vars.detach(), strict=True)}
