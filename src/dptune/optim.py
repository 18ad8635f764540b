"""Parameter groups and the learning-rate schedule."""

from __future__ import annotations

import re
from typing import Any

from torch import nn

from dptune.model import BACKBONE_PREFIXES

FSDP_PREFIX = "_fsdp_wrapped_module."  # what FSDP (use_orig_params) inserts into parameter names
# an item of a block list: ViT / DINOv2 ``encoder.layer.i``, BEiT ``layers.i``, Swin ``layers.s.blocks.b``
_ITEM = re.compile(r"(?:^|\.)(?:layer|layers|blocks)\.\d+$")


def transformer_blocks(model: nn.Module) -> list[str]:
    """Names of the backbone's transformer blocks in forward order: items of ``layer``/``layers``/
    ``blocks`` lists that hold attention and no smaller such item (so a Swin stage is not a block,
    and a hybrid's ResNet layers, which hold no attention, are not blocks either)."""
    found = []
    for name, module in model.named_modules():
        if name.startswith(BACKBONE_PREFIXES) and _ITEM.search(name):
            if any("attention" in sub or "attn" in sub for sub, _ in module.named_modules()):
                found.append(name)
    return [b for b in found if not any(o.startswith(b + ".") for o in found)]


def backbone_depths(model: nn.Module) -> tuple[dict[str, int], int]:
    """Depth of each backbone parameter, for layer-wise LR decay, and the number of blocks ``n``.

    Blocks are found by module name: block ``k`` (in forward order) has depth ``k``; what comes
    before the first block (patch / position embeddings, a hybrid's ResNet stem) has depth 0;
    what sits between blocks (Swin's patch merging) takes the depth of the block before it;
    what follows the last block (final norms) has depth ``n + 1``, like the heads.
    """
    blocks = [b.replace(FSDP_PREFIX, "") for b in transformer_blocks(model)]
    index = {name: k for k, name in enumerate(blocks, start=1)}
    depths: dict[str, int] = {}
    current = 0
    for name, _ in model.named_parameters():
        name = name.replace(FSDP_PREFIX, "")
        if not name.startswith(BACKBONE_PREFIXES):
            continue
        owner = next((b for b in blocks if name.startswith(b + ".")), None)
        if owner is not None:
            current = index[owner]
            depths[name] = current
        else:
            depths[name] = len(blocks) + 1 if blocks and current == len(blocks) else current
    return depths, len(blocks)


def param_groups(
    model: nn.Module, lr: float, head_lr_mult: float, weight_decay: float, layer_decay: float = 1.0
) -> list[dict[str, Any]]:
    """AdamW/SGD groups: backbone vs. neck+heads (``lr * head_lr_mult``), each split into
    decayed weights and never-decayed norms, biases, position embeddings and CLS token; with
    ``layer_decay < 1`` the backbone is further split by depth (see ``backbone_depths``)."""
    depths, n = backbone_depths(model) if layer_decay != 1.0 else ({}, 0)
    if layer_decay != 1.0 and n == 0:
        raise ValueError("model.layer_decay: no transformer blocks found in this backbone")
    groups: dict[tuple[bool, bool, int], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        name = name.replace(FSDP_PREFIX, "")
        no_decay = p.ndim <= 1 or name.endswith(("position_embeddings", "cls_token", "relative_position_bias_table"))
        groups.setdefault((not name.startswith(BACKBONE_PREFIXES), no_decay, depths.get(name, -1)), []).append(p)
    out = []
    for (is_head, no_decay, depth), params in sorted(groups.items()):
        name = "head" if is_head else "backbone" if depth < 0 else f"backbone_{depth:02d}"
        scale = head_lr_mult if is_head else 1.0 if depth < 0 else layer_decay ** (n + 1 - depth)
        out.append({"params": params, "lr": lr * scale, "weight_decay": 0.0 if no_decay else weight_decay,
                    "name": name + ("_no_decay" if no_decay else "")})
    return out


class WarmupPoly:
    """LR multiplier per optimizer step: linear warmup, then polynomial decay to ``min_ratio``."""

    def __init__(self, total_steps: int, warmup_steps: int, power: float = 1.0, min_ratio: float = 0.0) -> None:
        self.total, self.warmup, self.power, self.min_ratio = max(1, total_steps), warmup_steps, power, min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.min_ratio + (1 - self.min_ratio) * (1 - progress) ** self.power
