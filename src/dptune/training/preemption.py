"""SIGTERM in a run of several processes: every process stops at the same training step
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
    """Lightning's SIGTERM handler broadcasts from inside the handler, on the process that got the
    signal, wherever that process is (inside a gradient all-reduce, a validation, a metric sync):
    the other processes were in another collective or none, and the run hung for good. A signal to
    one process only (a child) stopped that process alone.

    In a run of several processes the handler only notes the signal (and passes it on to the
    processes it started, as Lightning's does); after each training step the processes agree (the
    largest of their notes) and, if any got it, all stop there together: Lightning's own check at the
    step's end then stops each of them, and ``Checkpoint`` writes ``last.ckpt``. A validation runs to
    its end first: dptune scores each validation image once, so processes may hold different numbers
    of batches, and one that stopped inside it left the others waiting. A run of one process keeps
    Lightning's handler."""

    def __init__(self) -> None:
        self._noted = False
        self._installed = False
        self._held = False

    def _install(self, trainer: pl.Trainer) -> None:
        # after Lightning registered its handlers (when the fit's stage starts; teardown puts back what it found)
        if self._installed or trainer.world_size <= 1 or threading.current_thread() is not threading.main_thread():
            return
        self._noted, self._installed = False, True

        def note(signum, frame) -> None:
            log.info("[rank %d] SIGTERM: every process stops after the next training step", trainer.global_rank)
            if not self._noted:
                launcher = trainer.strategy.launcher
                if launcher is not None:  # the processes this one started
                    launcher.kill(signum)
            self._noted = True

        signal.signal(signal.SIGTERM, note)

    def on_sanity_check_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._install(trainer)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._install(trainer)

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        if not self._installed:
            return
        noted = torch.tensor([1.0 if self._noted else 0.0], device=trainer.strategy.root_device)
        if float(trainer.strategy.reduce(noted, reduce_op="max")) > 0:
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

