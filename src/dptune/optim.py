"""Parameter groups and the learning-rate schedule."""

from __future__ import annotations

from typing import Any

from torch import nn

from dptune.model import head_parameter_names


def param_groups(model: nn.Module, lr: float, head_lr_mult: float, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW/SGD groups: backbone vs. neck+heads (``lr * head_lr_mult``), each split into
    decayed weights and never-decayed norms, biases, position embeddings and CLS token."""
    head = head_parameter_names(model)
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim <= 1 or name.endswith(("position_embeddings", "cls_token"))
        groups.setdefault((name in head, no_decay), []).append(p)
    return [
        {
            "params": params,
            "lr": lr * (head_lr_mult if is_head else 1.0),
            "weight_decay": 0.0 if no_decay else weight_decay,
            "name": f"{'head' if is_head else 'backbone'}{'_no_decay' if no_decay else ''}",
        }
        for (is_head, no_decay), params in sorted(groups.items())
    ]


class WarmupPoly:
    """LR multiplier per optimizer step: linear warmup, then polynomial decay to ``min_ratio``."""

    def __init__(self, total_steps: int, warmup_steps: int, power: float = 1.0, min_ratio: float = 0.0) -> None:
        self.total, self.warmup, self.power, self.min_ratio = max(1, total_steps), warmup_steps, power, min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.min_ratio + (1 - self.min_ratio) * (1 - progress) ** self.power
