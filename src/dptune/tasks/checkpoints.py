"""Reading dptune checkpoints safely, rebuilding the task that wrote them offline, and checking the
checkpoint a run resumes (or scores) against that run.

A resumed run's settings are its own: the checkpoint brings the weights, the optimizer state (the
moments, not the settings), where the schedule and the loops stand. What a resume may change and
what it may not:

- settings that only change the run (learning rate, weight decay, schedule, losses, evaluation,
  logging, precision switches; the trainer's run length, devices, checkpointing) are applied and
  each change is logged: ``resume: model.lr 0.001 -> 0.123 (this run's setting)``;
- settings that say what the model is or what its outputs mean (the task, the network, the label
  set, the normalisation, the depth range and mode) stop the run with one line naming the setting
  and both values, as does a change that leaves the optimizer state without a place (another
  optimizer, other parameter groups).
"""

from __future__ import annotations

import copy
import logging
import math
import os
import re
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.io import TorchCheckpointIO

from dptune.errors import ConfigError
from dptune.models.checkpoint_file import dptune_parts, is_remote, load_checkpoint
from dptune.tasks.optim import TRAINING_SETTINGS

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
    _check_state_dict(ckpt["state_dict"], module, ckpt_path, "loading", say=False)
    module.load_state_dict(ckpt["state_dict"])
    module.checkpoint_metrics = meta.get("metrics", {})
    module.checkpoint_meta = meta
    module.checkpoint_evaluation = meta.get("evaluation", {"mode": hp.get("val_mode", "resize")})
    return module.eval()


# ---------------------------------------------------------------------- resuming and scoring checkpoints

# what Lightning resolves itself (``--ckpt_path last``): the file it picks is checked when it is read
_LIGHTNING_PATHS = ("last", "best", "hpc")

# hyperparameters that say what the model is or what its outputs mean (the label set; the depth
# kind and range, which a bounded head scales by): a run cannot change them on a checkpoint
MODEL_SETTINGS = ("label_spec", "mode", "depth_mode", "max_depth", "share_reassemble")
# where the network came from: a resumed run's weights are the checkpoint's, so these are not
# compared as settings; the network they build (its config) and the normalisation are
ORIGIN_SETTINGS = ("pretrained", "config", "backbone", "fresh_init", "image_mean", "image_std")
# network config entries that do not make another network: names, versions, output switches,
# initialisation and dropout rates, the label names (compared as the label set)
_CONFIG_IGNORED = frozenset({
    "_name_or_path", "transformers_version", "architectures", "dtype", "torch_dtype", "id2label", "label2id",
    "output_attentions", "output_hidden_states", "return_dict", "use_return_dict", "problem_type",
    "initializer_range", "hidden_dropout_prob", "attention_probs_dropout_prob", "semantic_classifier_dropout",
    "drop_path_rate", "auxiliary_loss_weight", "semantic_loss_ignore_index", "chunk_size_feed_forward",
    "_attn_implementation", "_attn_implementation_autoset", "_attn_implementation_internal", "attn_implementation",
})


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
    if stage != "fit":
        raise ConfigError(f"--ckpt_path last: no {last} ({stage} would score an untrained model); give the "
                          "checkpoint's path, or the run's --trainer.default_root_dir")
    log.info("--ckpt_path last: no %s yet; the run starts from the beginning", last)
    return None


def check_ckpt_path(path: str, task: str, stage: str, dirpath: str | None = None, root: str | None = None) -> None:
    """What can be said of ``--ckpt_path`` before anything is built: a URL is refused (Lightning
    would unpickle it with ``weights_only=False``), a file that is not a readable dptune checkpoint
    or is one of another task is one line, and so are ``last`` / ``best`` / ``hpc`` that stand for
    no file (``dirpath``: the run's checkpoint folder; ``root``: its default_root_dir). Reads the
    metadata only (the tensors are mapped)."""
    if is_remote(path):
        raise ConfigError(f"--ckpt_path {path}: a URL; train.py resumes and scores local files only (Lightning would "
                          "unpickle a remote one with weights_only=False, which can run code): download it first "
                          "and pass its path")
    if path.lower() == "registry" or path.lower().startswith("registry:"):
        return
    if path in _LIGHTNING_PATHS:
        if dirpath is None:
            return
        path = lightning_path(path, stage, dirpath, root or os.path.dirname(dirpath))
        if path is None:
            return
    meta, _ = dptune_parts(load_checkpoint(path, mmap=True), path)
    check_task(meta.get("task", "segmentation"), task, path, stage)


