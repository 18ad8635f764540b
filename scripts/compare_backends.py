"""Compare the PIL and torchvision backends of an exported segmentation model's image processor:
how much the resized inputs differ and how many predicted pixels change class. Plain
``transformers`` only; needs torchvision installed (``AutoImageProcessor`` picks it by default then).

    python scripts/compare_backends.py OUT --images "../shared/data/camvid/val/*.jpg"
"""

from __future__ import annotations

import argparse
import glob

import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir")
    ap.add_argument("--images", required=True, help="image glob")
    args = ap.parse_args()
    model = AutoModelForSemanticSegmentation.from_pretrained(args.model_dir).eval()
    pil = AutoImageProcessor.from_pretrained(args.model_dir, backend="pil")
    tv = AutoImageProcessor.from_pretrained(args.model_dir, backend="torchvision")
    std = torch.tensor(pil.image_std).view(1, 3, 1, 1)
    worst, differ, values, changed, total = 0.0, 0, 0, 0, 0
    for f in sorted(glob.glob(args.images)):
        img = Image.open(f).convert("RGB")
        a, b = (p(images=img, return_tensors="pt")["pixel_values"] for p in (pil, tv))
        levels = ((a - b).abs() * std * 255).round()  # back to grey levels of the resized uint8 image
        worst, differ, values = max(worst, levels.max().item()), differ + int((levels > 0).sum()), values + levels.numel()
        with torch.no_grad():
            masks = [torch.nn.functional.interpolate(model(pixel_values=x).logits, size=img.size[::-1],
                                                     mode="bilinear", align_corners=False).argmax(1) for x in (a, b)]
        changed, total = changed + int((masks[0] != masks[1]).sum()), total + masks[0].numel()
    print(f"input: max {worst:.0f} grey level(s) apart, {100 * differ / values:.2f}% of values differ; "
          f"masks: {100 * changed / total:.3f}% of pixels change class")


if __name__ == "__main__":
    main()
