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

import numpy as np
import torch


def load_joint(ref: str, device: str, trust_remote_code: bool = False):
    """(segmentation predictor, depth predictor, the joint model that runs both heads on one
    backbone pass): each part loaded as its predictor reads it, the depth part then using the
    segmentation part's backbone (the two are the same weights)."""
    from dptune.inference.depth_predictor import DepthPredictor
    from dptune.inference.predictor import Predictor
    from dptune.models.joint import JointDPT

    seg = Predictor.load(ref, device, trust_remote_code=trust_remote_code)
    depth = DepthPredictor.load(ref, device, trust_remote_code=trust_remote_code)
    return seg, depth, JointDPT(seg.model, depth.model).eval()


@torch.no_grad()
def one_pass(joint, seg, depth, image: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(class indices, top-class probability, depth clipped at 0) of one image from one backbone pass:
    what ``seg.predict`` and ``depth.predict`` give for the whole image, one view."""
    from transformers.modeling_outputs import DepthEstimatorOutput

    h, w = image.shape[:2]
    x = seg.processor(images=image, return_tensors="pt", input_data_format="channels_last")["pixel_values"]
    x = x.to(seg.device)
    logits, _, raw = joint(x)
    up = torch.nn.functional.interpolate(logits.float(), size=(h, w), mode="bilinear", align_corners=False)[0]
    conf, pred = up.cpu().softmax(0).max(0)
    metres = depth.processor.post_process_depth_estimation(DepthEstimatorOutput(predicted_depth=raw.float().cpu()),
                                                           target_sizes=[(h, w)])[0]["predicted_depth"].numpy()
    metres = metres.reshape(h, w)  # the post-processing squeezes a map 1 pixel tall or wide
    return pred.numpy().astype(np.uint8), conf.numpy(), np.clip(metres, 0, None)


def predict_both(args, paths: list[str], stems: list[str]) -> int:
    """Masks and depth maps of ``paths`` into ``args.out`` (outputs named by ``stems``, see ``output_stems``)."""
    from dptune.tools.depth import (
        cloud_intrinsics,
        depth_encoding,
        depth_files,
        depth_views,
        mirror_note,
        warn_clipped,
        write_depth,
        write_depth_format,
    )
    from dptune.tools.masks import mask_files, write_masks
    from dptune.tools.outputs import failures, parse_scales, predict_each, prepare_out

    scales = parse_scales(args.scales)
    seg, depth, joint = load_joint(args.model, args.device, trust_remote_code=args.trust_remote_code)
    metric = depth.mode == "metric"
    k = cloud_intrinsics(args.intrinsics, metric)
    shared = args.mode == "whole" and scales == (1.0,) and args.flip == "none"
    if not shared:
        notes = [mirror_note(args.flip)] if args.flip != "none" else []
        print("note: --mode/--flip/--scales shape the masks; depth is predicted on the whole image at one scale"
              + "".join(f"; {n}" for n in notes), file=sys.stderr)
    enc, clipped = depth_encoding(depth), []
    planned = [f for s in stems for f in mask_files(s, args.confidence) + depth_files(s, enc, k)]
    out = prepare_out(args.out, planned, args.overwrite)
    words = write_depth_format(out, enc)

    def one(path: str, stem: str, image: np.ndarray) -> None:
        if shared:
            pred, conf, metres = one_pass(joint, seg, depth, image)
        else:
            pred, conf = seg.predict(image, mode=args.mode, flip=args.flip, scales=scales)
            metres = depth_views(depth, image, args.flip)
        write_masks(out, stem, image, pred, conf, seg.labels, args)
        if write_depth(out, stem, metres, image, enc, k):
            clipped.append(path)

    failed = predict_each(paths, stems, "predicting masks and depth", one)
    print(f"{len(paths) - len(failed)} masks and depth maps in {out} ({enc['file']}: {words}; depth_format.json)")
    warn_clipped(clipped, enc)
    return failures(failed, len(paths))
