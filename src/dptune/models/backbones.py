"""Backbone families: which model class a DPT config needs, and a DPT built around a bare
backbone (``facebook/dinov2-small``, a Swinv2 or BEiT checkpoint, or their config JSONs).

Families: ``vit`` (DPT's own ViT, e.g. ``Intel/dpt-large-ade``), ``hybrid`` (DPT-Hybrid: a BiT
ResNet stem + ViT, still the plain ``DPTForSemanticSegmentation``) and every model type
``transformers.AutoBackbone`` knows (``swinv2``, ``beit``, ``dinov2``, ...), which run in
``DPTBackboneForSemanticSegmentation``.
"""

from __future__ import annotations

import logging

import torch
from transformers import (
    DepthAnythingForDepthEstimation,
    DPTConfig,
    DPTForDepthEstimation,
    DPTForSemanticSegmentation,
    PretrainedConfig,
)

from dptune.errors import ConfigError
from dptune.models.dpt_backbone import DPTBackboneForSemanticSegmentation, uses_backbone

log = logging.getLogger(__name__)

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)
# what each family's published checkpoints were trained with: DPT's own ViT/Hybrid and BEiT
# normalise with 0.5/0.5; DINOv2 and Swin/Swinv2 with ImageNet's statistics
FAMILY_NORMALIZATION = {"vit": (HALF, HALF), "hybrid": (HALF, HALF), "beit": (HALF, HALF),
                        "dinov2": (IMAGENET_MEAN, IMAGENET_STD), "swinv2": (IMAGENET_MEAN, IMAGENET_STD),
                        "swin": (IMAGENET_MEAN, IMAGENET_STD)}


def default_normalization(config: PretrainedConfig) -> tuple[tuple[float, ...], tuple[float, ...], bool]:
    """(mean, std, known) for a model whose checkpoint ships no image processor: the family's own
    statistics when ``known``, else ImageNet's."""
    return family_normalization(family(config))


def family_normalization(kind: str) -> tuple[tuple[float, ...], tuple[float, ...], bool]:
    """(mean, std, known) of the backbone family ``kind`` (``family(config)``): its published
    statistics when ``known``, else ImageNet's."""
    found = FAMILY_NORMALIZATION.get(kind.lower())
    return (*(found or (IMAGENET_MEAN, IMAGENET_STD)), found is not None)


def family(config: PretrainedConfig) -> str:
    """``vit``, ``hybrid`` or the backbone's model type, for a DPT config or a bare backbone config."""
    if config.model_type != "dpt":
        return config.model_type
    if getattr(config, "is_hybrid", False):
        return "hybrid"
    return config.backbone_config.model_type if uses_backbone(config) else "vit"


def model_class(config: DPTConfig) -> type:
    """The segmentation class of a DPT config."""
    return DPTBackboneForSemanticSegmentation if uses_backbone(config) else DPTForSemanticSegmentation


def depth_model_class(config: PretrainedConfig) -> type:
    """The depth class of a DPT (any backbone) or Depth Anything config."""
    return DepthAnythingForDepthEstimation if config.model_type == "depth_anything" else DPTForDepthEstimation


def check_family(config: PretrainedConfig, wanted: str | None, source: str) -> None:
    if wanted is not None and family(config).lower() != wanted.lower():
        raise ConfigError(f"model.backbone is {wanted!r} but {source} holds a {family(config)!r} model")


def _is_hierarchical(bb: PretrainedConfig) -> bool:
    return getattr(bb, "depths", None) is not None and getattr(bb, "embed_dim", None) is not None


def backbone_options(bb: PretrainedConfig) -> dict:
    """What DPT reads from a backbone: four stages, tokens (not maps) from ViT-like ones.

    ViT-like (BEiT, DINOv2, ...): the outputs of blocks L/4, L/2, 3L/4 and L, as in the published
    DPT-BEiT and DPT-DINOv2 models. Hierarchical (Swin/Swinv2): the four stages' maps."""
    if _is_hierarchical(bb):
        return {"out_indices": list(range(1, len(bb.depths) + 1)), "out_features": None}
    n = int(bb.num_hidden_layers)
    opts = {"out_indices": [n // 4, n // 2, 3 * n // 4, n], "out_features": None, "reshape_hidden_states": False}
    if hasattr(bb, "apply_layernorm"):
        opts["apply_layernorm"] = True
    return opts


def dpt_config_for_backbone(bb: PretrainedConfig) -> DPTConfig:
    """A DPT neck and heads sized for ``bb`` (the published DPT-DINOv2 / DPT-Swinv2 layouts)."""
    bb = bb.__class__.from_dict({**bb.to_dict(), **backbone_options(bb)})
    if _is_hierarchical(bb):
        widths = [int(bb.embed_dim * 2**i) for i in range(len(bb.depths))]
        top = widths[-1]
    else:
        top = int(bb.hidden_size)
        widths = [top // 8, top // 4, top // 2, top]
    return DPTConfig(
        backbone_config=bb, hidden_size=top, neck_hidden_sizes=widths, fusion_hidden_size=min(256, top),
        readout_type="project", reassemble_factors=[4, 2, 1, 0.5], image_size=bb.image_size,
        patch_size=bb.patch_size, use_auxiliary_head=True,
    )


def load_backbone_weights(model: DPTBackboneForSemanticSegmentation, ref: str) -> None:
    """Copy a bare backbone checkpoint (hub id or directory) into ``model.backbone``."""
    # the backbone class itself: AutoBackbone.from_pretrained asks the hub first, even for a directory
    pretrained = type(model.backbone).from_pretrained(ref, config=model.config.backbone_config, dtype=torch.float32)
    missing, unexpected = model.backbone.load_state_dict(pretrained.state_dict(), strict=False)
    if missing or unexpected:
        raise ConfigError(f"{ref}: backbone weights do not fit (missing {missing[:3]}, unexpected {unexpected[:3]})")
    log.info("%s: backbone weights loaded (%d tensors)", ref, len(pretrained.state_dict()))
