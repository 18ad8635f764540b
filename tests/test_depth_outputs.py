"""What predict writes for depth: maps that hold the model's range, a depth_format.json that says how to
read them (and that dptune's reader follows), never overwritten by other maps' description."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from dptune.data.depth_files import read_depth
from dptune.errors import DataError
from dptune.tools.depth import depth_encoding, write_depth, write_depth_format


def _model(max_depth, mode="metric"):
    return SimpleNamespace(mode=mode, meta={"max_depth": max_depth})


@pytest.mark.parametrize("max_depth, dtype, per_metre", [
    (10.0, "uint16", 1000.0), (65.534, "uint16", 1000.0), (65.535, "uint16", 256.0), (80.0, "uint16", 256.0), (255.99, "uint16", 256.0),
    (300.0, "float32", 1.0), (None, "float32", 1.0)])
def test_the_encoding_follows_the_model_range(max_depth, dtype, per_metre):
    enc = depth_encoding(_model(max_depth))
    assert (enc["dtype"], enc["value_per_metre"]) == (dtype, per_metre)
    assert enc["file"].endswith(".tiff" if dtype == "float32" else ".png")
    assert depth_encoding(_model(None, "relative"))["metric"] is False


@pytest.mark.parametrize("max_depth, far", [(80.0, 79.5), (300.0, 290.0)])
def test_far_depth_survives_and_dptune_reads_it_back_in_metres(tmp_path, max_depth, far):
    """KITTI's recipe goes to 80 m: a millimetre PNG saturates at 65.535 m; 256 per metre holds it, and
    beyond 256 m float TIFF does. dptune's depth reader, given no scale, follows depth_format.json."""
    depth = np.linspace(2.0, far, 64 * 48, dtype=np.float32).reshape(48, 64)
    enc = depth_encoding(_model(max_depth))
    write_depth_format(tmp_path, enc)
    assert not write_depth(tmp_path, "far", depth, np.zeros((48, 64, 3), np.uint8), enc, None)
    back = read_depth(str(tmp_path / enc["file"].replace("<stem>", "far")))
    assert np.abs(back - depth).max() <= 0.5 / enc["value_per_metre"] + 1e-4
    mm = depth_encoding(_model(10.0))
    assert write_depth(tmp_path, "mm", depth, np.zeros((48, 64, 3), np.uint8), mm, None)  # clipped: the caller warns


def test_depth_that_would_be_stored_as_the_no_depth_code_is_said_to_be_clipped(tmp_path):
    """65535 in a 16-bit map means no depth: a value that rounds to it (65.5346 m, an upsampling
    overshoot past a 65.534 m bound) was stored as no depth without the clipped warning."""
    enc = depth_encoding(_model(65.534))
    depth = np.full((4, 4), 3.0, np.float32)
    assert not write_depth(tmp_path, "in", depth, np.zeros((4, 4, 3), np.uint8), enc, None)
    depth[0, 0] = 65.5346
    assert write_depth(tmp_path, "edge", depth, np.zeros((4, 4, 3), np.uint8), enc, None)
    depth[0, 0] = 65.5344  # stored as 65534: still depth
    assert not write_depth(tmp_path, "top", depth, np.zeros((4, 4, 3), np.uint8), enc, None)
    assert read_depth(str(tmp_path / "top_depth.png"))[0, 0] == pytest.approx(65.534)


def test_a_depth_format_json_saying_otherwise_is_never_overwritten(tmp_path):
    (tmp_path / "depth_format.json").write_text('{"mine": "user notes"}')
    with pytest.raises(DataError, match="already there and describes other depth maps"):
        write_depth_format(tmp_path, depth_encoding(_model(10.0)))
    assert json.loads((tmp_path / "depth_format.json").read_text()) == {"mine": "user notes"}
    other = tmp_path / "other"
    other.mkdir()
    write_depth_format(other, depth_encoding(_model(10.0)))
    write_depth_format(other, depth_encoding(_model(10.0)))  # the same description: fine
    with pytest.raises(DataError, match="describes other depth maps"):
        write_depth_format(other, depth_encoding(_model(80.0)))


def test_depth_under_half_a_step_is_stored_as_depth_not_as_the_no_depth_code(tmp_path):
    """0 means no depth in a 16-bit map: a metric model's 0.3 mm rounded to it, so the map said 'no depth'
    where the .ply beside it kept the points (a user attack). It is stored as one step, the least depth."""
    enc = depth_encoding(_model(10.0))
    depth = np.array([[0.0003, 0.0], [0.0012, 2.0]], np.float32)
    write_depth(tmp_path, "near", depth, np.zeros((2, 2, 3), np.uint8), enc, (585.0, 585.0, 1.0, 1.0))
    stored = np.asarray(Image.open(tmp_path / enc["file"].replace("<stem>", "near")))
    assert stored.tolist() == [[1, 0], [1, 2000]]
    assert ((read_depth(str(tmp_path / "near_depth.png")) > 0) == (depth > 0)).all()


def test_a_stock_dpt_depth_directory_is_read_as_relative_inverse_depth(tmp_path):
    """A directory saved by plain transformers from ``DPTForDepthEstimation`` (``Intel/dpt-large``,
    ``dpt-hybrid-midas``: MiDaS's relative inverse depth, no ``depth_mode``) was taken for metric metres by
    predict and evaluate (depth TIFFs saying metres, a point cloud of inverse depth, unaligned scores), while
    dptune's own ``head_mode`` of the same config says relative (a review)."""
    import torch
    from conftest import TINY
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    from dptune.inference.depth_predictor import DepthPredictor

    cfg = DPTConfig(**{k: v for k, v in TINY.items() if k not in ("use_auxiliary_head", "num_labels")})
    cfg.architectures = ["DPTForDepthEstimation"]
    torch.manual_seed(0)
    DPTForDepthEstimation(cfg).save_pretrained(tmp_path / "stock")
    DPTImageProcessor(size={"height": 64, "width": 64}).save_pretrained(tmp_path / "stock")
    predictor = DepthPredictor.load(str(tmp_path / "stock"))
    assert predictor.mode == "relative"
    assert depth_encoding(predictor)["metric"] is False
