"""Score an exported depth model with plain ``transformers`` + numpy, no dptune import: what whoever
receives the model can run to check it. Each image goes through the directory's own image
processor (whichever backend ``AutoImageProcessor`` resolves to), ``predicted_depth`` is upsampled
to the ground truth's size by the processor's own ``post_process_depth_estimation`` (what
``pipeline("depth-estimation")`` does: bicubic), and the standard metrics are computed per image on pixels
with ground truth (> 0, at most ``--max-depth``), then averaged over images. Metric depth is scored
as it is (``--align none``, default); a relative model's output (affine-invariant inverse depth) is
first aligned per image: ``--align lstsq`` fits scale and shift of its inverse depth by least
squares (MiDaS's protocol), ``--align median`` scales its depth (1 / output) to the ground truth's
median. Predictions are clipped to [1e-3, max depth] as the usual protocol does. ``--constant``
scores a prediction that is the same everywhere instead of the model (with alignment: what a
model that learned nothing scores).

    python scripts/score_depth_plain.py OUT --images "../shared/data/7scenes-kitchen/val/rgb/*.jpg" \
        --depth "../shared/data/7scenes-kitchen/val/depth/{stem}.png" --depth-scale 1000 --max-depth 10
"""

from __future__ import annotations

import argparse
import glob
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForDepthEstimation


def metrics(pred: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    ratio = np.maximum(pred / gt, gt / pred)
    log_diff = np.log(pred) - np.log(gt)
    return {
        "abs_rel": float(np.mean(np.abs(pred - gt) / gt)),
        "sq_rel": float(np.mean((pred - gt) ** 2 / gt)),
        "rmse": float(np.sqrt(np.mean((pred - gt) ** 2))),
        "rmse_log": float(np.sqrt(np.mean(log_diff**2))),
        "log10": float(np.mean(np.abs(np.log10(pred) - np.log10(gt)))),
        "silog": float(np.sqrt(max(np.mean(log_diff**2) - np.mean(log_diff) ** 2, 0)) * 100),
        "delta1": float(np.mean(ratio < 1.25)),
        "delta2": float(np.mean(ratio < 1.25**2)),
        "delta3": float(np.mean(ratio < 1.25**3)),
    }


def align(pred: np.ndarray, gt: np.ndarray, how: str) -> np.ndarray:
    """Per-image alignment of a relative output (inverse depth) to metric ground truth, as depth."""
    if how == "median":
        depth = 1.0 / np.clip(pred, 1e-8, None)
        return depth * np.median(gt) / np.median(depth)
    a = np.stack([pred, np.ones_like(pred)], 1)
    scale, shift = np.linalg.lstsq(a, 1.0 / gt, rcond=None)[0]
    return 1.0 / np.clip(scale * pred + shift, 1e-8, None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir")
    ap.add_argument("--images", required=True, help="image glob")
    ap.add_argument("--depth", required=True, help="depth path template with {stem}")
    ap.add_argument("--depth-scale", type=float, default=1000.0, help="stored value per metre (16-bit PNG)")
    ap.add_argument("--max-depth", type=float, default=10.0)
    ap.add_argument("--align", choices=["none", "median", "lstsq"], default="none",
                    help="per-image alignment of a relative model's inverse depth (none: metric depth)")
    ap.add_argument("--constant", action="store_true", help="score a constant prediction instead of the model")
    args = ap.parse_args()
    model = AutoModelForDepthEstimation.from_pretrained(args.model_dir).eval()
    proc = AutoImageProcessor.from_pretrained(args.model_dir)
    files = sorted(glob.glob(args.images))
    per_image = []
    for f in files:
        img = Image.open(f).convert("RGB")
        gt = np.asarray(Image.open(args.depth.format(stem=Path(f).stem))).astype(np.float64) / args.depth_scale
        with torch.no_grad():
            outputs = model(**proc(images=img, return_tensors="pt"))
        up = proc.post_process_depth_estimation(outputs, target_sizes=[gt.shape])[0]["predicted_depth"]
        up = up.double().numpy()
        valid = (gt > 0) & (gt <= args.max_depth)
        if args.constant:
            up = np.ones_like(up)
        if valid.any():
            pred = up[valid] if args.align == "none" else align(up[valid], gt[valid], args.align)
            per_image.append(metrics(np.clip(pred, 1e-3, args.max_depth), gt[valid]))
    mean = {k: float(np.mean([m[k] for m in per_image])) for k in per_image[0]}
    print(json.dumps({"images": len(per_image), "processor": type(proc).__name__, "align": args.align,
                      "constant": args.constant, **mean}))


if __name__ == "__main__":
    main()
