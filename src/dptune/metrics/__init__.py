"""Metrics updated per batch on the device and summed across processes."""

from __future__ import annotations

import torch
from torchmetrics import Metric


def summed_state(metric: Metric, name: str) -> torch.Tensor:
    """A state of ``metric`` summed over processes (e.g. its image count), the local value kept for
    further updates. Reading ``metric.<name>`` after ``compute()`` gives this process's own value:
    torchmetrics sums the states only inside ``compute``. Every process must call this (a collective)."""
    with metric.sync_context():
        return getattr(metric, name).clone()
