import pytest
import torch
from transformers import DPTConfig, DPTForSemanticSegmentation

from dptune.models import build_model, segment


def test_classifier_rows_carried_over_by_name(tmp_path, tiny_config):
    cfg = DPTConfig(**tiny_config, num_labels=3, id2label={0: "wall", 1: "Car", 2: "sky"},
                    label2id={"wall": 0, "Car": 1, "sky": 2})
    src = DPTForSemanticSegmentation(cfg)
    src.save_pretrained(tmp_path / "ckpt")
    model = build_model(["SKY", "road", "car", "tree"], pretrained=str(tmp_path / "ckpt"))
    assert model.config.num_labels == 4 and model.config.id2label[0] == "SKY"
    for head_old, head_new in [(src.head.head[4], model.head.head[4]),
                               (src.auxiliary_head.head[4], model.auxiliary_head.head[4])]:
        assert head_new.out_channels == 4
        assert torch.equal(head_new.weight[0], head_old.weight[2])  # sky
        assert torch.equal(head_new.weight[2], head_old.weight[1])  # car
        assert torch.equal(head_new.bias[2], head_old.bias[1])
        assert not torch.equal(head_new.weight[1], head_old.weight[0])  # road is new
    # the rest of the network is the checkpoint's
    assert torch.equal(model.neck.convs[0].weight, src.neck.convs[0].weight)


def test_same_label_set_keeps_classifier(tmp_path, tiny_config):
    cfg = DPTConfig(**tiny_config, num_labels=2, id2label={0: "a", 1: "b"}, label2id={"a": 0, "b": 1})
    src = DPTForSemanticSegmentation(cfg)
    src.save_pretrained(tmp_path / "ckpt")
    model = build_model(["a", "b"], pretrained=str(tmp_path / "ckpt"))
    assert torch.equal(model.head.head[4].weight, src.head.head[4].weight)


def test_non_square_forward(tiny_config):
    model = build_model(["a", "b", "c"], config=tiny_config).eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        logits, aux = segment(model, x)
    assert logits.shape == (2, 3, 64, 96)
    assert aux.shape == (2, 3, 32, 48)
    # an odd patch grid: the neck rounds up, callers resize logits to the labels
    with torch.no_grad():
        logits, _ = segment(model, torch.randn(1, 3, 48, 112))
    assert logits.shape[-2] >= 48 and logits.shape[-1] >= 112
    with pytest.raises(RuntimeError):  # what dptune fixes: the stock forward cannot do this
        model(pixel_values=x)
    with pytest.raises(ValueError, match="not a multiple of 16"):
        segment(model, torch.randn(1, 3, 64, 70))


def test_square_forward_matches_transformers(tiny_config):
    model = build_model(["a", "b", "c"], config=tiny_config).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ours, _ = segment(model, x)
        ref = model(pixel_values=x).logits
    assert torch.allclose(ours, ref, atol=1e-5)


def test_exactly_one_model_source(tiny_config):
    with pytest.raises(ValueError, match="exactly one"):
        build_model(["a"], pretrained=None, config=None)


def _neck_output_std(model, x):
    out = {}

    def keep(module, inputs, outputs):
        out["std"] = outputs[-1].std().item()

    hook = model.neck.fusion_stage.register_forward_hook(keep)
    with torch.no_grad():
        segment(model.eval(), x)
    hook.remove()
    return out["std"]


