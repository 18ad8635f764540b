"""Depth metrics and losses against numpy references; valid pixels only; never NaN."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dptune.losses.depth import LOSSES, berhu, l1, scale_shift_invariant, silog
from dptune.metrics.depth import NAMES, DepthMetrics, align


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


def test_ssi_stays_exact_at_real_resolution_when_the_prediction_barely_varies():
    """A fresh relative head predicts almost a constant: an exactly affine prediction of spread 3e-4
    around 5 at 384 x 384 must score (nearly) 0, not the 1e12 of float32 normal equations."""
    torch.manual_seed(0)
    gt = torch.rand(2, 384, 384) * 3 + 0.5
    target = 1 / gt
    pred = (5.0 + 3e-4 * (target - target.mean()) / target.std()).requires_grad_()
    loss = scale_shift_invariant(pred, gt, gt > 0)
    loss.backward()
    assert loss.item() < 5e-3 and torch.isfinite(pred.grad).all()
    # against numpy's float64 least squares on a less trivial prediction
    pred = 5.0 + 3e-4 * torch.randn(2, 384, 384)
    residuals = []
    for b in range(2):
        a = np.stack([pred[b].double().flatten().numpy(), np.ones(384 * 384)], 1)
        t = target[b].double().flatten().numpy()
        residuals.append(np.abs(a @ np.linalg.lstsq(a, t, rcond=None)[0] - t).mean())
    ours = scale_shift_invariant(pred, gt, gt > 0, grad_weight=0.0)
    assert ours.item() == pytest.approx(np.mean(residuals), rel=1e-3)


@pytest.mark.skipif(not __import__("conftest").KITCHEN.exists(), reason="7-Scenes data not present")
def test_a_fresh_relative_head_trains_from_its_first_step_at_384():
    """Real 7-Scenes frames at 384 x 384, a relative-mode DPT with a fresh head: the SSI loss is
    finite from the first step and falls over a few optimizer steps."""
    from conftest import KITCHEN, TINY
    from PIL import Image

    from dptune.models.depth import build_depth_model, depth_forward

    torch.manual_seed(0)
    config = {k: v for k, v in TINY.items() if k not in ("use_auxiliary_head", "semantic_loss_ignore_index")}
    model = build_depth_model(config={**config, "image_size": 384}, mode="relative").train()
    frames = sorted((KITCHEN / "train" / "rgb").glob("*.jpg"))[:2]
    images = torch.stack([torch.from_numpy(np.asarray(Image.open(f).convert("RGB").resize((384, 384), Image.BICUBIC)))
                          .permute(2, 0, 1).float() / 127.5 - 1 for f in frames])
    depth = torch.stack([torch.from_numpy(np.asarray(Image.open(KITCHEN / "train" / "depth" / f"{f.stem}.png")
                                                     .resize((384, 384), Image.NEAREST)).astype(np.float32) / 1000)
                         for f in frames])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(12):
        loss = scale_shift_invariant(depth_forward(model, images), depth, depth > 0)
        assert torch.isfinite(loss), losses
        opt.zero_grad()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        opt.step()
        losses.append(loss.item())
    assert losses[0] < 10 and min(losses[-3:]) < 0.95 * losses[0], losses


def test_lstsq_alignment_of_a_constant_prediction_is_the_mean_inverse_depth():
    # a head that predicts one value everywhere (e.g. 0, dead after a bad run) has no scale to fit:
    # LAPACK's rank-deficient answer put every pixel at the 1e-8 floor, 1e8 m, and evaluate printed an
    # abs_rel of 5e7; the best constant is the least-squares fit of the inverse depth, its mean
    from dptune.metrics.depth import align

    gt = torch.linspace(0.5, 4.0, 1000, dtype=torch.float64)
    for value in (0.0, 2.0):
        got = align(torch.full_like(gt, value), gt, "lstsq")
        assert torch.allclose(got, torch.full_like(gt, 1.0 / float((1.0 / gt).mean())))
    pred = torch.rand(1000, dtype=torch.float64)  # and a full-rank fit is numpy's least squares
    a = np.stack([pred.numpy(), np.ones(1000)], 1)
    ref = np.linalg.lstsq(a, 1.0 / gt.numpy(), rcond=None)[0]
    assert torch.allclose(align(pred, gt, "lstsq"), 1.0 / torch.from_numpy(a @ ref).clamp(min=1e-8), rtol=1e-9)


def test_median_alignment_uses_the_median_numpy_and_the_usual_protocol_use():
    """torch.median gives the lower of the two middle values of an even count: the aligned depth
    differed from np.median's (the Eigen / Monodepth protocol) on small or sparse images."""
    from dptune.metrics.depth import align

    pred = torch.tensor([1.0, 2.0, 4.0, 8.0])  # inverse depth: depth 1, 0.5, 0.25, 0.125
    gt = torch.tensor([1.0, 2.0, 3.0, 5.0])
    depth = 1.0 / pred.double().numpy()
    ref = depth * np.median(gt.numpy()) / np.median(depth)
    aligned = align(pred, gt, "median", max_depth=10.0)  # a bound past every value: none clipped
    assert np.allclose(aligned.numpy(), ref, rtol=1e-12), (aligned, ref)
    odd = torch.tensor([1.0, 2.0, 4.0])
    ref = (1.0 / odd.double().numpy()) * 2.0 / np.median(1.0 / odd.double().numpy())
    assert np.allclose(align(odd, gt[:3], "median", max_depth=10.0).numpy(), ref, rtol=1e-12)
    assert float(align(torch.tensor([0.0, 2.0, 4.0, 8.0]), gt, "median").max()) == 50.0  # else 10x the farthest


