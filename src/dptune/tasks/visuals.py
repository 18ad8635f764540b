"""Validation pictures: colourised depth maps on a shared scale, depth panels, and the W&B images of
both tasks (class overlays, depth panels) that every task logs the same way."""

from __future__ import annotations

import os
import tempfile

import cv2
import numpy as np

MIN_SPAN = 0.5  # a colour scale spans at least this fraction of the median depth


def depth_range(depth: np.ndarray, min_span: float = MIN_SPAN) -> tuple[float, float]:
    """The colour scale of a depth map: the 2nd-98th percentile of its valid (> 0) values (robust to
    outliers), widened about its middle to at least ``min_span`` x the median depth, so that a
    near-constant map (a wall, a model that predicts one depth everywhere) shows as nearly one colour
    instead of its noise stretched over the whole colour map."""
    # in float64: the median of float32 values near the float32 limit overflows (an "inf m" scale)
    valid = depth[np.isfinite(depth) & (depth > 0)].astype(np.float64)
    if valid.size == 0:
        return 0.0, 1.0
    lo, hi = (float(v) for v in np.percentile(valid, [2, 98]))
    span = max(hi - lo, min_span * float(np.median(valid)), 1e-6)
    lo = max((lo + hi - span) / 2, 0.0)
    return lo, lo + span


def _turbo(scaled: np.ndarray) -> np.ndarray:
    """0-1 -> RGB uint8, 0 (near) warm, 1 (far) cold."""
    return cv2.applyColorMap(((1 - np.clip(scaled, 0, 1)) * 255).astype(np.uint8), cv2.COLORMAP_TURBO)[..., ::-1].copy()


def _inferno(scaled: np.ndarray) -> np.ndarray:
    return cv2.applyColorMap((np.clip(scaled, 0, 1) * 255).astype(np.uint8), cv2.COLORMAP_INFERNO)[..., ::-1].copy()


def _value(v: float, units: str) -> str:
    digits = 2 if abs(v) < 10 else 1 if abs(v) < 100 else 0
    return f"{v:.{digits}f} {units}".rstrip()


