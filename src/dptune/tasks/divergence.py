"""Divergence guard: no non-finite update, ever.

Every optimizer step is checked before it runs: the loss of each batch of its accumulation
window (all of a joint model's task losses are in it) and, where no GradScaler does it (32 and
bf16 precision), the gradients. Every process takes the same decision (a non-finite loss on
one process alone must not leave the others waiting). A non-finite step updates nothing: the
weights, the optimizer state and the BatchNorm statistics its forward pass changed stay as
they were; ``nonfinite_skips`` such steps in a row are skipped, one more stops the run.

A mixin of ``DPTTask`` (it reads the task's ``model``, ``hparams`` and ``trainer``)."""

from __future__ import annotations

import logging
from typing import Any

import torch

from dptune.errors import ConfigError
from dptune.tasks.optim import NonFiniteSteps, any_nonfinite, nonfinite_tensors

log = logging.getLogger(__name__)


class DivergenceGuard:
    """Lightning hooks that check every optimizer step before it runs and skip, or stop at, a
    non-finite one. Put it before ``LightningModule`` in the bases."""

    def on_train_start(self) -> None:
        self._nonfinite = NonFiniteSteps(self.hparams.get("nonfinite_skips", 3))
        self._window_open = False

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._batch_idx = batch_idx
        if self._window_open:  # a later batch of the same accumulation window
            return
        self._window_open = True
        self._loss_finite: torch.Tensor | None = None
        self._step_losses: dict[str, torch.Tensor] = {}
        buffers = list(self.model.buffers())  # BatchNorm statistics and counts, what a forward pass changes
        saved = getattr(self, "_saved_buffers", None)
        if saved is None or [id(b) for b in saved[0]] != [id(b) for b in buffers]:
            self._saved_buffers = (buffers, [b.detach().clone() for b in buffers])
        else:
            for copy, b in zip(saved[1], buffers, strict=True):
                copy.copy_(b)

    def log(self, name: str, value: Any, *args: Any, **kwargs: Any) -> None:
        if name.startswith("train/loss") and isinstance(value, torch.Tensor):
            getattr(self, "_step_losses", {})[name] = value.detach()  # named by the divergence message
        super().log(name, value, *args, **kwargs)

    def on_before_backward(self, loss: torch.Tensor) -> None:
        finite = torch.isfinite(loss.detach()).all()
        previous = getattr(self, "_loss_finite", None)
        self._loss_finite = finite if previous is None else previous & finite

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        trainer = self.trainer
        scaler = getattr(trainer.precision_plugin, "scaler", None)  # 16-mixed: it skips inf gradients itself
        finite = torch.ones(2, dtype=torch.bool, device=self.device)  # the loss, the gradients
        if getattr(self, "_loss_finite", None) is not None:
            finite[0] = self._loss_finite
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if scaler is None and grads:
            finite[1] = ~any_nonfinite(grads).to(self.device)
        self._loss_finite, self._window_open = None, False
        # how many processes found a non-finite loss, non-finite gradients: one collective, one decision
        counts = trainer.strategy.reduce((~finite).float(), reduce_op="sum")
        bad_loss, bad_grads = (int(n) for n in counts.tolist())
        if self._nonfinite.update(not (bad_loss or bad_grads)) == "step":
            return
        saved = getattr(self, "_saved_buffers", None)
        if saved is not None:  # this window's forward passes updated BatchNorm statistics (with NaN)
            for b, copy in zip(*saved, strict=True):
                b.copy_(copy)
        terms = [f"{k}={float(v.float().sum()):g}" for k, v in getattr(self, "_step_losses", {}).items()
                 if not bool(torch.isfinite(v).all())]
        what = "non-finite loss" + (f" ({', '.join(terms)})" if terms else "") if bad_loss else "non-finite gradients"
        if trainer.world_size > 1:
            what += f" on {bad_loss or bad_grads} of {trainer.world_size} processes"
        where = f"step {trainer.global_step + 1} (epoch {trainer.current_epoch + 1}, batch {self._batch_idx + 1})"
        weights = self._nonfinite_weights()
        if weights or self._nonfinite.in_a_row > self._nonfinite.limit:
            n = self._nonfinite.in_a_row
            streak = f" in {n} steps in a row, more than model.nonfinite_skips={self._nonfinite.limit}" if n > 1 else ""
            if weights:
                streak += f"; the weights themselves are non-finite ({len(weights)} tensors, e.g. {weights[0]})"
            raise ConfigError(f"training diverged at {where}: {what}{streak}; likely cause: {self._likely_cause()}")
        if scaler is not None and getattr(optimizer, "_step_supports_amp_scaling", False):
            # a fused optimizer under a GradScaler: the scaler has not looked at these (still scaled)
            # gradients yet; a NaN among them makes it skip the step (and lower its scale)
            if grads:
                grads[0].fill_(float("nan"))
        else:  # no gradient, no update: the optimizer leaves these weights and their state alone
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None
        if trainer.is_global_zero:
            log.warning("%s: %s; step skipped, the weights are unchanged (%d of model.nonfinite_skips=%d in a row, "
                        "%d in this run)", where, what, self._nonfinite.in_a_row, self._nonfinite.limit,
                        self._nonfinite.skipped)

    def _nonfinite_weights(self) -> list[str]:
        """Names of this process's parameters and buffers that hold a NaN or inf, the same on every
        process (empty unless every process finds its own weights finite)."""
        bad = nonfinite_tensors((*self.named_parameters(), *self.named_buffers()))
        if self.trainer.strategy.reduce_boolean_decision(not bad, all=True):
            return []
        return bad or ["(on another process)"]

    def _likely_cause(self) -> str:
        hp, precision = self.hparams, str(self.trainer.precision)
        if self._nonfinite.updates == 0:
            return ("the starting weights or the data, since this run has not updated the weights yet (check the "
                    "batch's files and model.pretrained / model.config)")
        lr = f"model.lr {hp.lr:g}" + (f", x{hp.head_lr_mult:g} for the neck and heads" if hp.head_lr_mult != 1 else "")
        cause = (f"a learning rate too high ({lr}): lower --model.lr, lengthen the warmup (--model.warmup_steps) "
                 "or clip gradients (--trainer.gradient_clip_val 1.0)")
        if precision.startswith("16"):
            cause += f"; or fp16 overflow (trainer.precision {precision}): try --trainer.precision bf16-mixed"
        return cause
