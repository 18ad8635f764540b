"""A run's config.yaml given back as ``--config`` with another ``trainer.default_root_dir``: the folders
it names for its own run (checkpoints, the loggers' ``save_dir``) follow the new root."""

from __future__ import annotations

import logging
import os
from typing import Any

from dptune.cli.args import config_files, read_config
from dptune.cli.places import at_any_level, last_setter

log = logging.getLogger(__name__)


def _same_path(a: Any, b: Any) -> bool:
    return (isinstance(a, str) and isinstance(b, str)
            and os.path.normpath(os.path.expanduser(a)) == os.path.normpath(os.path.expanduser(b)))


def follow_the_root(cfg: Any, args: list[str], loggers: list) -> None:
    """A run's config.yaml names that run's folders: its ``checkpoint.dirpath`` and its loggers'
    ``save_dir``, derived from its ``trainer.default_root_dir``. Given back as ``--config`` with
    another root, they follow the new root (they kept the earlier run's folders, and a run continued
    elsewhere wrote over that run's checkpoints and into its W&B folder). A folder the file sets to
    anything else than its own root's is left as it is."""
    root = cfg.trainer.default_root_dir
    for path in config_files(args):
        old = at_any_level(read_config(path), ["trainer", "default_root_dir"])[1] if os.path.isfile(path) else None
        if not isinstance(old, str) or _same_path(old, root):
            continue
        moved = []
        if _same_path(cfg.checkpoint.dirpath, os.path.join(old, "checkpoints")) and \
                last_setter(["checkpoint", "dirpath"], args) == path:  # the file's, not given after it
            cfg.checkpoint.dirpath = os.path.join(root, "checkpoints")
            moved.append("checkpoint.dirpath")
        # the file's (or found nowhere by key: a list of loggers), not given after it
        save_dir_from_file = last_setter(["trainer", "logger", "init_args", "save_dir"], args) in (path, None)
        for lg in loggers:
            init = getattr(lg, "init_args", None)
            if init is not None and _same_path(init.get("save_dir"), old) and save_dir_from_file:
                init.save_dir = root
                moved.append("the logger's save_dir")
        if moved:
            log.info("%s: %s named the folder of its own run (%s); this run's follow trainer.default_root_dir %s",
                     path, " and ".join(moved), old, root)
