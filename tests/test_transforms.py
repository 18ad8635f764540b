import numpy as np
import pytest
import torch
from transformers import DPTImageProcessorPil

from dptune.data.transforms import (
    RandomScaleCrop,
    build_transforms,
    default_train_transforms,
    resize_like_processor,
)
from dptune.labels import IGNORE_INDEX


def _sample(h=90, w=120, classes=5, seed=0):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    mask = rng.integers(0, classes, (h, w)).astype(np.uint8)
    mask[:5] = IGNORE_INDEX
    return image, mask


def test_default_pipeline_keeps_mask_values_and_fills_255():
    image, mask = _sample()
    pipe = build_transforms(default_train_transforms((128, 128), (0.5, 2.0), None), seed=0)
    saw_padding = False
    for _ in range(30):
        out = pipe(image=image, mask=mask)
        assert out["image"].shape == (128, 128, 3) and out["image"].dtype == np.uint8
        assert out["mask"].shape == (128, 128)
        assert set(np.unique(out["mask"])) <= set(np.unique(mask))  # nearest: no invented classes
        saw_padding |= bool((out["mask"] == IGNORE_INDEX).mean() > 0.3)
    assert saw_padding  # scales < 1 leave a 90x120 image smaller than the 128 crop


def test_scale_crop_pads_image_with_zero_and_mask_with_255():
    image = np.full((40, 40, 3), 200, np.uint8)
    mask = np.ones((40, 40), np.uint8)
    t = RandomScaleCrop(crop=(64, 64), scale=(1.0, 1.0))
    t.set_random_seed(0)
    out = t(image=image, mask=mask)
    pad = out["mask"] == IGNORE_INDEX
    assert pad.sum() == 64 * 64 - 40 * 40
    assert (out["image"][pad] == 0).all() and (out["image"][~pad] == 200).all()


def test_scale_crop_base_size_matches_evaluation_scale():
    # at scale 1 with base_size = crop size the crop is the whole (squashed) image
    image, mask = _sample(60, 120)
    t = RandomScaleCrop(crop=(32, 32), scale=(1.0, 1.0), base_size=(32, 32))
    t.set_random_seed(0)
    out = t(image=image, mask=mask)
    import cv2

    assert np.array_equal(out["mask"], cv2.resize(mask, (32, 32), interpolation=cv2.INTER_NEAREST_EXACT))
    assert np.array_equal(out["image"], cv2.resize(image, (32, 32), interpolation=cv2.INTER_AREA))


def test_scale_crop_cat_max_ratio_redraws_windows_dominated_by_one_class():
    # a 120x120 class-1 block in a 400x400 class-0 mask: a 100x100 window is balanced (class 0
    # under 75%) only where it overlaps the block by more than a quarter
    image = np.zeros((400, 400, 3), np.uint8)
    mask = np.zeros((400, 400), np.uint8)
    mask[:120, :120] = 1

    def balanced_share(ratio):
        t = RandomScaleCrop(crop=(100, 100), scale=(1.0, 1.0), cat_max_ratio=ratio)
        t.set_random_seed(0)
        share = [(t(image=image, mask=mask)["mask"] == 1).mean() for _ in range(400)]
        return np.mean([0.25 < s < 0.75 for s in share])

    plain, redrawn = balanced_share(1.0), balanced_share(0.75)
    assert plain < 0.1 and redrawn > 2.5 * plain
    with pytest.raises(ValueError, match="cat_max_ratio"):
        RandomScaleCrop(cat_max_ratio=0)


def test_yaml_pipeline_gets_255_fill_and_nearest_masks():
    pipe = build_transforms([{"name": "PadIfNeeded", "min_height": 64, "min_width": 64},
                             {"name": "Rotate", "limit": 30, "p": 1.0}], seed=0)
    image, mask = _sample(32, 32)
    mask[:] = 2
    out = pipe(image=image, mask=mask)
    assert set(np.unique(out["mask"])) <= {2, IGNORE_INDEX}
    assert (out["mask"] == IGNORE_INDEX).any()
    with pytest.raises(ValueError, match="nearest"):
        build_transforms([{"name": "Rotate", "mask_interpolation": 1}])
    with pytest.raises(ValueError, match="unknown transform"):
        build_transforms([{"name": "NoSuchThing"}])


