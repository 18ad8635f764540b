"""The run's ``config.yaml``: written once the run has passed every check, never over the user's
``--config`` or a run's record, and logged whole to the logger."""

from __future__ import annotations

import logging
import os

import yaml
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import Logger

log = logging.getLogger(__name__)


class LoggedSaveConfig(SaveConfigCallback):
    """Writes ``config.yaml`` beside the checkpoints and logs the whole resolved config (trainer
    settings included, not only the model's and data's hyperparameters) to the logger."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        # written when the stage starts, once every check has passed: the model's setup (after this
        # one) and, on a resume, the check against this run when Lightning reads the checkpoint; a run
        # refused before it starts leaves no config.yaml (and no W&B run) behind, and a refused
        # resume leaves the run's record as it was
        self._deferred = (trainer, pl_module, stage)

    def _write(self, trainer, pl_module, stage: str) -> None:
        """config.yaml records the run's settings, not where it resumed from: ``ckpt_path`` is left
        out (null), so that the file given back as ``--config`` starts what it says, and resuming
        stays a choice made on the command line (``--ckpt_path last``). A config.yaml this run was
        given as ``--config`` is the user's input, and one that a validate or test run finds in its
        folder is the record of the run there: either is left as it is, and this run's settings go
        to the first free config-N.yaml beside it."""
        if self.already_saved:
            return
        log_dir = trainer.log_dir  # every process: it broadcasts
        if trainer.is_global_zero and log_dir is not None:
            inputs = {os.path.realpath(str(getattr(p, "absolute", None) or p)) for p in self.config.get("config") or []}
            first = os.path.join(log_dir, self.config_filename)
            # validate and test leave a run's record (a fit's config.yaml in the folder) as it is
            kept = os.path.realpath(first) in inputs or (stage != "fit" and os.path.exists(first))
            name, n = self.config_filename, 1
            stem, ext = os.path.splitext(self.config_filename)
            while kept and (name == self.config_filename or os.path.exists(os.path.join(log_dir, name))):
                n += 1
                name = f"{stem}-{n}{ext}"
            if name != self.config_filename:
                why = "this run's --config" if os.path.realpath(first) in inputs else "the record of the run there"
                log.info("%s is %s and is left as it is; this %s run's settings are written to %s", first, why,
                         getattr(stage, "value", stage), os.path.join(log_dir, name))
                self.config_filename = name
        self.config = self.config.clone()
        if "ckpt_path" in self.config:
            self.config.ckpt_path = None
        super().setup(trainer, pl_module, stage)

    def _write_deferred(self) -> None:
        deferred = getattr(self, "_deferred", None)
        if deferred is not None:
            self._deferred = None
            self._write(*deferred)

    def on_fit_start(self, trainer, pl_module) -> None:
        self._write_deferred()

    def on_validation_start(self, trainer, pl_module) -> None:
        self._write_deferred()  # validate (in a fit: already written at its start)

    def on_test_start(self, trainer, pl_module) -> None:
        self._write_deferred()

    def save_config(self, trainer, pl_module, stage: str) -> None:
        # under its own key: the model's hyperparameters, logged too, have a ``config`` of their own
        resolved = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
        for logger in trainer.loggers:
            if isinstance(logger, Logger):
                logger.log_hyperparams({"resolved_config": resolved})
