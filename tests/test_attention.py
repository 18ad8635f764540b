"""``attn_implementation: auto``: a CPU run in bfloat16 trains with eager attention (PyTorch's fused
kernel is the slower one there), float32 and GPU runs with sdpa; the switch reaches every
transformers model of the network (a joint model's two), changes no result beyond rounding, and
is said once in the log. An explicit setting is kept."""

from __future__ import annotations

import json
import logging

import lightning.pytorch as pl
import pytest
import torch
from conftest import CAMVID, REPO, TINY
from test_divergence import Frames
from torch.utils.data import DataLoader
from transformers import PreTrainedModel

from dptune.labels import LabelSet
from dptune.models.attention import auto_attention, sequence_length, time_attention
from dptune.tasks.segmentation import SegmentationModule

SPEC = LabelSet(names=["a", "b", "c"]).to_dict()


def kernels(module) -> set[str]:
    return {m.config._attn_implementation for m in module.model.modules() if isinstance(m, PreTrainedModel)}


def fit(module, precision: str) -> None:
    pl.Trainer(accelerator="cpu", devices=1, max_steps=1, precision=precision, logger=False, enable_progress_bar=False,
               enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0
               ).fit(module, DataLoader(Frames(), batch_size=2))


def test_auto_is_eager_for_short_sequences_of_a_bf16_cpu_run_and_sdpa_elsewhere():
    assert auto_attention("cpu", "bf16-mixed", 197)[0] == "eager" and auto_attention("cpu", "bf16-true", 400)[0] == "eager"
    assert auto_attention("cpu", "bf16-mixed", 577)[0] == "sdpa"  # DPT-Large at 384 px: no clear winner
    assert auto_attention("cpu", "bf16-mixed", None)[0] == "sdpa"  # length unknown (windowed attention)
    assert auto_attention("cpu", "32-true", 197)[0] == "sdpa" and auto_attention("cuda", "bf16-mixed", 197)[0] == "sdpa"
    assert auto_attention("cpu", "16-mixed", 197)[0] == "sdpa"  # float16: eager's Q K^T can overflow


def test_the_sequence_length_is_patches_plus_cls_from_the_model_that_attends():
    from transformers import DPTConfig

    assert sequence_length(DPTConfig(**TINY), (64, 96)) == 4 * 6 + 1
    dino = DPTConfig(**json.loads((REPO / "configs" / "models" / "dpt-dinov2-bench-tiny.json").read_text()))
    assert sequence_length(dino, (182, 182)) == 13 * 13 + 1  # the DINOv2 backbone's patch 14
    swin = DPTConfig(backbone_config={"model_type": "swinv2", "window_size": 8}, use_autobackbone=True)
    assert sequence_length(swin, (256, 256)) is None


def test_a_bf16_cpu_fit_trains_with_eager_attention_and_says_so(caplog):
    torch.manual_seed(0)
    module = SegmentationModule(config=dict(TINY), label_spec=SPEC, image_size=64, lr=1e-3, warmup_steps=0)
    assert kernels(module) == {"sdpa"}  # built as transformers builds it
    with caplog.at_level(logging.INFO, logger="dptune"):
        fit(module, "bf16-mixed")
    assert kernels(module) == {"eager"}
    said = [r.getMessage() for r in caplog.records if "attention chosen" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("eager attention chosen: CPU at bf16-mixed"), said
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dptune"):
        fit(module, "32-true")  # the same module in float32: back to sdpa
    assert kernels(module) == {"sdpa"}

    pinned = SegmentationModule(config=dict(TINY), label_spec=SPEC, image_size=64, attn_implementation="sdpa")
    fit(pinned, "bf16-mixed")
    assert kernels(pinned) == {"sdpa"}  # an explicit setting wins


def sdpa_calls(monkeypatch) -> list[int]:
    """Counts the fused kernel's calls (transformers calls it through torch.nn.functional)."""
    calls = [0]
    fused = torch.nn.functional.scaled_dot_product_attention

    def counted(*a, **k):
        calls[0] += 1
        return fused(*a, **k)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counted)
    return calls


