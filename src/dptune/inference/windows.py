"""Whole-image and sliding-window prediction, with flip / rotation / multi-scale test-time augmentation.

``forward`` maps a model input (B, 3, h, w) to logits (B, C, h', w'); ``prepare(images, whole)``
turns uint8 (B, 3, h, w) images into that input: a whole image resized as the model's image
processor does (``whole``), a sliding window as it is (native crops, never resized or padded).
The predictor's ``prepare`` is its processor; without one the images are resized by the model's
``Preprocessing`` spec and go in as uint8 (dptune's module normalises them itself). One path: a
whole-image view at any test-time scale is the scaled image prepared whole, then flipped or
turned; a test-time scale resizes by the spec too. Every function returns float logits at the
input image's own resolution.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from dptune.preprocessing import Preprocessing

Forward = Callable[[torch.Tensor], torch.Tensor]
Prepare = Callable[[torch.Tensor, bool], torch.Tensor]


def spec_prepare(prep: Preprocessing | None) -> Prepare:
    """Without a processor: a whole image resized by ``prep`` (to the size its processor would
    give it), a window as it is; uint8 either way."""
    return lambda images, whole: prep.resize(images) if whole and prep is not None else images


def _resize_logits(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


# Test-time flips: each view is (quarter turns, horizontal flip). "h" is the usual left-right flip;
# "hv" adds the up-down flip and both (four views); "d4" is the eight symmetries of the square
# (rotations by 0/90/180/270 degrees, each with and without a flip) for imagery with no "up",
# such as aerial tiles trained with VerticalFlip + RandomRotate90.
FLIP_VIEWS: dict[str, tuple[tuple[int, bool], ...]] = {
    "none": ((0, False),),
    "h": ((0, False), (0, True)),
    "hv": ((0, False), (0, True), (2, True), (2, False)),  # (2, True) = up-down flip
    "d4": tuple((k, f) for k in range(4) for f in (False, True)),
}


def flip_views(flip: bool | str | None) -> tuple[tuple[int, bool], ...]:
    """The views of a ``flip`` setting: False/None/"none", True/"h", "hv" or "d4"."""
    key = "h" if flip is True else "none" if flip is None or flip is False else flip
    if key not in FLIP_VIEWS:
        raise ValueError(f"flip must be one of {', '.join(FLIP_VIEWS)}, got {flip!r}")
    return FLIP_VIEWS[key]


def to_view(x: torch.Tensor, turns: int, flipped: bool) -> torch.Tensor:
    x = torch.rot90(x, turns, dims=(-2, -1)) if turns else x
    return x.flip(-1) if flipped else x


def from_view(x: torch.Tensor, turns: int, flipped: bool) -> torch.Tensor:
    x = x.flip(-1) if flipped else x
    return torch.rot90(x, -turns, dims=(-2, -1)) if turns else x


def whole_logits(forward: Forward, images: torch.Tensor, prep: Preprocessing | None = None,
                 view: tuple[int, bool] = (0, False), prepare: Prepare | None = None) -> torch.Tensor:
    """The whole image prepared (``prepare(images, True)``, default: resized by ``prep`` as its
    processor does), turned / flipped as ``view`` (quarter turns, mirror), predicted, the logits
    turned back and upsampled to the input size."""
    h, w = images.shape[-2:]
    x = to_view((prepare or spec_prepare(prep))(images, True), *view)
    return _resize_logits(from_view(forward(x).float(), *view), (h, w))


def _starts(length: int, window: int, stride: int) -> list[int]:
    if length <= window:
        return [0]
    starts = list(range(0, length - window + 1, stride))
    if starts[-1] != length - window:
        starts.append(length - window)  # the last window ends at the border
    return starts


def slide_logits(
    forward: Forward, images: torch.Tensor, window: Sequence[int], stride: Sequence[int], batch: int = 8
) -> torch.Tensor:
    """Sliding windows of ``window`` at native resolution, logits of overlaps averaged.

    Images smaller than a window are padded (bottom/right) for the forward pass only.
    Windows are run ``batch`` at a time.
    """
    wh, ww = int(window[0]), int(window[1])
    b, _, h, w = images.shape
    ph, pw = max(h, wh), max(w, ww)
    if (ph, pw) != (h, w):
        images = F.pad(images, (0, pw - w, 0, ph - h))
    boxes = [(y, x) for y in _starts(ph, wh, int(stride[0])) for x in _starts(pw, ww, int(stride[1]))]
    count = images.new_zeros((1, 1, ph, pw), dtype=torch.float32)
    for y, x in boxes:
        count[:, :, y : y + wh, x : x + ww] += 1
    # each window's logits scaled down by a power of two at least the most windows over a pixel: their
    # sum cannot overflow where each is finite (finite logits near the float32 limit would sum to inf),
    # and scaling by a power of two is exact (down to float32's smallest normal numbers, ~1e-38, far
    # below any logit that matters), so the mean is the plain sum / count
    scale = 2.0 ** math.ceil(math.log2(float(count.max())))
    total = None
    for i in range(0, len(boxes), max(1, batch // b)):
        chunk = boxes[i : i + max(1, batch // b)]
        crops = torch.cat([images[:, :, y : y + wh, x : x + ww] for y, x in chunk])
        logits = _resize_logits(forward(crops).float(), (wh, ww)) / scale
        if total is None:
            total = logits.new_zeros((b, logits.shape[1], ph, pw))
        for k, (y, x) in enumerate(chunk):
            total[:, :, y : y + wh, x : x + ww] += logits[k * b : (k + 1) * b]
    return (total / count * scale)[:, :, :h, :w]


def predict_probs(
    forward: Forward,
    images: torch.Tensor,
    prep: Preprocessing,
    mode: str = "whole",
    stride: Sequence[int] | None = None,
    flip: bool | str = False,
    scales: Sequence[float] = (1.0,),
    prepare: Prepare | None = None,
) -> torch.Tensor:
    """Class probabilities at the input size by ``whole`` (the image prepared as its processor
    does) or ``slide`` (native windows of ``prep.size``), averaged over ``scales`` (the image
    rescaled first, by ``prep``) and the flips of ``flip`` (see ``FLIP_VIEWS``). ``prepare``: see
    the module's docstring (default ``spec_prepare(prep)``)."""
    prepare = prepare or spec_prepare(prep)
    h, w = images.shape[-2:]
    size = prep.size
    if mode == "slide" and stride is None:
        stride = [max(1, round(s * 2 / 3)) for s in size]
    views = flip_views(flip)
    out = None
    n = 0
    for scale in scales:
        # at least a pixel a side: a 1-pixel-tall image at 0.5 was resized to nothing (PIL: "must be > 0")
        scaled = images if scale == 1.0 else prep.resize(images, (max(1, round(h * scale)), max(1, round(w * scale))))
        for turns, flipped in views:
            if mode == "slide":
                # windows of the turned image: a quarter turn swaps the sides of the window and stride
                x = to_view(scaled, turns, flipped)
                window, step = (size[::-1], tuple(stride)[::-1]) if turns % 2 else (size, stride)
                logits = from_view(slide_logits(lambda v: forward(prepare(v, False)), x, window, step), turns, flipped)
            else:
                logits = whole_logits(forward, scaled, prep, (turns, flipped), prepare)
            logits = _resize_logits(logits, (h, w)).softmax(1)  # average probabilities across views
            out = logits if out is None else out + logits
            n += 1
    return out / n
