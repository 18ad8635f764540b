"""Parameter groups, the learning-rate schedule, and the count of non-finite steps."""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from dptune.errors import ConfigError
from dptune.models import BACKBONE_PREFIXES

log = logging.getLogger(__name__)

FSDP_PREFIX = "_fsdp_wrapped_module."  # what FSDP (use_orig_params) inserts into parameter names
_TASK_PREFIX = re.compile(r"^(?:seg|depth)\.")  # the two models of a joint segmentation + depth DPT


# each optimizer and schedule setting: (lowest, lowest allowed, highest, highest allowed, what it is)
_RANGES = {
    "lr": (0.0, False, math.inf, False, "the backbone's peak learning rate"),
    "head_lr_mult": (0.0, True, math.inf, False, "the neck and heads' learning rate over the backbone's"),
    "layer_decay": (0.0, False, math.inf, False, "each lower block's learning rate over the one above"),
    "weight_decay": (0.0, True, math.inf, False, "the weight decay"),
    "momentum": (0.0, True, 1.0, False, "SGD's momentum"),
    "warmup_ratio": (0.0, True, 1.0, True, "the share of the steps that warm up"),
    "warmup_steps": (0, True, math.inf, False, "the steps that warm up"),
    "poly_power": (0.0, True, math.inf, False, "the exponent of the polynomial decay"),
    "min_lr_ratio": (0.0, True, 1.0, True, "the final learning rate over the peak"),
}
TRAINING_SETTINGS = (*_RANGES, "betas")  # what only training reads: a model rebuilt to serve leaves them out


def check_optimizer_settings(hp: Any) -> None:
    """One line naming the first optimizer or schedule setting out of its range (before any data
    loads): a negative or infinite learning rate crashed in torch or diverged, a zero one trained
    nothing, a warmup or final ratio past 1 and a negative decay ran without a word."""
    def bad(key: str, value: Any, lo: float, lo_ok: bool, hi: float, hi_ok: bool, what: str) -> str | None:
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if number and math.isfinite(value) and (value >= lo if lo_ok else value > lo) and \
                (value <= hi if hi_ok else value < hi):
            return None
        limits = f"{'>=' if lo_ok else '>'} {lo:g}" + ("" if hi == math.inf else f" and {'<=' if hi_ok else '<'} {hi:g}")
        return f"model.{key} ({what}) must be a finite number {limits}, got {value!r}"

    for key, limits in _RANGES.items():
        value = hp.get(key)
        if value is None and key == "warmup_steps":  # None: warmup_ratio decides
            continue
        problem = bad(key, value, *limits)
        if problem:
            raise ConfigError(problem)
    betas = hp.get("betas")
    if not isinstance(betas, (list, tuple)) or len(betas) != 2 or any(bad("betas", b, 0.0, True, 1.0, False, "")
                                                                    for b in betas):
        raise ConfigError(f"model.betas (AdamW's two averaging rates) must be two numbers >= 0 and < 1, got {betas!r}")
    if hp.get("head_lr_mult") == 0:
        log.warning("model.head_lr_mult 0: the neck and heads do not train (learning rate 0), newly initialised "
                    "layers included")


def canonical(name: str) -> str:
    """A parameter name as a single DPT has it: without FSDP's wrapper prefix and without the
    ``seg.`` / ``depth.`` prefix of a joint model (its shared backbone is ``seg.dpt.*``)."""
    return _TASK_PREFIX.sub("", name.replace(FSDP_PREFIX, ""))
# an item of a block list: ViT / DINOv2 ``encoder.layer.i``, BEiT ``layers.i``, Swin ``layers.s.blocks.b``
_ITEM = re.compile(r"(?:^|\.)(?:layer|layers|blocks)\.\d+$")


