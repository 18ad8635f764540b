import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dptune.labels import IGNORE_INDEX, LabelSet
from dptune.losses.segmentation import dice_loss, lovasz_loss
from dptune.tasks.optim import WarmupPoly
from dptune.tasks.segmentation import SegmentationModule


def _module(config, **kw):
    spec = LabelSet(names=["a", "b", "c"]).to_dict()
    return SegmentationModule(config=config, label_spec=spec, image_size=64, **kw)


def test_loss_with_auxiliary_head_off(tiny_config):
    cfg = dict(tiny_config, use_auxiliary_head=False)
    m = _module(cfg)
    assert m.model.auxiliary_head is None
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    target = torch.randint(0, 3, (2, 64, 64))
    target[:, :8] = IGNORE_INDEX
    logits, aux = m(images)
    assert aux is None
    losses = m.loss(logits, aux, target)
    ref = F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX)
    assert torch.allclose(losses["loss"], ref, atol=1e-6)
    losses["loss"].backward()


def test_aux_term_and_class_weights(tiny_config):
    m = _module(tiny_config, aux_weight=0.5, class_weights=[1.0, 2.0, 0.5])
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    target = torch.randint(0, 3, (2, 64, 64))
    logits, aux = m(images)
    w = torch.tensor([1.0, 2.0, 0.5])
    up = F.interpolate(aux, size=(64, 64), mode="bilinear", align_corners=False)
    ref = F.cross_entropy(logits, target, weight=w) + 0.5 * F.cross_entropy(up, target, weight=w)
    assert torch.allclose(m.loss(logits, aux, target)["loss"], ref, atol=1e-5)


def test_all_ignored_crop_gives_zero_loss_not_nan(tiny_config):
    m = _module(tiny_config)
    images = torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8)
    target = torch.full((1, 64, 64), IGNORE_INDEX)
    loss = m.loss(*m(images), target)["loss"]
    assert loss.item() == 0.0
    loss.backward()


def test_param_groups_no_decay_and_head_lr(tiny_config):
    m = _module(tiny_config, lr=1e-4, head_lr_mult=10, weight_decay=0.05)
    groups = {g["name"]: g for g in m.param_groups()}
    assert set(groups) == {"backbone", "backbone_no_decay", "head", "head_no_decay"}
    names = {id(p): n for n, p in m.model.named_parameters()}
    no_decay = {names[id(p)] for p in groups["backbone_no_decay"]["params"]}
    assert "dpt.embeddings.cls_token" in no_decay and "dpt.embeddings.position_embeddings" in no_decay
    assert any(n.endswith("layernorm_before.bias") for n in no_decay)
    assert groups["backbone_no_decay"]["weight_decay"] == 0 and groups["backbone"]["weight_decay"] == 0.05
    assert groups["head"]["lr"] == pytest.approx(1e-3) and groups["backbone"]["lr"] == pytest.approx(1e-4)
    head_names = {names[id(p)] for p in groups["head"]["params"]}
    assert "head.head.4.weight" in head_names and "auxiliary_head.head.4.weight" in head_names
    total = sum(len(g["params"]) for g in groups.values())
    trainable = [n for n, p in m.model.named_parameters() if p.requires_grad]
    assert total == len(trainable)
    # the encoder's final layer norm is never run by dptune's forward: frozen, not optimized
    assert "dpt.layernorm.weight" not in trainable and "dpt.layernorm.weight" in m.model.state_dict()


def _lrs(sched, steps):
    out = []
    for _ in range(steps):
        out.append(sched.optimizer.param_groups[0]["lr"])
        sched.optimizer.step()
        sched.step()
    return out


def test_warmup_then_linear_decay_by_hand():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    lrs = _lrs(WarmupPoly(opt, total_steps=6, warmup_steps=2), 7)
    # warmup 1/2, 2/2, then 1 - k/4 for k = 0..4 after the warmup
    assert lrs == pytest.approx([0.5, 1.0, 1.0, 0.75, 0.5, 0.25, 0.0])


def test_schedule_state_restores_the_step_not_the_length():
    """A checkpoint of a 4-step run loaded into an 8-step run continues on the 8-step schedule."""
    short = WarmupPoly(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), total_steps=4, warmup_steps=0)
    _lrs(short, 4)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    long = WarmupPoly(opt, total_steps=8, warmup_steps=0)
    long.load_state_dict(short.state_dict())
    assert long.last_epoch == 4
    assert _lrs(long, 4) == pytest.approx([0.5, 0.375, 0.25, 0.125])  # 1 - k/8 for k = 4..7


