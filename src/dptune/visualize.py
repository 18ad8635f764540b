"""Validation pictures: colourised depth maps on a shared scale, depth panels, and the W&B images of
both tasks (class overlays, depth panels) that every task logs the same way."""

from __future__ import annotations

import cv2
import numpy as np


def depth_range(depth: np.ndarray) -> tuple[float, float]:
    """The 2nd-98th percentile of the valid (> 0) values: a colour scale robust to outliers."""
    valid = depth[depth > 0]
    if valid.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(valid, [2, 98])
    return float(lo), float(max(hi, lo + 1e-6))


def colorize_depth(depth: np.ndarray, lo: float, hi: float, invalid=(0, 0, 0)) -> np.ndarray:
    """HxW depth -> HxWx3 uint8 RGB (turbo colour map, near = warm), invalid (<= 0) pixels in ``invalid``."""
    scaled = np.clip((depth - lo) / (hi - lo), 0, 1)
    rgb = cv2.applyColorMap(((1 - scaled) * 255).astype(np.uint8), cv2.COLORMAP_TURBO)[..., ::-1].copy()
    rgb[depth <= 0] = invalid
    return rgb


def align_for_display(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """A relative (inverse-depth) prediction as metres for display: least-squares scale and shift
    of inverse depth against the valid ground truth."""
    valid = gt > 0
    if valid.sum() < 2:
        return pred
    a = np.stack([pred[valid], np.ones(valid.sum())], 1)
    scale, shift = np.linalg.lstsq(a, 1.0 / gt[valid], rcond=None)[0]
    return 1.0 / np.clip(scale * pred + shift, 1e-6, None)


def depth_panel(image: np.ndarray, gt: np.ndarray, pred: np.ndarray, relative: bool = False) -> np.ndarray:
    """image | ground truth | prediction | absolute error, ground truth and prediction on one
    colour scale (the ground truth's), the error on its own (invalid ground truth black)."""
    if relative:
        pred = align_for_display(pred, gt)
    lo, hi = depth_range(gt)
    err = np.where(gt > 0, np.abs(pred - gt), 0.0)
    err_hi = float(np.percentile(err[gt > 0], 98)) if (gt > 0).any() else 1.0
    err_rgb = cv2.applyColorMap((np.clip(err / max(err_hi, 1e-6), 0, 1) * 255).astype(np.uint8),
                                cv2.COLORMAP_INFERNO)[..., ::-1].copy()
    err_rgb[gt <= 0] = 0
    return np.concatenate([image, colorize_depth(gt, lo, hi), colorize_depth(pred, lo, hi), err_rgb], axis=1)


def overlay_images(samples: list[dict[str, np.ndarray]], names: list[str]) -> list:
    """W&B images of ``image`` with ``gt`` and ``pred`` class masks as toggleable overlays."""
    import wandb

    class_labels = dict(enumerate(names)) | {255: "ignore"}
    return [wandb.Image(s["image"], masks={"ground_truth": {"mask_data": s["gt"], "class_labels": class_labels},
                                           "prediction": {"mask_data": s["pred"], "class_labels": class_labels}})
            for s in samples]


def depth_images(samples: list[dict[str, np.ndarray]], relative: bool = False) -> list:
    """W&B images of depth panels from ``image``, ``gt`` and ``pred`` depth."""
    import wandb

    return [wandb.Image(depth_panel(s["image"], s["gt"], s["pred"], relative),
                        caption="image | ground truth | prediction | |error| (same colour scale)") for s in samples]


def log_iou_table(logger, names: list[str], iou: list[float], step: int, key: str = "val/per_class_IoU") -> None:
    rows = [[n, None if np.isnan(v) else float(v)] for n, v in zip(names, iou, strict=True)]
    logger.log_table(key, columns=["class", "IoU"], data=rows, step=step)
