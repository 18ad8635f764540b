"""The segmentation + depth side of ``scripts/predict.py``: class masks, overlays and depth maps
from one forward pass of a joint model (a multitask ``.ckpt``, or an exported directory holding
``segmentation/`` and ``depth/``, whose identical backbones are tied back into one)."""

from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np
import torch

from dptune.models.source import is_joint_export


def load_joint(ref: str, device: str):
    """(joint model, image processor, label set, depth metadata)."""
    if is_joint_export(ref):  # each part as its own predictor reads it, the backbones tied back into one
        from dptune.depth_predictor import DepthPredictor
        from dptune.models.joint import JointDPT
        from dptune.predictor import Predictor

        seg, depth = Predictor.load(ref), DepthPredictor.load(ref)
        joint, processor, labels, meta = JointDPT(seg.model, depth.model), seg.processor, seg.labels, depth.meta
    else:
        from dptune.tasks.checkpoints import load_module

        module = load_module(ref)
        joint, processor, labels = module.model, module.image_processor(), module.label_set
        meta = module.checkpoint_meta.get("depth", {})
    return joint.eval().to(device), processor, labels, meta


def predict_both(args, paths: list[str]) -> int:
    from dptune.depth_predictor import _Outputs
    from dptune.tools.predict import overlay, readable_images, write_rgb
    from dptune.visualize import colorize_depth, depth_range

    joint, processor, labels, _ = load_joint(args.model, args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    failed: list[str] = []
    for path, image in readable_images(paths, "predicting masks and depth", failed):
        h, w = image.shape[:2]
        x = processor(images=image, return_tensors="pt")["pixel_values"].to(args.device)
        with torch.no_grad():
            logits, _, depth = joint(x)  # one backbone pass for both
        up = torch.nn.functional.interpolate(logits.float(), size=(h, w), mode="bilinear", align_corners=False)
        pred = up.argmax(1)[0].cpu().numpy().astype(np.uint8)
        metres = processor.post_process_depth_estimation(_Outputs(depth.float().cpu()), target_sizes=[(h, w)])
        metres = np.clip(metres[0]["predicted_depth"].numpy(), 0, None)
        stem = Path(path).stem
        cv2.imwrite(str(out / f"{stem}.png"), pred)
        write_rgb(out / f"{stem}_overlay.png", overlay(image, pred, labels, args.alpha))
        cv2.imwrite(str(out / f"{stem}_depth.png"), np.clip(np.round(metres * 1000), 0, 65535).astype(np.uint16))
        lo, hi = depth_range(metres)
        cv2.imwrite(str(out / f"{stem}_depth_color.png"), colorize_depth(metres, lo, hi)[..., ::-1])
    print(f"{len(paths) - len(failed)} masks and depth maps in {out} (<stem>_depth.png in millimetres)"
          + (f", {len(failed)} unreadable images" if failed else ""), file=sys.stdout)
    return 2 if failed else 0
