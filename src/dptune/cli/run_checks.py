"""Checks of a run before anything is built or written: the run length and seed, a checkpoint folder
that already holds a run, the best checkpoint's file name, and the folders the run and its loggers write in."""

from __future__ import annotations

import os

from dptune.errors import ConfigError
from dptune.metrics.directions import monitor_mode
from dptune.training.checkpoint_state import template_field
from dptune.training.wandb_runs import checked_mode, environment_mode

# settings where an empty string means nothing (a folder, a time, a file name): jsonargparse takes it as a str
BLANK_REFUSED = (("trainer", "default_root_dir"), ("trainer", "val_check_interval"), ("trainer", "max_time"),
                 ("checkpoint", "dirpath"), ("checkpoint", "filename"))


def check_run_length_and_seed(config) -> None:
    """Said before anything is built: a seed Lightning refuses with a traceback (-1), a fit of 0
    epochs or steps, which Lightning ends at once with exit 0, no checkpoint and no word, and an
    accumulation of 0 batches (Lightning's ZeroDivisionError) or fewer, and a blank folder or time
    (``--trainer.default_root_dir ""`` trained into the built-in root, ``--checkpoint.dirpath ""`` into
    the working folder, past the check for a run already there)."""
    sub = config.get("subcommand")
    cfg = config[sub] if sub else config
    for section, key in BLANK_REFUSED:
        value = (cfg.get(section) or {}).get(key)
        if isinstance(value, str) and not value.strip():
            raise ConfigError(f"{section}.{key}: given an empty value; leave it out for the default, or give one")
    seed = cfg.get("seed_everything")
    if not (seed is None or isinstance(seed, bool) or isinstance(seed, int) and 0 <= seed <= 2**32 - 1):
        raise ConfigError(f"seed_everything {seed}: a seed is a whole number from 0 to 4294967295 (true draws one)")
    if sub == "fit":
        acc = cfg.trainer.get("accumulate_grad_batches")
        if acc is not None and (isinstance(acc, bool) or not isinstance(acc, int) or acc < 1):
            raise ConfigError(f"trainer.accumulate_grad_batches {acc}: the batches each optimizer step adds up, a "
                              "whole number from 1 (1: a step every batch)")
        for key, unit in (("max_epochs", "epochs"), ("max_steps", "steps"), ("limit_train_batches", "batches")):
            value = cfg.trainer.get(key)
            if value == 0 and not isinstance(value, bool):
                raise ConfigError(f"trainer.{key} 0: a fit of 0 {unit} trains nothing and writes no checkpoint "
                                  "(-1 sets no limit; dptune validate scores a checkpoint without training)")


def best_filename(monitor: str) -> str:
    """The best checkpoint's name for a run selected by ``monitor`` (``val/delta_m`` ->
    ``best-epoch03-deltam0.0521.ckpt``)."""
    short = "".join(c for c in monitor.rsplit("/", 1)[-1] if c.isalnum() or c in ".-")
    if short[-1:].isdigit() or short[-1:] == ".":  # class '#1': 'best-epoch03-1_0.2500', not '10.2500'
        short += "_"
    return f"best-epoch{{epoch:02d}}-{short}{{{template_field(monitor)}:.4f}}"


def settle_monitor_mode(checkpoint) -> None:
    """The best checkpoint's ``mode`` by what it monitors (``monitor_mode``): the task's default mode went with
    any monitor, so ``--checkpoint.monitor val/loss`` kept the highest loss, the worst epoch, as "best". A
    mode that says otherwise is set right, in a log line."""
    import logging

    monitor = checkpoint.get("monitor")
    mode = monitor_mode(monitor) if isinstance(monitor, str) else None
    if mode is not None and checkpoint.get("mode") != mode:
        logging.getLogger("dptune.cli").info("checkpoint.monitor %s: best is %s, so checkpoint.mode is %s (was %s)",
                                             monitor, "lowest" if mode == "min" else "highest", mode,
                                             checkpoint.get("mode"))
        checkpoint.mode = mode