def check_task(saved: str, task: str, path: str, stage: str) -> None:
    """One line when a checkpoint of one task is resumed or scored as another."""
    if saved == task:
        return
    if stage == "fit":
        raise ConfigError(f"{path}: a {saved} checkpoint; this run trains {task} and cannot resume from it (resume it "
                          f"with --task {saved} and its own config; to start a {task} model from its weights, give it "
                          "as --model.pretrained, without --ckpt_path)")
    raise ConfigError(f"{path}: a {saved} checkpoint; this run scores {task} (score it with --task {saved} and its "
                      "own config)")


def check_resume(module, ckpt: dict[str, Any], path: str, stage: str, say: bool = True) -> list[str]:
    """Check a checkpoint that ``module`` is about to resume from (``stage`` fit) or be scored with
    (validate, test) against this run, and bring its state dict in line with it. One line
    (``ConfigError``) when it is not a whole dptune checkpoint of this task and this model; each
    setting this run changes is logged (``say``) and returned, as ``model.NAME``."""
    meta, saved = dptune_parts(ckpt, path)
    check_task(meta.get("task", "segmentation"), module.task, path, stage)
    word = "resume" if stage == "fit" else stage

    def fix(kept: str = "the checkpoint's setting") -> str:
        if stage == "fit":
            return (f"resume with {kept}, or start a new run from its weights: --model.pretrained {path} without "
                    "--ckpt_path")
        return f"{stage} it with {kept}"

    hp = {k: v for k, v in module.hparams.items() if not k.startswith("_")}

    if "label_spec" in hp and "label_spec" in saved:
        _check_labels(saved["label_spec"], hp["label_spec"], path, fix("data labelled with its label set"))
    for key in MODEL_SETTINGS:
        if key != "label_spec" and key in hp and key in saved and _plain(saved[key]) != _plain(hp[key]):
            raise ConfigError(f"{path}: model.{key} is {saved[key]!r} in the checkpoint, {hp[key]!r} in this run; "
                              f"a {word} cannot change what the model outputs: {fix()}")
    _check_network(meta, module, path, word, fix("the model config it was trained with"))
    for what, old, new in (("image_mean", meta["image_mean"], module.image_mean),
                           ("image_std", meta["image_std"], module.image_std)):
        if len(old) != len(new) or any(not math.isclose(a, b, rel_tol=1e-6) for a, b in zip(old, new, strict=False)):
            raise ConfigError(f"{path}: its model was trained on images normalised with {what} {list(old)}, this run "
                              f"normalises with {list(new)} (model.image_mean/image_std, or the model source's "
                              f"defaults); a {word} cannot change the normalisation: {fix()}")
    if stage == "fit":
        if "optimizer" in hp and "optimizer" in saved and saved["optimizer"] != hp["optimizer"]:
            raise ConfigError(f"{path}: model.optimizer is {saved['optimizer']!r} in the checkpoint, "
                              f"{hp['optimizer']!r} in this run; its optimizer state cannot carry over to another "
                              f"optimizer: {fix()}")
        missing = [k for k in ("optimizer_states", "lr_schedulers", "loops") if k not in ckpt]
        if missing:
            raise ConfigError(f"{path}: holds no {', '.join(missing)} (weights only: checkpoint.save_weights_only?); "
                              f"a resume needs a whole checkpoint; start a new run from its weights: --model.pretrained "
                              f"{path} without --ckpt_path")
    _check_state_dict(ckpt["state_dict"], module, path, word, say)

    changed = []
    skip = {*MODEL_SETTINGS, *ORIGIN_SETTINGS, "optimizer"}
    for key in sorted(set(hp) & set(saved) - skip):
        if _plain(saved[key]) != _plain(hp[key]):
            changed.append(f"model.{key}")
            if say:
                log.info("%s: model.%s %s -> %s (this run's setting)", word, key, _show(saved[key]), _show(hp[key]))
    return changed


