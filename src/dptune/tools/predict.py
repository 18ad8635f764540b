"""Predict masks (segmentation models), depth maps (depth models) or both (segmentation + depth
models) for images.

    python scripts/predict.py --model OUT --images "photos/*.jpg" --out preds
    python scripts/predict.py --model DEPTH-OUT --images "frames/*.jpg" --out depth \
        --intrinsics ../shared/data/7scenes-kitchen/camera-intrinsics.txt
    python scripts/predict.py --model RUN/checkpoints/last.ckpt --images frame.jpg --out preds \
        --mode slide --flip --confidence --device cuda

For each image ``<stem>.png`` holds class indices (uint8, the model's id2label order),
``<stem>_overlay.png`` the prediction in the label colours blended on the image with a legend of
the classes present, and with ``--confidence`` ``<stem>_confidence.png`` the top-class
probability (black 0, white 1). Depth models: see ``dptune.tools.depth`` (16-bit depth PNGs in
millimetres, colourised maps, ``.ply`` point clouds with ``--intrinsics``; the whole image at one
scale, so ``--mode slide``, ``--scales`` and ``--confidence`` are refused; ``--flip`` averages the
left-right mirror). Segmentation + depth models write both sets of files and take every option:
``--mode``, ``--flip`` and ``--scales`` shape the masks as for a segmentation model, depth is the
depth model's (see ``dptune.tools.multitask``).
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import torch
from tqdm.auto import tqdm

from dptune.data.sources import read_image
from dptune.errors import ConfigError, DataError
from dptune.inference import FLIP_VIEWS
from dptune.labels import LabelSet

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def list_images(spec: str) -> list[str]:
    """A file, a folder (its images) or a glob."""
    if os.path.isdir(spec):
        return sorted(str(p) for p in Path(spec).iterdir() if p.suffix.lower() in IMAGE_EXTS)
    if os.path.isfile(spec):
        return [spec]
    found = sorted(glob.glob(spec, recursive=True))
    if not found:
        raise DataError(f"{spec}: no images found")
    return found


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


def readable_images(paths: list[str], desc: str, failed: list[str]) -> Iterator[tuple[str, np.ndarray]]:
    """(path, uint8 HxWx3 image) of each readable file, with a progress bar; an unreadable one is
    reported in one line and appended to ``failed``."""
    for path in tqdm(paths, desc=desc):
        try:
            yield path, read_image(path)
        except DataError as e:
            print(f"error: {e}", file=sys.stderr)
            failed.append(path)


def write_rgb(path: Path, rgb: np.ndarray) -> None:
    cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))


def write_masks(out: Path, stem: str, image: np.ndarray, pred: np.ndarray, conf: np.ndarray, labels: LabelSet,
                args: argparse.Namespace) -> None:
    """``<stem>.png``, ``<stem>_overlay.png`` and, with ``--confidence``, ``<stem>_confidence.png``."""
    cv2.imwrite(str(out / f"{stem}.png"), pred)
    write_rgb(out / f"{stem}_overlay.png", overlay(image, pred, labels, args.alpha))
    if args.confidence:
        cv2.imwrite(str(out / f"{stem}_confidence.png"), (conf * 255).round().astype(np.uint8))


SCALE_RANGE = (0.125, 4.0)  # beyond: views of a few pixels, or of a size no memory holds


def parse_scales(spec: str) -> tuple[float, ...]:
    """``--scales``: comma-separated factors within ``SCALE_RANGE``."""
    try:
        scales = tuple(float(s) for s in spec.split(","))
    except ValueError:
        scales = ()
    lo, hi = SCALE_RANGE
    if not scales or not all(lo <= s <= hi for s in scales):  # NaN and inf fail too
        raise ConfigError(f"--scales {spec!r}: give comma-separated factors from {lo:g} to {hi:g}, e.g. 0.75,1,1.25")
    return scales


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="dptune .ckpt or exported directory")
    ap.add_argument("--images", required=True, help="an image file, a folder or a glob")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--mode", choices=["whole", "slide"], default="whole",
                    help="masks: whole image or sliding windows (depth: whole image only)")
    ap.add_argument("--flip", nargs="?", const="h", default="none", choices=list(FLIP_VIEWS),
                    help="flip TTA: h, hv (also up-down) or d4 (also 90-degree turns); bare --flip = h. "
                         "Depth averages only the left-right mirror")
    ap.add_argument("--scales", default="1", help="masks: comma-separated scales to average (depth: 1 only)")
    ap.add_argument("--confidence", action="store_true", help="also write the top-class probability (masks)")
    ap.add_argument("--alpha", type=float, default=0.5, help="overlay opacity")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--intrinsics", help="depth and segmentation + depth models: fx,fy,cx,cy or a 3x3 camera "
                                         "matrix file; writes <stem>.ply")
    args = ap.parse_args(argv)
    from dptune.predictor import Predictor
    from dptune.tools.depth import model_task, predict_depth

    try:
        paths = list_images(args.images)
        task = model_task(args.model)
        if task == "depth":
            return predict_depth(args, paths)
        if task == "multitask":
            from dptune.tools.multitask import predict_both

            return predict_both(args, paths)
        scales = parse_scales(args.scales)
        if args.intrinsics:
            raise ConfigError("--intrinsics: point clouds need depth; this is a segmentation model")
        predictor = Predictor.load(args.model, args.device)
    except (DataError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    failed: list[str] = []
    for path, image in readable_images(paths, "predicting", failed):
        pred, conf = predictor.predict(image, mode=args.mode, flip=args.flip, scales=scales)
        write_masks(out, Path(path).stem, image, pred, conf, predictor.labels, args)
    print(f"{len(paths) - len(failed)} predictions in {out}" + (f", {len(failed)} unreadable images" if failed else ""))
    return 2 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
