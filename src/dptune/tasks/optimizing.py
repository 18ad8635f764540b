"""The optimizer and LR schedule of a task: parameter groups (backbone / neck and heads, weight
decay, layer-wise LR decay, the task's own parameters), AdamW (fused where it may be) or SGD with
momentum, the warmup-poly schedule over the run's optimizer steps, and resuming a checkpoint written
before the task's own parameters had a group.

A mixin of ``DPTTask`` (it reads the task's ``model``, ``hparams`` and ``trainer``)."""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from dptune.errors import ConfigError
from dptune.tasks.optim import WarmupPoly, param_groups

log = logging.getLogger(__name__)

STREAM_LENGTH = ("the training data is a stream (no length): set --trainer.max_steps for the LR schedule and "
                 "--trainer.val_check_interval in steps")


VAL_PROGRESS = ("loops", "fit_loop", "epoch_loop.val_loop.batch_progress")
_CUT = {"ready": 1, "started": 1, "processed": 0, "completed": 0}  # Lightning's "mid-evaluation", at batch 0


def _val_progress(checkpoint: dict[str, Any]) -> dict[str, Any] | None:
    """The validation loop's batch progress in a checkpoint's loop state (None where it has none)."""
    progress: Any = checkpoint
    for key in VAL_PROGRESS:
        progress = progress.get(key) if isinstance(progress, dict) else None
    return progress if isinstance(progress, dict) else None


def mark_validation_cut(checkpoint: dict[str, Any], cut: bool = True) -> None:
    """Record in ``checkpoint`` that a validation of the fit was stopped before it ended (``cut``):
    Lightning's resume then runs that validation again from its first batch (the scores so far are
    not saved). Otherwise record its validations as whole: after such a resume Lightning's count
    holds the cut's batch on top of the whole validation's, which reads as another cut."""
    progress = _val_progress(checkpoint)
    if progress is None:
        return
    if cut:
        progress.update(total=dict(_CUT), current=dict(_CUT), is_last_batch=False)
    elif validation_cut(checkpoint):
        total = progress["total"]
        total.update(ready=total["completed"], started=total["completed"], processed=total["completed"])


def validation_cut(checkpoint: dict[str, Any]) -> bool:
    """Whether resuming ``checkpoint`` begins with a validation that was stopped before it ended."""
    progress = (_val_progress(checkpoint) or {}).get("total")
    if not isinstance(progress, dict):
        return False
    started, processed = progress.get("started", 0), progress.get("processed", 0)
    return progress.get("ready") == started and processed == started - 1 and progress.get("completed") == processed


def resume_point(checkpoint: dict[str, Any]) -> tuple[int, int, int] | None:
    """Where a checkpoint's run stands: (optimizer steps, whole epochs, batches into the next epoch);
    None for a checkpoint without Lightning's loop state."""
    try:
        loop = checkpoint["loops"]["fit_loop"]
        epochs = loop["epoch_progress"]["current"]
        progress = loop["epoch_loop.batch_progress"]
        # processed, not completed: a checkpoint written as a batch ends (every_n_train_steps) is saved
        # before Lightning counts the batch complete, and Lightning completes it on restart
        batches, ready = int(progress["current"]["processed"]), int(progress["current"]["ready"])
        step = int(checkpoint["global_step"])
        done, started = int(epochs["completed"]), int(epochs["ready"])
    except (KeyError, TypeError, ValueError):
        return None
    if int(epochs["processed"]) > done:  # written as the epoch's validation ended
        return step, int(epochs["processed"]), 0
    if started == done:  # written after the epoch ended (no validation in it): its batches are a past epoch's
        return step, done, 0
    if progress.get("is_last_batch") is True and batches > 0 and ready == batches:
        # the epoch's last batch trained (a validation cut after it): Lightning trains no more of the epoch,
        # whatever its count of batches at this run's size (a batch started on an exception is trained again)
        return step, done + 1, 0
    return step, done, batches