def test_fresh_neck_keeps_the_signal_with_he_init(tiny_config):
    """transformers' N(0, 0.02) start shrinks the neck's signal by orders of magnitude (why a DPT
    from scratch learns slowly); He init keeps it at the input's scale."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    he = build_model(["a", "b", "c"], config=tiny_config)
    hf = build_model(["a", "b", "c"], config=tiny_config, fresh_init="hf")
    assert _neck_output_std(he, x) > 0.3
    assert _neck_output_std(hf, x) < 0.01
    for name, layer in he.named_modules():
        if isinstance(layer, torch.nn.Conv2d) and name.startswith("neck.fusion_stage"):
            fan_in = layer.weight[0].numel()
            assert abs(layer.weight.std().item() / (2 / fan_in) ** 0.5 - 1) < 0.2, name
    classifier = he.head.head[4]
    assert abs(classifier.weight.std().item() / (2 / classifier.in_channels) ** 0.5 - 1) < 0.3
    # the ViT keeps transformers' init
    assert abs(he.dpt.encoder.layer[0].attention.attention.query.weight.std().item() - 0.02) < 0.005
    with pytest.raises(ValueError, match="fresh_init"):
        build_model(["a"], config=tiny_config, fresh_init="xavier")


def test_he_init_only_touches_layers_the_checkpoint_lacks(tmp_path, tiny_config):
    """A pretrained DPT keeps every weight it has; a depth checkpoint's missing segmentation head starts He-normal."""
    from transformers import DPTForDepthEstimation

    torch.manual_seed(0)
    cfg = DPTConfig(**tiny_config, num_labels=2, id2label={0: "a", 1: "b"}, label2id={"a": 0, "b": 1})
    seg = DPTForSemanticSegmentation(cfg)
    seg.save_pretrained(tmp_path / "seg")
    model = build_model(["a", "b"], pretrained=str(tmp_path / "seg"))
    theirs = seg.state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in model.state_dict().items())

    depth = DPTForDepthEstimation(DPTConfig(**tiny_config))
    depth.save_pretrained(tmp_path / "depth")
    model = build_model(["a", "b"], pretrained=str(tmp_path / "depth"))
    assert torch.equal(model.neck.convs[0].weight, depth.neck.convs[0].weight)
    conv = model.head.head[0]  # 3x3 conv of the segmentation head, not in the depth checkpoint
    assert abs(conv.weight.std().item() / (2 / conv.weight[0].numel()) ** 0.5 - 1) < 0.2


def _he_ratio(weight: torch.Tensor) -> float:
    """Measured std over He-normal's std for this layer's fan-in (1.0 = He)."""
    return weight.std().item() / (2 / weight[0].numel()) ** 0.5


def test_classifiers_replaced_for_a_new_label_set_start_he(tmp_path, tiny_config):
    """adapt_classifiers swaps in new classifier convs; those (not the modules they replace) must be
    He-initialised. Fails when the fresh-layer list is taken before the swap: the new convs then keep
    PyTorch's default init (std 0.58 / sqrt(fan_in), ratio ~0.41)."""
    from transformers import DPTForDepthEstimation

    torch.manual_seed(0)
    names = [f"class{i}" for i in range(40)]
    DPTForDepthEstimation(DPTConfig(**tiny_config)).save_pretrained(tmp_path / "depth")
    model = build_model(names, pretrained=str(tmp_path / "depth"))
    for classifier in (model.head.head[4], model.auxiliary_head.head[4]):
        assert classifier.out_channels == 40
        assert abs(_he_ratio(classifier.weight) - 1) < 0.2
        assert classifier.bias.abs().max() == 0

    # a segmentation checkpoint adapted to new classes: carried rows are the checkpoint's, new rows He
    cfg = DPTConfig(**tiny_config, num_labels=2, id2label={0: "class0", 1: "class1"},
                    label2id={"class0": 0, "class1": 1})
    seg = DPTForSemanticSegmentation(cfg)
    seg.save_pretrained(tmp_path / "seg")
    model = build_model(names, pretrained=str(tmp_path / "seg"))
    new = model.head.head[4].weight
    assert torch.equal(new[:2], seg.head.head[4].weight)
    assert abs(_he_ratio(new[2:]) - 1) < 0.2
    hf = build_model(names, pretrained=str(tmp_path / "seg"), fresh_init="hf")
    assert abs(hf.head.head[4].weight[2:].std().item() - 0.02) < 0.005  # transformers' own N(0, 0.02)


