"""Depth metrics: the standard monocular-depth set, per image on valid pixels, averaged over images.

Each image's metrics are computed on its own valid pixels and added to running float64 sums with
an image count; both are summed across processes. Every image is scored by exactly one process
(see the datamodule's evaluation sampler), so 1 and 2 processes give the same figures up to
float64 rounding.
"""

from __future__ import annotations

import logging
import math

import torch
from torchmetrics import Metric

log = logging.getLogger(__name__)

NAMES = ("abs_rel", "sq_rel", "rmse", "rmse_log", "log10", "silog", "delta1", "delta2", "delta3")
LOWER_IS_BETTER = {"abs_rel", "sq_rel", "rmse", "rmse_log", "log10", "silog"}
MIN_DEPTH = 1e-3  # metres: the depth models' default model.min_depth (1 mm)
FAR_BOUND = 10.0  # without max_depth, aligned relative depth is clipped to this many times an image's farthest


def check_range(min_depth: float, max_depth: float | None, low: str = "model.min_depth",
                high: str = "model.max_depth") -> None:
    """A valid-depth range that can hold a measurement: 0 < min_depth < max_depth (None: no maximum; predictions
    are clipped to min_depth, so it must be above 0 for the log metrics); ``low`` and ``high`` name the
    settings in the message."""
    from dptune.errors import ConfigError

    if not 0 < min_depth < math.inf:
        raise ConfigError(f"{low} must be a depth > 0 in metres (predictions are clipped to it; the log metrics "
                          f"need it above 0), got {min_depth}")
    if max_depth is not None and not min_depth < max_depth < math.inf:
        raise ConfigError(f"{high} must be above {low} ({min_depth}) or left out, got {max_depth}")


def valid_depth(depth: torch.Tensor, min_depth: float, max_depth: float | None) -> torch.Tensor:
    """Ground truth that counts in losses and metrics: measured (> 0) and inside [min_depth, max_depth]."""
    ok = (depth > 0) & (depth >= min_depth)
    return ok & (depth <= max_depth) if max_depth else ok


def image_metrics(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """The nine metrics of one image from its valid pixels (1-d tensors, metres, both > 0).
    ``silog`` is 100 x the scale-invariant log error (the KITTI benchmark's unit)."""
    p, g = pred.double(), gt.double()
    diff = p - g
    log_diff = p.log() - g.log()
    ratio = torch.maximum(p / g, g / p)
    return torch.stack([
        (diff.abs() / g).mean(),
        (diff**2 / g).mean(),
        diff.pow(2).mean().sqrt(),
        log_diff.pow(2).mean().sqrt(),
        (log_diff.abs() / math.log(10)).mean(),
        (log_diff.pow(2).mean() - log_diff.mean() ** 2).clamp(min=0).sqrt() * 100,
        (ratio < 1.25).double().mean(),
        (ratio < 1.25**2).double().mean(),
        (ratio < 1.25**3).double().mean(),
    ])


def _median(values: torch.Tensor) -> torch.Tensor:
    """The median as numpy and the evaluation protocols take it: the mean of the two middle values
    of an even count (``torch.median`` gives the lower one)."""
    v = values.flatten()
    n = v.numel()
    low = v.kthvalue((n - 1) // 2 + 1).values  # selection, not a whole sort
    return low if n % 2 else (low + v.kthvalue(n // 2 + 1).values) / 2


def align(pred: torch.Tensor, gt: torch.Tensor, mode: str, max_depth: float | None = None) -> torch.Tensor:
    """A relative prediction (affine-invariant inverse depth) turned into metres on one image's
    valid pixels: ``median`` scales the predicted depth (1 / prediction) to the ground truth's
    median; ``lstsq`` fits scale and shift of the inverse depth by least squares (MiDaS's protocol).
    Aligned depth is clipped to ``max_depth`` (MiDaS's protocol), else to ``FAR_BOUND`` times the image's
    farthest valid ground truth: where the aligned inverse depth is 0 or below, or the prediction 0, the depth
    is unbounded, and one such pixel decided the image's RMSE (1e8 m); a bound at the farthest ground truth
    itself would forgive every overestimate past it."""
    pred = pred.double()
    far = float(max_depth) if max_depth else FAR_BOUND * float(gt.max())
    if mode == "median":
        depth = 1.0 / pred.clamp(min=1e-8)  # the prediction's own scale is unknown: clipped once scaled
        return (depth * (_median(gt.double()) / _median(depth))).clamp(max=far)
    if mode == "lstsq":
        target = 1.0 / gt.double()
        # the least-squares line in closed form, centred (stable); a constant prediction has no scale
        # to fit, only the shift (LAPACK's rank-deficient answer left both 0: every pixel at the floor)
        dp = pred - pred.mean()
        var = (dp * dp).sum()
        scale = (dp * (target - target.mean())).sum() / var if var > 0 else pred.new_zeros(())
        shift = target.mean() - scale * pred.mean()
        return 1.0 / (scale * pred + shift).clamp(min=1.0 / far)
    raise ValueError(f"alignment must be median or lstsq, got {mode!r}")


class DepthMetrics(Metric):
    """Per-image depth metrics averaged over images, exact across processes. ``images`` counts the
    images scored (``dptune.metrics.summed_state`` sums it over processes)."""

    full_state_update = False
    is_differentiable = False
    higher_is_better = None

    def __init__(self, min_depth: float = MIN_DEPTH, max_depth: float | None = None, alignment: str | None = None,
                 **kwargs) -> None:
        super().__init__(**kwargs)
        self.min_depth, self.max_depth, self.alignment = min_depth, max_depth, alignment
        self.add_state("sums", default=torch.zeros(len(NAMES), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("images", default=torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("nonfinite", default=torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, pred: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor) -> None:
        """``pred`` and ``gt`` (B, H, W) in metres (``pred`` relative when ``alignment`` is set),
        ``valid`` (B, H, W) bool. Images without a valid pixel are not counted."""
        for p, g, v in zip(pred, gt, valid, strict=True):
            if not v.any():
                continue
            p, g = p[v], g[v]
            if not bool(torch.isfinite(p).all()):  # an overflowing model: no result (compute gives NaN)
                self.nonfinite += 1
                continue
            if self.alignment:
                p = align(p, g, self.alignment, self.max_depth)
            p = p.clamp(min=self.min_depth, max=self.max_depth)  # the usual protocol clips predictions
            self.sums += image_metrics(p, g.double())
            self.images += 1

    def compute(self) -> dict[str, torch.Tensor]:
        # no image scored is no result: NaN, never the perfect-looking 0 of an empty sum
        n = torch.where((self.images > 0) & (self.nonfinite == 0), self.images.double(), torch.nan)
        return {name: self.sums[i] / n for i, name in enumerate(NAMES)}


def warn_if_none_scored(images: int, where: str, min_depth: float, max_depth: float | None) -> None:
    """One warning when a validation scored no depth image: its metrics are NaN, not a result."""
    if images == 0:
        log.warning("%s: no depth image had a valid pixel in [%s, %s] m: the depth metrics are NaN (no result; is "
                    "depth_scale right?)", where, min_depth, max_depth if max_depth else "inf")
