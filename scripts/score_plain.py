"""Score an exported directory with plain ``transformers`` + numpy, no dptune import: what whoever
receives the model can run to check it. Each image goes through the directory's own image
processor, logits are upsampled bilinearly to the mask size, and a confusion matrix gives mIoU
(mean over classes present in the masks or the predictions).

    python scripts/score_plain.py OUT --images "../shared/data/camvid/val/*.jpg" \
        --masks "../shared/data/camvid/valannot/{stem}.png" --num-classes 11

Index masks only (values >= num-classes are ignored). Models exported with a Swinv2, BEiT or
DINOv2 backbone ship their class as ``modeling_dptune.py``, loaded with ``trust_remote_code``.
"""

from __future__ import annotations

import argparse
import glob
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir")
    ap.add_argument("--images", required=True, help="image glob")
    ap.add_argument("--masks", required=True, help="mask path template with {stem}")
    ap.add_argument("--num-classes", type=int, required=True)
    args = ap.parse_args()
    model = AutoModelForSemanticSegmentation.from_pretrained(args.model_dir, trust_remote_code=True).eval()
    proc = AutoImageProcessor.from_pretrained(args.model_dir)
    n = args.num_classes
    cm = np.zeros((n, n), np.int64)
    files = sorted(glob.glob(args.images))
    if not files:
        raise SystemExit(f"error: no images match {args.images}")
    for f in files:
        img = Image.open(f).convert("RGB")
        gt = np.asarray(Image.open(args.masks.format(stem=Path(f).stem)))
        with torch.no_grad():
            logits = model(**proc(images=img, return_tensors="pt")).logits
        up = torch.nn.functional.interpolate(logits, size=gt.shape[:2], mode="bilinear", align_corners=False)
        pred = up.argmax(1)[0].numpy()
        valid = gt < n
        cm += np.bincount(n * gt[valid].astype(np.int64) + pred[valid], minlength=n * n).reshape(n, n)
    inter = np.diag(cm)
    union = cm.sum(0) + cm.sum(1) - inter
    present = union > 0
    iou = np.where(present, inter / np.maximum(union, 1), np.nan)
    print(json.dumps({"images": len(files), "mIoU": round(float(np.nanmean(iou)), 4),
                      "pixel_acc": round(float(inter.sum() / cm.sum()), 4),
                      "IoU": [None if np.isnan(v) else round(float(v), 4) for v in iou]}))


if __name__ == "__main__":
    main()
