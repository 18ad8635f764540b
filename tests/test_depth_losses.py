"""Depth metrics and losses against numpy references; valid pixels only; never NaN."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dptune.losses.depth import LOSSES, berhu, l1, scale_shift_invariant, silog
from dptune.metrics.depth import NAMES, DepthMetrics


def _np_metrics(p: np.ndarray, g: np.ndarray) -> np.ndarray:
    """The standard definitions, written independently of dptune (per image)."""
    r = np.maximum(p / g, g / p)
    d = np.log(p) - np.log(g)
    return np.array([np.mean(np.abs(p - g) / g), np.mean((p - g) ** 2 / g), np.sqrt(np.mean((p - g) ** 2)),
                     np.sqrt(np.mean(d**2)), np.mean(np.abs(np.log10(p) - np.log10(g))),
                     np.sqrt(np.mean(d**2) - np.mean(d) ** 2) * 100,
                     np.mean(r < 1.25), np.mean(r < 1.25**2), np.mean(r < 1.25**3)])


def _batch(seed=0, b=3, h=20, w=24):
    rng = np.random.default_rng(seed)
    gt = rng.uniform(0.5, 5.0, (b, h, w))
    gt[rng.random((b, h, w)) < 0.3] = 0  # sparse ground truth
    pred = gt * rng.uniform(0.7, 1.4, (b, h, w)) + rng.uniform(0.1, 0.5, (b, h, w))
    return torch.from_numpy(pred), torch.from_numpy(gt)


def test_metrics_are_per_image_averages_on_valid_pixels():
    pred, gt = _batch()
    valid = gt > 0
    valid[2] = False  # an image without ground truth counts in no average
    m = DepthMetrics()
    m.update(pred[:2], gt[:2], valid[:2])
    m.update(pred[2:], gt[2:], valid[2:])
    got = m.compute()
    ref = np.mean([_np_metrics(pred[i][valid[i]].numpy(), gt[i][valid[i]].numpy()) for i in range(2)], axis=0)
    assert int(m.images) == 2
    np.testing.assert_allclose([float(got[k]) for k in NAMES], ref, rtol=1e-10)


def test_alignment_recovers_an_affine_inverse_depth():
    """A relative model's output 3 / depth + 0.2 (inverse depth up to scale and shift) scores perfectly
    after least-squares alignment; median alignment undoes a pure scale of depth."""
    _, gt = _batch(1)
    valid = gt > 0
    inv = torch.where(valid, 3.0 / gt.clamp(min=1e-3) + 0.2, torch.zeros_like(gt))
    m = DepthMetrics(alignment="lstsq")
    m.update(inv, gt, valid)
    assert float(m.compute()["abs_rel"]) < 1e-9 and float(m.compute()["delta1"]) == 1.0
    scaled = torch.where(valid, 1.0 / (2.5 * gt.clamp(min=1e-3)), torch.zeros_like(gt))  # 1 / (2.5 x depth)
    m = DepthMetrics(alignment="median")
    m.update(scaled, gt, valid)
    assert float(m.compute()["abs_rel"]) < 1e-9


def test_silog_matches_numpy_and_ignores_invalid_pixels():
    pred, gt = _batch(2)
    valid = gt > 0
    ref = []
    for i in range(pred.shape[0]):
        d = np.log(pred[i][valid[i]].numpy()) - np.log(gt[i][valid[i]].numpy())
        ref.append(np.sqrt(np.mean(d**2) - 0.85 * np.mean(d) ** 2))
    assert silog(pred.float(), gt.float(), valid).item() == pytest.approx(np.mean(ref), rel=1e-5)
    garbage = torch.where(valid, pred, torch.full_like(pred, 1e6))  # what invalid pixels hold must not matter
    assert silog(garbage.float(), gt.float(), valid).item() == pytest.approx(np.mean(ref), rel=1e-5)


@pytest.mark.parametrize("name", list(LOSSES))
def test_no_valid_pixels_gives_zero_with_a_gradient(name):
    pred = torch.rand(2, 16, 16, requires_grad=True)
    gt = torch.zeros(2, 16, 16)
    gt[0, 0, :3] = 2.0  # 3 valid pixels: under min_valid, the image contributes nothing
    loss = LOSSES[name](pred, gt, gt > 0)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(pred.grad).all()


def test_ssi_is_invariant_to_scale_and_shift_of_the_prediction():
    _, gt = _batch(3)
    valid = gt > 0
    pred = torch.rand_like(gt)
    base = scale_shift_invariant(pred.float(), gt.float(), valid)
    moved = scale_shift_invariant((4.0 * pred + 1.5).float(), gt.float(), valid)
    assert moved.item() == pytest.approx(base.item(), rel=1e-4)
    perfect = torch.where(valid, 2.0 / gt.clamp(min=1e-3) - 0.1, torch.zeros_like(gt))
    assert scale_shift_invariant(perfect.float(), gt.float(), valid).item() < 1e-4


def test_l1_and_berhu_by_hand():
    pred = torch.tensor([[[1.0, 2.0, 3.0, 9.0]]]).repeat(1, 4, 1)
    gt = torch.tensor([[[1.5, 2.0, 0.0, 4.0]]]).repeat(1, 4, 1)
    valid = gt > 0
    assert l1(pred, gt, valid, min_valid=1).item() == pytest.approx((0.5 + 0 + 5) / 3)
    c = 0.2 * 5.0  # berHu: |x| up to c, (x^2 + c^2) / 2c beyond
    assert berhu(pred, gt, valid, min_valid=1).item() == pytest.approx((0.5 + 0 + (25 + c * c) / (2 * c)) / 3)