def color_bar(height: int, lo: float, hi: float, units: str = "m", cmap=_turbo) -> np.ndarray:
    """A vertical colour bar for the scale ``lo``-``hi`` (``hi`` at the top), its two ends labelled with
    their values in ``units``, on white: HxWx3 uint8 to put beside a picture of the same height."""
    scale = float(np.clip(height / 400, 0.3, 0.8))
    labels = [_value(hi, units), _value(lo, units)]
    (tw, th), base = max((cv2.getTextSize(t, cv2.FONT_HERSHEY_SIMPLEX, scale, 1) for t in labels), key=lambda x: x[0][0])
    bar_w, pad = max(8, height // 24), 3
    out = np.full((height, pad + bar_w + pad + tw + pad, 3), 255, np.uint8)
    out[:, pad:pad + bar_w] = cmap(np.linspace(1, 0, height)[:, None].repeat(bar_w, 1))
    x = pad + bar_w + pad
    cv2.putText(out, labels[0], (x, min(height - 1, th + 1)), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(out, labels[1], (x, max(th, height - 1 - base)), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 1,
                cv2.LINE_AA)
    return out


def colorize_depth(depth: np.ndarray, lo: float, hi: float, invalid=(0, 0, 0), colorbar: bool = True,
                   units: str = "m") -> np.ndarray:
    """HxW depth -> HxWx3 uint8 RGB (turbo colour map, near = warm), invalid (<= 0) pixels in ``invalid``;
    with ``colorbar`` a bar on the right giving the scale, ``lo`` and ``hi`` written at its ends in ``units``."""
    rgb = _turbo((depth - lo) / (hi - lo))
    rgb[~(depth > 0)] = invalid
    return np.concatenate([rgb, color_bar(depth.shape[0], lo, hi, units)], axis=1) if colorbar else rgb


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
    """image | ground truth | prediction + colour bar | absolute error + colour bar: ground truth and
    prediction on one colour scale, the ground truth's (a prediction's own noise is never stretched),
    the error on its own (invalid ground truth black)."""
    if relative:
        pred = align_for_display(pred, gt)
    lo, hi = depth_range(gt)
    err = np.where(gt > 0, np.abs(pred - gt), 0.0)
    err_hi = max(float(np.percentile(err[gt > 0], 98)) if (gt > 0).any() else 1.0, 1e-6)
    err_rgb = _inferno(err / err_hi)
    err_rgb[gt <= 0] = 0
    return np.concatenate([image, colorize_depth(gt, lo, hi, colorbar=False), colorize_depth(pred, lo, hi),
                           err_rgb, color_bar(gt.shape[0], 0.0, err_hi, "m", _inferno)], axis=1)


# Pictures (photos, depth panels) go to W&B as JPEG: PNG encoding of the four 480 x 2766 depth panels took
# 0.8 s at every validation, 17 of the 270 s of a 7-Scenes run (docs/benchmarks.md, "Validation cost").
# Written here at quality 90 with full colour resolution: W&B's own JPEG (quality 75, halved colour)
# put coloured halos around missing depth and blurred the colour scale. Class masks stay PNG (W&B
# writes them itself): a class index must survive exactly.
JPEG_OPTIONS = {"quality": 90, "subsampling": 0}


JPEG_MAX_SIDE = 65500  # JPEG's largest width or height


def _jpeg(picture: np.ndarray, folder: str) -> str | np.ndarray:
    """``picture`` (HxWx3 uint8) written as a JPEG file in ``folder``: its path; the picture itself (W&B
    writes it as PNG) where JPEG cannot hold it (a side over 65500 px) or the write fails."""
    if max(picture.shape[:2]) > JPEG_MAX_SIDE:
        return picture
    fd, path = tempfile.mkstemp(suffix=".jpg", dir=folder)
    os.close(fd)
    written = cv2.imwrite(path, cv2.cvtColor(np.ascontiguousarray(picture), cv2.COLOR_RGB2BGR),
                          [cv2.IMWRITE_JPEG_QUALITY, JPEG_OPTIONS["quality"], cv2.IMWRITE_JPEG_SAMPLING_FACTOR,
                           cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444])
    return path if written else picture


def overlay_images(samples: list[dict[str, np.ndarray]], names: list[str], folder: str) -> list:
    """W&B images of ``image`` with ``gt`` and ``pred`` class masks as toggleable overlays (the photos
    written to ``folder``, which must last until the images are logged)."""
    import wandb

    class_labels = dict(enumerate(names)) | {255: "ignore"}
    return [wandb.Image(_jpeg(s["image"], folder),
                        masks={"ground_truth": {"mask_data": s["gt"], "class_labels": class_labels},
                               "prediction": {"mask_data": s["pred"], "class_labels": class_labels}})
            for s in samples]


def depth_images(samples: list[dict[str, np.ndarray]], folder: str, relative: bool = False) -> list:
    """W&B images of depth panels from ``image``, ``gt`` and ``pred`` depth (written to ``folder``,
    which must last until the images are logged)."""
    import wandb

    return [wandb.Image(_jpeg(depth_panel(s["image"], s["gt"], s["pred"], relative), folder),
                        caption="image | ground truth | prediction (the ground truth's colour scale, in metres) | |error|")
            for s in samples]


def log_iou_table(logger, names: list[str], iou: list[float], step: int, key: str = "val/per_class_IoU") -> None:
    rows = [[n, None if np.isnan(v) else float(v)] for n, v in zip(names, iou, strict=True)]
    logger.log_table(key, columns=["class", "IoU"], data=rows, step=step)


# ---------------------------------------------------------------------- a validation batch's samples
def _image_at(batch: dict, b: int, h: int, w: int, native: bool = False) -> np.ndarray:
    """Sample ``b``'s image (HxWx3 uint8) at its label size ``h`` x ``w``: cropped out of the batch's
    padding (``native``: images at native size, sliding-window validation) or resized back from
    ``image_size`` (whole-image validation)."""
    image = batch["image"][b, :, :h, :w] if native else batch["image"][b]
    image = image.permute(1, 2, 0).cpu().numpy()
    return image if image.shape[:2] == (h, w) else cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)


def segmentation_samples(batch: dict, preds, n: int, native: bool = False) -> list[dict[str, np.ndarray]]:
    """Image, ground truth and predicted classes of a batch's first ``n`` samples, at the label size."""
    samples = []
    for b in range(min(n, batch["image"].shape[0])):
        h, w = batch["sizes"][b]
        samples.append({"image": _image_at(batch, b, h, w, native),
                        "gt": batch["mask"][b, :h, :w].cpu().numpy().astype(np.uint8),
                        "pred": preds[b, :h, :w].cpu().numpy().astype(np.uint8)})
    return samples


def depth_samples(batch: dict, preds, n: int) -> list[dict[str, np.ndarray]]:
    """Image, ground truth and predicted depth of a batch's first ``n`` samples, at the label size."""
    samples = []
    for b in range(min(n, batch["image"].shape[0])):
        h, w = batch["sizes"][b]
        samples.append({"image": _image_at(batch, b, h, w), "gt": batch["depth"][b, :h, :w].cpu().numpy(),
                        "pred": preds[b, :h, :w].float().cpu().numpy()})
    return samples


def joint_samples(batch: dict, outputs: dict, n: int) -> list[dict]:
    """A segmentation + depth batch's samples: ``seg`` and/or ``depth`` parts, whichever the batch's
    source labels (``outputs`` holds ``preds`` for classes, ``depth`` for depth)."""
    seg = segmentation_samples(batch, outputs["preds"], n) if "preds" in outputs else None
    depth = depth_samples(batch, outputs["depth"], n) if "depth" in outputs else None
    count = len(seg if seg is not None else depth if depth is not None else [])
    samples = []
    for b in range(count):
        sample: dict = {"image": (seg or depth)[b]["image"]}
        if seg is not None:
            sample["seg"] = seg[b]
        if depth is not None:
            sample["depth"] = depth[b]
        samples.append(sample)
    return samples


def log_validation_images(logger, step: int, names: list[str] | None = None, iou: list[float] | None = None,
                          seg: list[dict] | None = None, depth: list[dict] | None = None,
                          relative: bool = False) -> None:
    """One validation's W&B pictures: the per-class IoU table (``names``, ``iou``), class overlays
    of the ``seg`` samples, depth panels of the ``depth`` samples."""
    if iou:
        log_iou_table(logger, names, iou, step)
    if not seg and not depth:
        return
    with tempfile.TemporaryDirectory(prefix="dptune-pictures-") as folder:  # W&B copies the files when it logs
        images = {**({"val/overlays": overlay_images(seg, names, folder)} if seg else {}),
                  **({"val/depth": depth_images(depth, folder, relative)} if depth else {})}
        logger.experiment.log({**images, "trainer/global_step": step})
