"""A callback the preemption test adds on the command line: SIGTERM to itself at a given step."""

import os
import signal

import lightning.pytorch as pl


class SigtermAt(pl.Callback):
    def __init__(self, step: int = 5) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args, **kwargs) -> None:
        if trainer.global_step == self.step and trainer.is_global_zero:
            os.kill(os.getpid(), signal.SIGTERM)
