"""Export a dptune checkpoint to a directory plain ``transformers`` loads (and serves)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def export_checkpoint(ckpt: str | Path, out_dir: str | Path) -> Path:
    """Write ``model.safetensors`` + ``config.json`` (id2label) + ``preprocessor_config.json``.

    The image processor carries the size and normalisation the model was validated with, so
    ``AutoImageProcessor.from_pretrained(out_dir)`` reproduces dptune's validation input.
    """
    from dptune.module import load_module

    module = load_module(str(ckpt))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = module.model
    model.config.architectures = ["DPTForSemanticSegmentation"]
    model.save_pretrained(out, safe_serialization=True)
    module.image_processor().save_pretrained(out)
    log.info("exported %s -> %s (%d classes)", ckpt, out, module.num_classes)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("checkpoint", help="dptune Lightning checkpoint (.ckpt)")
    parser.add_argument("out_dir", help="output directory (created if missing)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not Path(args.checkpoint).is_file():
        print(f"error: {args.checkpoint}: checkpoint not found", file=sys.stderr)
        return 2
    try:
        with torch.no_grad():
            out = export_checkpoint(args.checkpoint, args.out_dir)
    except (ValueError, OSError, KeyError) as e:
        print(f"error: {args.checkpoint}: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
