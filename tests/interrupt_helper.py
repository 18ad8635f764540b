"""A callback that stands in for Ctrl-C: KeyboardInterrupt at a batch (default the first) of the second epoch."""

from __future__ import annotations

import lightning.pytorch as pl


class CtrlCAt(pl.Callback):
    def __init__(self, batch: int = 0) -> None:
        self.batch = batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.current_epoch == 1 and batch_idx == self.batch:
            raise KeyboardInterrupt
