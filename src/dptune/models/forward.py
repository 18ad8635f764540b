"""DPT forward passes on any H x W that is a multiple of the patch size, for every task.

``transformers``' ``DPTForSemanticSegmentation.forward`` (and the depth model's, for DPT's own ViT)
does not pass the patch grid to the neck, so non-square inputs fail; these functions do, and run
only the encoder layers the neck reads.
"""

from __future__ import annotations

import torch
from transformers import DPTForSemanticSegmentation, PreTrainedModel

from dptune.models.dpt_backbone import input_multiple, uses_backbone
from dptune.models.heads import run_head

# parameter names of the backbone (DPT's own ViT, or a transformers backbone); the rest is neck + heads
BACKBONE_PREFIXES = ("dpt.", "backbone.")


def backbone_features(model: DPTForSemanticSegmentation, pixel_values: torch.Tensor) -> list[torch.Tensor]:
    """Hidden states the neck needs, running only the encoder layers that feed it."""
    cfg = model.config
    emb = model.dpt.embeddings
    if getattr(cfg, "is_hybrid", False):
        out = emb(pixel_values, interpolate_pos_encoding=True)
        features = list(out.intermediate_activations)
        wanted = list(cfg.backbone_out_indices[2:])
    else:
        out = emb(pixel_values)
        features = []
        wanted = list(cfg.backbone_out_indices)
    hidden = out.last_hidden_states
    last = max(wanted)
    for i, layer in enumerate(model.dpt.encoder.layer[: last + 1]):
        hidden = layer(hidden)
        if i in wanted:
            features.append(hidden)
    return features


def check_multiple(pixel_values: torch.Tensor, multiple: int) -> int:
    """``multiple``, where the input's height and width are multiples of it (the backbone's patch size or
    stride); a ``ValueError`` otherwise (an exported graph runs on such an input and gives a cropped map)."""
    h, w = pixel_values.shape[-2:]
    if h % multiple or w % multiple:
        raise ValueError(f"input {h}x{w} is not a multiple of {multiple} (the backbone's patch size / stride)")
    return multiple


def segment(
    model: PreTrainedModel, pixel_values: torch.Tensor, with_aux: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(logits, auxiliary logits or None) for normalised images of any H x W divisible by the patch size.

    Unlike ``DPTForSemanticSegmentation.forward`` this passes the patch grid to the neck, so
    non-square inputs work, and it skips the encoder's final layer norm, which segmentation
    never reads. ``with_aux=False`` skips the auxiliary head (only the loss reads it; it costs
    as much as the main head). Logits come at the input resolution when the patch grid is even in both
    directions; otherwise the neck rounds the grid up and callers resize (loss and metrics do).
    """
    multiple = check_multiple(pixel_values, input_multiple(model.config))
    h, w = pixel_values.shape[-2:]
    if uses_backbone(model.config):
        features = model.features(pixel_values)
    else:
        features = backbone_features(model, pixel_values)
        features = model.neck(features, patch_height=h // multiple, patch_width=w // multiple)
    logits = run_head(model.head, features)
    aux = model.auxiliary_head(features[-1]) if with_aux and model.auxiliary_head is not None else None
    return logits, aux
