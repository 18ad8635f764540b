"""The LightningCLI behind ``train.py``: fit / validate / test with one typed config."""

from __future__ import annotations

import logging
import os
import random
import sys
import warnings
from typing import Any

from jsonargparse import ArgumentError
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from dptune import TASKS
from dptune.cli.args import (
    PARSER_MODE,
    SAID,
    check_early_configs,
    command_line_start,
    mapping_settings,
    merge_deep_keys,
    register_loader,
    renamed_args,
)
from dptune.cli.places import named_where, setting_error
from dptune.cli.processes import first_process, peer_stopped, refuse_started_processes
from dptune.cli.run_checks import (
    best_filename,
    check_run_folder,
    check_run_length_and_seed,
    refuse_a_second_run,
    settle_logger_folders,
    settle_monitor_mode,
)
from dptune.cli.run_root import follow_the_root
from dptune.cli.save_config import LoggedSaveConfig
from dptune.cli.tasks import TASK_SETTINGS, task_classes, task_from_args
from dptune.errors import ConfigError, DataError, first_line, said_by_another_process, wait_for_the_launcher
from dptune.tasks.checkpoints import ResumeCheck, check_ckpt_path, is_registry
from dptune.training.callbacks import LRMonitor, ProgressLog, ValidationVisuals
from dptune.training.checkpointing import Checkpoint, InterruptGuard
from dptune.training.hardware import DPTuneTrainer
from dptune.training.preemption import SigtermSync
from dptune.training.wandb_runs import current_wandb_run, finish_wandb_run

log = logging.getLogger(__name__)

DEFAULT_ROOT = "runs/dptune"