def test_eager_and_sdpa_give_the_same_outputs_and_gradients(monkeypatch):
    """The switch reaches the forward pass (the fused kernel is called under sdpa only) and changes
    no result beyond rounding (float32, the same weights)."""
    calls = sdpa_calls(monkeypatch)
    torch.manual_seed(0)
    module = SegmentationModule(config=dict(TINY), label_spec=SPEC, image_size=64).eval()  # no dropout
    x = torch.randn(2, 3, 64, 64)
    out = {}
    for impl in ("sdpa", "eager"):
        module.model.set_attn_implementation(impl)
        module.zero_grad()
        calls[0] = 0
        logits = module.model(pixel_values=x).logits
        assert (calls[0] > 0) == (impl == "sdpa"), (impl, calls[0])
        logits.square().mean().backward()
        grad = module.model.dpt.encoder.layer[0].attention.attention.query.weight.grad.clone()
        out[impl] = (logits.detach(), grad)
    torch.testing.assert_close(out["sdpa"][0], out["eager"][0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out["sdpa"][1], out["eager"][1], rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("family", ["dpt-hybrid-tiny", "dpt-dinov2-tiny", "dpt-beit-tiny", "dpt-swinv2-tiny",
                                    "depth-anything-tiny"])
def test_every_backbone_family_runs_under_auto_in_float32_and_bfloat16(family, monkeypatch, caplog):
    """A model without sdpa (DPT-Hybrid's BiT stem, Depth Anything's head) keeps its own kernel; the
    switch to sdpa in float32 used to ask it for sdpa and stop the run (every GPU run too). In
    bfloat16 the attending backbone itself runs eager (no fused-kernel call)."""
    from dptune.tasks.depth import DepthModule

    calls = sdpa_calls(monkeypatch)
    cfg = json.loads((REPO / "configs" / "models" / f"{family}.json").read_text())
    if family == "depth-anything-tiny":
        module = DepthModule(config=cfg, image_size=56, max_depth=10.0)
    else:
        module = SegmentationModule(config=cfg, label_spec=SPEC, image_size=64)
    size = 56 if "anything" in family or "dinov2" in family else 64
    for precision in ("32-true", "bf16-mixed", "32-true"):
        module.trainer = pl.Trainer(accelerator="cpu", devices=1, precision=precision, logger=False)
        with caplog.at_level(logging.INFO, logger="dptune"):
            module._choose_attention()
        assert any("attention chosen" in r.getMessage() for r in caplog.records), (family, precision)
        caplog.clear()
        calls[0] = 0
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=precision.startswith("bf16")):
            module.eval()(torch.randint(0, 256, (1, 3, size, size), dtype=torch.uint8))
        if precision.startswith("bf16") and family != "dpt-swinv2-tiny":  # Swin's windows keep sdpa
            assert calls[0] == 0, (family, calls[0])


def test_a_joint_models_two_networks_both_switch(tmp_path):
    from dptune.data.multitask_datamodule import joint_label_set
    from dptune.tasks.multitask import MultiTaskModule

    joint = MultiTaskModule(config=dict(TINY), label_spec=joint_label_set([LabelSet(names=["a", "b"])], None).to_dict(),
                            image_size=64, max_depth=10.0)
    nets = [m for m in joint.model.modules() if isinstance(m, PreTrainedModel)]
    assert len(nets) >= 2
    trainer = pl.Trainer(accelerator="cpu", devices=1, precision="bf16-mixed", logger=False)
    joint.trainer = trainer
    joint._choose_attention()
    assert kernels(joint) == {"eager"}
    (tmp_path / "x").mkdir()
    nets[0].save_pretrained(tmp_path / "x")  # the exported config does not carry the run's kernel
    assert not [k for k in json.loads((tmp_path / "x" / "config.json").read_text()) if "attn" in k]


def test_the_timing_tool_times_both_kernels():
    t = time_attention((2, 17, 8), 2, torch.float32)
    assert set(t) == {"sdpa", "eager"} and all(0 < v < 10 for v in t.values())


@pytest.mark.parametrize("value", ["foo", "", "flash_attention_2"])
def test_an_attention_transformers_cannot_run_here_is_one_line_naming_the_setting(value, tmp_path):
    """It was transformers' ValueError / ImportError traceback from deep in the model's build."""

    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps(TINY))
    from conftest import run_python

    proc = run_python(REPO / "train.py", ["fit", "--config", str(REPO / "configs" / "camvid.yaml"),
                      "--data.root", str(CAMVID), "--model.config", str(cfg), "--model.attn_implementation", value,
                      "--trainer.default_root_dir", str(tmp_path / "run")], tmp_path, timeout=300)
    err = [ln for ln in proc.stderr.splitlines() if ln.startswith("error")]
    assert proc.returncode == 2 and len(err) == 1 and "model.attn_implementation" in err[0], proc.stderr[-1500:]
    assert "Traceback" not in proc.stderr
