"""Segmentation + depth in one DPT: one backbone pass, heads on their own samples, partial labels."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, TINY
from transformers import DPTForDepthEstimation, DPTForSemanticSegmentation

from dptune.losses.depth import silog
from dptune.models import build_model, segment
from dptune.models.depth import build_depth_model, depth_forward
from dptune.models.joint import JointDPT, UncertaintyWeighting, labelled_rows

NAMES = ["a", "b", "c"]


def joint(share_reassemble: bool = False, config=TINY) -> JointDPT:
    torch.manual_seed(0)
    depth_config = {k: v for k, v in config.items() if k not in ("use_auxiliary_head", "semantic_loss_ignore_index")}
    return JointDPT(build_model(NAMES, config=dict(config)), build_depth_model(config=depth_config), share_reassemble)


def test_one_backbone_pass_gives_both_stock_models_outputs():
    m = joint().eval()
    assert m.depth.dpt is m.seg.dpt  # one backbone module, trained by both tasks
    x = torch.randn(2, 3, 64, 96)  # non-square
    with torch.no_grad():
        logits, aux, depth = m(x, with_aux=True)
        ref_logits, ref_aux = segment(m.seg, x)
        assert torch.allclose(logits, ref_logits, atol=1e-6) and torch.allclose(aux, ref_aux, atol=1e-6)
        assert torch.allclose(depth, depth_forward(m.depth, x), atol=1e-6)
    shared = joint(share_reassemble=True)
    assert shared.depth.neck.reassemble_stage is shared.seg.neck.reassemble_stage
    assert sum(p.numel() for p in shared.parameters()) < sum(p.numel() for p in m.parameters())


def test_a_mixed_batch_gives_each_task_gradients_from_its_own_samples_only():
    """Sample 0 has a mask only, 1 depth only, 2 both. In training mode (BatchNorm on batch
    statistics): the segmentation loss reaches images 0 and 2 only, the depth loss 1 and 2 only,
    and the summed loss is finite."""
    m = joint().train()
    x = torch.randn(3, 3, 64, 64, requires_grad=True)
    mask = torch.randint(0, 3, (3, 64, 64))
    mask[1] = 255
    gt = torch.rand(3, 64, 64) * 3 + 0.5
    gt[0] = 0
    seg_rows, depth_rows = labelled_rows(mask, gt > 0)
    assert seg_rows.tolist() == [0, 2] and depth_rows.tolist() == [1, 2]
    logits, _, depth = m(x, seg_rows, depth_rows)
    seg_loss = F.cross_entropy(F.interpolate(logits, size=(64, 64), mode="bilinear"), mask[seg_rows], ignore_index=255)
    depth_loss = silog(depth, gt[depth_rows], gt[depth_rows] > 0)
    (g_seg,) = torch.autograd.grad(seg_loss, x, retain_graph=True)
    (g_depth,) = torch.autograd.grad(depth_loss, x, retain_graph=True)
    assert g_seg[1].abs().max() == 0 and g_seg[0].abs().max() > 0 and g_seg[2].abs().max() > 0
    assert g_depth[0].abs().max() == 0 and g_depth[1].abs().max() > 0 and g_depth[2].abs().max() > 0
    total = UncertaintyWeighting(["segmentation", "depth"])({"segmentation": seg_loss, "depth": depth_loss})
    total.backward()
    assert torch.isfinite(total) and all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
    # a batch without any depth label: the depth head runs on no rows; its BatchNorm statistics stay
    # as they were and every one of its weights gets a zero gradient (DDP needs one from every process)
    for seg_rows, depth_rows, idle in ((torch.arange(3), [], m.depth), ([], torch.arange(3), m.seg)):
        m.zero_grad()
        stats = {n: b.clone() for n, b in idle.named_buffers() if "running" in n}
        logits, _, depth = m(x, torch.as_tensor(seg_rows, dtype=torch.long), torch.as_tensor(depth_rows, dtype=torch.long))
        assert (logits.shape[0], depth.shape[0]) == (len(seg_rows), len(depth_rows))
        assert all(torch.equal(b, dict(idle.named_buffers())[n]) for n, b in stats.items())
        (logits.sum() + depth.sum()).backward()
        head = [p for n, p in idle.named_parameters() if n.startswith(("neck.", "head.")) and p.requires_grad]
        assert head and all(p.grad is not None and p.grad.abs().max() == 0 for p in head)
    assert any("running" in n for n, _ in m.seg.named_buffers())  # the segmentation head's BatchNorm


def test_uncertainty_weighting_by_hand():
    w = UncertaintyWeighting(["segmentation", "depth"])
    with torch.no_grad():
        w.log_vars.copy_(torch.tensor([0.5, -1.0]))
    total = w({"segmentation": torch.tensor(2.0), "depth": torch.tensor(3.0)})
    assert total.item() == pytest.approx(2.0 * torch.exp(torch.tensor(-0.5)).item() + 0.5 + 3.0 * torch.e - 1.0)
    assert w({"depth": torch.tensor(3.0)}).item() == pytest.approx(3.0 * torch.e - 1.0)  # a task absent from a batch
    assert w.weights()["depth"] == pytest.approx(torch.e)


def test_each_task_saves_as_its_stock_model(tmp_path):
    m = joint().eval()
    m.seg.save_pretrained(tmp_path / "seg")
    m.depth.save_pretrained(tmp_path / "depth")
    seg = DPTForSemanticSegmentation.from_pretrained(tmp_path / "seg").eval()
    depth = DPTForDepthEstimation.from_pretrained(tmp_path / "depth").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        logits, _, pred = m(x)
        assert torch.allclose(seg(pixel_values=x).logits, logits, atol=1e-5)
        assert torch.allclose(depth(pixel_values=x).predicted_depth, pred, atol=1e-5)


def test_backbone_family_models_share_their_backbone():
    cfg = json.loads((REPO / "configs" / "models" / "dpt-dinov2-tiny.json").read_text())
    torch.manual_seed(0)
    m = JointDPT(build_model(NAMES, config=cfg), build_depth_model(config=cfg)).eval()
    assert m.depth.backbone is m.seg.backbone
    x = torch.randn(1, 3, 56, 84)
    with torch.no_grad():
        logits, _, depth = m(x)
        assert torch.allclose(logits, segment(m.seg, x)[0], atol=1e-5)
        assert torch.allclose(depth, depth_forward(m.depth, x), atol=1e-5)


def test_benchmark_presets_resolve_and_the_joint_benchmark_runs(capsys):
    """The presets are files of this repository (a move of the tool once pointed them into src/)."""
    from dptune.tools.benchmark import PRESETS, main, model_config

    assert PRESETS["dpt-large-ade"].is_file() and model_config("dpt-large-ade", None).hidden_size == 1024
    assert main(["--joint", "--model", str(REPO / "configs" / "models" / "dpt-tiny.json"), "--crop", "64",
                 "--steps", "1", "--warmup", "0", "--precision", "32-true"]) == 0
    assert "speed-up" in capsys.readouterr().out


def test_a_segmentation_model_starts_both_tasks_of_a_joint_model(tmp_path):
    """model.pretrained = a segmentation directory: the segmentation part loads whole, the depth part
    takes its backbone (shared) and neck, and only the depth head starts fresh (predicting init_depth)."""
    from dptune.labels import LabelSet
    from dptune.tasks.multitask import MultiTaskModule

    torch.manual_seed(0)
    seg = build_model(NAMES, config=dict(TINY))
    seg.save_pretrained(tmp_path / "seg")
    module = MultiTaskModule(pretrained=str(tmp_path / "seg"), label_spec=LabelSet(names=NAMES).to_dict(),
                             image_size=64, init_depth=2.0)
    j, ref = module.model, seg.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in j.seg.state_dict().items())
    depth = j.depth.state_dict()
    assert all(torch.equal(depth[k], ref[k]) for k in ref if k.startswith(("dpt.", "neck.")))
    assert j.depth.dpt is j.seg.dpt
    with torch.no_grad():
        pred = j.depth.eval()(pixel_values=torch.randn(1, 3, 64, 64)).predicted_depth
    assert torch.allclose(pred, torch.full_like(pred, 2.0), atol=0.05)