def test_dice_matches_a_one_hot_reference(tiny_config):
    m = _module(tiny_config, region_loss="dice", aux_weight=0.0)
    logits = torch.randn(2, 3, 16, 16, requires_grad=True)
    target = torch.randint(0, 2, (2, 16, 16))  # class 2 absent: left out of the mean
    target[:, :3] = IGNORE_INDEX
    valid = (target != IGNORE_INDEX).unsqueeze(1).float()
    probs = logits.softmax(1) * valid
    onehot = F.one_hot(target.clamp(max=2), 3).permute(0, 3, 1, 2).float() * valid
    inter, denom = (probs * onehot).sum((0, 2, 3)), probs.sum((0, 2, 3)) + onehot.sum((0, 2, 3))
    ref = 1 - ((2 * inter + 1) / (denom + 1))[:2].mean()
    ours = dice_loss(logits, target)
    assert torch.allclose(ours, ref, atol=1e-6)
    ours.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    total = m.loss(logits, None, target)
    assert torch.allclose(total["loss"], total["loss_main"] + total["loss_dice"])


def test_lovasz_is_one_minus_iou_for_hard_predictions(tiny_config):
    """The Lovasz extension agrees with the Jaccard loss on one-hot probabilities: for each class
    present in the target, 1 - IoU over the batch (numpy), averaged; predicted-only classes and
    ignored pixels do not count."""
    rng = np.random.default_rng(0)
    target = torch.from_numpy(rng.integers(0, 3, (2, 12, 12)))  # class 3 only ever predicted
    target[:, :2] = IGNORE_INDEX
    pred = target.clone()
    flip = torch.from_numpy(rng.random((2, 12, 12)) < 0.3)
    pred[flip] = torch.from_numpy(rng.integers(0, 4, (2, 12, 12)))[flip]
    pred[pred == IGNORE_INDEX] = 3
    logits = F.one_hot(pred, 4).permute(0, 3, 1, 2).float() * 100  # softmax = one-hot
    t, p = target.numpy().ravel(), pred.numpy().ravel()
    t, p = t[t != IGNORE_INDEX], p[t != IGNORE_INDEX]
    ref = np.mean([1 - ((t == c) & (p == c)).sum() / ((t == c) | (p == c)).sum() for c in np.unique(t)])
    assert abs(lovasz_loss(logits, target).item() - ref) < 1e-5
    soft = torch.randn(2, 4, 12, 12, requires_grad=True)
    value = lovasz_loss(soft, target)
    value.backward()
    assert 0 < value.item() < 1 and torch.isfinite(soft.grad).all() and soft.grad.abs().sum() > 0
    m = _module(tiny_config, region_loss="lovasz", aux_weight=0.0)
    total = m.loss(soft, None, target)
    assert torch.allclose(total["loss"], total["loss_main"] + total["loss_lovasz"])


def test_aux_head_runs_only_when_the_loss_reads_it(tiny_config):
    images = torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8)
    m = _module(tiny_config)
    assert m(images)[1] is not None  # training, aux_weight 0.4
    m.eval()
    assert m(images)[1] is None
    m.train()
    assert _module(tiny_config, aux_weight=0.0)(images)[1] is None


def test_sync_batchnorm_only_for_multi_gpu():
    from types import SimpleNamespace

    from dptune.tasks.base import wants_sync_batchnorm

    def trainer(world, device):
        return SimpleNamespace(world_size=world, strategy=SimpleNamespace(root_device=torch.device(device)))

    assert wants_sync_batchnorm(trainer(2, "cuda"))
    assert not wants_sync_batchnorm(trainer(1, "cuda"))
    assert not wants_sync_batchnorm(trainer(2, "cpu"))  # gloo DDP on CPU: plain BatchNorm
    assert not wants_sync_batchnorm(None)


def test_normalisation_without_an_image_processor_follows_the_family(tmp_path, tiny_config, caplog):
    """No preprocessor_config.json: DINOv2 gets ImageNet statistics (not DPT's 0.5), and the log says
    where mean/std came from in every case."""
    import json
    import logging

    from conftest import REPO

    caplog.set_level(logging.INFO, logger="dptune")
    dino = json.loads((REPO / "configs" / "models" / "dpt-dinov2-tiny.json").read_text())
    m = _module(dino)
    assert m.image_mean == pytest.approx([0.485, 0.456, 0.406]) and m.image_std == pytest.approx([0.229, 0.224, 0.225])
    assert "dinov2 family's published statistics" in caplog.text
    caplog.clear()
    assert _module(tiny_config).image_mean == [0.5, 0.5, 0.5]
    assert "vit family" in caplog.text
    # a checkpoint directory that ships no processor says so
    caplog.clear()
    from transformers import DPTConfig, DPTForSemanticSegmentation

    DPTForSemanticSegmentation(DPTConfig(**tiny_config)).save_pretrained(tmp_path / "ckpt")
    spec = LabelSet(names=["a", "b", "c"]).to_dict()
    SegmentationModule(pretrained=str(tmp_path / "ckpt"), label_spec=spec, image_size=64)
    assert "ships no preprocessor_config.json" in caplog.text


