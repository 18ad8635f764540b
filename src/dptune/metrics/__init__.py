"""Metrics updated per batch on the device and summed across processes."""

from __future__ import annotations

import numpy as np
import torch
from torchmetrics import Metric


def finite_rows(x: torch.Tensor) -> torch.Tensor:
    """Per sample (first dimension), whether all its values are finite: ``isfinite(x)`` reduced over
    the rest. On a CPU a sum settles it in one pass over any memory layout (a NaN or inf makes the
    sum NaN or inf) and only samples whose sum is not finite, e.g. large finite values that
    overflow, are checked value by value: about 1 against 35 ms for a batch of CamVid validation
    logits (8 x 11 x 360 x 480; ``python -m dptune.tools.eval_kernels``, docs/benchmarks.md).
    Elsewhere the plain check, which needs no wait for the device."""
    if x.device.type != "cpu" or x.ndim < 2:
        return torch.isfinite(x.reshape(x.shape[0], -1)).all(1)
    ok = torch.isfinite(x.sum(tuple(range(1, x.ndim))))
    for i in (~ok).nonzero().flatten().tolist():  # each sample as a view: no copy of a diverged batch
        ok[i] = bool(torch.isfinite(x[i]).all())
    return ok


WEIGHTS_CAUSE = "the weights are non-finite or overflow the forward pass, e.g. after a learning rate too high"


def require_finite(output: torch.Tensor | np.ndarray, what: str, cause: str = WEIGHTS_CAUSE) -> None:
    """A ``ModelOutputError`` unless every value of a model's ``output`` is finite; ``what`` names the
    output (and the graph that gave it, where that is not the torch model), ``cause`` what makes it so."""
    from dptune.errors import ModelOutputError

    x = torch.from_numpy(output) if isinstance(output, np.ndarray) else output.detach()
    if x.numel() and not bool(finite_rows(x.reshape(1, -1) if x.ndim < 2 else x).all()):
        raise ModelOutputError(f"{what} is NaN or infinite ({cause}); no result from it")


def warn_if_nonfinite(metric: Metric, where: str) -> int:
    """How many images (over all processes) gave non-finite predictions, with one warning if any:
    their metrics are NaN (no result), so no checkpoint is chosen as best by them. A collective."""
    import logging

    n = int(summed_state(metric, "nonfinite"))
    if n:
        logging.getLogger("dptune").warning(
            "%s: %d image(s) gave non-finite predictions (NaN/inf: the model's outputs overflow); the metrics are "
            "NaN, no result", where, n)
    return n


def summed_state(metric: Metric, name: str) -> torch.Tensor:
    """A state of ``metric`` summed over processes (e.g. its image count), the local value kept for
    further updates. Reading ``metric.<name>`` after ``compute()`` gives this process's own value:
    torchmetrics sums the states only inside ``compute``. Every process must call this (a collective)."""
    with metric.sync_context():
        return getattr(metric, name).clone()


class SplitMean(Metric):
    """A split's mean of per-batch means, each weighted by what it averages (labelled pixels, scored
    images): sum(mean x weight) / sum(weight), both sums over every process (torchmetrics sums the
    states in ``compute``), so the result is the same whatever the batches and shards. NaN when
    nothing was weighed (no batch had anything to average)."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("total", torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("weight", torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, mean: torch.Tensor, weight: torch.Tensor) -> None:
        weight = weight.to(self.weight.dtype)
        # a batch with nothing to average adds nothing (its mean is a placeholder); no wait for the device
        self.total += torch.where(weight > 0, mean.detach().to(self.total.dtype) * weight, 0.0)
        self.weight += weight

    def compute(self) -> torch.Tensor:
        return self.total / self.weight if bool(self.weight > 0) else torch.tensor(float("nan"))


def private_states(module: torch.nn.Module) -> None:
    """Reset every torchmetrics metric in ``module``: new state tensors of this process's own. The processes
    ``ddp_spawn`` starts get the module through torch.multiprocessing, which moves the CPU tensors it sends
    into shared memory, and Lightning gives them private copies of the parameters and buffers only: the
    metrics' states stayed one tensor that every process (and the launcher) added into, so a validation of
    5 images on 2 processes counted 10. Called where a task is set up, in each process."""
    for metric in module.modules():
        if isinstance(metric, Metric):
            metric.reset()
