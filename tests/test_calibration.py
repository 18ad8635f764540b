"""Temperature scaling: fitted by NLL over labelled pixels, folded into the classifier so the stock class
and pipeline serve calibrated probabilities, masks unchanged, ECE before / after in the card."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from conftest import CAMVID, TINY, needs
from PIL import Image

from dptune.export.temperature import ece, fit_temperature, fold_temperature, nll, pixel_logits
from dptune.labels import LabelSet


def overconfident(n: int = 20000, c: int = 5, t: float = 2.5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels drawn from softmax(z); the model reports z * t (over-confident by a factor t)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, c, generator=g) * 2
    y = torch.multinomial(torch.softmax(z, 1), 1, generator=g)[:, 0]
    return z * t, y


def test_fit_recovers_the_temperature_and_lowers_nll_and_ece_on_other_pixels():
    logits, labels = overconfident(t=2.5)
    t = fit_temperature(logits, labels)
    assert t == pytest.approx(2.5, rel=0.08)
    held_x, held_y = overconfident(t=2.5, seed=1)
    assert nll(held_x, held_y, t) < nll(held_x, held_y)
    assert ece(held_x, held_y, t) < 0.5 * ece(held_x, held_y)
    # an under-confident model gets T < 1
    under_x, under_y = overconfident(t=0.5, seed=2)
    assert fit_temperature(under_x, under_y) < 1


def test_ece_of_a_calibrated_model_is_near_zero_and_ignored_pixels_are_not_sampled():
    logits, labels = overconfident(t=1.0, n=50000)
    assert ece(logits, labels) < 0.02
    mask = np.full((8, 8), 255, np.uint8)
    mask[:2] = 1
    x, y = pixel_logits(torch.randn(1, 3, 4, 4), mask, np.random.default_rng(0))
    assert x.shape == (16, 3) and set(y.tolist()) == {1}


def test_ece_bins_are_closed_below_and_gathered_over_images_as_in_one_pass():
    """Bin i holds [i/15, (i+1)/15) (1.0 in the last): a confidence on an edge counts in the bin above;
    the ECE gathered image by image (what the export measures per graph) is the one-pass ECE."""
    from dptune.export.temperature import ECEBins

    edge = torch.tensor([1 / 15, 1 / 15, 1.0], dtype=torch.float64)
    bins = ECEBins()
    bins.add(edge, torch.tensor([True, False, True]))
    assert bins.count[1] == 2 and bins.count[0] == 0 and bins.count[14] == 1
    logits, labels = overconfident(t=2.0, n=6000)
    parts = ECEBins()
    for x, y in zip(logits.split(1000), labels.split(1000), strict=True):
        conf, pred = torch.softmax(x.double(), 1).max(1)
        parts.add(conf, pred == y)
    assert parts.value() == pytest.approx(ece(logits, labels), abs=1e-12)


def test_folding_divides_the_logits_and_keeps_every_argmax():
    from dptune.models import build_model, segment

    torch.manual_seed(0)
    model = build_model(["a", "b", "c"], config=dict(TINY)).eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        before = segment(model, x, with_aux=False)[0]
        fold_temperature(model, 1.7)
        after = segment(model, x, with_aux=False)[0]
    torch.testing.assert_close(after, before / 1.7, rtol=1e-5, atol=1e-5)
    assert torch.equal(after.argmax(1), before.argmax(1))
    with pytest.raises(ValueError):
        fold_temperature(model, 0.0)


@needs(CAMVID)
def test_calibrated_export_serves_through_the_stock_class_and_pipeline_with_the_same_masks(tmp_path):
    """Export a small model trained for a few steps on CamVid (an untrained one is near-uniform), with
    and without --calibrate-temperature: the stock class gives logits / T, pipeline the same masks, and
    the card and dptune.json carry T and ECE before / after (lower after on the held-back images)."""
    from transformers import DPTForSemanticSegmentation, pipeline

    from dptune.data.images import read_image
    from dptune.export import export
    from dptune.export.serving import ServingOptions
    from dptune.tasks.segmentation import SegmentationModule

    labels = LabelSet.from_yaml(CAMVID / "labels.yaml")
    torch.manual_seed(0)
    module = SegmentationModule(config=dict(TINY), label_spec=labels.to_dict(), image_size=64)
    proc = module.image_processor()
    train = sorted(CAMVID.glob("train/*.jpg"))[::12][:24]
    xs = torch.cat([torch.from_numpy(proc(images=read_image(str(p)), return_tensors="np")["pixel_values"])
                    for p in train])
    ys = torch.stack([torch.from_numpy(labels.encode(np.array(Image.open(CAMVID / "trainannot" / f"{p.stem}.png")
                                                              .resize((64, 64), Image.NEAREST)), p.name)).long()
                      for p in train])
    opt = torch.optim.AdamW(module.model.parameters(), lr=3e-3)
    from dptune.models import segment

    for _ in range(60):  # over-fitted a little: over-confident on unseen frames
        loss = torch.nn.functional.cross_entropy(segment(module.model, xs, with_aux=False)[0], ys, ignore_index=255)
        opt.zero_grad()
        loss.backward()
        opt.step()
    module.eval()
    src = tmp_path / "src"
    module.model.save_pretrained(src)
    proc.save_pretrained(src)
    (src / "dptune.json").write_text(json.dumps({"labels": labels.to_dict()}))
    cfg = tmp_path / "data.yaml"
    cfg.write_text(yaml.safe_dump({"data": {"root": str(CAMVID), "labels": "labels.yaml", "splits": {
        "val": {"images": "val/0016E5_08[01]*.jpg", "masks": "valannot/{stem}.png"}}}}))
    with torch.no_grad():
        export(str(src), tmp_path / "plain")
        export(str(src), tmp_path / "cal", serving=ServingOptions(temperature=True, data=str(cfg), count=8))
    cal = json.loads((tmp_path / "cal" / "dptune.json").read_text())["serving"]["calibration"]
    t = cal["temperature"]
    assert t > 0 and abs(t - 1) > 0.05
    assert cal["ece_after"] < cal["ece_before"] and cal["fitted_on_images"] == 8 and cal["held_back_images"] > 8
    card = (tmp_path / "cal" / "README.md").read_text()
    assert "## Calibrated confidence" in card and f"{cal['ece_before']:.4f} before" in card

    plain = DPTForSemanticSegmentation.from_pretrained(tmp_path / "plain").eval()
    calibrated = DPTForSemanticSegmentation.from_pretrained(tmp_path / "cal").eval()
    x = torch.from_numpy(proc(images=read_image(str(sorted(CAMVID.glob("val/*.jpg"))[-1])),
                              return_tensors="np")["pixel_values"])
    with torch.no_grad():
        a, b = plain(pixel_values=x).logits, calibrated(pixel_values=x).logits
    torch.testing.assert_close(b, a / t, rtol=1e-4, atol=1e-5)
    image = Image.open(sorted(CAMVID.glob("val/*.jpg"))[-1])
    masks = [{r["label"]: np.array(r["mask"]) for r in pipeline("image-segmentation", model=str(tmp_path / d))(image)}
             for d in ("plain", "cal")]
    assert masks[0].keys() == masks[1].keys() and all(np.array_equal(masks[0][k], masks[1][k]) for k in masks[0])