def test_validation_resize_is_what_auto_image_processor_resolves_to_here(tmp_path):
    """AutoImageProcessor.from_pretrained(export) picks the torchvision backend whenever torchvision
    is installed; validation must resize like whichever it picks in this environment (this test runs
    in both kinds of environment: see docs/benchmarks.md)."""
    from transformers import AutoImageProcessor

    from dptune.preprocessing import processor_backend

    DPTImageProcessorPil(size={"height": 64, "width": 48}, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(
        tmp_path)
    auto = AutoImageProcessor.from_pretrained(tmp_path)
    assert ("Pil" in type(auto).__name__) == (processor_backend() == "pil")
    for h, w in [(90, 120), (400, 300), (33, 47)]:
        image, _ = _sample(h, w)
        ref = torch.as_tensor(auto(images=image, return_tensors="pt")["pixel_values"][0])
        ours = torch.from_numpy(resize_like_processor(image, (64, 48))).permute(2, 0, 1).float() / 255
        assert torch.allclose((ours - 0.5) / 0.5, ref, atol=1e-6), (h, w, ((ours - 0.5) / 0.5 - ref).abs().max())


def _coordinates(h=200, w=200):
    """An image whose red channel is each pixel's column and green its row, and a mask of the column: content
    that ties each label pixel to the image pixel it must sit on."""
    x = np.tile(np.arange(w, dtype=np.uint8), (h, 1))
    y = np.tile(np.arange(h, dtype=np.uint8)[:, None], (1, w))
    return np.stack([x, y, np.zeros_like(x)], -1), x.copy(), y.copy()


@pytest.mark.parametrize("spec", [
    [{"name": "RandomScaleCrop", "crop": [64, 64], "scale": [0.4, 0.4]}],  # shrinks 2.5x (area-averaged image)
    [{"name": "RandomScaleCrop", "crop": [64, 64], "scale": [1.7, 1.7]}],  # enlarges (bilinear image)
    [{"name": "Resize", "height": 64, "width": 64, "interpolation": 3}],
    [{"name": "LongestMaxSize", "max_size": 80, "interpolation": 3}],
    [{"name": "RandomResizedCrop", "size": [64, 64], "scale": [0.5, 0.5], "ratio": [1, 1], "interpolation": 3}],
])
def test_resizes_keep_the_mask_on_its_image_pixels(spec):
    """OpenCV's nearest resize samples at floor(i * scale), not at the pixel's centre, where the image's area
    and bilinear resizes take it: every resized mask sat (scale - 1) / 2 source pixels up and left of its image
    (0.75 px at the default pipeline's 2.5x shrink; a review). Masks are resized by the centred nearest
    neighbour (OpenCV's INTER_NEAREST_EXACT), which still invents no class."""
    image, mask, _ = _coordinates()
    pipe = build_transforms(spec, seed=0)
    for _ in range(5):
        out = pipe(image=image, mask=mask)
        inside = out["mask"] != IGNORE_INDEX
        offset = out["mask"][inside].astype(float) - out["image"][..., 0][inside].astype(float)
        assert abs(offset.mean()) < 0.3, (spec, offset.mean())
        assert set(np.unique(out["mask"][inside])) <= set(range(200))


def test_a_mask_interpolation_given_is_nearest_or_centred_nearest():
    """Masks hold class indices: nearest (0) or centred nearest (6) may be given, anything else is refused;
    warps whose albumentations class takes only OpenCV's first five flags keep nearest."""
    build_transforms([{"name": "Resize", "height": 8, "width": 8, "mask_interpolation": 0}])
    build_transforms([{"name": "Resize", "height": 8, "width": 8, "mask_interpolation": 6}])
    build_transforms([{"name": "Rotate", "limit": 10}, {"name": "Affine", "scale": 0.5}])
    with pytest.raises(ValueError, match="nearest"):
        build_transforms([{"name": "Resize", "height": 8, "width": 8, "mask_interpolation": 1}])
