"""Reading dptune checkpoints safely and rebuilding the task that wrote them, offline."""

from __future__ import annotations

import os
import pickle
from typing import Any

import torch

from dptune.errors import ConfigError


def load_checkpoint(path: str, map_location: str = "cpu") -> dict[str, Any]:
    """A checkpoint read with ``weights_only=True`` (tensors and plain types: what dptune writes),
    so that opening a checkpoint cannot run code. One that holds other Python objects is refused,
    unless ``DPTUNE_TRUST_CHECKPOINTS=1`` says its source is trusted."""
    if os.environ.get("DPTUNE_TRUST_CHECKPOINTS") == "1":
        return torch.load(path, map_location=map_location, weights_only=False)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{path}: holds Python objects beyond tensors and plain types ({first}); loading it could "
                          "run code. If you trust its source, set DPTUNE_TRUST_CHECKPOINTS=1") from None


def task_class(task: str):
    from dptune.tasks.depth import DepthModule
    from dptune.tasks.multitask import MultiTaskModule
    from dptune.tasks.segmentation import SegmentationModule

    classes = {"segmentation": SegmentationModule, "depth": DepthModule, "multitask": MultiTaskModule}
    if task not in classes:
        raise ConfigError(f"unknown dptune task {task!r} (known: {sorted(classes)})")
    return classes[task]


def load_module(ckpt_path: str, map_location: str = "cpu"):
    """Rebuild the task module (segmentation or depth) of a dptune checkpoint without the hub."""
    ckpt = load_checkpoint(ckpt_path, map_location)
    if "dptune" not in ckpt or "hyper_parameters" not in ckpt:
        raise ConfigError(f"{ckpt_path}: not a dptune checkpoint (no model config stored)")
    meta = ckpt["dptune"]
    hp = {k: v for k, v in ckpt["hyper_parameters"].items() if not k.startswith("_")}
    hp.update(pretrained=None, config=meta["model_config"], image_mean=meta["image_mean"], image_std=meta["image_std"])
    module = task_class(meta.get("task", "segmentation"))(**hp)
    module.load_state_dict(ckpt["state_dict"])
    module.checkpoint_metrics = meta.get("metrics", {})
    module.checkpoint_meta = meta
    module.checkpoint_evaluation = meta.get("evaluation", {"mode": hp.get("val_mode", "resize")})
    return module.eval()