def test_slide_mode_overlays_line_up_with_their_masks_in_mixed_size_batches():
    """Slide-mode validation batches hold native-size images padded to the largest: the overlay of
    a smaller image is its own pixels, not the padded canvas stretched to its size."""
    from types import SimpleNamespace

    from conftest import TINY

    from dptune.data.loaders import collate
    from dptune.training.callbacks import ValidationVisuals

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (3, h, w), dtype=np.uint8) for h, w in [(48, 80), (32, 40)]]
    items = [{"image": torch.from_numpy(im), "mask": torch.zeros(im.shape[1:], dtype=torch.uint8), "index": i}
             for i, im in enumerate(images)]
    batch = collate(items)
    trainer = SimpleNamespace(sanity_checking=False, is_global_zero=True)
    module = _module(dict(TINY), val_mode="slide", log_images=2)
    cb = ValidationVisuals()
    cb._wandb = lambda trainer: object()  # only "is a W&B logger attached" is asked here
    cb.on_validation_batch_end(trainer, module, {"preds": batch["mask"]}, batch, 0)
    for sample, image in zip(cb._samples, images, strict=True):
        assert np.array_equal(sample["image"], image.transpose(1, 2, 0))
        assert sample["gt"].shape == image.shape[1:]


def test_checkpoints_load_without_unpickling_code(tmp_path, tiny_config, monkeypatch):
    """load_module reads with weights_only=True; a file holding arbitrary objects is refused in one
    line unless the user says the source is trusted."""
    from dptune.errors import ConfigError
    from dptune.tasks.checkpoints import load_checkpoint

    safe = tmp_path / "safe.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "dptune": {"metrics": {}}}, safe)
    assert torch.equal(load_checkpoint(str(safe))["state_dict"]["w"], torch.zeros(2))
    unsafe = tmp_path / "unsafe.ckpt"
    torch.save({"state_dict": {}, "extra": _Opaque()}, unsafe)
    with pytest.raises(ConfigError, match="DPTUNE_TRUST_CHECKPOINTS=1"):
        load_checkpoint(str(unsafe))
    monkeypatch.setenv("DPTUNE_TRUST_CHECKPOINTS", "1")
    assert isinstance(load_checkpoint(str(unsafe))["extra"], _Opaque)


class _Opaque:
    """A class torch's safe loader does not allow."""


@pytest.mark.parametrize("key, value", [("lr", 0.0), ("min_lr_ratio", 1.5), ("betas", [0.9, 1.0])])
def test_a_checkpoint_saved_with_settings_that_cannot_train_still_serves(key, value, tiny_config, tmp_path):
    """Training settings out of range are refused when a task is built to train; a checkpoint that
    holds one (written before the check) still loads for predict, evaluate and export, which never
    use them (load_module rebuilt the task with them and was refused)."""
    from dptune.tasks.checkpoints import load_module

    module = _module(tiny_config)
    state = {"state_dict": module.state_dict(), "hyper_parameters": {**dict(module.hparams), key: value}}
    module.on_save_checkpoint(state)
    torch.save(state, tmp_path / "old.ckpt")
    loaded = load_module(str(tmp_path / "old.ckpt"))
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded.model(x).logits, module.eval().model(x).logits)


def test_heads_held_at_learning_rate_zero_are_said(tiny_config, caplog):
    with caplog.at_level("WARNING"):
        _module(tiny_config, head_lr_mult=0.0)
    assert "model.head_lr_mult 0: the neck and heads do not train" in caplog.text


