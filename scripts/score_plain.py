"""Score an exported directory with plain ``transformers`` + numpy, no dptune import: what whoever
receives the model can run to check it. Each image goes through the directory's own image
processor (by default whichever backend ``AutoImageProcessor`` resolves to: torchvision when it is
installed; ``--backend pil|torchvision`` forces one), logits are upsampled bilinearly to the mask
size, and a confusion matrix gives mIoU (mean over classes present in the masks or the predictions).

    python scripts/score_plain.py OUT --images "../shared/data/camvid/val/*.jpg" \
        --masks "../shared/data/camvid/valannot/{stem}.png" --num-classes 11

    # Dubai: colour-coded masks, whole image and square sliding windows at native resolution
    python scripts/score_plain.py OUT --images "../shared/data/dubai-aerial/Tile 6/images/*.jpg" \
        --masks "../shared/data/dubai-aerial/Tile 6/masks/{stem}.png" --num-classes 6 \
        --colors ../shared/data/dubai-aerial/labels.yaml --mode both

Index masks (values >= num-classes are ignored), or RGB colour-coded masks with ``--colors``
(a labels.yaml whose ``colors`` list gives class i's colour; other colours are ignored).
``--mode slide`` runs windows of the processor's size over the image at its own resolution
(stride 2/3 of a window, bottom/right windows flush with the edge, logits averaged where they
overlap), normalised with the processor's mean and std. Models exported with a Swinv2, BEiT or
DINOv2 backbone ship their class as ``modeling_dptune.py``: pass ``--trust-remote-code`` to run it
(refused without it: plain ``transformers`` would load its own class and leave the backbone unused).
"""

from __future__ import annotations

import argparse
import glob
import json
import sys
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation, PretrainedConfig


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


def read_gt(path: str, n: int, colors: list | None) -> np.ndarray:
    if colors is None:
        return np.asarray(Image.open(path)).astype(np.int64)
    rgb = np.asarray(Image.open(path).convert("RGB")).astype(np.int64)
    key = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    gt = np.full(key.shape, n, np.int64)  # n = not a class: ignored
    for i, (r, g, b) in enumerate(colors):
        gt[key == (r << 16 | g << 8 | b)] = i
    return gt


def starts(length: int, window: int, stride: int) -> list[int]:
    last = max(length - window, 0)
    return sorted(set(range(0, last + 1, stride)) | {last})


def slide_logits(model, proc, img: Image.Image) -> torch.Tensor:
    size = proc.size["height"], proc.size["width"]
    mean = torch.tensor(proc.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(proc.image_std).view(1, 3, 1, 1)
    x = (torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].float() / 255 - mean) / std
    h, w = x.shape[-2:]
    pad_h, pad_w = max(size[0] - h, 0), max(size[1] - w, 0)
    x = torch.nn.functional.pad(x, (0, pad_w, 0, pad_h))
    total, count = None, torch.zeros(1, 1, h + pad_h, w + pad_w)
    for y in starts(h + pad_h, size[0], round(size[0] * 2 / 3)):
        for x0 in starts(w + pad_w, size[1], round(size[1] * 2 / 3)):
            with torch.no_grad():
                lg = model(pixel_values=x[:, :, y:y + size[0], x0:x0 + size[1]]).logits
            lg = torch.nn.functional.interpolate(lg, size=size, mode="bilinear", align_corners=False)
            total = torch.zeros(1, lg.shape[1], *count.shape[-2:]) if total is None else total
            total[:, :, y:y + size[0], x0:x0 + size[1]] += lg
            count[:, :, y:y + size[0], x0:x0 + size[1]] += 1
    return (total / count)[:, :, :h, :w]


def scores(cm: np.ndarray) -> dict:
    inter = np.diag(cm)
    union = cm.sum(0) + cm.sum(1) - inter
    iou = np.where(union > 0, inter / np.maximum(union, 1), np.nan)
    return {"mIoU": round(float(np.nanmean(iou)), 4), "pixel_acc": round(float(inter.sum() / cm.sum()), 4),
            "IoU": [None if np.isnan(v) else round(float(v), 4) for v in iou]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    ap.add_argument("model_dir")
    ap.add_argument("--images", required=True, help="image glob")
    ap.add_argument("--masks", required=True, help="mask path template with {stem}")
    ap.add_argument("--num-classes", type=int, required=True)
    ap.add_argument("--colors", help="labels.yaml with a colors list: the masks are RGB colour codes")
    ap.add_argument("--mode", choices=["whole", "slide", "both"], default="whole")
    ap.add_argument("--backend", choices=["auto", "pil", "torchvision"], default="auto",
                    help="DPTImageProcessor backend (auto: what AutoImageProcessor picks here: torchvision if installed)")
    ap.add_argument("--trust-remote-code", action="store_true",
                    help="run the model code the directory ships (auto_map in its config.json: dptune's "
                         "modeling_dptune.py for Swinv2, BEiT and DINOv2 backbones); off by default")
    args = ap.parse_args(argv)
    if error := remote_code_error(args.model_dir, args.trust_remote_code):
        print(error, file=sys.stderr)
        return 2
    model = AutoModelForSemanticSegmentation.from_pretrained(args.model_dir,
                                                             trust_remote_code=args.trust_remote_code).eval()
    proc = AutoImageProcessor.from_pretrained(args.model_dir, **({} if args.backend == "auto" else {"backend": args.backend}))
    n = args.num_classes
    colors = yaml.safe_load(open(args.colors))["colors"] if args.colors else None
    modes = ["whole", "slide"] if args.mode == "both" else [args.mode]
    cms = {m: np.zeros((n, n), np.int64) for m in modes}
    files = sorted(glob.glob(args.images))
    if not files:
        print(f"error: no images match {args.images}", file=sys.stderr)
        return 2
    for f in files:
        img = Image.open(f).convert("RGB")
        gt = read_gt(args.masks.format(stem=Path(f).stem), n, colors)
        valid = gt < n
        for mode in modes:
            if mode == "whole":
                with torch.no_grad():
                    logits = model(**proc(images=img, return_tensors="pt")).logits
                logits = torch.nn.functional.interpolate(logits, size=gt.shape[:2], mode="bilinear",
                                                         align_corners=False)
            else:
                logits = slide_logits(model, proc, img)
            pred = logits.argmax(1)[0].numpy()
            cms[mode] += np.bincount(n * gt[valid] + pred[valid], minlength=n * n).reshape(n, n)
    for mode in modes:
        print(json.dumps({"images": len(files), "mode": mode, "processor": type(proc).__name__, **scores(cms[mode])}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
