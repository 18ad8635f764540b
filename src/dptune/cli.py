"""The LightningCLI behind ``train.py``: fit / validate / test with one typed config."""

from __future__ import annotations

import logging
import os
import sys
import warnings

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import Logger

from dptune.callbacks import Checkpoint, LRMonitor, ValidationVisuals
from dptune.data.datamodule import SegmentationDataModule
from dptune.errors import ConfigError, DataError
from dptune.tasks.segmentation import SegmentationModule

DEFAULT_ROOT = "runs/dptune"


class LoggedSaveConfig(SaveConfigCallback):
    """Writes ``config.yaml`` beside the checkpoints and logs the whole resolved config (trainer
    settings included, not only the model's and data's hyperparameters) to the logger."""

    def save_config(self, trainer, pl_module, stage: str) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, Logger):
                logger.log_hyperparams({"config": self.parser.dump(self.config, skip_none=False)})


class DPTuneCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # data facts reach the model once, by link, never written twice
        parser.link_arguments("data.labels_spec", "model.label_spec", apply_on="instantiate")
        parser.link_arguments("data.image_size", "model.image_size")
        parser.link_arguments("data.val_mode", "model.val_mode")
        parser.add_lightning_class_args(Checkpoint, "checkpoint")
        parser.set_defaults({
            "checkpoint.monitor": "val/mIoU",
            "checkpoint.mode": "max",
            "checkpoint.save_last": True,
            "checkpoint.save_top_k": 1,
            "checkpoint.filename": "best-epoch{epoch:02d}-mIoU{val/mIoU:.4f}",
            "checkpoint.auto_insert_metric_name": False,
        })

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        root = cfg.trainer.default_root_dir or DEFAULT_ROOT
        cfg.trainer.default_root_dir = root
        if cfg.checkpoint.dirpath is None:
            cfg.checkpoint.dirpath = os.path.join(root, "checkpoints")
        loggers = cfg.trainer.logger if isinstance(cfg.trainer.logger, list) else [cfg.trainer.logger]
        for lg in loggers:
            init = getattr(lg, "init_args", None)
            if init is not None and "save_dir" in init and init.save_dir in (None, "."):
                init.save_dir = root


def trainer_defaults() -> dict:
    return {
        "default_root_dir": DEFAULT_ROOT,
        "logger": {"class_path": "dptune.callbacks.DPTuneWandbLogger", "init_args": {"project": "dptune"}},
        "callbacks": [LRMonitor(logging_interval="step"), ValidationVisuals()],
        "log_every_n_steps": 10,
    }


def _quiet() -> None:
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("dptune").setLevel(logging.INFO)


def main(args: list[str] | None = None) -> int:
    """Run the CLI. Bad data and settings end in one line per problem and exit code 2; any other
    exception is a bug (ours or a library's) and keeps its traceback."""
    _quiet()
    try:
        DPTuneCLI(
            SegmentationModule,
            SegmentationDataModule,
            trainer_defaults=trainer_defaults(),
            seed_everything_default=0,
            save_config_callback=LoggedSaveConfig,
            save_config_kwargs={"overwrite": True},
            args=args,
        )
    except (DataError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
