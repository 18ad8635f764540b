"""The run's ``config.yaml``: written once the run has passed every check, never over the user's
``--config`` or a run's record, and logged whole to the logger."""

from __future__ import annotations

import logging
import os

import yaml
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import Logger

from dptune.cli.run_checks import check_config_file

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
        resumed = self.config.get("ckpt_path") is not None
        self.config = self.config.clone()
        if "ckpt_path" in self.config:
            self.config.ckpt_path = None
        log_dir = trainer.log_dir  # every process: it broadcasts
        if trainer.is_global_zero and log_dir is not None:
            check_config_file(os.path.join(log_dir, self.config_filename), "the run's log folder")
            self._choose_name(log_dir, stage, resumed)
        super().setup(trainer, pl_module, stage)

    def _choose_name(self, log_dir: str, stage, resumed: bool) -> None:
        """config.yaml, or the first free config-N.yaml beside it where config.yaml is this run's
        --config, the record of the run there (validate, test), or of the settings the run trained with
        before this resume (a resumed fit whose settings no record holds; a requeue with the same
        settings, its own config.yaml given back as --config or not, writes the record that holds them
        again, as it is)."""
        inputs = {os.path.realpath(str(getattr(p, "absolute", None) or p)) for p in self.config.get("config") or []}
        stem, ext = os.path.splitext(self.config_filename)
        first = os.path.join(log_dir, self.config_filename)
        names, n = [self.config_filename], 2
        while os.path.lexists(os.path.join(log_dir, f"{stem}-{n}{ext}")):  # a dangling link's name is taken too
            names.append(f"{stem}-{n}{ext}")
            n += 1
        if resumed and stage == "fit" and os.path.exists(first):
            same = self._same_record(log_dir, names)
            if same is not None:
                self.config_filename = same  # the same settings (a requeued job): the same file, rewritten as it is
                return
        if os.path.realpath(first) in inputs:
            why = "this run's --config"
        elif os.path.exists(first) and stage != "fit":
            why = "the record of the run there"
        elif os.path.exists(first) and resumed:
            why = "the record of the run's earlier settings"
        else:
            return
        name = f"{stem}-{n}{ext}"
        log.info("%s is %s and is left as it is; this %s run's settings are written to %s", first, why,
                 getattr(stage, "value", stage), os.path.join(log_dir, name))
        self.config_filename = name

    def _same_record(self, log_dir: str, names: list[str]) -> str | None:
        """The record among ``names`` (config.yaml, config-N.yaml: a fit's, a validate's, the run's own
        --config) that holds exactly this run's settings, if one does."""
        text = self.parser.dump(self.config, skip_none=False)
        for name in reversed(names):
            try:
                with open(os.path.join(log_dir, name), encoding="utf-8") as f:
                    if f.read() == text:
                        return name
            except (OSError, UnicodeDecodeError):
                continue
        return None

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
