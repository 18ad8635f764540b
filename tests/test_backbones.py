"""DPT beyond ViT: hybrid (BiT + ViT), Swinv2, BEiT and DINOv2 backbones, tiny configs from configs/models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CAMVID, REPO, needs
from PIL import Image

from dptune.models import build_model, load_exported, segment
from dptune.models.backbones import family
from dptune.models.dpt_backbone import input_multiple
from dptune.tasks.optim import backbone_depths, param_groups

MODELS = REPO / "configs" / "models"
FAMILIES = {"hybrid": 4, "swinv2": 5, "beit": 4, "dinov2": 4}  # family -> transformer blocks in the tiny config
NAMES = [f"class{i}" for i in range(5)]


def tiny(fam: str) -> str:
    return str(MODELS / f"dpt-{fam}-tiny.json")


@pytest.mark.parametrize("fam", FAMILIES)
def test_non_square_forward_and_backward_reach_every_trainable_weight(fam):
    torch.manual_seed(0)
    model = build_model(NAMES, config=tiny(fam), backbone=fam).train()
    assert family(model.config) == fam
    m = input_multiple(model.config)
    x = torch.randn(2, 3, 4 * m, 6 * m)
    logits, aux = segment(model, x)
    assert logits.shape[:2] == (2, 5) and aux.shape[:2] == (2, 5)
    # logits keep the aspect ratio (DINOv2's 14-pixel patches come back at 16 pixels per patch)
    assert logits.shape[-1] * 4 == logits.shape[-2] * 6
    (logits.sum() + aux.sum()).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing


def test_input_that_is_not_a_multiple_is_refused():
    model = build_model(NAMES, config=tiny("swinv2"))
    with pytest.raises(ValueError, match="multiple of 32"):
        segment(model, torch.randn(1, 3, 64, 80))


@pytest.mark.parametrize("fam", FAMILIES)
def test_layer_decay_finds_blocks_by_name(fam):
    model = build_model(NAMES, config=tiny(fam))
    depths, n = backbone_depths(model)
    assert n == FAMILIES[fam]
    emb = next(k for k in depths if ".embeddings." in k)
    assert depths[emb] == 0
    groups = param_groups(model, lr=1.0, head_lr_mult=10.0, weight_decay=0.05, layer_decay=0.5)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    for name, d in depths.items():
        if named[name].requires_grad:
            assert lr_of[id(named[name])] == pytest.approx(0.5 ** (n + 1 - d)), name
    heads = [g for g in groups if g["name"].startswith("head")]
    assert heads and all(g["lr"] == 10.0 for g in heads)
    # every trainable weight is in exactly one group
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in model.parameters())


def test_layer_decay_off_keeps_four_groups():
    groups = param_groups(build_model(NAMES, config=tiny("dinov2")), 1e-4, 10.0, 0.01, layer_decay=1.0)
    assert sorted(g["name"] for g in groups) == ["backbone", "backbone_no_decay", "head", "head_no_decay"]


def test_bare_backbone_config_gets_a_dpt_neck():
    model = build_model(NAMES, config=str(MODELS / "dinov2-tiny-backbone.json"), backbone="dinov2")
    cfg = model.config
    assert cfg.backbone_config.out_indices == [1, 2, 3, 4]
    assert cfg.neck_hidden_sizes == [12, 24, 48, 96]
    assert segment(model, torch.randn(1, 3, 56, 84))[0].shape[:2] == (1, 5)


def test_backbone_family_mismatch_is_an_error():
    with pytest.raises(ValueError, match="model.backbone is 'swinv2'.*'dinov2'"):
        build_model(NAMES, config=tiny("dinov2"), backbone="swinv2")


def test_pretrained_bare_backbone_weights_are_loaded(tmp_path):
    """The common case: ``--model.pretrained facebook/dinov2-small --model.backbone dinov2``."""
    from transformers import Dinov2Config, Dinov2Model

    spec = json.loads((MODELS / "dinov2-tiny-backbone.json").read_text())
    spec.pop("model_type")
    torch.manual_seed(1)
    Dinov2Model(Dinov2Config(**spec)).save_pretrained(tmp_path / "dinov2")
    saved = Dinov2Model.from_pretrained(tmp_path / "dinov2").state_dict()
    model = build_model(NAMES, pretrained=str(tmp_path / "dinov2"), backbone="dinov2")
    mine = model.backbone.state_dict()
    for key in ("embeddings.cls_token", "encoder.layer.3.mlp.fc2.weight", "layernorm.weight"):
        assert torch.equal(mine[key], saved[key]), key


def test_depth_checkpoint_backbone_and_neck_carry_over(tmp_path):
    """A DPT depth model with a backbone (like ``facebook/dpt-dinov2-small-kitti``) starts a segmenter."""
    from transformers import DPTForDepthEstimation

    from dptune.models import load_config

    torch.manual_seed(2)
    depth = DPTForDepthEstimation(load_config(tiny("dinov2")))
    depth.save_pretrained(tmp_path / "depth")
    model = build_model(NAMES, pretrained=str(tmp_path / "depth"))
    theirs = depth.state_dict()
    for key in ("backbone.encoder.layer.0.attention.q_proj.weight",
                "neck.reassemble_stage.readout_projects.0.0.weight", "neck.fusion_stage.layers.3.projection.weight"):
        assert torch.equal(model.state_dict()[key], theirs[key]), key
    assert model.config.num_labels == 5 and model.head.head[4].out_channels == 5


# ---------------------------------------------------------------- train.py, resume, export, ONNX
TRAIN = {"images": "train/0001TP_006[89]*.jpg", "masks": "trainannot/{stem}.png"}
VAL = {"images": "val/0016E5_0799*.jpg", "masks": "valannot/{stem}.png"}


@pytest.mark.slow
@needs(CAMVID)
@pytest.mark.parametrize("fam", FAMILIES)
def test_fit_resume_export_onnx(fam, tmp_path):
    from test_train import run_train
    from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation

    from dptune.export import export
    from dptune.tasks.checkpoints import load_module

    size = 70 if fam == "dinov2" else 64
    args = ["fit", "--config", str(REPO / "configs" / "camvid.yaml"), "--data.root", str(CAMVID),
            "--model.config", tiny(fam), "--model.backbone", fam, "--model.layer_decay", "0.9",
            "--data.splits", json.dumps({"train": TRAIN, "val": VAL}),
            "--data.image_size", str(size), "--data.crop_size", str(size), "--data.batch_size", "2",
            "--data.num_workers", "0", "--trainer.default_root_dir", str(tmp_path / "run"),
            "--trainer.enable_progress_bar", "false", "--trainer.precision", "32-true", "--trainer.logger", "false"]
    run_train([*args, "--trainer.max_epochs", "1"], cwd=tmp_path)
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    run_train([*args, "--trainer.max_epochs", "2", "--ckpt_path", str(last)], cwd=tmp_path)
    ckpt = torch.load(last, map_location="cpu")
    assert ckpt["global_step"] == 6 and ckpt["epoch"] == 1  # 3 steps per epoch, resumed once
    assert 0.0 <= ckpt["dptune"]["metrics"]["val"]["mIoU"] <= 1.0

    out = export(str(last), tmp_path / "out", onnx=True)  # raises if ONNX parity fails
    assert (out / "model.onnx").exists()
    # plain transformers: hybrid is the stock class; other backbones ship their class as remote code
    assert (out / "modeling_dptune.py").exists() == (fam != "hybrid")
    theirs = AutoModelForSemanticSegmentation.from_pretrained(out, trust_remote_code=True).eval()
    proc = AutoImageProcessor.from_pretrained(out)
    frame = sorted((CAMVID / "val").glob("*.jpg"))[0]
    pixels = proc(images=Image.open(frame), return_tensors="pt")["pixel_values"]
    module = load_module(str(last)).eval()
    ours = load_exported(str(out)).eval()
    resized = np.asarray(Image.open(frame).convert("RGB").resize((size, size), Image.BICUBIC))
    with torch.no_grad():
        ref = module(torch.from_numpy(resized).permute(2, 0, 1)[None])[0]
        assert torch.allclose(theirs(pixel_values=pixels).logits, ref, atol=1e-4)
        assert torch.allclose(segment(ours, pixels)[0], ref, atol=1e-4)


@pytest.mark.parametrize("fam", ["vit", *FAMILIES])
def test_fsdp_strategy_shards_each_transformer_block(fam):
    """FSDP needs GPUs under Lightning; what can be checked here is which modules become units."""
    from dptune.tasks.optim import transformer_blocks
    from dptune.training.strategies import DPTFSDPStrategy

    model = build_model(NAMES, config=str(MODELS / "dpt-tiny.json") if fam == "vit" else tiny(fam))
    strategy = DPTFSDPStrategy(activation_checkpointing=True)
    assert strategy.kwargs["use_orig_params"] is True
    units = strategy.kwargs["auto_wrap_policy"]._run_policy(model, set(), {})  # what FSDP would wrap
    wrapped = {name for name, m in model.named_modules() if m in units and m is not model}
    checkpointed = strategy._activation_checkpointing_kwargs["auto_wrap_policy"]._run_policy(model, set(), {})
    assert {m for m in checkpointed if m is not model} == {m for m in units if m is not model}
    blocks = set(transformer_blocks(model))
    if fam == "swinv2":  # Swin checkpoints (and shards) whole stages, each holding its blocks
        assert wrapped and all(any(b.startswith(w + ".") for w in wrapped) for b in blocks)
    else:
        assert wrapped == blocks


def test_param_groups_read_names_through_fsdp_wrappers():
    """FSDP (use_orig_params) inserts ``_fsdp_wrapped_module.`` into names; groups must not change."""
    model = build_model(NAMES, config=tiny("dinov2"))
    plain = param_groups(model, 1.0, 10.0, 0.05, layer_decay=0.8)

    class Wrapped(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self._fsdp_wrapped_module = inner

    model.backbone.encoder.layer[1] = Wrapped(model.backbone.encoder.layer[1])
    wrapped = param_groups(model, 1.0, 10.0, 0.05, layer_decay=0.8)
    assert [(g["name"], g["lr"], len(g["params"])) for g in plain] == [(g["name"], g["lr"], len(g["params"])) for g in wrapped]


def test_push_to_hub_uploads_the_whole_directory(tmp_path, monkeypatch):
    """No hub here: the upload is recorded instead of sent. Everything the export wrote must go,
    remote code included (a DINOv2 model does not load on the hub without it)."""
    import huggingface_hub

    from dptune.export import export
    from dptune.labels import LabelSet
    from dptune.tasks.segmentation import SegmentationModule

    calls = []

    class FakeApi:
        def create_repo(self, repo, exist_ok=False):
            calls.append(("create", repo, exist_ok))

        def upload_folder(self, folder_path, repo_id, commit_message=""):
            calls.append(("upload", repo_id, sorted(p.name for p in Path(folder_path).iterdir())))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    labels = LabelSet(names=NAMES)
    module = SegmentationModule(config=tiny("dinov2"), label_spec=labels.to_dict(), image_size=56)
    src = tmp_path / "src"
    module.model.save_pretrained(src)
    module.image_processor().save_pretrained(src)
    export(str(src), tmp_path / "out", push_to_hub="someone/dpt-dinov2-test")
    assert calls[0] == ("create", "someone/dpt-dinov2-test", True)
    assert calls[1][0] == "upload" and calls[1][1] == "someone/dpt-dinov2-test"
    for name in ("config.json", "model.safetensors", "preprocessor_config.json", "README.md", "modeling_dptune.py"):
        assert name in calls[1][2], name


def test_swinv2_logit_scale_and_position_bias_mlp_get_no_weight_decay():
    """Official Swin-V2 exempts logit_scale and the continuous position bias MLP (cpb_mlp) from
    weight decay; both are >= 2-d tensors, so a norms-and-biases rule alone decays them."""
    model = build_model(NAMES, config=tiny("swinv2"))
    groups = param_groups(model, 1e-4, 10.0, 0.05)
    name_of = {id(p): n for n, p in model.named_parameters()}
    decayed = {name_of[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    special = [n for n, p in model.named_parameters()
               if p.requires_grad and ("logit_scale" in n or "continuous_position_bias_mlp" in n)]
    assert len(special) >= 10 and not decayed & set(special)
    assert any(n.endswith("attention.self.query.weight") for n in decayed)  # ordinary weights still decay


def test_a_dinov2_backbone_with_register_tokens_trains_segmentation_and_refuses_depth_in_one_line(tmp_path):
    """DINOv2 with registers puts register tokens after the class token: the neck folded them as patches and the
    model's first image ended in a reshape traceback (a review). Segmentation drops them before the neck (its
    export ships that code); a depth model, which exports load in transformers' own class, is refused."""
    import json

    import torch

    from dptune.errors import ConfigError
    from dptune.models.build import build_model
    from dptune.models.depth import build_depth_model

    spec = json.loads((REPO / "configs" / "models" / "dpt-dinov2-tiny.json").read_text())
    spec["backbone_config"].update(model_type="dinov2_with_registers", num_register_tokens=4)
    path = tmp_path / "reg.json"
    path.write_text(json.dumps(spec))
    model = build_model(["a", "b"], None, str(path)).eval()
    plain = dict(spec, backbone_config={**spec["backbone_config"], "model_type": "dinov2", "num_register_tokens": 0})
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 56, 56)).logits.shape == \
            build_model(["a", "b"], None, plain).eval()(torch.zeros(1, 3, 56, 56)).logits.shape
    with pytest.raises(ConfigError, match="4 register tokens"):
        build_depth_model(None, str(path))
    # a bare backbone's config and Depth Anything's hold it elsewhere: refused all the same (a second review)
    bare = json.loads((REPO / "configs" / "models" / "dinov2-tiny-backbone.json").read_text())
    bare.update(model_type="dinov2_with_registers", num_register_tokens=4)
    anything = json.loads((REPO / "configs" / "models" / "depth-anything-tiny.json").read_text())
    anything["backbone_config"].update(model_type="dinov2_with_registers", num_register_tokens=4)
    for name, spec in (("bare.json", bare), ("anything.json", anything)):
        (tmp_path / name).write_text(json.dumps(spec))
        with pytest.raises(ConfigError, match="4 register tokens"):
            build_depth_model(None, str(tmp_path / name))
