"""Depth losses on valid pixels only. Every loss is computed per image and averaged over the images
that have at least ``min_valid`` valid pixels: an image with (almost) no ground truth contributes
nothing, and a batch of such images gives 0 with a gradient, never NaN. One term is pooled over the
batch instead: ``ssi``'s gradient matching, summed over the kept images' valid pixel pairs and
divided by their count (MiDaS's batch-based reduction), so an image counts by its valid pixels."""

from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-3  # metres: predictions are clamped here before a logarithm or division
MIN_VALID = 16  # valid pixels an image needs to count in a loss


def _per_image(values: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-image mean of ``values`` over valid pixels, valid pixel count)."""
    n = valid.sum((-2, -1))
    return (values * valid).sum((-2, -1)) / n.clamp(min=1), n


def scored_images(valid: torch.Tensor, min_valid: int = MIN_VALID) -> torch.Tensor:
    """Which images of a (B, H, W) valid map a loss averages over: those with at least ``min_valid``
    valid pixels."""
    return valid.sum((-2, -1)) >= min_valid


def _mean_over_images(per_image: torch.Tensor, n: torch.Tensor, min_valid: int, like: torch.Tensor) -> torch.Tensor:
    keep = n >= min_valid
    if not keep.any():
        return like.sum() * 0.0  # zero, connected to the graph
    return per_image[keep].mean()


def silog(pred: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor, variance_focus: float = 0.85,
          min_valid: int = MIN_VALID) -> torch.Tensor:
    """Scale-invariant log loss (Eigen et al. 2014; lambda 0.85 as in BTS/AdaBins), per image:
    sqrt(mean(d^2) - lambda * mean(d)^2), d = log(pred) - log(gt)."""
    d = torch.where(valid, pred.float().clamp(min=EPS).log() - gt.float().clamp(min=EPS).log(), 0.0)
    m1, n = _per_image(d, valid)
    m2, _ = _per_image(d * d, valid)
    per_image = (m2 - variance_focus * m1 * m1).clamp(min=1e-8).sqrt()
    return _mean_over_images(per_image, n, min_valid, pred)


def l1(pred: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor, min_valid: int = MIN_VALID) -> torch.Tensor:
    per_image, n = _per_image(torch.where(valid, (pred.float() - gt).abs(), 0.0), valid)
    return _mean_over_images(per_image, n, min_valid, pred)


def berhu(pred: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor, min_valid: int = MIN_VALID) -> torch.Tensor:
    """Reverse Huber (Laina et al. 2016): |x| up to c, (x^2 + c^2) / 2c beyond; c = 0.2 x the image's
    largest absolute error."""
    err = torch.where(valid, (pred.float() - gt).abs(), 0.0)
    c = (0.2 * err.amax((-2, -1), keepdim=True)).detach().clamp(min=1e-6)
    per_pixel = torch.where(err <= c, err, (err * err + c * c) / (2 * c))
    per_image, n = _per_image(per_pixel, valid)
    return _mean_over_images(per_image, n, min_valid, pred)


def _align_scale_shift(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Per image, the least-squares scale and shift that map ``pred`` onto ``target`` over valid
    pixels, applied to ``pred``. Solved on centred values (scale = cov / var, the aligned prediction
    = scale x (pred - its mean) + the target's mean): the uncentred 2x2 normal equations cancel
    catastrophically in float32 when the prediction barely varies, as a fresh head's does (a
    prediction of spread 3e-4 around 5 at 384 x 384 gave a loss of 1e12). A constant prediction
    has no scale: it is aligned to the target's mean."""
    w = valid.to(pred.dtype)
    n = w.sum((-2, -1), keepdim=True).clamp(min=1)
    p = pred - (w * pred).sum((-2, -1), keepdim=True) / n
    t_mean = (w * target).sum((-2, -1), keepdim=True) / n
    var = (w * p * p).sum((-2, -1), keepdim=True)
    cov = (w * p * (target - t_mean)).sum((-2, -1), keepdim=True)
    scale = torch.where(var > 0, cov / var.clamp(min=torch.finfo(var.dtype).tiny), 0.0)
    return scale * p + t_mean


def gradient_matching(residual: torch.Tensor, valid: torch.Tensor, scales: int = 4) -> torch.Tensor:
    """MiDaS's multi-scale gradient matching: |d/dx R| + |d/dy R| of the aligned residual summed over
    the batch's pairs of valid pixels and divided by the batch's valid pixels, at ``scales``
    resolutions (every 2**k-th pixel)."""
    total = residual.new_zeros(())
    for k in range(scales):
        step = 2**k
        r, v = residual[:, ::step, ::step], valid[:, ::step, ::step].float()
        gx = (r[:, :, 1:] - r[:, :, :-1]).abs() * v[:, :, 1:] * v[:, :, :-1]
        gy = (r[:, 1:, :] - r[:, :-1, :]).abs() * v[:, 1:, :] * v[:, :-1, :]
        total = total + (gx.sum() + gy.sum()) / v.sum().clamp(min=1)
    return total


def scale_shift_invariant(pred: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor, grad_weight: float = 0.5,
                          min_valid: int = MIN_VALID) -> torch.Tensor:
    """Relative depth (MiDaS, Ranftl et al. 2020): the prediction is affine-invariant inverse depth;
    per image it is aligned to the ground truth's inverse depth by least-squares scale and shift,
    then scored by mean absolute error plus ``grad_weight`` x multi-scale gradient matching."""
    keep = scored_images(valid, min_valid)
    if not keep.any():
        return pred.sum() * 0.0
    pred, gt, valid = pred[keep].float(), gt[keep].float(), valid[keep]
    target = torch.where(valid, 1.0 / gt.clamp(min=EPS), 0.0)
    residual = torch.where(valid, _align_scale_shift(pred, target, valid) - target, 0.0)
    mae, _ = _per_image(residual.abs(), valid)
    return mae.mean() + grad_weight * gradient_matching(residual, valid)


LOSSES = {"silog": silog, "ssi": scale_shift_invariant, "l1": l1, "berhu": berhu}


def upsample_depth(pred: torch.Tensor, size) -> torch.Tensor:
    """(B, h, w) predictions to ``size`` (the ground truth's) exactly as ``pipeline("depth-estimation")``
    does it (``post_process_depth_estimation``: bicubic), so that validation scores what users get."""
    if tuple(pred.shape[-2:]) == tuple(size):
        return pred
    return F.interpolate(pred[:, None], size=tuple(size), mode="bicubic", align_corners=False)[:, 0]
