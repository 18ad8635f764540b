"""Callbacks and the W&B logger: learning rates, progress lines and validation visuals (the W&B mode and a
command's run: ``dptune.training.wandb_runs``; checkpoints and interruptions: ``dptune.training.checkpointing``)."""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
from lightning.pytorch.callbacks import Callback, LearningRateMonitor
from lightning.pytorch.loggers import WandbLogger

from dptune.training.wandb_runs import (
    checked_mode,
    environment_mode,
    settings_refused,
    unreadable_file,
    wandb_mode,
)

log = logging.getLogger(__name__)


class DPTuneWandbLogger(WandbLogger):
    """``WandbLogger`` that picks online/offline by itself (see ``wandb_mode``)."""

    def __init__(self, project: str = "dptune", save_dir: str = ".", mode: str | None = None, **kwargs: Any) -> None:
        """
        Args:
            project: W&B project.
            save_dir: Where the run folder goes; ``train.py`` sets it to ``trainer.default_root_dir``.
            mode: ``online``, ``offline`` or ``disabled``; default: online when credentials exist.
        """
        if mode:
            environment_mode()  # checked whatever the mode given here: wandb reads it anyway
            mode = checked_mode(mode, "trainer.logger.init_args.mode")
        else:
            mode = wandb_mode()  # reads and checks WANDB_MODE itself
        os.environ.setdefault("WANDB_SILENT", "true")
        super().__init__(project=project, save_dir=save_dir, mode=mode, **kwargs)

    @property
    def experiment(self) -> Any:
        """Lightning's run, made at the first log; wandb's refusals (no credentials, a bad key, a setting it
        does not take, the server out of reach: a traceback after the data checks) are one line."""
        try:
            return super().experiment
        except Exception as e:
            import wandb.errors

            from dptune.errors import ConfigError

            # wandb's own errors (credentials, a bad key, the server out of reach) and its settings' validation
            # (pydantic's ValueError: a WANDB_BASE_URL it does not take); logging offline is advised where it helps
            settings = isinstance(e, ValueError) and type(e).__module__.startswith("pydantic")
            if isinstance(e, wandb.errors.Error) or settings:
                online = self._wandb_init.get("mode") not in ("offline", "dryrun", "disabled")
                hint = (" (or log offline: WANDB_MODE=offline, and upload later with wandb sync)"
                        if online and not settings and not settings_refused() else "")
                raise ConfigError(f"W&B: {' '.join(str(e).split())}{hint}") from None
            if isinstance(e, UnicodeDecodeError):  # wandb reads the netrc without catching this
                raise ConfigError(f"W&B: {unreadable_file() or 'a file it reads'}: not a text file ({e.reason})"
                                  ) from None
            raise

    # Pickled for the processes ``ddp_spawn`` starts (the Python API; the command line runs ddp), Lightning's
    # logger creates the W&B run in the launching process and the spawned one attaches to it; the attached
    # run's folder is then taken from the spawned process's working directory (wandb 0.31), where its pictures
    # went (a ``wandb`` folder beside the command, not the run's). The run's root folder travels with the
    # logger and is the spawned process's ``WANDB_DIR``, which the attached run takes its folder from.
    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        root = getattr(getattr(self._experiment, "settings", None), "root_dir", None)
        state["_dptune_wandb_dir"] = os.path.abspath(root) if isinstance(root, str) and root else None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        import multiprocessing

        state = dict(state)
        root = state.pop("_dptune_wandb_dir", None)
        self.__dict__.update(state)
        # only in a process being started (multiprocessing's own test: the flag is up while the process unpickles
        # what it was given); a copy made in this process changes nothing
        if root and getattr(multiprocessing.current_process(), "_inheriting", False):
            os.environ["WANDB_DIR"] = root


