"""What a task refuses to start a stage with, said in one line before the run begins: sizes the
backbone cannot take, a stream of training data without a run length, a callback monitoring a value
validation never logs. ``StageChecks`` is a mixin of ``DPTTask``; a task adds its own checks by
overriding ``check_stage`` and names what its validation logs in ``validation_keys``."""

from __future__ import annotations

from typing import Any

import torch

from dptune.errors import ConfigError
from dptune.metrics.directions import monitor_mode
from dptune.models.dpt_backbone import input_multiple
from dptune.tasks.optimizing import STREAM_LENGTH


class StageChecks:
    """The checks of ``DPTTask`` (``self.model``, ``self.hparams`` and ``self.trainer`` are the task's)."""

    def check_sizes(self, **sizes: Any) -> None:
        """Image, crop and window sizes must be multiples of what the backbone divides by."""
        m = input_multiple(self.model.config)
        for what, size in sizes.items():
            pair = [size, size] if isinstance(size, int) else list(size or [])
            if any(int(v) <= 0 for v in pair):
                raise ConfigError(f"data.{what} {pair} is not a size: height and width in pixels, multiples of {m}")
            if any(int(v) % m for v in pair):
                fix = [max(m, round(int(v) / m) * m) for v in pair]
                raise ConfigError(f"data.{what} {pair} is not a multiple of {m} (the backbone's patch size / stride); "
                                  f"use e.g. {fix}")

    def check_stage(self, stage: str) -> None:
        """What the stage refuses to start with: sizes the backbone cannot take, a stream of training
        data without a run length (a task adds its own). Run once per run: by ``prepare_data`` in a
        run of one process, else by ``setup``."""
        dm = getattr(self.trainer, "datamodule", None)
        self.check_sizes(image_size=self.hparams.image_size, crop_size=getattr(dm, "crop_size", None))
        train = getattr(dm, "datasets", {}).get("train") if stage == "fit" else None
        stream = isinstance(train, torch.utils.data.IterableDataset) and not hasattr(train, "__len__")
        # a stream's run is as long as max_steps, or as a whole number of batches per epoch says
        batches = self.trainer.limit_train_batches if stream else None
        if stream and self.trainer.max_steps in (None, -1) and not (isinstance(batches, int) and batches > 0):
            raise ConfigError(STREAM_LENGTH)
        if stage == "fit":
            self.check_monitors()

    def validation_keys(self) -> list[str]:
        """The values validation logs (``fnmatch`` patterns where a name varies), for checking what a
        checkpoint or early stopping monitors before the run (``check_monitors``)."""
        return ["val/loss"]

    def monitor_hint(self, monitor: str) -> str:
        """What makes the task log ``monitor`` where it can (a task's setting), else nothing."""
        return ""

    def check_monitors(self) -> None:
        """A callback monitoring a value no validation logs (a typo, ``val/delta_m`` without its
        references) stopped the run with Lightning's traceback after the first epoch: one line now."""
        import fnmatch

        keys = [*self.validation_keys(), "train/*", "epoch", "step"]  # Lightning offers epoch and step itself
        for cb in getattr(self.trainer, "callbacks", None) or []:
            monitor = getattr(cb, "monitor", None)
            # a name is matched as it is (a class may be called "Tree[s]"); only the task's "*" entries are patterns
            if not isinstance(monitor, str) or any(monitor == k or ("*" in k and fnmatch.fnmatchcase(monitor, k))
                                                   for k in keys):
                continue
            what = "checkpoint.monitor" if type(cb).__name__ == "Checkpoint" else f"{type(cb).__name__} monitor"
            shown = [k for k in keys if k not in ("train/*", "epoch", "step")]
            raise ConfigError(f"{what} {monitor}: validation logs no such value ({', '.join(shown[:8])}"
                              f"{', ...' if len(shown) > 8 else ''}; or a train/ value){self.monitor_hint(monitor)}")
        for cb in getattr(self.trainer, "callbacks", None) or []:
            # the command line sets dptune's best checkpoint's mode by its monitor; a callback the user added keeps
            # the mode it was given (EarlyStopping's default min stopped a run as its mIoU rose, without a word)
            monitor, mode = getattr(cb, "monitor", None), getattr(cb, "mode", None)
            best = monitor_mode(monitor) if isinstance(monitor, str) else None
            if best is not None and mode in ("min", "max") and mode != best:
                raise ConfigError(f"{type(cb).__name__} monitor {monitor}: best is {'lowest' if best == 'min' else 'highest'}"
                                  f", but its mode is {mode}; give it mode {best} (mode: {best} in its entry of trainer.callbacks, or "
                                  f"--trainer.callbacks.mode {best} right after the --trainer.callbacks+= that adds it: "
                                  "that flag sets the callback added last)")
