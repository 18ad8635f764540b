import pytest
import torch
from transformers import DPTConfig, DPTForSemanticSegmentation

from dptune.model import build_model, segment


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