@pytest.mark.parametrize("kind", ["channel", "element", "none"])
def test_head_dropout_drops_whole_channels_single_activations_or_nothing(tiny_config, kind):
    """``head_dropout``: ``channel`` (the default) zeroes whole feature maps of a sample in both heads, the
    cheap draw on a CPU; ``element`` single activations, as transformers' heads do; ``none`` nothing. The
    kept values are scaled by 1 / (1 - p) in training; validation runs them unchanged."""
    m = _module(tiny_config) if kind == "channel" else _module(tiny_config, head_dropout=kind)
    seen = []
    for head in (m.model.head, m.model.auxiliary_head):
        layer = head.head[3]  # conv, norm, activation, dropout, classifier
        expected = {"channel": torch.nn.Dropout2d, "element": torch.nn.Dropout, "none": torch.nn.Identity}[kind]
        assert type(layer) is expected
        if kind != "none":
            layer.p = 0.5  # (0.1 as built) for a clear count of what is dropped
        layer.register_forward_hook(lambda mod, i, o: seen.append((i[0].detach(), o.detach())))
    torch.manual_seed(0)
    images = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8)
    m(images)
    assert len(seen) == 2  # both heads ran (training with the auxiliary head)
    for x, y in seen:
        live = x != 0  # after a ReLU: the activations dropout can change
        zeroed = (y == 0) & live
        kept = (y != 0) & live
        if kind == "none":
            assert torch.equal(x, y)
            continue
        torch.testing.assert_close(y[kept], x[kept] * 2.0)  # 1 / (1 - 0.5)
        assert 0.3 < zeroed.sum() / live.sum() < 0.7
        planes = zeroed.flatten(2).any(2), (kept.flatten(2)).any(2)  # per (sample, channel): any zeroed / kept
        mixed = (planes[0] & planes[1]).sum()
        if kind == "channel":
            assert mixed == 0  # a feature map is dropped or kept as a whole
        else:
            assert mixed > 0.5 * planes[0].numel()
    seen.clear()
    m.eval()
    m(images, with_aux=True)
    assert all(torch.equal(x, y) for x, y in seen)


def test_the_cross_entropy_of_bfloat16_logits_is_summed_in_float32():
    """Under ``bf16-true`` the logits, and the class weights with them, are bfloat16, and the loss over a
    CamVid-sized validation batch came out 0.7% off the exact value of those same logits: it was summed and
    returned in bfloat16 (8 significant bits; 32768 apart at 6.7 million). Compared with numpy in float64."""
    from dptune.losses.segmentation import cross_entropy, cross_entropy_terms

    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(2, 11, 360, 480, generator=gen) * 3).bfloat16().contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, 11, (2, 360, 480), generator=gen)
    target[:, :40] = IGNORE_INDEX
    weight = torch.rand(11, generator=gen) + 0.5
    x = logits.double().numpy().transpose(0, 2, 3, 1)  # (N, H, W, C)
    w = weight.bfloat16().double().numpy()  # the weights as a bf16 module holds them
    t = target.numpy()
    valid = t != IGNORE_INDEX
    tc = np.where(valid, t, 0)
    m = x.max(-1, keepdims=True)
    lse = (m[..., 0] + np.log(np.exp(x - m).sum(-1)))
    picked = np.take_along_axis(x, tc[..., None], -1)[..., 0]
    ref_total = float(((lse - picked) * w[tc] * valid).sum())
    ref_weight = float((w[tc] * valid).sum())
    total, weights = cross_entropy_terms(logits, target, weight.bfloat16())
    assert abs(float(total) / ref_total - 1) < 1e-5, (float(total), ref_total)
    assert abs(float(weights) / ref_weight - 1) < 1e-5, (float(weights), ref_weight)
    mean = cross_entropy(logits, target, weight.bfloat16())
    assert abs(float(mean) / (ref_total / ref_weight) - 1) < 1e-5
    assert mean.dtype == torch.float32


def test_the_cross_entropy_of_float64_logits_stays_float64():
    """At least float32 (a review: the float32 of bf16-true's fix took 64-true's float64 down)."""
    from dptune.losses.segmentation import cross_entropy

    logits = torch.randn(2, 5, 8, 8, dtype=torch.float64)
    target = torch.randint(0, 5, (2, 32, 32))
    assert cross_entropy(logits, target, torch.rand(5, dtype=torch.float64)).dtype == torch.float64


def test_the_auxiliary_weight_in_the_models_config_is_the_runs(tiny_config, tmp_path):
    """The export's config.json kept the source checkpoint's auxiliary_loss_weight (0.4) whatever the run
    trained with: with aux_weight 0 (a head never trained) plain transformers fine-tuning the export added 0.4 x
    that head's loss (a review). The model's config carries the run's weight, and the export writes it."""
    import json

    for weight in (0.0, 0.2):
        m = _module(tiny_config, aux_weight=weight)
        assert m.model.config.auxiliary_loss_weight == weight
        m.model.save_pretrained(tmp_path / str(weight))
        assert json.loads((tmp_path / str(weight) / "config.json").read_text())["auxiliary_loss_weight"] == weight


def test_an_auxiliary_weight_without_an_auxiliary_head_is_said(tmp_path):
    """``aux_weight`` with a model that has no auxiliary head trained the main head's loss alone without a word
    (a review): a log line says the setting has no effect."""
    import json

    from conftest import TINY
    from test_cli import _logged_quickstart

    config = tmp_path / "noaux.json"
    config.write_text(json.dumps({**TINY, "use_auxiliary_head": False}))
    proc = _logged_quickstart(tmp_path / "run", "--model.config", str(config), "--model.aux_weight", "0.4",
                              wandb_mode="disabled")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "model.aux_weight 0.4: this model has no auxiliary head" in proc.stderr