def _check_labels(old: dict[str, Any], new: dict[str, Any], path: str, fix: str) -> None:
    a, b = list(old.get("names", [])), list(new.get("names", []))
    if a == b:
        # same classes, read from the masks another way (a map, colours, ignored values): the model
        # would learn class i from other pixels than before, without a word
        differ = sorted(k for k in set(old) | set(new) if k != "names" and _plain(old.get(k)) != _plain(new.get(k)))
        if differ:
            key = differ[0]
            raise ConfigError(f"{path}: the same classes, but this run's label set reads masks differently: {key} is "
                              f"{_show(old.get(key))} in the checkpoint, {_show(new.get(key))} in this run; the label "
                              f"set (data.labels) is part of the model: {fix}")
        return

    def names(n: list[str]) -> str:
        return ", ".join(n[:6]) + (", ..." if len(n) > 6 else "")

    where = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    raise ConfigError(f"{path}: its model predicts {len(a)} classes ({names(a)}), this run's label set has {len(b)} "
                      f"({names(b)}; they part at class {where}); the label set (data.labels) is part of the model: "
                      f"{fix}")


def _check_network(meta: dict[str, Any], module, path: str, word: str, fix: str) -> None:
    """The network this run built against the one the checkpoint stores (its config); the weights
    are compared by ``_check_state_dict``."""
    pairs = [("", meta.get("model_config"), module.model.config)]
    depth = getattr(module.model, "depth", None)
    if meta.get("depth_model_config") is not None and depth is not None:
        pairs.append(("depth model's ", meta["depth_model_config"], depth.config))
    for which, old, config in pairs:
        diff = _config_diff(old or {}, config.to_dict())
        if diff:
            key, a, b = diff
            raise ConfigError(f"{path}: the checkpoint's {which}network has {key} {_show(a)}, the one this run builds "
                              f"(model.config / model.pretrained) has {_show(b)}; a {word} cannot change the network: "
                              f"{fix}")


def _config_diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> tuple[str, Any, Any] | None:
    for key in sorted(set(old) & set(new) - _CONFIG_IGNORED):
        a, b = old[key], new[key]
        if isinstance(a, dict) and isinstance(b, dict):
            found = _config_diff(a, b, f"{prefix}{key}.")
            if found:
                return found
        elif _plain(a) != _plain(b):
            return f"{prefix}{key}", a, b
    return None


def _check_state_dict(state: dict[str, Any], module, path: str, word: str, say: bool) -> None:
    """Every tensor of the network present, in its shape; nothing the network lacks. What the task
    owns beside the network (``weights.*``: learned loss weights, present only with
    ``model.weighting uncertainty``) follows this run: a tensor it has and the checkpoint lacks
    starts fresh, one it no longer has is dropped."""
    want = module.state_dict()
    missing = [k for k in want if k not in state]
    extra = [k for k in state if k not in want]

    def some(keys: list[str]) -> str:
        return ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")

    lacks = [k for k in missing if k.startswith("model.")]
    if lacks:
        raise ConfigError(f"{path}: lacks {len(lacks)} of the model's {len(want)} tensors ({some(lacks)}): the file is "
                          "damaged, or was written by another model")
    alien = [k for k in extra if k.startswith("model.")]
    if alien:
        raise ConfigError(f"{path}: holds {len(alien)} tensors this run's model does not have ({some(alien)}): it was "
                          "written by another model")
    damaged = [k for k, v in state.items() if k.startswith("model.") and torch.is_tensor(v) and v.is_floating_point()
               and not bool(torch.isfinite(v).all())]
    if damaged:
        raise ConfigError(f"{path}: {len(damaged)} of the model's tensors hold NaN/inf ({some(damaged)}): the file is "
                          "damaged, or was written by a diverged run; use an earlier checkpoint")
    for key, value in want.items():
        old = state.get(key)
        if hasattr(old, "shape") and tuple(old.shape) != tuple(value.shape):
            raise ConfigError(f"{path}: tensor {key} has shape {list(old.shape)} in the checkpoint, {list(value.shape)} "
                              "in this run's model: it was written by another model")
    for key in missing:
        state[key] = want[key].detach().clone()
    for key in extra:
        del state[key]
    if say and missing:
        log.info("%s: %s not in the checkpoint (its run had no such tensor): starts fresh", word, some(missing))
    if say and extra:
        log.info("%s: %s dropped from the checkpoint (this run has no such tensor)", word, some(extra))


