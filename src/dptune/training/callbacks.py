"""Callbacks and logger set-up: checkpoints, Weights & Biases mode and validation visuals."""

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
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger

log = logging.getLogger(__name__)

INTERRUPTED: list[str] = []  # a fit stopped by Ctrl-C: what to tell the user (set by Checkpoint.on_exception)


def wandb_mode() -> str:
    """``online`` only when credentials exist; never a login prompt, never a hang waiting for one.

    An explicit ``WANDB_MODE`` wins.
    """
    explicit = os.environ.get("WANDB_MODE")
    if explicit:
        return explicit
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        if "api.wandb.ai" in netrc.read_text():
            return "online"
    except OSError:
        pass
    return "offline"


class DPTuneWandbLogger(WandbLogger):
    """``WandbLogger`` that picks online/offline by itself (see ``wandb_mode``)."""

    def __init__(self, project: str = "dptune", save_dir: str = ".", mode: str | None = None, **kwargs: Any) -> None:
        """
        Args:
            project: W&B project.
            save_dir: Where the run folder goes; ``train.py`` sets it to ``trainer.default_root_dir``.
            mode: ``online``, ``offline`` or ``disabled``; default: online when credentials exist.
        """
        mode = mode or wandb_mode()
        os.environ.setdefault("WANDB_SILENT", "true")
        super().__init__(project=project, save_dir=save_dir, mode=mode, **kwargs)


class Checkpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose ``last.ckpt`` is the latest state after every validation.

    Lightning 2.6 only refreshes ``last.ckpt`` when a top-k checkpoint is written in the same
    step, so a run whose metric stops improving would leave a stale ``last.ckpt`` to resume
    from or export.

    A run whose weights or optimizer state hold a NaN or inf has diverged: no checkpoint of it is
    written or selected as best (the run stops with one line instead; while Lightning handles
    another exception, such a checkpoint is left unwritten with a warning).
    """

    _in_exception = False

    def state_dict(self) -> dict[str, Any]:
        """Lightning's state, without the +-inf "no k-th best yet" sentinel: a checkpoint holds no
        non-finite tensor at all (the sentinel is rebuilt from the mode on load)."""
        import torch

        state = super().state_dict()
        for key in ("kth_value", "best_model_score", "current_score"):
            value = state.get(key)
            if isinstance(value, torch.Tensor) and not bool(torch.isfinite(value).all()):
                if key == "kth_value":
                    del state[key]
                else:
                    state[key] = None
        return state

    @staticmethod
    def _nonfinite(trainer: pl.Trainer) -> list[str]:
        """This process's parameters, buffers and optimizer state tensors that hold a NaN or inf."""
        from dptune.tasks.optim import nonfinite_tensors

        module = trainer.lightning_module
        named = [*module.named_parameters(), *module.named_buffers()]
        for i, opt in enumerate(trainer.optimizers):
            for state in opt.state.values():
                named += [(f"optimizer {i} state {k}", v) for k, v in state.items()]
        return nonfinite_tensors(named)

    def _check_weights(self, trainer: pl.Trainer) -> None:
        """Stop (on every process alike) rather than write or select a checkpoint of non-finite weights."""
        if self._in_exception:
            return  # ``_save_checkpoint`` looks, without collectives
        if getattr(self, "_finite_at_step", None) == trainer.global_step:
            return  # checked for the other checkpoint of this step
        bad = self._nonfinite(trainer)
        if trainer.strategy.reduce_boolean_decision(not bad, all=True):
            self._finite_at_step = trainer.global_step
            return
        from dptune.errors import ConfigError

        raise ConfigError(f"training diverged: at step {trainer.global_step} {len(bad) or 'some'} tensors of the run "
                          f"hold NaN/inf (e.g. {bad[0] if bad else 'on another process'}); no checkpoint written. "
                          f"Resume from an earlier checkpoint with a lower --model.lr")

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        if self._in_exception:
            bad = self._nonfinite(trainer)
            if bad:
                log.warning("not writing %s: %d tensors hold NaN/inf (e.g. %s)", filepath, len(bad), bad[0])
                return
        # atomic: a job killed while writing leaves the previous file, never half of a new one
        partial = f"{filepath}.partial"
        super()._save_checkpoint(trainer, partial)
        if trainer.is_global_zero:
            os.replace(partial, filepath)
        trainer.strategy.barrier("dptune-checkpoint")
        self._last_checkpoint_saved = filepath

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """On SIGTERM (preemption; Lightning stops at the next step) write ``last.ckpt`` mid-epoch,
        so that ``--ckpt_path last`` resumes at the same global step."""
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        self._in_exception = True  # no collectives, no new exception: a non-finite state is left unwritten
        try:
            super().on_exception(trainer, pl_module, exception)
            if isinstance(exception, KeyboardInterrupt) and trainer.state.fn == "fit" and trainer.is_global_zero:
                # Lightning ends a Ctrl-C with a bare exit 1; dptune.cli.main turns it into this line and 130
                last = self.last_model_path if self.last_model_path and os.path.isfile(self.last_model_path) else None
                INTERRUPTED.append(f"interrupted (Ctrl-C) at step {trainer.global_step}; "
                                   + (f"resume from the last checkpoint with --ckpt_path last ({last})" if last else
                                      "no checkpoint was written yet: start the run again"))
            if isinstance(exception, SIGTERMException) and self.save_last and trainer.state.fn == "fit":
                if self._last_global_step_saved != trainer.global_step:
                    self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
                if trainer.is_global_zero:
                    log.warning("SIGTERM: saved %s at step %d; resume with --ckpt_path last",
                                self.last_model_path, trainer.global_step)
        finally:
            self._in_exception = False

    def _save_topk_checkpoint(self, trainer: pl.Trainer, monitor_candidates: dict[str, Any]) -> None:
        """A NaN monitored value (nothing was scored) is no result: it never becomes "best"; nor
        do non-finite weights (see ``_check_weights``)."""
        import torch

        self._check_weights(trainer)
        current = monitor_candidates.get(self.monitor) if self.monitor else None
        if current is not None and torch.isnan(torch.as_tensor(current)).any():
            if trainer.is_global_zero:
                log.warning("%s is NaN at step %d (nothing was scored, or the predictions were non-finite): no best "
                            "checkpoint from it", self.monitor,
                            trainer.global_step)
            return
        super()._save_topk_checkpoint(trainer, monitor_candidates)

    def _save_last_checkpoint(self, trainer: pl.Trainer, monitor_candidates: dict[str, Any]) -> None:
        if self.save_last:
            self._check_weights(trainer)
        super()._save_last_checkpoint(trainer, monitor_candidates)

    def _refresh_last(self, trainer: pl.Trainer) -> None:
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            if self._last_global_step_saved != trainer.global_step:
                self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    # after the parent's own save for this epoch (it saves at train-epoch end or validation end)
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._refresh_last(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not trainer.sanity_checking and not self._should_save_on_train_epoch_end(trainer):
            self._refresh_last(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        self._refresh_last(trainer)


class InterruptGuard(Callback):
    """A Ctrl-C is never lost. Python turns SIGINT into a KeyboardInterrupt wherever the program is;
    when that is a finalizer (``__del__``, run by the garbage collector inside any call) Python prints
    "Exception ignored" and goes on, and the run trained to its end. While a fit runs, SIGINT notes
    itself before raising; one that did not stop the run is raised again at the next batch's end, or
    when training ends. Outside a fit the handler acts as Python's own (Lightning puts the handlers it
    found at the fit's start back after a failed run, this one included). Each process of a DDP run
    guards itself: a Ctrl-C from a terminal reaches them all."""

    def __init__(self) -> None:
        self.pending = False
        self.active = False
        self._before = None

    def _sigint(self, signum, frame) -> None:
        if self.active:
            self.pending = True
        raise KeyboardInterrupt

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        import signal
        import threading

        self.pending, self.active = False, True
        # only where Python's own handler is in place (a job started in the background ignores SIGINT) or an
        # earlier guard's, which acts as Python's outside its fit: a fit that failed skips the teardown that
        # removes it, and Lightning puts it back as the handler it found; the next fit stands in for it
        handler = signal.getsignal(signal.SIGINT)
        if threading.current_thread() is threading.main_thread() and \
                (handler is signal.default_int_handler or isinstance(getattr(handler, "__self__", None), InterruptGuard)):
            self._before = signal.signal(signal.SIGINT, self._sigint)

    def _raise_lost(self, *args: Any) -> None:
        if self.pending:
            self.pending = False
            raise KeyboardInterrupt

    on_train_batch_end = on_validation_batch_end = on_train_end = _raise_lost

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.pending, self.active = False, False  # it stopped the run

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        import signal

        self.active = False
        if self._before is not None and signal.getsignal(signal.SIGINT) == self._sigint:
            earlier = getattr(self._before, "__self__", None)
            # an earlier guard's handler left behind by a failed fit acts as Python's own: put Python's own back
            gone = isinstance(earlier, InterruptGuard) and not earlier.active
            signal.signal(signal.SIGINT, signal.default_int_handler if gone else self._before)
        self._before = None


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