@pytest.mark.parametrize("alignment", ["lstsq", "median"])
def test_relative_metrics_without_a_maximum_depth_stay_finite_and_keep_real_errors(alignment):
    """Relative depth is scored after alignment; where the aligned inverse depth is <= 0 (lstsq) or the
    prediction is 0 (median, a ReLU head), the depth was floored at 1e-8 inverse depth, 1e8 m, with no
    maximum to clip to by default: one pixel made AbsRel ~5e4 and RMSE ~6e6 m (a review). Without
    ``max_depth`` an aligned prediction is clipped to 10 times the image's farthest valid ground truth (at the
    farthest itself, a prediction 10x too far was forgiven: AbsRel 0, a second review); with it, to
    ``max_depth`` as before."""
    torch.manual_seed(0)
    g = torch.linspace(0.8, 8.0, 4096).reshape(1, 64, 64)
    p = 1 / g + 0.08 * torch.randn(1, 64, 64)  # noisy inverse depth: some aligned values go <= 0
    p = p.clamp(min=0) if alignment == "median" else p
    capped = DepthMetrics(max_depth=80.0, alignment=alignment)
    capped.update(p, g, g > 0)
    free = DepthMetrics(alignment=alignment)
    free.update(p, g, g > 0)
    a, b = capped.compute(), free.compute()
    for name in NAMES:  # 10 x 8.0 m, the farthest ground truth: the same clip
        assert float(b[name]) == pytest.approx(float(a[name]), rel=1e-12), name
    assert float(b["abs_rel"]) < 1 and float(b["rmse"]) < 80
    assert float(align(p.flatten(), g.flatten(), alignment).max()) > 8.0  # past the farthest: not forgiven
    if alignment == "median":  # (lstsq fits any two-level prediction exactly)
        gt = torch.full((1, 10, 10), 2.0)
        gt[0, :4] = 4.0
        far = gt.clone()
        far[0, :4] = 40.0  # 10x too far where the ground truth is farthest
        m = DepthMetrics(alignment=alignment)
        m.update(1 / far, gt, gt > 0)
        assert float(m.compute()["abs_rel"]) == pytest.approx(0.4 * 9, rel=1e-6)  # 40 pixels 9x off (1/40 in float32)


def test_a_minimum_depth_of_zero_is_refused():
    """``model.min_depth: 0`` was accepted and then a ReLU head's 0 made rmse_log and log10 inf and silog NaN
    for the whole split, while ``dptune evaluate`` of the same model used 1 mm (a review)."""
    from dptune.errors import ConfigError
    from dptune.metrics.depth import check_range

    with pytest.raises(ConfigError, match="model.min_depth must be a depth > 0"):
        check_range(0.0, 10.0)
    check_range(1e-6, None)
