"""The segmentation + depth side of ``scripts/predict.py``: class masks, overlays and depth maps
of a joint model (a multitask ``.ckpt``, or an exported directory holding ``segmentation/`` and
``depth/``), each task read by its own predictor, their backbones tied back into one.

Every option does what it does for a model of one task: ``--confidence`` writes the top-class
probability, ``--intrinsics`` the ``.ply`` point cloud; ``--mode slide``, ``--flip`` and
``--scales`` shape the masks as the segmentation predictor does, while depth stays the depth
predictor's whole image at one scale (``--flip`` averages its left-right mirror; see
``dptune.tools.depth``). Without those three, both come from one backbone pass.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch


def load_joint(ref: str, device: str):
    """(segmentation predictor, depth predictor, the joint model that runs both heads on one
    backbone pass): each part loaded as its predictor reads it, the depth part then using the
    segmentation part's backbone (the two are the same weights)."""
    from dptune.depth_predictor import DepthPredictor
    from dptune.models.joint import JointDPT
    from dptune.predictor import Predictor

    seg, depth = Predictor.load(ref, device), DepthPredictor.load(ref, device)
    return seg, depth, JointDPT(seg.model, depth.model).eval()


@torch.no_grad()
def one_pass(joint, seg, depth, image: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(class indices, top-class probability, depth clipped at 0) of one image from one backbone pass:
    what ``seg.predict`` and ``depth.predict`` give for the whole image, one view."""
    from transformers.modeling_outputs import DepthEstimatorOutput

    h, w = image.shape[:2]
    x = seg.processor(images=image, return_tensors="pt")["pixel_values"].to(seg.device)
    logits, _, raw = joint(x)
    up = torch.nn.functional.interpolate(logits.float(), size=(h, w), mode="bilinear", align_corners=False)[0]
    conf, pred = up.cpu().softmax(0).max(0)
    metres = depth.processor.post_process_depth_estimation(DepthEstimatorOutput(predicted_depth=raw.float().cpu()),
                                                           target_sizes=[(h, w)])[0]["predicted_depth"].numpy()
    return pred.numpy().astype(np.uint8), conf.numpy(), np.clip(metres, 0, None)


def predict_both(args, paths: list[str]) -> int:
    from dptune.tools.depth import (
        cloud_intrinsics,
        depth_encoding,
        depth_views,
        mirror_note,
        warn_clipped,
        write_depth,
        write_depth_format,
    )
    from dptune.tools.predict import parse_scales, readable_images, write_masks

    scales = parse_scales(args.scales)
    seg, depth, joint = load_joint(args.model, args.device)
    metric = depth.mode == "metric"
    k = cloud_intrinsics(args.intrinsics, metric)
    shared = args.mode == "whole" and scales == (1.0,) and args.flip == "none"
    if not shared:
        notes = [mirror_note(args.flip)] if args.flip != "none" else []
        print("note: --mode/--flip/--scales shape the masks; depth is predicted on the whole image at one scale"
              + "".join(f"; {n}" for n in notes), file=sys.stderr)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    failed: list[str] = []
    enc, clipped = depth_encoding(depth), []
    words = write_depth_format(out, enc)
    for path, image in readable_images(paths, "predicting masks and depth", failed):
        if shared:
            pred, conf, metres = one_pass(joint, seg, depth, image)
        else:
            pred, conf = seg.predict(image, mode=args.mode, flip=args.flip, scales=scales)
            metres = depth_views(depth, image, args.flip)
        stem = Path(path).stem
        write_masks(out, stem, image, pred, conf, seg.labels, args)
        if write_depth(out, stem, metres, image, enc, k):
            clipped.append(path)
    print(f"{len(paths) - len(failed)} masks and depth maps in {out} ({enc['file']}: {words}; depth_format.json)"
          + (f", {len(failed)} unreadable images" if failed else ""))
    warn_clipped(clipped, enc)
    return 2 if failed else 0