def transformer_blocks(model: nn.Module) -> list[str]:
    """Names of the backbone's transformer blocks in forward order: items of ``layer``/``layers``/
    ``blocks`` lists that hold attention and no smaller such item (so a Swin stage is not a block,
    and a hybrid's ResNet layers, which hold no attention, are not blocks either)."""
    found = []
    for name, module in model.named_modules():
        if canonical(name).startswith(BACKBONE_PREFIXES) and _ITEM.search(name):
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
    blocks = [canonical(b) for b in transformer_blocks(model)]
    index = {name: k for k, name in enumerate(blocks, start=1)}
    depths: dict[str, int] = {}
    current = 0
    for name, _ in model.named_parameters():
        name = canonical(name)
        if not name.startswith(BACKBONE_PREFIXES):
            continue
        owner = next((b for b in blocks if name.startswith(b + ".")), None)
        if owner is not None:
            current = index[owner]
            depths[name] = current
        else:
            depths[name] = len(blocks) + 1 if blocks and current == len(blocks) else current
    return depths, len(blocks)


# besides norms and biases: embeddings and tokens, and what the official Swin-V2 recipe exempts
# (the attention's logit_scale and the continuous position bias MLP, "cpb_mlp" there)
_NO_DECAY_SUFFIXES = ("position_embeddings", "cls_token", "relative_position_bias_table", "logit_scale")
_NO_DECAY_PARTS = (".continuous_position_bias_mlp.",)


def exempt_from_decay(name: str) -> bool:
    """Whether a parameter of 2 or more dimensions is still exempt from weight decay, by name."""
    return name.endswith(_NO_DECAY_SUFFIXES) or any(part in name for part in _NO_DECAY_PARTS)


