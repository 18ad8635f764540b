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


def test_a_relative_checkpoint_starting_a_metric_model_restarts_its_head(tmp_path, caplog):
    """Intel/dpt-large-style checkpoints predict MiDaS inverse depth (near = large) and their config
    says nothing: as metres the head would train from the wrong sign. A metric model from one gets
    a fresh head (starting at init_depth), says so, and keeps backbone and neck; a relative model
    keeps the head; a dptune metric export starting a metric model keeps it too."""
    import logging

    from conftest import TINY
    from transformers import DPTConfig, DPTForDepthEstimation

    config = {k: v for k, v in TINY.items() if k not in ("use_auxiliary_head", "semantic_loss_ignore_index")}
    torch.manual_seed(0)
    hub_like = DPTForDepthEstimation(DPTConfig(**config))  # no depth_mode: a published MiDaS-style DPT
    hub_like.save_pretrained(tmp_path / "midas")
    head = {n: p.clone() for n, p in hub_like.head.named_parameters()}
    x = torch.randn(1, 3, 64, 64)
    with caplog.at_level(logging.INFO, logger="dptune.models.depth"):
        metric = build_depth_model(pretrained=str(tmp_path / "midas"), mode="metric", init_depth=2.5).eval()
    assert "predicts relative depth, this model metric depth: the head starts fresh" in caplog.text
    assert not torch.equal(dict(metric.head.named_parameters())["head.0.weight"], head["head.0.weight"])
    assert torch.equal(metric.neck.fusion_stage.layers[0].projection.weight,
                       hub_like.neck.fusion_stage.layers[0].projection.weight)
    with torch.no_grad():
        assert torch.allclose(depth_forward(metric, x), torch.full((1, 64, 64), 2.5), atol=0.05)
    relative = build_depth_model(pretrained=str(tmp_path / "midas"), mode="relative")
    assert all(torch.equal(p, head[n]) for n, p in relative.head.named_parameters())

    metric.save_pretrained(tmp_path / "metric")  # depth_mode: metric travels in the config
    again = build_depth_model(pretrained=str(tmp_path / "metric"), mode="metric")
    assert all(torch.equal(p, dict(metric.head.named_parameters())[n]) for n, p in again.head.named_parameters())


@pytest.mark.parametrize("max_depth", [None, 10.0])
def test_a_bounded_depth_anything_head_restarts_when_its_bound_changes(tmp_path, caplog, max_depth):
    """A metric Depth Anything head ends in sigmoid x max_depth: read without the bound (a ReLU) it
    predicts 0 everywhere and gets no gradient; read with another bound, every depth is rescaled.
    Either way the head starts fresh (at init_depth); the same bound keeps it."""
    import logging

    config = json.loads(DA_TINY.read_text())
    torch.manual_seed(0)
    source = build_depth_model(config=config, mode="metric", max_depth=20.0, init_depth=3.0)
    source.save_pretrained(tmp_path / "da")
    x = torch.randn(1, 3, 56, 56)
    with caplog.at_level(logging.INFO, logger="dptune.models.depth"):
        model = build_depth_model(pretrained=str(tmp_path / "da"), mode="metric", max_depth=max_depth, init_depth=2.0)
    assert "bounded at 20 m" in caplog.text and "the head starts fresh" in caplog.text
    with torch.no_grad():
        assert torch.allclose(depth_forward(model.eval(), x), torch.full((1, 56, 56), 2.0), atol=0.1)
    same = build_depth_model(pretrained=str(tmp_path / "da"), mode="metric", max_depth=20.0)
    assert all(torch.equal(p, dict(source.head.named_parameters())[n]) for n, p in same.head.named_parameters())


def test_a_depth_anything_model_trains_through_lightning(tmp_path):
    """The Lightning path (``setup`` checks the input sizes against the backbone's patch) read
    ``config.is_hybrid``, which only DPT's config has: every Depth Anything fit stopped with an
    AttributeError before its first step."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    torch.manual_seed(0)
    module = DepthModule(config=json.loads(DA_TINY.read_text()), image_size=56, max_depth=10.0, lr=1e-3,
                         warmup_steps=0)
    batches = [{"image": torch.randint(0, 256, (2, 3, 56, 56), dtype=torch.uint8),
                "depth": torch.rand(2, 56, 56) * 5 + 0.5} for _ in range(2)]
    before = module.model.head.conv3.weight.detach().clone()
    pl.Trainer(accelerator="cpu", devices=1, max_steps=2, logger=False, enable_progress_bar=False,
               enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0,
               default_root_dir=tmp_path).fit(module, DataLoader(batches, batch_size=None))
    assert not torch.equal(before, module.model.head.conv3.weight.detach())  # it trained


def test_a_depth_anything_onnx_graph_is_fixed_at_the_processors_size_and_matches_torch(tmp_path):
    """Depth Anything's head computes its output size in Python (``int(patches * patch_size)``),
    which tracing freezes: traced at another size (the odd patch grid dynamic graphs are traced
    on), the graph gave 70x70 depth for a 56x56 input and every ONNX export of it failed."""
    pytest.importorskip("onnxruntime")
    from dptune.export.onnx import export_onnx, onnx_dynamic_size, onnx_parity

    model = build_depth_model(config=json.loads(DA_TINY.read_text()), mode="metric", max_depth=8.0).eval()
    assert not onnx_dynamic_size(model)
    path = export_onnx(model, tmp_path / "model.onnx", (56, 56))
    assert onnx_parity(model, path, [(1, 56, 56), (2, 56, 56)]) < 1e-4
