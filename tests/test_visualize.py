"""Depth pictures: a colour scale that does not stretch noise, and a colour bar that gives it in metres."""

from __future__ import annotations

import numpy as np

from dptune.tasks.visuals import colorize_depth, depth_panel, depth_range

H, W = 48, 64


def _spread(rgb: np.ndarray) -> float:
    """Mean distance of the pixels' colours from their median colour (0-255 per channel)."""
    flat = rgb.reshape(-1, 3).astype(np.float64)
    return float(np.abs(flat - np.median(flat, 0)).mean())


def test_a_near_constant_prediction_renders_nearly_uniform():
    """An untrained model's flat 2 m with millimetres of noise must not fill the whole colour map."""
    flat = 2.0 + 0.005 * np.random.default_rng(0).standard_normal((H, W))
    lo, hi = depth_range(flat)
    assert lo <= flat.min() and hi >= flat.max() and hi - lo >= 0.5  # the scale spans at least a quarter of 2 m
    assert _spread(colorize_depth(flat, lo, hi)[:, :W]) < 3
    # a real scene (1-4 m) still uses the colour map
    scene = np.tile(np.linspace(1.0, 4.0, W), (H, 1))
    lo, hi = depth_range(scene)
    assert hi - lo > 2.5 and _spread(colorize_depth(scene, lo, hi)[:, :W]) > 40


def test_a_depth_picture_carries_a_colour_bar_with_metres_at_its_ends():
    scene = np.tile(np.linspace(1.0, 4.0, W), (H, 1))
    lo, hi = depth_range(scene)
    rgb = colorize_depth(scene, lo, hi)
    assert rgb.shape[0] == H and rgb.shape[1] > W
    assert np.array_equal(rgb[:, :W], colorize_depth(scene, lo, hi, colorbar=False))
    bar = rgb[:, W:]
    # the bar's colours run from the far end of the scale (top) to the near end (bottom)
    far, near = colorize_depth(np.array([[hi]]), lo, hi, colorbar=False)[0, 0], \
        colorize_depth(np.array([[lo]]), lo, hi, colorbar=False)[0, 0]
    rows = [bar[r].reshape(-1, 3).tolist() for r in (0, H - 1)]
    assert far.tolist() in rows[0] and near.tolist() in rows[1]
    # text (the metre values) at the top and bottom of the legend, nothing in between
    text = (bar.min(2) < 128) & ~np.isin(bar.reshape(-1, 3), [far, near]).all(1).reshape(bar.shape[:2])
    third = H // 3
    assert text[:third].any() and text[-third:].any() and not text[third:-third, -8:].any()


def test_a_panel_scales_the_prediction_by_the_ground_truth_and_shows_both_bars():
    rng = np.random.default_rng(1)
    gt = np.tile(np.linspace(1.0, 4.0, W), (H, 1))
    gt[:4] = 0  # no measurement
    flat = 2.5 + 0.005 * rng.standard_normal((H, W))
    image = np.zeros((H, W, 3), np.uint8)
    panel = depth_panel(image, gt, flat)
    assert panel.shape[0] == H and panel.shape[1] > 4 * W  # image, gt, prediction, error + colour bars
    lo, hi = depth_range(gt)
    gt_rgb = colorize_depth(gt, lo, hi, colorbar=False)
    assert np.array_equal(panel[:, W:2 * W], gt_rgb)
    assert _spread(panel[:, 2 * W:3 * W]) < 3  # the flat prediction on the ground truth's scale
