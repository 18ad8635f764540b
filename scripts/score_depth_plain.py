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
model that learned nothing scores). A model whose config.json names code shipped with it
(``auto_map``) loads only with ``--trust-remote-code``.

    python scripts/score_depth_plain.py OUT --images "../shared/data/7scenes-kitchen/val/rgb/*.jpg" \
        --depth "../shared/data/7scenes-kitchen/val/depth/{stem}.png" --depth-scale 1000 --max-depth 10
"""

from __future__ import annotations

import argparse
import glob
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForDepthEstimation, PretrainedConfig


def remote_code_error(model_dir: str, trust: bool) -> str | None:
    """The one-line error when ``model_dir``'s config.json names code shipped with the model
    (``auto_map``, e.g. dptune's ``modeling_dptune.py`` for Swinv2/BEiT/DINOv2 backbones) and
    ``--trust-remote-code`` was not given: without it ``transformers`` would load its own class
    instead, silently leaving the backbone's weights unused. None when the model may load."""
    try:
        config, _ = PretrainedConfig.get_config_dict(model_dir)
    except (OSError, ValueError) as e:
        return f"error: {model_dir}: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}"
    auto_map = config.get("auto_map")
    if not auto_map or trust:
        return None
    refs = [r for v in auto_map.values() for r in (v if isinstance(v, (list, tuple)) else [v]) if r]
    files = sorted({r.split("--")[-1].rsplit(".", 1)[0] + ".py" for r in refs})  # "repo--module.Class" on the hub
    return (f"error: {model_dir}: config.json's auto_map loads code shipped with the model ({', '.join(files)}); "
            "read it, then pass --trust-remote-code to run it")


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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    ap.add_argument("model_dir")
    ap.add_argument("--images", required=True, help="image glob")
    ap.add_argument("--depth", required=True, help="depth path template with {stem}")
    ap.add_argument("--depth-scale", type=float, default=1000.0, help="stored value per metre (16-bit PNG)")
    ap.add_argument("--max-depth", type=float, default=10.0)
    ap.add_argument("--align", choices=["none", "median", "lstsq"], default="none",
                    help="per-image alignment of a relative model's inverse depth (none: metric depth)")
    ap.add_argument("--constant", action="store_true", help="score a constant prediction instead of the model")
    ap.add_argument("--trust-remote-code", action="store_true",
                    help="run the model code the directory ships (auto_map in its config.json: dptune's "
                         "modeling_dptune.py for Swinv2, BEiT and DINOv2 backbones); off by default")
    args = ap.parse_args(argv)
    if error := remote_code_error(args.model_dir, args.trust_remote_code):
        print(error, file=sys.stderr)
        return 2
    model = AutoModelForDepthEstimation.from_pretrained(args.model_dir, trust_remote_code=args.trust_remote_code).eval()
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
    if not per_image:
        print(f"error: no image matching {args.images} has ground truth in (0, {args.max_depth:g}] m", file=sys.stderr)
        return 2
    mean = {k: float(np.mean([m[k] for m in per_image])) for k in per_image[0]}
    print(json.dumps({"images": len(per_image), "processor": type(proc).__name__, "align": args.align,
                      "constant": args.constant, **mean}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
