"""The tasks the command line runs: each one's module and datamodule, the data facts linked into its
model, what its "best" checkpoint means, and which one a command line asks for."""

from __future__ import annotations

from typing import Any

from dptune import TASKS
from dptune.cli.args import config_files, read_config
from dptune.data.datamodule import SegmentationDataModule
from dptune.errors import ConfigError
from dptune.tasks.segmentation import SegmentationModule

# per task (dptune.TASKS): data facts linked into the model, what "best" means
TASK_SETTINGS: dict[str, dict[str, Any]] = {
    "segmentation": {
        "links": [("data.labels_spec", "model.label_spec", "instantiate"), ("data.image_size", "model.image_size", None),
                  ("data.val_mode", "model.val_mode", None)],
        "monitor": ("val/mIoU", "max", "best-epoch{epoch:02d}-mIoU{val/mIoU:.4f}"),
    },
    "depth": {
        "links": [("data.image_size", "model.image_size", None), ("data.eval_crop", "model.eval_crop", None)],
        "monitor": ("val/abs_rel", "min", "best-epoch{epoch:02d}-absrel{val/abs_rel:.4f}"),
    },
    # with model.references set, --checkpoint.monitor val/delta_m --checkpoint.mode max selects on both tasks
    "multitask": {
        "links": [("data.labels_spec", "model.label_spec", "instantiate"), ("data.image_size", "model.image_size", None)],
        "monitor": ("val/mIoU", "max", "best-epoch{epoch:02d}-mIoU{val/mIoU:.4f}"),
    },
}


def task_classes(task: str) -> tuple[type, type]:
    if task == "depth":
        from dptune.data.depth_datamodule import DepthDataModule
        from dptune.tasks.depth import DepthModule

        return DepthModule, DepthDataModule
    if task == "multitask":
        from dptune.data.multitask_datamodule import MultiTaskDataModule
        from dptune.tasks.multitask import MultiTaskModule

        return MultiTaskModule, MultiTaskDataModule
    return SegmentationModule, SegmentationDataModule


def task_from_args(args: list[str]) -> str:
    """The task a command line asks for: ``--task NAME``, else a ``task:`` key at the top of a
    ``--config`` file (the last one that has it), else segmentation. Every config file is read
    here, so that one that is not YAML or not a mapping is one line naming it."""
    task, where = None, "--task"
    for path in config_files(args):
        spec = read_config(path) or {}
        if "task" in spec:
            task, where = spec["task"], f"{path}: task"
    for i, arg in enumerate(args):
        if arg == "--task" and i + 1 < len(args):
            task, where = args[i + 1], "--task"
        elif arg.startswith("--task="):
            task, where = arg.split("=", 1)[1], "--task"
    task = task or "segmentation"
    if not isinstance(task, str) or task not in TASKS:
        raise ConfigError(f"{where}: expected one of {', '.join(TASKS)}, given {task!r}")
    return task
