"""Calibrated confidence for segmentation exports: temperature scaling (Guo et al., 2017).

One scalar ``T`` is fitted on validation images by minimising the negative log-likelihood of the
labelled pixels (ignore index 255 left out) under ``softmax(logits / T)``. It is then folded into the
classifier, the last 1x1 convolution of the segmentation head: ``W / T``, ``b / T``. Everything after
that convolution is linear (the head's bilinear upsampling, ``pipeline``'s resize) so the model
outputs ``logits / T`` exactly: the stock ``DPTForSemanticSegmentation``, ``pipeline("image-segmentation")``,
the ONNX graphs and ``predict``'s confidence maps all serve calibrated probabilities with no extra code.
``T > 0``, so every argmax of one view (every single-view mask) is unchanged; an average of several views'
probabilities (test-time augmentation) is not, and its masks can differ.

The expected calibration error (ECE: 15 equal-width confidence bins, |accuracy - confidence| weighted
by the bins' pixel counts, over labelled pixels) is measured before and after on held-back images."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

IGNORE = 255
PIXELS_PER_IMAGE = 20000  # labelled pixels sampled per image (fixed seed): memory stays small at any image size
BINS = 15


def classifier(model: nn.Module) -> nn.Conv2d:
    """The segmentation head's last convolution, the one that outputs the class logits."""
    n = model.config.num_labels
    convs = [m for m in model.head.modules() if isinstance(m, nn.Conv2d) and m.out_channels == n]
    if not convs:
        raise ValueError(f"no {n}-channel classifier convolution in {type(model.head).__name__}")
    return convs[-1]


def fold_temperature(model: nn.Module, temperature: float) -> None:
    """Divide the classifier's weight and bias by ``temperature`` in place (outputs ``logits / T``)."""
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    conv = classifier(model)
    with torch.no_grad():
        conv.weight.div_(temperature)
        if conv.bias is not None:
            conv.bias.div_(temperature)


def pixel_logits(logits: np.ndarray | torch.Tensor, mask: np.ndarray, rng: np.random.Generator,
                 per_image: int = PIXELS_PER_IMAGE) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, C) logits and (N,) labels of up to ``per_image`` labelled pixels of one image: ``logits``
    (1, C, h, w) upsampled (bilinear, as ``pipeline`` does) to the mask's size."""
    t = torch.as_tensor(logits, dtype=torch.float32)
    up = F.interpolate(t, size=mask.shape[:2], mode="bilinear", align_corners=False)[0]
    flat_mask = torch.from_numpy(mask.reshape(-1).astype(np.int64))
    idx = np.flatnonzero(mask.reshape(-1) != IGNORE)
    if len(idx) > per_image:
        idx = np.sort(rng.choice(idx, per_image, replace=False))
    idx_t = torch.from_numpy(idx)
    return up.reshape(up.shape[0], -1)[:, idx_t].T.contiguous(), flat_mask[idx_t]


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The ``T`` minimising the NLL of ``labels`` under ``softmax(logits / T)`` (log T optimised by
    L-BFGS; bounded to [0.05, 20])."""
    log_t = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=100, line_search_fn="strong_wolfe")
    x, y = logits.double(), labels

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x / log_t.double().exp(), y)
        loss.backward()
        return loss

    with torch.enable_grad():  # export runs under no_grad
        opt.step(closure)
    return float(log_t.detach().exp().clamp(0.05, 20.0))


def nll(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> float:
    return float(F.cross_entropy(logits.double() / temperature, labels))


def ece(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0, bins: int = BINS) -> float:
    """Expected calibration error of the top-1 confidence (equal-width bins)."""
    prob = torch.softmax(logits.double() / temperature, dim=1)
    conf, pred = prob.max(1)
    correct = (pred == labels).double()
    acc = ECEBins(bins)
    acc.add(conf, correct)
    return acc.value()


class ECEBins:
    """Expected calibration error gathered over images: per equal-width confidence bin, the pixel count
    and the sums of confidence and of correctness. Bin ``i`` holds confidences in ``[i/bins, (i+1)/bins)``,
    the last bin also 1.0 (``bucketize(..., right=True)`` on the inner edges)."""

    def __init__(self, bins: int = BINS) -> None:
        self.bins = bins
        self.edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
        self.count = torch.zeros(bins, dtype=torch.float64)
        self.conf = torch.zeros(bins, dtype=torch.float64)
        self.correct = torch.zeros(bins, dtype=torch.float64)

    def add(self, confidence: torch.Tensor, correct: torch.Tensor) -> None:
        confidence = confidence.double().reshape(-1)
        which = torch.bucketize(confidence, self.edges[1:-1], right=True)
        self.count += torch.bincount(which, minlength=self.bins).double()
        self.conf += torch.bincount(which, confidence, minlength=self.bins)
        self.correct += torch.bincount(which, correct.double().reshape(-1), minlength=self.bins)

    def value(self) -> float:
        n = float(self.count.sum())
        if not n:
            return float("nan")
        used = self.count > 0
        return float(((self.correct[used] - self.conf[used]).abs()).sum() / n)


def calibration_report(fit: tuple[torch.Tensor, torch.Tensor], held: tuple[torch.Tensor, torch.Tensor],
                       fit_images: int, held_images: int) -> dict:
    """Fit ``T`` on ``fit`` pixels and score NLL / ECE before and after on ``held`` pixels."""
    t = fit_temperature(*fit)
    return {"temperature": t, "fitted_on_images": fit_images, "held_back_images": held_images,
            "held_back_pixels": int(held[1].numel()), "ece_before": ece(*held), "ece_after": ece(*held, t),
            "nll_before": nll(*held), "nll_after": nll(*held, t), "bins": BINS}
