"""The files a segmentation prediction is written as: class-index PNGs, colour overlays with a
legend of the classes present, and confidence maps."""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np

from dptune.labels import LabelSet
from dptune.tools.outputs import imwrite


def overlay(image: np.ndarray, pred: np.ndarray, labels: LabelSet, alpha: float = 0.5) -> np.ndarray:
    """The prediction in label colours blended on the image, a legend of present classes on the right."""
    color = labels.colorize(pred)
    blend = (image.astype(np.float32) * (1 - alpha) + color.astype(np.float32) * alpha).astype(np.uint8)
    present = [int(c) for c in np.unique(pred) if c < labels.num_classes]
    row = 22
    width = 16 + 9 * max((len(labels.names[c]) for c in present), default=4) + 30
    legend = np.full((max(blend.shape[0], row * len(present) + 10), width, 3), 255, np.uint8)
    for k, c in enumerate(present):
        y = 8 + k * row
        cv2.rectangle(legend, (8, y), (24, y + 14), tuple(int(v) for v in labels.colors[c]), -1)
        cv2.rectangle(legend, (8, y), (24, y + 14), (0, 0, 0), 1)
        cv2.putText(legend, labels.names[c], (30, y + 12), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    canvas = np.full((legend.shape[0], blend.shape[1] + width, 3), 255, np.uint8)
    canvas[: blend.shape[0], : blend.shape[1]] = blend
    canvas[:, blend.shape[1]:] = legend
    return canvas


def write_rgb(path: Path, rgb: np.ndarray) -> None:
    imwrite(path, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))


def mask_files(stem: str, confidence: bool) -> list[str]:
    """What ``write_masks`` writes for one input."""
    return [f"{stem}.png", f"{stem}_overlay.png"] + ([f"{stem}_confidence.png"] if confidence else [])


def write_masks(out: Path, stem: str, image: np.ndarray, pred: np.ndarray, conf: np.ndarray, labels: LabelSet,
                args: argparse.Namespace) -> None:
    """``<stem>.png``, ``<stem>_overlay.png`` and, with ``--confidence``, ``<stem>_confidence.png``."""
    imwrite(out / f"{stem}.png", pred)
    write_rgb(out / f"{stem}_overlay.png", overlay(image, pred, labels, args.alpha))
    if args.confidence:
        imwrite(out / f"{stem}_confidence.png", (conf * 255).round().astype(np.uint8))