class Optimizing:
    """Lightning's ``configure_optimizers`` and ``on_load_checkpoint`` for a task. Put it before
    ``LightningModule`` in the bases."""

    def param_groups(self) -> list[dict[str, Any]]:
        """The network's groups (backbone / neck and heads, decay, layer-wise LR), and a ``task``
        group (``lr * head_lr_mult``, no decay) for what the task owns beside the network, such as
        learned loss weights. Every trainable parameter of the module is in exactly one group."""
        hp = self.hparams
        groups = param_groups(self.model, hp.lr, hp.head_lr_mult, hp.weight_decay, hp.layer_decay)
        network = {id(p) for p in self.model.parameters()}
        own = [p for p in self.parameters() if p.requires_grad and id(p) not in network]
        if own:
            groups.append({"params": own, "lr": hp.lr * hp.head_lr_mult, "weight_decay": 0.0, "name": "task"})
        grouped = [id(p) for g in groups for p in g["params"]]
        trainable = {id(p) for p in self.parameters() if p.requires_grad}
        if len(grouped) != len(set(grouped)) or set(grouped) != trainable:
            raise RuntimeError(f"optimizer groups cover {len(set(grouped))} of {len(trainable)} trainable parameters "
                               f"({len(grouped) - len(set(grouped))} twice): a bug in {type(self).__name__}")
        return groups

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A run resumed from a checkpoint written before the task's own parameters (learned loss
        weights) had an optimizer group: its optimizer and schedule lack the last, ``task`` group.
        Add it, empty (those parameters restart their optimizer state), so that the resume works.
        A checkpoint cut inside a validation has that validation left to run, even at the run's last step."""
        self._validation_left = validation_cut(checkpoint)
        self._resumed = resume_point(checkpoint)
        self._fit_schedule_to_the_checkpoint()
        groups = self.param_groups()
        if groups[-1]["name"] != "task":
            return
        names = [g["name"] for g in groups]
        for state in checkpoint.get("optimizer_states") or []:
            saved = state.get("param_groups", [])
            if [g.get("name") for g in saved] != names[:-1]:
                continue
            first = 1 + max((i for g in saved for i in g["params"]), default=-1)
            task = {k: v for k, v in saved[-1].items() if k != "params"}
            task.update(params=list(range(first, first + len(groups[-1]["params"]))), lr=groups[-1]["lr"],
                        initial_lr=groups[-1]["lr"], weight_decay=0.0, name="task")
            saved.append(task)
            for sched in checkpoint.get("lr_schedulers") or []:
                if len(sched.get("base_lrs", [])) == len(saved) - 1:
                    sched["base_lrs"].append(groups[-1]["lr"])
            log.info("the checkpoint's optimizer has no group for %s's own parameters (written before they had "
                     "one): they resume with a fresh optimizer state", type(self).__name__)

    def _fit_schedule_to_the_checkpoint(self) -> None:
        """A strategy that restores after setting up the optimizers (FSDP, DeepSpeed) reads the checkpoint
        after ``configure_optimizers`` made the schedule: its length and whether a cut validation is left
        are made the checkpoint's here, before the schedule's state is restored."""
        trainer = self._trainer
        for config in getattr(trainer, "lr_scheduler_configs", None) or []:
            sched = config.scheduler
            if isinstance(sched, WarmupPoly):
                sched.validation_left = self._validation_left
                sched.total = self._run_steps()

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        if hp.optimizer == "sgd":
            opt = torch.optim.SGD(self.param_groups(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
        else:
            opt = torch.optim.AdamW(self.param_groups(), lr=hp.lr, betas=tuple(hp.betas),
                                    weight_decay=hp.weight_decay, fused=self._fused_adamw())
        total = self._run_steps()
        warmup = hp.warmup_steps if hp.warmup_steps is not None else int(round(hp.warmup_ratio * total))
        if warmup >= total and getattr(self.trainer, "is_global_zero", True):
            given = (f"model.warmup_steps {warmup} is" if hp.warmup_steps is not None else
                     f"model.warmup_ratio {hp.warmup_ratio:g} makes a warmup ({warmup} steps)")
            log.warning("%s not shorter than this run's %d optimizer steps: the LR rises to %.0f%% of model.lr (%g) "
                        "at the last step and never decays; set a shorter warmup (model.warmup_ratio below 1, or "
                        "fewer model.warmup_steps)", given, total, 100 * min(1.0, total / max(warmup, 1)), hp.lr)
        sched = WarmupPoly(opt, total, warmup, hp.poly_power, hp.min_lr_ratio)
        sched.validation_left = getattr(self, "_validation_left", False)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}

    def _run_steps(self) -> int:
        """The optimizer steps of this run, which the schedule spans: Lightning's estimate, counted for a
        resumed run by ``_steps_of_resumed_run``; one line where the settings give none or no length."""
        from lightning.fabric.utilities.exceptions import MisconfigurationException

        try:  # Lightning sizes the training loader here: its checks of the limits raise (limit_train_batches 0.1 of 4)
            total = self.trainer.estimated_stepping_batches
        except MisconfigurationException as e:
            raise ConfigError(f"trainer settings: {' '.join(str(e).split())}") from None
        if not math.isfinite(total):
            raise ConfigError(STREAM_LENGTH)
        total = self._steps_of_resumed_run(total)
        if total <= 0:
            raise ConfigError("the training split gives this run no optimizer step (no whole batch on a process, or "
                              "trainer.limit_train_batches / max_steps): lower data.batch_size or add training images")
        return int(total)

    def _steps_of_resumed_run(self, estimated: int) -> int:
        """The optimizer steps this run ends at. Lightning counts max_epochs of this run's epochs; a run
        resumed on another number of processes (or batch size) has epochs of another length, so its
        schedule ended early or late, and a checkpoint of more steps than that count was refused as
        having nothing left to train: the steps done, then the rest of this epoch and the epochs left
        at this run's length."""
        resumed, trainer = getattr(self, "_resumed", None), self.trainer
        if resumed is None or not trainer.max_epochs or trainer.max_epochs < 0 or \
                not math.isfinite(trainer.num_training_batches):
            return estimated
        step, epochs, batches_in_epoch = resumed
        per_epoch = math.ceil(trainer.num_training_batches / trainer.accumulate_grad_batches)
        total = step + max(0, per_epoch - batches_in_epoch // trainer.accumulate_grad_batches) * (batches_in_epoch > 0) \
            + max(0, trainer.max_epochs - epochs - (batches_in_epoch > 0)) * per_epoch
        return min(total, trainer.max_steps) if trainer.max_steps and trainer.max_steps > 0 else total

    def _fused_adamw(self) -> bool:
        """The fused AdamW kernel (CPU and CUDA) beats the per-tensor loop, but it unscales
        gradients inside its step, so Lightning cannot clip gradients before it: with
        ``gradient_clip_val`` set the optimizer is the unfused one."""
        if any(p.device.type not in ("cpu", "cuda") for p in self.model.parameters()):
            return False
        clip = self.trainer.gradient_clip_val if self._trainer is not None else None
        return not clip