def apply_run_settings(trainer, ckpt: dict[str, Any], path: str, changed: list[str]) -> None:
    """This run's optimizer and schedule settings over those of the checkpoint it resumes. An
    optimizer's ``load_state_dict`` takes every group setting (learning rate, weight decay, betas,
    the fused switch, ...) from the checkpoint, and the schedule its base learning rates: so a
    resume would train at the old run's settings whatever this run says. Here the checkpoint's
    groups and base learning rates are made this run's (just configured, before Lightning restores
    them); the moments and the schedule's position stay the checkpoint's."""
    schedulers = ckpt.get("lr_schedulers") or []
    for optimizer, saved in zip(trainer.optimizers, ckpt.get("optimizer_states") or [], strict=False):
        groups, mine = saved.get("param_groups", []), optimizer.param_groups
        names = [g.get("name") for g in mine]
        if [g.get("name") for g in groups] == [*names, "task"]:  # learned loss weights, now fixed
            for index in groups.pop()["params"]:
                saved.get("state", {}).pop(index, None)
            for sched in schedulers:
                if len(sched.get("base_lrs", [])) == len(groups) + 1:
                    sched["base_lrs"].pop()
        layout = [(g.get("name"), len(g["params"])) for g in groups]
        ours = [(g.get("name"), len(g["params"])) for g in mine]
        if layout != ours:
            why = f" ({', '.join(changed)} changed)" if changed else ""
            raise ConfigError(f"{path}: its optimizer state has {len(layout)} parameter groups "
                              f"({_layout(layout)}), this run's optimizer {len(ours)} ({_layout(ours)}){why}; the "
                              f"state cannot carry over: resume with the checkpoint's settings, or start a new run "
                              f"from its weights: --model.pretrained {path} without --ckpt_path")
        for old, new in zip(groups, mine, strict=True):
            old.update({k: copy.deepcopy(v) for k, v in new.items() if k != "params"})
    for config, sched in zip(trainer.lr_scheduler_configs, schedulers, strict=False):
        if "base_lrs" in sched and hasattr(config.scheduler, "base_lrs"):
            sched["base_lrs"] = list(config.scheduler.base_lrs)


def _layout(groups: list[tuple[Any, int]]) -> str:
    shown = [f"{name or i}: {n}" for i, (name, n) in enumerate(groups)]
    return ", ".join(shown[:4]) + (", ..." if len(shown) > 4 else "")


def _plain(value: Any) -> Any:
    """A setting as plain data, so that a tuple and the list a checkpoint gives back compare equal."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _show(value: Any) -> str:
    text = repr(_plain(value)) if not isinstance(value, str) else value
    return text if len(text) <= 80 else text[:77] + "..."


def epochs_done(ckpt: dict[str, Any]) -> int:
    """The epochs a checkpoint's run has trained through (a checkpoint written as an epoch's
    validation ends counts that epoch: it is "processed", not yet "completed" in Lightning's loop)."""
    try:
        progress = ckpt["loops"]["fit_loop"]["epoch_progress"]["current"]
        return int(max(progress["processed"], progress["completed"]))
    except (KeyError, TypeError, ValueError):
        return int(ckpt.get("epoch") or 0)


def check_epochs(ckpt: dict[str, Any], path: str, max_epochs: int | None) -> None:
    """One line, before anything is restored or written, when this run's ``max_epochs`` is below the
    epochs the checkpoint has trained (Lightning raised a MisconfigurationException with a traceback,
    after the run's config.yaml was written)."""
    done = epochs_done(ckpt)
    if max_epochs is not None and max_epochs != -1 and done > max_epochs:
        raise ConfigError(f"{path}: the checkpoint has trained {done} epochs; this run sets trainer.max_epochs "
                          f"{max_epochs}, below that: resume with --trainer.max_epochs {done + 1} or more to train "
                          f"on, or start a new run from its weights: --model.pretrained {path} without --ckpt_path")


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
            check_epochs(ckpt, path, trainer.max_epochs)
            self._pending = (ckpt, path, changed)
            if trainer.optimizers:  # a strategy that restores after setting up the optimizers
                self.on_fit_start(trainer, trainer.lightning_module)

    def on_fit_start(self, trainer, pl_module) -> None:
        # after the optimizers are set up, before Lightning restores their state
        if self._pending is not None:
            ckpt, path, changed = self._pending
            self._pending = None
            apply_run_settings(trainer, ckpt, path, changed)