class DPTuneCLI(LightningCLI):
    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        # no predict: dptune's tasks have no predict loop; scripts/predict.py writes predictions
        return {k: v for k, v in LightningCLI.subcommands().items() if k != "predict"}

    def __init__(self, *args: Any, task: str = "segmentation", prog: str | None = None, **kwargs: Any) -> None:
        self.task = task
        self._argv = list(kwargs.get("args") or [])  # where each setting came from (config files' own folders)
        kwargs.setdefault("trainer_class", DPTuneTrainer)  # precision: auto resolved for the machine
        register_loader()
        # a bad value or option raises (one line from ``main``) instead of printing the whole usage first
        mode = {"parser_mode": PARSER_MODE, "exit_on_error": False}
        main_kwargs = {**mode, **({"prog": prog} if prog else {})}  # the usage line's name (``dptune``)
        kwargs.setdefault("parser_kwargs", {**main_kwargs, **{sub: mode for sub in self.subcommands()}})
        super().__init__(*args, **kwargs)

    def instantiate_trainer(self, **kwargs: Any):
        """Lightning's checks of the trainer settings (``max_steps=-5``, ``devices='[0,'`` on a CPU)
        raise its own exceptions with a traceback; they are settings the user gave, said in one line."""
        import traceback

        from lightning.fabric.utilities.exceptions import MisconfigurationException

        try:
            trainer = super().instantiate_trainer(**kwargs)
        except (ConfigError, DataError):
            raise  # dptune's own lines, as they are
        except (MisconfigurationException, TypeError, ValueError, ImportError) as e:
            # Lightning's checks only: a TypeError or ValueError raised elsewhere is a bug and keeps its traceback
            frames = traceback.extract_tb(e.__traceback__)
            if not isinstance(e, MisconfigurationException) and (
                    not frames or f"{os.sep}lightning{os.sep}" not in frames[-1].filename):
                raise
            raise ConfigError(f"trainer settings: {' '.join(str(e).split())}") from e
        refuse_started_processes(trainer)
        return trainer

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list) -> Any:
        """``trainer.enable_checkpointing false`` leaves out dptune's own checkpoint callback (Lightning
        refused the run for holding one); a ModelCheckpoint the user added is still Lightning's to refuse."""
        if config.get("enable_checkpointing") is False:
            callbacks = [c for c in callbacks if not isinstance(c, Checkpoint)]
            log.warning("trainer.enable_checkpointing false: no checkpoint is written (nothing to resume, "
                        "export or predict with when the fit ends)")
        return super()._instantiate_trainer(config, callbacks)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--task", choices=list(TASKS), default="segmentation",
                            help="What to train: segmentation (default), depth, or multitask (both in one model); "
                                 "a config file may say it as task: depth")
        # data facts reach the model once, by link, never written twice
        for source, target, when in TASK_SETTINGS[self.task]["links"]:
            parser.link_arguments(source, target, **({"apply_on": when} if when else {}))
        parser.add_lightning_class_args(Checkpoint, "checkpoint")
        parser.add_lightning_class_args(ProgressLog, "progress")
        monitor, mode, filename = TASK_SETTINGS[self.task]["monitor"]
        parser.set_defaults({
            "task": self.task,
            "checkpoint.monitor": monitor,
            "checkpoint.mode": mode,
            "checkpoint.save_last": True,
            "checkpoint.save_top_k": 1,
            "checkpoint.filename": filename,
            "checkpoint.auto_insert_metric_name": False,
        })

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """A key deep inside a mapping setting (``--data.splits.train.masks X``) changes that key and
        keeps the rest of the setting (``merge_deep_keys``)."""
        settings = mapping_settings({"model": self.model_class, "data": self.datamodule_class})
        if isinstance(args, list) and any(a.startswith(tuple(f"--{s}." for s in settings)) for a in args):
            args = merge_deep_keys(args, settings, lambda before, setting: self._in_effect(parser, before, setting))
        super().parse_arguments(parser, args)
        check_run_length_and_seed(self.config)
        sub = self.config.get("subcommand")
        cfg = self.config[sub] if sub else self.config
        self._seed_given = cfg.get("seed_everything")
        if isinstance(cfg.get("seed_everything"), bool):
            # Lightning 2.6 seeds 0 for true; dptune draws one, and config.yaml records it. So it does for
            # false (no seed): the training order and augmentations are always seeded. The processes
            # Lightning's launcher starts (LOCAL_RANK set) take the first's, passed in PL_GLOBAL_SEED; a
            # PL_GLOBAL_SEED left in the environment of a run of its own is not a seed it was given
            given = os.environ.get("PL_GLOBAL_SEED") if os.environ.get("LOCAL_RANK") else None
            cfg["seed_everything"] = int(given or random.SystemRandom().randrange(2**32))

    def _in_effect(self, parser: LightningArgumentParser, args: list[str], setting: str) -> tuple[bool, Any]:
        """What ``args`` (the start of a command line) make of ``setting``: (False, None) where the
        parser refuses them (the whole command line's parse says why) or they print and stop."""
        import contextlib
        import io

        sub = next((a for a in args if a in self.subcommands()), None)
        if sub is None:
            return False, None
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                cfg = parser.parse_args([a for a in args if not a.startswith("--print_config")])
        except (ArgumentError, ConfigError, DataError, SystemExit):
            return False, None
        return True, cfg[sub].get(setting)

    def _parse_ckpt_path(self) -> None:
        """Lightning's CLI puts the hyperparameters of a ``--ckpt_path`` file over the run's settings:
        ``--ckpt_path RUN --model.lr 0.123`` trained (and logged) the old LR, and a setting the user
        had removed came back. Here a run's settings are its own; the checkpoint brings the weights,
        the optimizer state and the progress, and ``ResumeCheck`` decides, when Lightning reads it,
        what the run may change. Said here, before anything is built: a URL, a file that is not a
        readable dptune checkpoint, one of another task."""
        sub = self.config.get("subcommand")
        path = self.config[sub].get("ckpt_path") if sub else None
        seed = None
        if path is not None:
            cfg = self.config[sub]
            self._settle_folders(cfg)  # `last` is the run's folder's: a run config given back names its old one
            root, dirpath = cfg.trainer.default_root_dir, cfg.checkpoint.dirpath
            seed = check_ckpt_path(str(path), self.task, sub, dirpath=dirpath, root=root)
        say = sub == "fit" and first_process()
        if say and seed is not None and self.config[sub].get("seed_everything") != seed:
            # the run's orders, augmentations and dropout go on from the checkpoint's seed; config.yaml says so
            log.info("resume: seed_everything %s -> %d (the checkpoint's run's: its training order, augmentations "
                     "and dropout go on from it)", _said(self._seed_given), seed)
        elif say and seed is None and isinstance(self._seed_given, bool):
            log.info("seed_everything %s: this run's seed is %d (config.yaml records it: give it back to repeat "
                     "the run)", _said(self._seed_given), self.config[sub].get("seed_everything"))
        if seed is not None and sub == "fit":
            self.config[sub]["seed_everything"] = seed

    def _settle_folders(self, cfg) -> None:
        """The run's root and checkpoint folder, as the run will use them (a run config given back with
        another root: its folders follow the new root). Once settled, settling again changes nothing."""
        # ``~`` expanded once, here: Lightning expands it where it writes, dptune's checks did not (a second fit
        # into '~/run' passed the check for a run already there), and W&B made a folder named '~'
        root = os.path.expanduser(str(cfg.trainer.default_root_dir or DEFAULT_ROOT))
        cfg.trainer.default_root_dir = root
        follow_the_root(cfg, self._argv, _loggers(cfg))
        if cfg.checkpoint.dirpath is None:
            cfg.checkpoint.dirpath = os.path.join(root, "checkpoints")
        elif isinstance(cfg.checkpoint.dirpath, str):
            cfg.checkpoint.dirpath = os.path.expanduser(cfg.checkpoint.dirpath)

    def before_instantiate_classes(self) -> None:
        if self.task == "multitask" and self.subcommand == "test":
            raise ConfigError("test: the segmentation + depth task has no test stage; score a test split with "
                              "dptune evaluate --model RUN/checkpoints/last.ckpt --config CONFIG --split test "
                              "(or dptune validate, which scores the val splits)")
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        self._settle_folders(cfg)
        root = cfg.trainer.default_root_dir
        check_run_folder(root, "trainer.default_root_dir")
        if self.subcommand == "fit":
            check_run_folder(cfg.checkpoint.dirpath, "checkpoint.dirpath")
        default_monitor, _, default_name = TASK_SETTINGS[self.task]["monitor"]
        if cfg.checkpoint.filename == default_name and cfg.checkpoint.monitor not in (None, default_monitor):
            cfg.checkpoint.filename = best_filename(cfg.checkpoint.monitor)  # named after what selects it
        settle_monitor_mode(cfg.checkpoint)
        ckpt = cfg.get("ckpt_path")
        if self.subcommand == "fit" and (ckpt is None or str(ckpt) not in ("last", "hpc") and not is_registry(str(ckpt))):
            refuse_a_second_run(cfg.checkpoint.dirpath, resuming=None if ckpt is None else str(ckpt), root=root)
        settle_logger_folders(_loggers(cfg), root)


