"""Callbacks the end-to-end tests add on the command line (``--trainer.callbacks+=sigterm_helper.X``)."""

import json
import os
import signal

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import SingleDeviceStrategy


class SigtermAt(pl.Callback):
    """SIGTERM to itself at a given step (preemption), in the process of the given rank only."""

    def __init__(self, step: int = 5, rank: int = 0) -> None:
        self.step, self.rank = step, rank

    def on_train_batch_end(self, trainer, *args, **kwargs) -> None:
        if trainer.global_step == self.step and trainer.global_rank == self.rank:
            os.kill(os.getpid(), signal.SIGTERM)


class SigtermAtBatch(pl.Callback):
    """SIGTERM to itself as a given training batch of a given epoch ends (one inside an accumulation window)."""

    def __init__(self, epoch: int = 0, batch: int = 0) -> None:
        self.epoch, self.batch = epoch, batch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == self.batch and trainer.global_rank == 0:
            os.kill(os.getpid(), signal.SIGTERM)


class SigtermInSanityCheck(pl.Callback):
    """SIGTERM to itself after the first batch of the sanity check (before any training step)."""

    def on_validation_batch_end(self, trainer, *args, **kwargs) -> None:
        if trainer.sanity_checking and trainer.is_global_zero:
            os.kill(os.getpid(), signal.SIGTERM)


class StepLog(pl.Callback):
    """Appends one JSON line per optimizer step (step, the LR of every group, the loss, the epoch, the
    process and the samples of its batch) to ``path``,
    and at the start of training a fingerprint of the weights and optimizer state it starts from."""

    def __init__(self, path: str) -> None:
        self.path = path

    def _write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def on_train_start(self, trainer, pl_module) -> None:
        opt = trainer.optimizers[0]
        moments = [s["exp_avg"].double().abs().sum().item() for s in opt.state.values() if "exp_avg" in s]
        weights = sum(v.double().abs().sum().item() for v in pl_module.state_dict().values() if v.is_floating_point())
        self._write({"start": trainer.global_step, "weights": weights, "exp_avg": sum(moments)})

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._lrs = [g["lr"] for g in trainer.optimizers[0].param_groups]  # the LR this step trains at

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self._write({"step": trainer.global_step, "lr": self._lrs, "loss": float(torch.as_tensor(loss)),
                     "epoch": trainer.current_epoch, "rank": trainer.global_rank, "index": batch["index"].tolist()})

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking and trainer.is_global_zero:
            scores = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
            self._write({"validated": trainer.global_step, "epoch": trainer.current_epoch, "scores": scores})


def read_log(path) -> tuple[list[dict], list[dict]]:
    """(start records, step records) of a StepLog file."""
    rows = [json.loads(line) for line in open(path)]
    return [r for r in rows if "start" in r], [r for r in rows if "step" in r]


def trained_per_epoch(steps: list[dict]) -> dict[int, list[int]]:
    """The samples each epoch trained, over every process, in the order of the steps (and ranks)."""
    out: dict[int, list[int]] = {}
    for s in sorted(steps, key=lambda s: (s["step"], s["rank"])):
        out.setdefault(s["epoch"], []).extend(s["index"])
    return out


def validations(path) -> dict[int, dict[str, float]]:
    """The validations a StepLog's runs ended (sanity checks left out): global step -> the val/ scores."""
    return {r["validated"]: r["scores"] for r in map(json.loads, open(path)) if "validated" in r}


class RaiseAt(pl.Callback):
    """Raises ``ValueError`` at the first training step: a stand-in for a bug deep inside a run."""

    def on_train_batch_start(self, *args, **kwargs) -> None:
        raise ValueError("planted bug")


class RaiseInStep(pl.Callback):
    """Raises ``ValueError`` inside the training step after ``step`` optimizer steps (before its backward
    pass): a checkpoint written on the exception has the batch started and not processed."""

    def __init__(self, step: int = 3) -> None:
        self.step = step

    def on_before_backward(self, trainer, *args, **kwargs) -> None:
        if trainer.global_step >= self.step:
            raise ValueError("planted bug")


class LateRestore(SingleDeviceStrategy):
    """A one-device strategy that reads the checkpoint after setting up the optimizers, as FSDP and
    DeepSpeed do (Lightning's ``restore_checkpoint_after_setup``)."""

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        return True
