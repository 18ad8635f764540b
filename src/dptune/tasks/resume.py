"""What a checkpoint a run resumes (or scores) may differ in from that run, and bringing its
optimizer state in line with the run's settings (``dptune.tasks.checkpoints.ResumeCheck`` calls these).

A resumed run's settings are its own: the checkpoint brings the weights, the optimizer state (the
moments, not the settings), where the schedule and the loops stand. What a resume may change and
what it may not:

- settings that only change the run (learning rate, weight decay, schedule, losses, evaluation,
  logging, precision switches; the trainer's run length, devices, checkpointing) are applied and
  each change is logged: ``resume: model.lr 0.001 -> 0.123 (this run's setting)``; so is each data
  setting (``resume: data.batch_size 8 -> 16``: the data are the run's to change);
- settings that say what the model is or what its outputs mean (the task, the network, the label
  set, the normalisation, the depth range and mode) stop the run with one line naming the setting
  and both values, as does a change that leaves the optimizer state without a place (another
  optimizer, other parameter groups).
"""

from __future__ import annotations

import copy
import logging
import math
from typing import Any

import torch

from dptune.data.order_resume import damaged_loops
from dptune.errors import ConfigError
from dptune.models.checkpoint_file import dptune_parts

log = logging.getLogger(__name__)


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
        damaged = damaged_loops(ckpt["loops"])
        if damaged:
            raise ConfigError(f"{path}: its loop state (where the run stands) is damaged: {damaged}; resume from "
                              f"another checkpoint of the run, or start a new run from its weights: --model.pretrained "
                              f"{path} without --ckpt_path")
    check_state_dict(ckpt["state_dict"], module, path, word, say)

    changed = []
    skip = {*MODEL_SETTINGS, *ORIGIN_SETTINGS, "optimizer"}
    for key in sorted(set(hp) & set(saved) - skip):
        if _plain(saved[key]) != _plain(hp[key]):
            changed.append(f"model.{key}")
            if say:
                say_change(word, f"model.{key}", saved[key], hp[key])
    return changed


def data_changes(saved: dict[str, Any], now: dict[str, Any], prefix: str = "data") -> list[tuple[str, Any, Any]]:
    """The data settings a resumed run changes against its checkpoint's (``datamodule_hyper_parameters``):
    (``data.splits.train.images``, old, new), a mapping setting compared key by key. They are the run's
    to change (another split, batch size, dataset), and a resume says each, as it says the model's."""
    changes = []
    for key in sorted(set(saved) | set(now), key=str):
        if str(key).startswith("_"):
            continue
        old, new = _plain(saved.get(key)), _plain(now.get(key))
        if isinstance(old, dict) and isinstance(new, dict):
            changes += data_changes(old, new, f"{prefix}.{key}")
        elif old != new:
            changes.append((f"{prefix}.{key}", old, new))
    return changes


def _check_labels(old: dict[str, Any], new: dict[str, Any], path: str, fix: str) -> None:
    a, b = list(old.get("names", [])), list(new.get("names", []))
    if a == b:
        # same classes, read from the masks another way (a map, colours, ignored values): the model
        # would learn class i from other pixels than before, without a word
        differ = sorted(k for k in set(old) | set(new) if k != "names" and _plain(old.get(k)) != _plain(new.get(k)))
        if differ:
            key = differ[0]
            raise ConfigError(f"{path}: the same classes, but this run's label set reads masks differently: {key} is "
                              f"{show_setting(old.get(key))} in the checkpoint, {show_setting(new.get(key))} in this run; the label "
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
    are compared by ``check_state_dict``."""
    pairs = [("", meta.get("model_config"), module.model.config)]
    depth = getattr(module.model, "depth", None)
    if meta.get("depth_model_config") is not None and depth is not None:
        pairs.append(("depth model's ", meta["depth_model_config"], depth.config))
    for which, old, config in pairs:
        diff = _config_diff(old or {}, config.to_dict())
        if diff:
            key, a, b = diff
            raise ConfigError(f"{path}: the checkpoint's {which}network has {key} {show_setting(a)}, the one this run builds "
                              f"(model.config / model.pretrained) has {show_setting(b)}; a {word} cannot change the network: "
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


def check_state_dict(state: dict[str, Any], module, path: str, word: str, say: bool) -> None:
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
    them); the moments and the schedule's position stay the checkpoint's. A checkpoint that leaves this
    run's schedule no step is refused here, before the run writes its config file."""
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
        if hasattr(config.scheduler, "check_left") and isinstance(sched.get("last_epoch"), int):
            from dptune.tasks.optimizing import validation_cut  # (optimizing imports this module)

            # before the run's config file is written
            config.scheduler.check_left(sched["last_epoch"], validation_cut(ckpt))


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


def say_change(word: str, key: str, old: Any, new: Any) -> None:
    """``resume: model.lr 0.0005 -> 0.123 (this run's setting)``: one setting this run changes."""
    log.info("%s: %s %s -> %s (this run's setting)", word, key, show_setting(old, new), show_setting(new, old))


def show_setting(value: Any, other: Any = None) -> str:
    """``value`` in at most about 80 characters; beside ``other`` (the value it is shown against),
    from a little before where the two first differ, so that two long paths that differ near their
    end do not read as the same one cut short."""
    text = repr(_plain(value)) if not isinstance(value, str) else value
    if len(text) <= 80:
        return text
    start = 0
    if other is not None:
        against = repr(_plain(other)) if not isinstance(other, str) else other
        same = next((i for i, (a, b) in enumerate(zip(text, against, strict=False)) if a != b), min(len(text), len(against)))
        start = max(0, min(same - 20, len(text) - 77))
    return ("..." if start else "") + text[start:start + 77] + ("..." if start + 77 < len(text) else "")
