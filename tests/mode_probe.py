"""A callback the tests add to ``train.py fit`` (``--trainer.callbacks+=mode_probe.ModeProbe``, with
tests/ on PYTHONPATH): at the first training step it writes which modules are in eval mode."""

from __future__ import annotations

import json
import os

from lightning.pytorch.callbacks import Callback


class ModeProbe(Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step or batch_idx:
            return
        modules = dict(pl_module.named_modules())
        report = {"modules": len(modules), "eval": sorted(n for n, m in modules.items() if not m.training)}
        with open(os.environ["DPTUNE_MODE_PROBE"], "w") as f:
            json.dump(report, f)