def param_groups(
    model: nn.Module, lr: float, head_lr_mult: float, weight_decay: float, layer_decay: float = 1.0
) -> list[dict[str, Any]]:
    """AdamW/SGD groups: backbone vs. neck+heads (``lr * head_lr_mult``), each split into
    decayed weights and never-decayed norms, biases, position embeddings and CLS token; with
    ``layer_decay < 1`` the backbone is further split by depth (see ``backbone_depths``)."""
    depths, n = backbone_depths(model) if layer_decay != 1.0 else ({}, 0)
    if layer_decay != 1.0 and n == 0:
        raise ConfigError("model.layer_decay: no transformer blocks found in this backbone")
    groups: dict[tuple[bool, bool, int], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        name = canonical(name)
        no_decay = p.ndim <= 1 or exempt_from_decay(name)
        groups.setdefault((not name.startswith(BACKBONE_PREFIXES), no_decay, depths.get(name, -1)), []).append(p)
    out = []
    for (is_head, no_decay, depth), params in sorted(groups.items()):
        name = "head" if is_head else "backbone" if depth < 0 else f"backbone_{depth:02d}"
        scale = head_lr_mult if is_head else 1.0 if depth < 0 else layer_decay ** (n + 1 - depth)
        out.append({"params": params, "lr": lr * scale, "weight_decay": 0.0 if no_decay else weight_decay,
                    "name": name + ("_no_decay" if no_decay else "")})
    return out


def warmup_poly(step: int, total: int, warmup: int, power: float = 1.0, min_ratio: float = 0.0) -> float:
    """LR multiplier at optimizer step ``step``: linear warmup, then polynomial decay to ``min_ratio``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * (1 - progress) ** power


class WarmupPoly(LRScheduler):
    """Linear warmup, then polynomial decay, over the optimizer steps of the *current* run.

    A checkpoint restores where the schedule stands (the step), never how long it is: the run
    that resumes knows its own length (``trainer.estimated_stepping_batches``), so resuming a
    1-epoch run into a 3-epoch one follows the 3-epoch schedule instead of sitting at the
    finished schedule's final LR. (``LambdaLR`` with a callable object saves and restores the
    object's fields, the old length included.)
    """

    def __init__(self, optimizer: Optimizer, total_steps: int, warmup_steps: int, power: float = 1.0,
                 min_ratio: float = 0.0) -> None:
        self.total, self.warmup = max(1, int(total_steps)), int(warmup_steps)
        self.power, self.min_ratio = float(power), float(min_ratio)
        self.validation_left = False  # the checkpoint to load ends inside a validation (a run at its end may resume)
        super().__init__(optimizer)

    def factor(self, step: int) -> float:
        return warmup_poly(step, self.total, self.warmup, self.power, self.min_ratio)

    def get_lr(self) -> list[float]:
        return [base * self.factor(self.last_epoch) for base in self.base_lrs]

    def state_dict(self) -> dict[str, Any]:
        return {"last_epoch": self.last_epoch, "_step_count": self._step_count, "base_lrs": list(self.base_lrs),
                "total_steps": self.total, "warmup_steps": self.warmup}

    def check_left(self, done: int, validation_left: bool | None = None) -> None:
        """One line where a checkpoint of ``done`` optimizer steps leaves this run nothing to train (its
        epochs may be shorter: another batch size or number of processes). ``apply_run_settings`` asks
        before the run writes anything (with the checkpoint's ``validation_left``: a strategy that restores after
        setting up the optimizers has not told the schedule yet), ``load_state_dict`` again when it restores."""
        left = self.validation_left if validation_left is None else validation_left
        if done > self.total or (done == self.total and not left):
            from dptune.errors import ConfigError

            raise ConfigError(f"the checkpoint has done {done} optimizer steps and this run has "
                              f"{self.total} in all: nothing is left to train; raise --trainer.max_epochs (or "
                              "max_steps) to extend the run")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_epoch = int(state["last_epoch"])
        self._step_count = int(state.get("_step_count", self.last_epoch + 1))
        self.base_lrs = list(state.get("base_lrs", self.base_lrs))
        saved = state.get("total_steps")
        self.check_left(self.last_epoch)
        from dptune.data.loaders import rank

        if saved is not None and int(saved) != self.total and rank() == 0:
            log.info("LR schedule: the checkpoint's run had %d optimizer steps, this run has %d; the schedule "
                     "follows this run (warmup %d steps, resuming at step %d)", saved, self.total, self.warmup,
                     self.last_epoch)
        # the optimizer's restored LRs belong to the old schedule; set this step's
        for group, lr in zip(self.optimizer.param_groups, self.get_lr(), strict=True):
            group["lr"] = lr
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]


class NonFiniteSteps:
    """Counts the optimizer steps whose loss or gradients are not finite (NaN or inf). Up to
    ``limit`` of them in a row are skipped (the weights are not updated); one more means the run
    has diverged and must stop. A finite step resets the count in a row; ``skipped`` is the
    run's total and ``updates`` the steps that did update the weights."""

    def __init__(self, limit: int) -> None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise ConfigError(f"model.nonfinite_skips must be a whole number >= 0, got {limit!r}")
        self.limit = limit
        self.in_a_row = self.skipped = self.updates = 0

    def update(self, finite: bool) -> str:
        """``"step"`` (update the weights), ``"skip"`` (leave them) or ``"stop"`` (diverged)."""
        if finite:
            self.in_a_row = 0
            self.updates += 1
            return "step"
        self.in_a_row += 1
        self.skipped += 1
        return "skip" if self.in_a_row <= self.limit else "stop"


def any_nonfinite(tensors: list[torch.Tensor]) -> torch.Tensor:
    """A 0-d bool tensor: does any of these tensors hold a NaN or inf? One fused pass per device and
    dtype (the kernel GradScaler uses, with a scale of 1), without a wait for the device; a norm
    over ~150 gradient tensors costs 40x more on CPU."""
    groups: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    found = []
    for (device, _dtype), group in groups.items():
        flag = torch.zeros(1, device=device)
        torch._amp_foreach_non_finite_check_and_unscale_(group, flag, torch.ones(1, device=device))
        found.append(flag.to(tensors[0].device))
    return torch.cat(found).any()


def nonfinite_tensors(named: Iterable[tuple[str, Any]]) -> list[str]:
    """The names of the floating-point tensors among ``named`` that hold a NaN or inf (one
    device sync per device, not one per tensor)."""
    flags: dict[torch.device, list[tuple[str, torch.Tensor]]] = {}
    for name, t in named:
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel():
            flags.setdefault(t.device, []).append((name, torch.isfinite(t.detach()).all()))
    bad = []
    for items in flags.values():
        finite = torch.stack([f for _, f in items]).tolist()
        bad += [name for (name, _), ok in zip(items, finite, strict=True) if not ok]
    return bad
