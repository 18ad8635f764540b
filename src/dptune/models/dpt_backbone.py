"""DPT semantic segmentation on any ``transformers`` backbone (Swinv2, BEiT, DINOv2, ...).

``transformers`` wires ``backbone_config`` only into ``DPTForDepthEstimation``; its
``DPTForSemanticSegmentation`` always builds DPT's own ViT (transformers issue 31249). This
class is the segmentation twin of the depth model: the backbone from ``load_backbone``, DPT's
neck, segmentation head and auxiliary head, with the same attribute names as the depth model so
that its checkpoints (``backbone.*``, ``neck.*``) load into it.

This file imports only ``torch`` and ``transformers``: ``scripts/export.py`` copies it next to
an exported model as ``modeling_dptune.py`` so that
``AutoModelForSemanticSegmentation.from_pretrained(dir, trust_remote_code=True)`` works
without dptune installed.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import DPTConfig
from transformers.backbone_utils import load_backbone
from transformers.modeling_outputs import SemanticSegmenterOutput
from transformers.models.dpt.modeling_dpt import (
    DPTAuxiliaryHead,
    DPTNeck,
    DPTPreTrainedModel,
    DPTSemanticSegmentationHead,
)

IGNORE_INDEX = 255


def input_multiple(config: DPTConfig) -> int:
    """Image sides must be multiples of this: the patch size of a ViT-like backbone, the
    patch size times the total downsampling of a hierarchical one (Swin)."""
    bb = config.backbone_config
    if bb is None or getattr(config, "is_hybrid", False):  # DPT-Hybrid (Depth Anything has no such field)
        return int(config.patch_size)
    patch = _patch_size(bb)
    depths = getattr(bb, "depths", None)
    return patch * 2 ** (len(depths) - 1) if depths else patch


def _patch_size(backbone_config) -> int:
    p = backbone_config.patch_size
    return int(p if isinstance(p, int) else p[0])


def uses_backbone(config: DPTConfig) -> bool:
    """True when the model needs this class (``backbone_config`` set and not DPT-Hybrid)."""
    return getattr(config, "backbone_config", None) is not None and not getattr(config, "is_hybrid", False)


class DPTBackboneForSemanticSegmentation(DPTPreTrainedModel):
    """DPT neck and heads on ``load_backbone(config)``'s feature maps; any H x W that is a
    multiple of ``input_multiple(config)``."""

    base_model_prefix = "backbone"

    def __init__(self, config: DPTConfig) -> None:
        super().__init__(config)
        if not uses_backbone(config):
            raise ValueError("DPTBackboneForSemanticSegmentation needs config.backbone_config (and is_hybrid=False)")
        self.backbone = load_backbone(config)
        self.neck = DPTNeck(config)
        self.head = DPTSemanticSegmentationHead(config)
        self.auxiliary_head = DPTAuxiliaryHead(config) if config.use_auxiliary_head else None
        self.post_init()

    def features(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """The neck's output for normalised images."""
        maps = list(self.backbone(pixel_values).feature_maps)
        # DINOv2 with registers puts its register tokens after the class token: the neck folds the rest
        registers = int(getattr(self.config.backbone_config, "num_register_tokens", 0) or 0)
        if registers:
            maps = [torch.cat([m[:, :1], m[:, 1 + registers:]], dim=1) if m.dim() == 3 else m for m in maps]
        patch = _patch_size(self.config.backbone_config)
        h, w = pixel_values.shape[-2:]
        # ViT-like backbones give tokens (B, 1 + h*w, C); the neck needs the grid to fold them
        return self.neck(maps, patch_height=h // patch, patch_width=w // patch)

    def forward(
        self, pixel_values: torch.Tensor, labels: torch.LongTensor | None = None, **kwargs
    ) -> SemanticSegmenterOutput:
        features = self.features(pixel_values)
        logits = self.head(features)
        loss = None
        if labels is not None:
            big = nn.functional.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
            loss = nn.functional.cross_entropy(big, labels, ignore_index=IGNORE_INDEX)
            if self.auxiliary_head is not None:
                aux = nn.functional.interpolate(
                    self.auxiliary_head(features[-1]), size=labels.shape[-2:], mode="bilinear", align_corners=False
                )
                loss = loss + self.config.auxiliary_loss_weight * nn.functional.cross_entropy(
                    aux, labels, ignore_index=IGNORE_INDEX
                )
        return SemanticSegmenterOutput(loss=loss, logits=logits)
