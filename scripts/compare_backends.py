"""Compare the PIL and torchvision backends of an exported segmentation model's image processor:
how much the resized inputs differ and how many predicted pixels change class. Plain
``transformers`` only; needs torchvision installed (``AutoImageProcessor`` picks it by default then).
A model whose config.json names code shipped with it (``auto_map``: dptune's Swinv2, BEiT and DINOv2
exports) loads only with ``--trust-remote-code``.

    python scripts/compare_backends.py OUT --images "../shared/data/camvid/val/*.jpg"
"""

from __future__ import annotations

import argparse
import glob
import sys

import torch
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    ap.add_argument("model_dir")
    ap.add_argument("--images", required=True, help="image glob")
    ap.add_argument("--trust-remote-code", action="store_true",
                    help="run the model code the directory ships (auto_map in its config.json: dptune's "
                         "modeling_dptune.py for Swinv2, BEiT and DINOv2 backbones); off by default")
    args = ap.parse_args(argv)
    if error := remote_code_error(args.model_dir, args.trust_remote_code):
        print(error, file=sys.stderr)
        return 2
    model = AutoModelForSemanticSegmentation.from_pretrained(args.model_dir,
                                                             trust_remote_code=args.trust_remote_code).eval()
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
