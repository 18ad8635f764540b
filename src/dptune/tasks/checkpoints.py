"""Reading dptune checkpoints safely and rebuilding the task that wrote them, offline."""

from __future__ import annotations

from dptune.checkpoint_file import dptune_parts, load_checkpoint
from dptune.errors import ConfigError

__all__ = ["load_checkpoint", "load_module", "task_class"]


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
    meta, hp = dptune_parts(ckpt, ckpt_path)
    hp = {k: v for k, v in hp.items() if not k.startswith("_")}
    hp.update(pretrained=None, config=meta["model_config"], image_mean=meta["image_mean"], image_std=meta["image_std"])
    module = task_class(meta.get("task", "segmentation"))(**hp)
    module.load_state_dict(ckpt["state_dict"])
    module.checkpoint_metrics = meta.get("metrics", {})
    module.checkpoint_meta = meta
    module.checkpoint_evaluation = meta.get("evaluation", {"mode": hp.get("val_mode", "resize")})
    return module.eval()