def _said(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _loggers(cfg) -> list:
    return cfg.trainer.logger if isinstance(cfg.trainer.logger, list) else [cfg.trainer.logger]


def trainer_defaults() -> dict:
    return {
        "default_root_dir": DEFAULT_ROOT,
        "logger": {"class_path": "dptune.training.callbacks.DPTuneWandbLogger", "init_args": {"project": "dptune"}},
        "callbacks": [LRMonitor(logging_interval="step"), ValidationVisuals(), ResumeCheck(), InterruptGuard(),
                      SigtermSync()],
        "log_every_n_steps": 10,
        # a bar only on a terminal; redirected output (nohup, SLURM) gets progress lines (ProgressLog)
        "enable_progress_bar": sys.stdout.isatty(),
    }


def _quiet() -> None:
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    # validation logs values it has summed over every process itself (exact, each image once): Lightning's
    # advice to average them across processes (14 lines per validation of a 2-process run) does not apply
    warnings.filterwarnings("ignore", message=".*sync_dist=True.*")
    # dptune always hands LightningCLI its argv itself (renamed class paths, the subcommand of the
    # dptune command): a plain command line is no mistake
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("dptune").setLevel(logging.INFO)


def main(args: list[str] | None = None, prog: str | None = None) -> int:
    """Run the CLI. Bad data and settings end in one line per problem and exit code 2; any other
    exception is a bug (ours or a library's) and keeps its traceback. ``prog``: the name usage
    lines give the command (``dptune`` from the dptune command; else the script's name). A W&B run
    the command started ends with it, marked with its exit status."""
    before, code = current_wandb_run(), 1
    try:
        code = _main(args, prog)
        return code
    except SystemExit as e:  # Lightning ends a run stopped by SIGTERM (its checkpoint saved) this way, code None
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
        raise
    finally:
        finish_wandb_run(before, code)


def _main(args: list[str] | None, prog: str | None) -> int:
    _quiet()
    from dptune.training.checkpointing import INTERRUPTED

    INTERRUPTED.clear()  # this run's own: a fit stopped outside main (Lightning used directly) leaves its line behind
    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] == ["predict"]:
        print("error: train.py has no predict subcommand; predict with scripts/predict.py --model "
              "RUN/checkpoints/last.ckpt --images 'photos/*.jpg' --out preds", file=sys.stderr)
        return 2
    try:
        argv = command_line_start(renamed_args(argv, SAID))
        check_early_configs(argv, DPTuneCLI.subcommands())
        task = task_from_args(argv)
        model_class, data_class = task_classes(task)
        DPTuneCLI(
            model_class,
            data_class,
            task=task,
            prog=prog,
            trainer_defaults=trainer_defaults(),
            seed_everything_default=0,
            save_config_callback=LoggedSaveConfig,
            save_config_kwargs={"overwrite": True},
            args=argv,
        )
    except (DataError, ConfigError) as e:
        said = f"error: {named_where(str(e), argv)}"
        first = not said_by_another_process(said)
        if first:
            print(said, file=sys.stderr)
        # the launcher's exit status is the run's: 2, not the SIGKILL of its child watcher. Said by another
        # process already, the error is the run's: the launcher is on its way out; else it may be this
        # process's alone, and the launcher blocked in a collective with it, so not long
        wait_for_the_launcher(10.0 if first else 30.0)
        return 2
    except ArgumentError as e:  # jsonargparse: an option that does not exist, a value of the wrong type
        sub = next((a for a in argv if not a.startswith("-")), "")
        command = " ".join([prog or os.path.basename(sys.argv[0] or "train.py")]
                           + ([sub] if sub in DPTuneCLI.subcommands() else []))
        said = setting_error(str(e), argv) or " ".join(str(e).split())
        print(f"error: {said} ({command} --help lists the settings)", file=sys.stderr)
        return 2
    except RuntimeError as e:
        if not peer_stopped(e):
            raise
        print(f"error: another process of this run stopped (its own line above says why); process "
              f"{os.environ.get('RANK', os.environ.get('LOCAL_RANK', '?'))} stops too ({first_line(e, 120)})",
              file=sys.stderr)
        return 2
    except SystemExit:
        if not INTERRUPTED:
            raise
        print(f"error: {INTERRUPTED.pop()}", file=sys.stderr)
        INTERRUPTED.clear()
        return 130
    return 0