class LRMonitor(LearningRateMonitor):
    """``LearningRateMonitor`` that stays quiet instead of failing when logging is off."""

    def on_train_start(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        if trainer.loggers:
            super().on_train_start(trainer, *args, **kwargs)

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        if trainer.loggers:
            super().on_train_batch_start(trainer, *args, **kwargs)

    def on_train_epoch_start(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        if trainer.loggers:
            super().on_train_epoch_start(trainer, *args, **kwargs)


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class ProgressLog(Callback):
    """Progress as log lines where no progress bar can be seen: output redirected to a file (nohup,
    SLURM, CI) or the bar turned off. A line at most every ``every`` seconds while training or
    validating (epoch, step of all steps, loss, images/s, elapsed, ETA); at the end of ``fit``,
    where the checkpoints and the W&B run are (and how to sync an offline run)."""

    def __init__(self, every: float = 30.0) -> None:
        """
        Args:
            every: Seconds between two progress lines (0: one per step).
        """
        if not 0 <= every < math.inf:
            from dptune.errors import ConfigError

            raise ConfigError(f"progress.every must be a number of seconds >= 0, got {every}")
        self.every = every
        self._start = self._last = 0.0
        self._images = self._first_step = 0

    @staticmethod
    def _active(trainer: pl.Trainer) -> bool:
        return trainer.is_global_zero and (trainer.progress_bar_callback is None or not sys.stdout.isatty())

    def _due(self) -> bool:
        now = time.monotonic()
        if now - self._last < self.every:
            return False
        self._last = now
        return True

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = self._last = time.monotonic()
        self._images, self._first_step = 0, trainer.global_step  # a resumed run starts past 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._images += _batch_size(batch) * trainer.world_size  # every process trains a batch this size
        if not self._active(trainer) or not self._due():
            return
        elapsed = time.monotonic() - self._start
        total, done = trainer.estimated_stepping_batches, trainer.global_step
        known = math.isfinite(total) and total > 0  # a stream without max_steps has no end to count to
        steps = f"step {done}/{int(total)} ({100 * done / total:.0f}%)" if known else f"step {done}"
        ran = done - self._first_step
        eta = f", ETA {_clock(elapsed * max(0, total - done) / ran)}" if known and ran > 0 else ""
        epochs = f"/{trainer.max_epochs}" if trainer.max_epochs and trainer.max_epochs > 0 else ""
        loss = trainer.callback_metrics.get("train/loss")
        log.info("epoch %d%s %s%s | %.1f images/s | elapsed %s%s", trainer.current_epoch + 1, epochs, steps,
                 f" | train/loss {float(loss):.4f}" if loss is not None else "",
                 self._images / max(elapsed, 1e-9), _clock(elapsed), eta)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if trainer.sanity_checking or not self._active(trainer) or not self._due():
            return
        counts = trainer.num_val_batches
        total = counts[dataloader_idx] if dataloader_idx < len(counts) else math.inf
        log.info("validating: batch %d%s%s", batch_idx + 1, f"/{int(total)}" if math.isfinite(total) else "",
                 f" of loader {dataloader_idx + 1}/{len(counts)}" if len(counts) > 1 else "")

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            for line in run_locations(trainer):
                log.info(line)


def _batch_size(batch: Any) -> int:
    image = batch.get("image") if isinstance(batch, dict) else None
    return int(image.shape[0]) if image is not None else 0


def run_locations(trainer: pl.Trainer) -> list[str]:
    """Where a run left its results: checkpoints (best and last) and the W&B run."""
    lines = []
    for cb in trainer.checkpoint_callbacks:
        if getattr(cb, "best_model_path", ""):
            lines.append(f"best checkpoint: {cb.best_model_path}")
        if getattr(cb, "last_model_path", ""):
            lines.append(f"last checkpoint: {cb.last_model_path} (resume: --ckpt_path {cb.last_model_path})")
    for lg in trainer.loggers:
        if isinstance(lg, WandbLogger):
            run = lg.experiment
            mode = getattr(getattr(run, "settings", None), "mode", None)
            if mode == "disabled" or getattr(run, "disabled", False):
                continue  # nothing was written
            folder = Path(run.dir).parent.resolve()
            if mode == "offline" or getattr(run, "offline", False):
                lines.append(f"W&B run (offline): {folder}; upload it with: wandb sync {folder}")
            else:
                lines.append(f"W&B run: {getattr(run, 'url', None) or folder} (files in {folder})")
    return lines


class ValidationVisuals(Callback):
    """Logs the task's validation pictures to W&B once per validation: the task says what they are
    (``visual_samples`` from the first batch, ``log_visuals``): segmentation overlays and a per-class
    IoU table, depth panels."""

    def __init__(self, num_images: int | None = None) -> None:
        self.num_images = num_images
        self._samples: list[dict[str, np.ndarray]] = []

    @staticmethod
    def _wandb(trainer: pl.Trainer) -> WandbLogger | None:
        for lg in trainer.loggers:
            if isinstance(lg, WandbLogger):
                return lg
        return None

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if batch_idx != 0 or trainer.sanity_checking or not trainer.is_global_zero or self._wandb(trainer) is None:
            return
        n = self.num_images if self.num_images is not None else pl_module.hparams.get("log_images", 4)
        self._samples.extend(pl_module.visual_samples(batch, outputs, n))  # first batch of each loader

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        logger = self._wandb(trainer)
        if logger is None or trainer.sanity_checking or not trainer.is_global_zero:
            return
        pl_module.log_visuals(logger, self._samples, trainer.global_step)
        self._samples = []
