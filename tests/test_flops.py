"""The FLOPs formula behind MFU agrees with torch.utils.flop_counter (tiny on CPU, Large on meta)."""

import pytest
import torch
from conftest import REPO
from torch.utils.flop_counter import FlopCounterMode
from transformers import DPTForSemanticSegmentation

from dptune.models import load_config, segment
from dptune.models.flops import dpt_forward_flops, dpt_train_flops


def counted(cfg, h, w, device):
    cfg._attn_implementation = "eager"  # the CPU flash kernel is invisible to the counter
    with torch.device(device):
        model = DPTForSemanticSegmentation(cfg)
        x = torch.randn(1, 3, h, w)
    with FlopCounterMode(display=False) as fc:
        segment(model, x)
    return fc.get_total_flops()


@pytest.mark.parametrize("h,w", [(192, 192), (192, 256)])
def test_tiny_formula_matches_counter(h, w):
    cfg = load_config(REPO / "configs" / "models" / "dpt-tiny.json")
    cfg.num_labels = 11
    ref = counted(cfg, h, w, "cpu")
    assert abs(dpt_forward_flops(cfg, h, w) / ref - 1) < 0.05


def test_large_formula_matches_counter_on_meta():
    cfg = load_config(REPO / "configs" / "models" / "dpt-large-ade.json")
    assert abs(dpt_forward_flops(cfg, 512, 512) / counted(cfg, 512, 512, "meta") - 1) < 0.05
    # the training step as the counter sees it: forward and backward of both heads
    with torch.device("meta"):
        model = DPTForSemanticSegmentation(cfg).train()
        x = torch.randn(1, 3, 512, 512)
    with FlopCounterMode(display=False) as fc:
        logits, aux = segment(model, x)
        (logits.sum() + aux.sum()).backward()
    assert abs(dpt_train_flops(cfg, 512, 512) / fc.get_total_flops() - 1) < 0.05  # ~3.2 TFLOP per image


def test_backbone_models_are_counted_on_meta():
    """Hybrid/Swinv2/BEiT/DINOv2 FLOPs come from flop_counter on the meta device; a real CPU
    count of the same training step must agree."""
    from dptune.models import load_config, segment
    from dptune.models.backbones import model_class
    from dptune.models.flops import train_flops

    cfg = load_config(REPO / "configs" / "models" / "dpt-dinov2-tiny.json")
    flops, how = train_flops(cfg, 56, 84)
    assert how == "flop_counter"
    model = model_class(cfg)(cfg).train()
    with FlopCounterMode(display=False) as fc:
        logits, aux = segment(model, torch.randn(1, 3, 56, 84))
        (logits.sum() + aux.sum()).backward()
    assert fc.get_total_flops() > 0
    assert abs(flops - fc.get_total_flops()) < 0.01 * fc.get_total_flops()  # attention kernels differ slightly
