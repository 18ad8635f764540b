"""SIGTERM: training stops at the end of an optimizer step, every process at the same one
(``SigtermSync``; a process the launcher started ends with it: ``dptune.command.end_with_the_launcher``)."""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

log = logging.getLogger(__name__)


class SigtermSync(Callback):
    """A ``SIGTERM`` stops training at the end of an optimizer step, on every process together.

    Lightning's handler stops at the next batch: inside an accumulation window
    (``accumulate_grad_batches``) the window's gradients so far were lost with the process, and the
    resume stepped on the window's remaining batches alone. And it broadcasts from inside the
    handler, on the process that got the signal, wherever that process is (inside a gradient
    all-reduce, a validation, a metric sync): the other processes were in another collective or none,
    and a run of several processes hung for good. A signal to one process only (a child) stopped that
    process alone.

    Here the handler only notes the signal (and passes it on to the processes it started, as
    Lightning's does). At the end of each optimizer step the processes agree (the largest of their
    notes) and, if any got it, all stop there together: Lightning's own check at the batch's end then
    stops each of them, and ``Checkpoint`` writes ``last.ckpt``. In a run of several processes a
    validation runs to its end first (dptune scores each validation image once, so processes may
    hold different numbers of batches, and one that stopped inside it left the others waiting); a run
    of one process stops inside it, as Lightning does, unless an accumulation window is open."""

    def __init__(self) -> None:
        self._noted = False
        self._installed = False
        self._held = False

    def _install(self, trainer: pl.Trainer) -> None:
        # after Lightning registered its handlers (when the fit's stage starts; teardown puts back what it found)
        if self._installed or threading.current_thread() is not threading.main_thread():
            return
        self._noted, self._installed = False, True

        def note(signum, frame) -> None:
            log.info("[rank %d] SIGTERM: %s", trainer.global_rank, "every process stops at the end of this optimizer "
                     "step" if trainer.world_size > 1 else "training stops at the end of this optimizer step")
            if not self._noted:
                launcher = trainer.strategy.launcher
                if launcher is not None:  # the processes this one started
                    launcher.kill(signum)
            self._noted = True
            if trainer.world_size == 1 and (trainer.sanity_checking or trainer.validating) and \
                    not self._window_open(trainer):
                trainer._signal_connector.received_sigterm = True  # one process stops inside a validation

        signal.signal(signal.SIGTERM, note)

    def on_sanity_check_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._install(trainer)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._install(trainer)

    @staticmethod
    def _window_open(trainer: pl.Trainer) -> bool:
        """The last training batch left an accumulation window open: its optimizer step is still to come."""
        return trainer.state.fn == "fit" and not trainer.sanity_checking and \
            trainer.fit_loop.epoch_loop._should_accumulate()

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        if not self._installed or self._window_open(trainer):  # every process is at the same batch
            return
        if trainer.world_size > 1:
            noted = torch.tensor([1.0 if self._noted else 0.0], device=trainer.strategy.root_device)
            agreed = float(trainer.strategy.reduce(noted, reduce_op="max")) > 0
        else:
            agreed = self._noted
        if agreed:
            trainer._signal_connector.received_sigterm = True

    def on_validation_batch_start(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        # one process: Lightning stops inside the validation (the resume runs it again), unless it
        # interrupts an accumulation window (a validation every N batches)
        if self._installed and trainer.world_size == 1 and self._noted and not self._window_open(trainer):
            trainer._signal_connector.received_sigterm = True

    def on_validation_batch_end(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        connector = trainer._signal_connector
        if trainer.world_size > 1 and connector.received_sigterm:  # held until the validation ends
            connector.received_sigterm, self._held = False, True

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._held:
            self._held = False
            trainer._signal_connector.received_sigterm = True

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._installed = self._noted = self._held = False

