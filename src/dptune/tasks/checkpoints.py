"""Reading dptune checkpoints safely, rebuilding the task that wrote them offline, and checking the
checkpoint a run resumes (or scores) against that run (what a resume may change:
``dptune.tasks.resume``).
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.io import TorchCheckpointIO

from dptune.errors import ConfigError
from dptune.models.checkpoint_file import dptune_parts, is_remote, load_checkpoint
from dptune.tasks.optim import TRAINING_SETTINGS
from dptune.tasks.optimizing import validation_cut
from dptune.tasks.resume import (
    apply_run_settings,
    check_resume,
    check_state_dict,
    check_task,
    data_changes,
    say_change,
)
from dptune.tasks.resume_length import check_epochs, order_record

__all__ = ["ResumeCheck", "check_ckpt_path", "check_resume", "load_checkpoint", "load_module", "task_class"]

log = logging.getLogger(__name__)


def task_class(task: str):
    from dptune.tasks.depth import DepthModule
    from dptune.tasks.multitask import MultiTaskModule
    from dptune.tasks.segmentation import SegmentationModule

    classes = {"segmentation": SegmentationModule, "depth": DepthModule, "multitask": MultiTaskModule}
    if task not in classes:
        raise ConfigError(f"unknown dptune task {task!r} (known: {sorted(classes)})")
    return classes[task]


def load_module(ckpt_path: str, map_location: str = "cpu"):
    """Rebuild the task module (segmentation or depth) of a dptune checkpoint without the hub."""
    ckpt = load_checkpoint(ckpt_path, map_location)
    meta, hp = dptune_parts(ckpt, ckpt_path)
    # the training-only settings are left out: one out of today's ranges (saved before they were checked) is
    # refused when a task is built to train, and serving never reads them
    hp = {k: v for k, v in hp.items() if not k.startswith("_") and k not in TRAINING_SETTINGS}
    hp.update(pretrained=None, config=meta["model_config"], image_mean=meta["image_mean"], image_std=meta["image_std"])
    module = task_class(meta.get("task", "segmentation"))(**hp)
    check_state_dict(ckpt["state_dict"], module, ckpt_path, "loading", say=False)
    module.load_state_dict(ckpt["state_dict"])
    module.checkpoint_metrics = meta.get("metrics", {})
    module.checkpoint_meta = meta
    module.checkpoint_evaluation = meta.get("evaluation", {"mode": hp.get("val_mode", "resize")})
    return module.eval()


# ---------------------------------------------------------------------- resuming and scoring checkpoints

# what Lightning resolves itself (``--ckpt_path last``): the file it picks is checked when it is read
_LIGHTNING_PATHS = ("last", "best", "hpc")

def lightning_path(path: str, stage: str, dirpath: str, root: str) -> str | None:
    """The file Lightning's ``last`` / ``best`` / ``hpc`` stands for, or None (fit starts afresh when
    there is no ``last``). Lightning itself would score an untrained model for a missing ``last``
    (validate, test) and stop with a traceback for ``best`` in a new process or a missing ``hpc``."""
    import glob

    if path == "best":
        found = sorted(glob.glob(os.path.join(glob.escape(dirpath), "best*.ckpt")))
        raise ConfigError("--ckpt_path best: only a running fit knows its best checkpoint; give the file"
                          + (f" ({', '.join(found[:3])})" if found else f" (none in {dirpath})"))
    if path == "hpc":
        found = sorted(glob.glob(os.path.join(glob.escape(root), "hpc_ckpt_*.ckpt")))
        if not found:
            raise ConfigError(f"--ckpt_path hpc: no hpc_ckpt_*.ckpt in {root} (trainer.default_root_dir)")
        return max(found, key=lambda f: int(re.sub(r"\D", "", os.path.basename(f)) or 0))
    last = os.path.join(dirpath, "last.ckpt")
    if os.path.isfile(last):
        return last
    if os.path.islink(last):  # a link to a disk not mounted: not "no last.ckpt yet", which a fit replaces
        raise ConfigError(f"--ckpt_path last: {last} is a link to {os.readlink(last)}, which does not exist")
    if stage != "fit":
        raise ConfigError(f"--ckpt_path last: no {last} ({stage} would score an untrained model); give the "
                          "checkpoint's path, or the run's --trainer.default_root_dir")
    log.info("--ckpt_path last: no %s yet; the run starts from the beginning", last)
    return None


def is_registry(path: str) -> bool:
    """Whether Lightning takes ``--ckpt_path`` for its model registry: ``registry`` or ``registry:NAME``
    where the registry's package (litmodels) is installed; otherwise it is a file, as for Lightning
    (``registry_copies/b.ckpt`` always is)."""
    import importlib.util

    named = path.lower() == "registry" or path.lower().startswith("registry:")
    return named and importlib.util.find_spec("litmodels") is not None


def check_ckpt_path(path: str, task: str, stage: str, dirpath: str | None = None,
                    root: str | None = None) -> int | None:
    """What can be said of ``--ckpt_path`` before anything is built: a URL is refused (Lightning
    would unpickle it with ``weights_only=False``), a file that is not a readable dptune checkpoint
    or is one of another task is one line, and so are ``last`` / ``best`` / ``hpc`` that stand for
    no file (``dirpath``: the run's checkpoint folder; ``root``: its default_root_dir). Reads the
    metadata only (the tensors are mapped). Returns the seed of the checkpoint's training order, if any."""
    if not path.strip():
        raise ConfigError("--ckpt_path is empty: give a checkpoint file, or last (the run folder's last.ckpt)")
    if is_remote(path):
        raise ConfigError(f"--ckpt_path {path}: a URL; train.py resumes and scores local files only (Lightning would "
                          "unpickle a remote one with weights_only=False, which can run code): download it first "
                          "and pass its path")
    if is_registry(path):
        return None
    if path in _LIGHTNING_PATHS:
        if dirpath is None:
            return None
        path = lightning_path(path, stage, dirpath, root or os.path.dirname(dirpath))
        if path is None:
            return None
    ckpt = load_checkpoint(path, mmap=True)
    meta, _ = dptune_parts(ckpt, path)
    check_task(meta.get("task", "segmentation"), task, path, stage)
    return order_seed(ckpt)


def order_seed(ckpt: dict[str, Any]) -> int | None:
    """The seed of a checkpoint's training order (the datamodule's record; ``dptune.data.order``), if it has one."""
    seed = (order_record(ckpt) or {}).get("seed")
    return seed if isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed < 2**32 else None


class _CheckedIO(TorchCheckpointIO):
    """Lightning's checkpoint reader, made safe: the file is read by ``load_checkpoint`` (tensors
    and plain types only; a damaged file or a URL is one line naming it) and checked against the
    run (``ResumeCheck``) before Lightning restores anything from it."""

    def __init__(self, guard: ResumeCheck, trainer) -> None:
        super().__init__()
        self.guard, self.trainer = guard, trainer

    def load_checkpoint(self, path, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        ckpt = load_checkpoint(str(path), "cpu" if map_location is None else map_location,
                               trusted=True if weights_only is False else None)
        self.guard.restored(self.trainer, ckpt, str(path))
        return ckpt


class ResumeCheck(Callback):
    """Every checkpoint Lightning restores (``--ckpt_path`` of fit, validate and test; ``last`` and
    ``best`` too) read safely and checked against this run (``check_resume``); a resumed fit trains
    with this run's optimizer settings (``apply_run_settings``)."""

    def __init__(self) -> None:
        self._pending: tuple[dict[str, Any], str, list[str]] | None = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        strategy = trainer.strategy
        if type(strategy.checkpoint_io) is TorchCheckpointIO:  # a plugin of the user's own is left alone
            strategy.checkpoint_io = _CheckedIO(self, trainer)

    def restored(self, trainer, ckpt: dict[str, Any], path: str) -> None:
        stage = trainer.state.fn.value if trainer.state.fn is not None else "fit"
        changed = check_resume(trainer.lightning_module, ckpt, path, stage, say=trainer.is_global_zero)
        if stage == "fit":
            check_epochs(ckpt, path, trainer.max_epochs, trainer.max_steps)
            saved, datamodule = ckpt.get("datamodule_hyper_parameters"), getattr(trainer, "datamodule", None)
            if isinstance(saved, dict) and datamodule is not None and trainer.is_global_zero:
                for key, old, new in data_changes(saved, dict(datamodule.hparams)):
                    say_change("resume", key, old, new)
            if hasattr(datamodule, "rebatch"):  # the interrupted epoch's batches counted in this run's
                datamodule.rebatch(ckpt, cut=validation_cut(ckpt))
            self._pending = (ckpt, path, changed)
            if trainer.optimizers:  # a strategy that restores after setting up the optimizers
                self.on_fit_start(trainer, trainer.lightning_module)

    def on_fit_start(self, trainer, pl_module) -> None:
        # after the optimizers are set up, before Lightning restores their state
        if self._pending is not None:
            ckpt, path, changed = self._pending
            self._pending = None
            apply_run_settings(trainer, ckpt, path, changed)