def refuse_a_second_run(dirpath: str, resuming: str | None = None, root: str | None = None) -> None:
    """A fit started afresh (no ``--ckpt_path``) into a checkpoint folder that already holds a run's
    checkpoints would mix two runs (last-v1.ckpt beside last.ckpt, a second best-*, the run's
    config.yaml rewritten): one line before anything is written. So would a checkpoint of another
    folder resumed there (``resuming``: its path; it wrote over the folder's last.ckpt; ``root``: the
    run's root, where Lightning writes its hpc checkpoints). The other
    processes of a DDP run start once rank 0 is running, and are not asked (the folder may hold its
    first checkpoint)."""
    if os.environ.get("LOCAL_RANK", "0") != "0" or os.environ.get("NODE_RANK", "0") != "0":
        return
    if not os.path.isdir(dirpath):
        return
    if resuming is not None and _own(resuming, dirpath, root):
        return
    found = sorted(f for f in os.listdir(dirpath) if f.endswith(".ckpt"))
    if found:
        shown = ", ".join(found[:3]) + (", ..." if len(found) > 3 else "")
        what = "a new fit" if resuming is None else f"resuming {resuming}"
        fix = ("start the new one in another --trainer.default_root_dir (or --checkpoint.dirpath)" if resuming is None
               else f"resume {resuming} in another --trainer.default_root_dir (or --checkpoint.dirpath)")
        raise ConfigError(f"{dirpath}: already holds the checkpoints of a run ({shown}); {what} there would mix "
                          f"two runs: resume that run with --ckpt_path last, or {fix}")


def _own(path: str, dirpath: str, root: str | None) -> bool:
    """Whether the checkpoint file ``path`` (a link: the file it names) is the run's own: in its checkpoint
    folder, or an ``hpc_ckpt_*.ckpt`` Lightning wrote in its root."""
    real = os.path.realpath(path)
    where = os.path.dirname(real)
    return where == os.path.realpath(dirpath) or (
        root is not None and where == os.path.realpath(root) and os.path.basename(real).startswith("hpc_ckpt_"))


def check_run_folder(path: str, setting: str) -> None:
    """A folder the run writes into (its root, its checkpoints): one that exists, or whose nearest existing
    parent is a folder this process can write in. Checked before anything is built, made nowhere; a file in
    the way or a read-only parent ended the run in a traceback when the config was first written."""
    import pathlib

    folder = pathlib.Path(path).expanduser()
    for there in [folder, *folder.parents]:
        if not there.exists():
            if there.is_symlink():  # a link whose target is gone (a purged scratch folder)
                raise ConfigError(f"{setting} {path}: {there} is {_dangling(str(there))}")
            continue
        if not there.is_dir():
            raise ConfigError(f"{setting} {path}: {there} is a file, not a folder")
        if not os.access(there, os.W_OK | os.X_OK):
            raise ConfigError(f"{setting} {path}: {there} is not writable by this user")
        return


def check_config_file(path: str, setting: str) -> None:
    """Where a run writes its config.yaml: a folder or a link whose target is gone there ended the run in a
    jsonargparse traceback (one that blamed the run's folder), or was taken for the record of an earlier run.
    The command line checks it before anything is built (no W&B run is made for a run refused here);
    ``LoggedSaveConfig`` checks it again for loggers whose folder only the trainer knows."""
    if os.path.isdir(path) or (os.path.islink(path) and not os.path.exists(path)):
        what = "a folder" if os.path.isdir(path) else _dangling(path)
        raise ConfigError(f"{setting}: {path} is {what}, where the run writes its config: move it away")


def _dangling(link: str) -> str:
    return f"a link to {os.readlink(link)}, which does not exist"


def settle_logger_folders(loggers: list, root: str) -> None:
    """The loggers' folders as the run will use them (``save_dir`` unset or ``.``: the run's ``root``; ``~``
    expanded), checked with the W&B mode before anything is built, and where config.yaml goes. ``loggers``:
    the trainer's logger settings (class_path and init_args; ``None`` or ``False`` for none)."""
    for lg in loggers:
        init = getattr(lg, "init_args", None)
        if init is not None and "save_dir" in init and init.save_dir in (None, "."):
            init.save_dir = root
        elif init is not None and isinstance(init.get("save_dir"), str):
            init.save_dir = os.path.expanduser(init.save_dir)
        if str(getattr(lg, "class_path", "")).endswith("WandbLogger"):
            # here, not only in the logger: jsonargparse turns an error raised while it builds one of a
            # setting's typed choices into a ValueError of its own, with a traceback
            mode = environment_mode()
            if init is not None and init.get("mode"):
                mode = checked_mode(init.mode, "trainer.logger.init_args.mode")
            if mode != "disabled" and init is not None and isinstance(init.get("save_dir"), str):
                check_run_folder(os.path.join(init.save_dir, "wandb"), "trainer.logger.init_args.save_dir")
    first = next(iter(loggers), None)
    if first in (None, False) or str(getattr(first, "class_path", "")).endswith("WandbLogger"):
        # config.yaml goes to the W&B logger's save_dir (or the root without a logger); other loggers'
        # folders only the trainer knows, and the callback checks them there
        folder = getattr(getattr(first, "init_args", None), "save_dir", None) or root  # save_dir set above
        setting = "trainer.default_root_dir" if folder == root else "trainer.logger.init_args.save_dir"
        check_config_file(os.path.join(str(folder), "config.yaml"), setting)  # both expanded above
