"""Depth models beyond DPT's ViT: Depth Anything with a bounded metric head, relative mode, any shape."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import REPO
from transformers import AutoModelForDepthEstimation

from dptune.models.depth import build_depth_model, depth_forward
from dptune.tasks.depth import DepthModule

DA_TINY = REPO / "configs" / "models" / "depth-anything-tiny.json"


def test_depth_anything_metric_head_is_bounded_by_max_depth_and_exports(tmp_path):
    model = build_depth_model(config=json.loads(DA_TINY.read_text()), mode="metric", max_depth=8.0, init_depth=2.0)
    assert type(model).__name__ == "DepthAnythingForDepthEstimation"
    assert model.config.depth_estimation_type == "metric" and model.config.max_depth == 8.0
    x = torch.randn(2, 3, 56, 84)  # non-square, multiples of the 14-pixel patch
    with torch.no_grad():
        depth = depth_forward(model.eval(), x)
    assert depth.shape[0] == 2 and depth.shape[-2:] == (56, 84)
    assert torch.allclose(depth, torch.full_like(depth, 2.0), atol=0.1)  # a fresh head starts near init_depth
    with torch.no_grad():
        model.head.conv3.bias.fill_(50.0)  # saturate: the sigmoid head stays under max_depth
        assert depth_forward(model, x).max() <= 8.0
    model.save_pretrained(tmp_path / "da")
    again = AutoModelForDepthEstimation.from_pretrained(tmp_path / "da").eval()
    with torch.no_grad():
        assert torch.allclose(again(pixel_values=x).predicted_depth, depth_forward(model, x), atol=1e-5)
    assert again.config.depth_mode == "metric" and again.config.depth_units == "metres"


def test_relative_mode_trains_with_the_shift_invariant_loss_and_is_scored_after_alignment():
    m = DepthModule(config=json.loads(DA_TINY.read_text()), mode="relative", image_size=56)
    assert m.loss_name == "ssi" and m.alignment == "lstsq" and m.model.config.depth_estimation_type == "relative"
    images = torch.randint(0, 256, (2, 3, 56, 56), dtype=torch.uint8)
    gt = torch.rand(2, 56, 56) * 3 + 0.5
    loss = m.loss(m(images), gt)
    loss.backward()
    assert torch.isfinite(loss) and any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())
    with pytest.raises(ValueError, match="cannot train metric depth"):
        DepthModule(config=json.loads(DA_TINY.read_text()), mode="metric", loss="ssi", image_size=56)


@pytest.mark.parametrize("build", ["segmentation", "depth"])
def test_an_unknown_fresh_init_is_refused_by_every_builder(build):
    """A typo in model.fresh_init must not silently mean transformers' initialisation."""
    from conftest import TINY

    from dptune.errors import ConfigError
    from dptune.models import build_model

    config = {k: v for k, v in TINY.items() if k not in ("use_auxiliary_head", "semantic_loss_ignore_index")}
    with pytest.raises(ConfigError, match="fresh_init must be 'he' or 'hf'"):
        if build == "segmentation":
            build_model(["a", "b"], config=config, fresh_init="xavier")
        else:
            build_depth_model(config=config, fresh_init="xavier")
