"""A callback that stands in for Ctrl-C: KeyboardInterrupt at the second epoch's first step."""

from __future__ import annotations

import lightning.pytorch as pl


class CtrlCAt(pl.Callback):
    def on_train_batch_start(self, trainer, *args, **kwargs) -> None:
        if trainer.current_epoch == 1:
            raise KeyboardInterrupt
