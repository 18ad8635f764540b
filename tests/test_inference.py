import pytest
import torch

from dptune.inference.windows import (
    _starts,
    flip_views,
    from_view,
    predict_probs,
    slide_logits,
    to_view,
    whole_logits,
)
from dptune.labels import LabelSet
from dptune.preprocessing import Preprocessing
from dptune.tasks.segmentation import SegmentationModule


def pixels_as_logits(x: torch.Tensor) -> torch.Tensor:
    return x.float()  # 3 "classes" whose logits are the pixel values: position-exact


@pytest.mark.parametrize("h,w", [(50, 70), (20, 30), (64, 64)])
def test_slide_reassembles_exactly(h, w):
    images = torch.randint(0, 256, (2, 3, h, w), dtype=torch.uint8)
    out = slide_logits(pixels_as_logits, images, (32, 32), (21, 21), batch=3)
    assert out.shape == (2, 3, h, w)
    assert torch.equal(out, images.float())


def test_window_starts_cover_the_image():
    assert _starts(100, 32, 21) == [0, 21, 42, 63, 68]
    assert _starts(20, 32, 21) == [0]


def test_whole_and_tta_return_input_size():
    images = torch.randint(0, 256, (1, 3, 40, 60), dtype=torch.uint8)
    prep = Preprocessing((32, 32), (0.5,) * 3, (0.5,) * 3)
    assert whole_logits(pixels_as_logits, images, prep).shape == (1, 3, 40, 60)
    probs = predict_probs(pixels_as_logits, images, prep, mode="slide", flip=True, scales=(0.75, 1.0))
    assert probs.shape == (1, 3, 40, 60)
    assert torch.allclose(probs.sum(1), torch.ones(1, 40, 60), atol=1e-5)


def test_module_validates_with_sliding_windows_on_non_square_images(tiny_config):
    spec = LabelSet(names=["a", "b", "c"]).to_dict()
    m = SegmentationModule(config=tiny_config, label_spec=spec, image_size=32, val_mode="slide").eval()
    images = torch.zeros(2, 3, 48, 80, dtype=torch.uint8)
    images[0] = torch.randint(0, 256, (3, 48, 80), dtype=torch.uint8)
    images[1, :, :40, :70] = torch.randint(0, 256, (3, 40, 70), dtype=torch.uint8)
    mask = torch.randint(0, 3, (2, 48, 80))
    mask[1, 40:] = 255
    mask[1, :, 70:] = 255
    with torch.no_grad():
        logits = m.slide(images, [(48, 80), (40, 70)], mask.shape[-2:])
        ref = slide_logits(lambda x: m(x)[0], images[1:, :, :40, :70], (32, 32), (21, 21))
    assert logits.shape == (2, 3, 48, 80)
    assert torch.allclose(logits[1, :, :40, :70], ref[0], atol=1e-5)


@pytest.mark.parametrize("flip", [True, "hv", "d4"])
@pytest.mark.parametrize("mode", ["whole", "slide"])
def test_flip_tta_flips_the_logits_back(mode, flip):
    """A per-pixel model is flip- and rotation-equivariant, so flip TTA must not change its output;
    a missing or wrong inverse would mirror or turn part of the averaged probabilities. The image
    is not square, so a quarter turn also has to swap the window / resize sides."""
    images = torch.randint(0, 256, (1, 3, 40, 60), dtype=torch.uint8)
    size = (40, 60) if mode == "whole" else (32, 24)
    prep = Preprocessing(size, (0.5,) * 3, (0.5,) * 3)
    plain = predict_probs(pixels_as_logits, images, prep, mode=mode)
    shapes = set()

    def recording(x):
        shapes.add(tuple(x.shape[-2:]))
        return pixels_as_logits(x)

    flipped = predict_probs(recording, images, prep, mode=mode, flip=flip)
    assert flipped.shape == plain.shape
    # turned views see the same windows of the image, turned
    assert shapes == ({size} if flip in (True, "hv") else {size, size[::-1]})
    assert torch.allclose(plain, flipped, atol=1e-5)
    assert not torch.allclose(plain, plain.flip(-1), atol=1e-3)  # the test image is not symmetric
    assert not torch.allclose(plain, plain.flip(-2), atol=1e-3)


def test_flip_views_are_distinct_and_invert():
    x = torch.arange(16.0).view(1, 1, 4, 4)  # no symmetry of the square maps it to itself
    for name, count in (("none", 1), ("h", 2), ("hv", 4), ("d4", 8)):
        views = flip_views(name)
        assert len(views) == count
        seen = [to_view(x, t, f) for t, f in views]
        assert all(not torch.equal(a, b) for i, a in enumerate(seen) for b in seen[i + 1:])
        assert all(torch.equal(from_view(v, t, f), x) for v, (t, f) in zip(seen, views, strict=True))
    assert flip_views(True) == flip_views("h") and flip_views(False) == flip_views(None) == flip_views("none")
    with pytest.raises(ValueError, match="flip must be one of"):
        flip_views("v")


def test_slide_averages_windows_whose_logits_near_the_float32_limit_without_overflow():
    # finite logits of a model on the edge of divergence: the overlap's sum (before it is divided by
    # the window count) was inf, so the averaged logits and every probability from them were NaN
    near_max = float(torch.finfo(torch.float32).max) * 0.9
    images = torch.zeros(1, 3, 50, 70, dtype=torch.uint8)
    out = slide_logits(lambda x: torch.full((x.shape[0], 2, *x.shape[-2:]), near_max), images, (32, 32), (21, 21))
    assert torch.isfinite(out).all() and torch.allclose(out, torch.full_like(out, near_max))
