"""What predict writes for depth: 16-bit PNGs that hold the model's range, and say how to read them."""

from __future__ import annotations

import json
from types import SimpleNamespace

import cv2
import numpy as np
import pytest

from dptune.tools.depth import png_per_metre, write_depth, write_depth_format


@pytest.mark.parametrize("max_depth, per_metre", [(10.0, 1000.0), (65.535, 1000.0), (80.0, 256.0), (None, 256.0)])
def test_the_png_encoding_follows_the_model_range(max_depth, per_metre):
    assert png_per_metre(SimpleNamespace(mode="metric", meta={"max_depth": max_depth})) == per_metre
    assert png_per_metre(SimpleNamespace(mode="relative", meta={})) is None


def test_a_driving_scene_keeps_its_far_depth(tmp_path):
    """KITTI's recipe goes to 80 m: a millimetre PNG saturates at 65.535 m; 256 per metre holds it."""
    depth = np.linspace(2.0, 79.5, 64 * 48, dtype=np.float32).reshape(48, 64)
    image = np.zeros((48, 64, 3), np.uint8)
    assert not write_depth(tmp_path, "far", depth, image, 256.0, None)
    back = cv2.imread(str(tmp_path / "far_depth.png"), cv2.IMREAD_UNCHANGED).astype(np.float64) / 256
    assert np.abs(back - depth).max() <= 0.5 / 256 + 1e-6
    assert write_depth(tmp_path, "mm", depth, image, 1000.0, None)  # clipped: the caller warns
    spec = json.loads((tmp_path / "depth_format.json").read_text()) if write_depth_format(tmp_path, 256.0) else {}
    assert spec["value_per_metre"] == 256.0 and spec["max_metres"] == pytest.approx(255.996) and spec["invalid"] == 0