def test_logits_past_cudas_upsampling_limit_are_made_in_chunks_with_the_same_numbers(tiny_config, monkeypatch):
    """CUDA's bilinear upsampling refuses outputs of 2**31 elements or more: DPT-Large's head at 512 x 512
    with 150 classes hit it from batch 55 on an H200 (gradient checkpointing fits such batches). Simulated
    here with a lower limit that interpolate enforces as the CUDA kernel does; the head's layers before its
    final upsampling still see the whole batch (BatchNorm's batch statistics), so training computes the same."""
    import torch.nn.functional as F

    import dptune.models.chunks as chunks
    from dptune.losses.segmentation import cross_entropy

    torch.manual_seed(0)
    model = DPTForSemanticSegmentation(DPTConfig(**tiny_config, num_labels=5)).train()
    model.config.semantic_classifier_dropout = 0.0
    model.head.head[3].p = 0.0
    x = torch.randn(6, 3, 64, 64)
    target = torch.randint(0, 5, (6, 64, 64))
    expected, _ = segment(model, x, with_aux=False)
    expected_loss = cross_entropy(expected, target)
    calls = []
    interpolate = F.interpolate

    def limited(inp, *args, **kwargs):
        out = interpolate(inp, *args, **kwargs)
        if out.shape[1] != 5:  # the neck's (at real sizes it reaches the limit at over twice the batch)
            return out
        calls.append(out.shape[0])
        if out.numel() > limit:
            raise RuntimeError(f"upsample_bilinear2d only supports output tensors with less than INT_MAX elements, "
                               f"but got {list(out.shape)}")
        return out

    limit = 2 * 5 * 64 * 64  # two samples' logits at full size
    monkeypatch.setattr(chunks, "ELEMENT_LIMIT", limit)
    monkeypatch.setattr(F, "interpolate", limited)
    heads = []  # the head is still called as a module (its hooks run: the benchmark's profile ranges)
    hook = model.head.register_forward_hook(lambda *_: heads.append(1))
    logits, _ = segment(model, x, with_aux=False)
    hook.remove()
    assert calls and max(calls) <= 2 and sum(calls) == 6 and heads == [1], (calls, heads)
    assert isinstance(model.head.head[-1], torch.nn.Upsample)  # put back
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(cross_entropy(logits, target), expected_loss, rtol=1e-6, atol=1e-6)


def limit_kernel(monkeypatch, owner, name: str, limit: int) -> list[int]:
    """``owner.name`` made to fail as a CUDA kernel does past ``limit`` elements (its first argument's),
    with dptune's chunk limit lowered to it; returns the batch sizes it was called with."""
    import dptune.models.chunks as chunks

    real, sizes = getattr(owner, name), []

    def limited(x, *args, **kwargs):
        sizes.append(x.shape[0])
        if x.numel() > limit:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real(x, *args, **kwargs)

    monkeypatch.setattr(chunks, "ELEMENT_LIMIT", limit)
    monkeypatch.setattr(owner, name, limited)
    return sizes


def test_cross_entropy_past_the_element_limit_runs_in_chunks_with_the_same_loss_and_gradient(monkeypatch):
    """The full-size logits of 64 x 150 x 512 x 512 pass 2**31 elements; CUDA's softmax kernels then read
    out of bounds (an H200 stopped with an illegal memory access). The loss sums per chunk of samples;
    simulated with a lower limit that cross_entropy enforces."""
    import torch.nn.functional as F

    import dptune.losses.segmentation as seg_losses

    torch.manual_seed(0)
    logits = torch.randn(5, 4, 8, 8, requires_grad=True)
    target = torch.randint(0, 4, (5, 16, 16))
    target[0, :3] = 255
    weight = torch.tensor([1.0, 2.0, 0.5, 1.5])
    expected = [seg_losses.cross_entropy(logits, target, w) for w in (None, weight)]
    grads = [torch.autograd.grad(e, logits)[0] for e in expected]
    sizes = limit_kernel(monkeypatch, F, "cross_entropy", 2 * 4 * 16 * 16)
    for w, e, g in zip((None, weight), expected, grads, strict=True):
        got = seg_losses.cross_entropy(logits, target, w)
        torch.testing.assert_close(got, e, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(torch.autograd.grad(got, logits)[0], g, rtol=1e-6, atol=1e-7)
    assert max(sizes) == 2 and sum(sizes) == 10, sizes


def test_the_dice_loss_past_the_element_limit_runs_in_chunks_with_the_same_loss_and_gradient(monkeypatch):
    """The dice loss took the softmax of the whole batch's full-size logits (past 2**31 elements on
    a GPU at 150 classes, 512 x 512, batch 55: the kernel the cross-entropy's crash came from)."""
    import dptune.losses.segmentation as seg_losses

    torch.manual_seed(0)
    logits = torch.randn(5, 4, 8, 8, requires_grad=True)
    target = torch.randint(0, 4, (5, 16, 16))
    target[0, :3] = 255
    expected = seg_losses.dice_loss(logits, target)
    grad = torch.autograd.grad(expected, logits)[0]
    sizes = limit_kernel(monkeypatch, torch.Tensor, "softmax", 2 * 4 * 16 * 16)
    got = seg_losses.dice_loss(logits, target)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(torch.autograd.grad(got, logits)[0], grad, rtol=1e-5, atol=1e-7)
    assert max(sizes) == 2 and sum(sizes) == 5, sizes
