"""The depth side of ``scripts/evaluate.py``: AbsRel, SqRel, RMSE, RMSE log, log10, SILog and
delta < 1.25^k per image on valid pixels, averaged over images, on any folder of images and depth
maps (the model's alignment, evaluation crop and depth range unless given)."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import torch
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from dptune.data.depth import DepthFolderSource, eval_crop_mask
from dptune.data.depth_files import check_depth_size
from dptune.data.depth_values import check_split_depth
from dptune.errors import ConfigError, DataError, of_image
from dptune.metrics.depth import NAMES, DepthMetrics, check_range, valid_depth
from dptune.tools.depth import mirror_mean, mirror_note, refuse_segmentation_options
from dptune.tools.inputs import json_is_ours, refuse_output
from dptune.tools.outputs import write_text


def evaluate_depth(args) -> int:
    from dptune.inference.depth_predictor import DepthPredictor

    source = _source(args)
    predictor = DepthPredictor.load(args.model, args.device, trust_remote_code=args.trust_remote_code,
                                    backend=getattr(args, "backend", "torch"))
    align = args.alignment or predictor.meta.get("alignment") or ("none" if predictor.mode == "metric" else "lstsq")
    crop = args.eval_crop or predictor.meta.get("eval_crop") or "none"
    max_depth = args.max_depth if args.max_depth is not None else predictor.meta.get("max_depth")
    min_depth = args.min_depth if args.min_depth is not None else predictor.meta.get("min_depth") or 1e-3
    check_range(min_depth, max_depth, "--min-depth", "--max-depth")
    metric = DepthMetrics(min_depth, max_depth, None if align == "none" else align)
    if mirror_note(args.flip):
        print(f"note: {mirror_note(args.flip)}", file=sys.stderr)
    unscored = _score(args, source, predictor, metric, crop)
    where = f"ground truth inside [{min_depth:g}, {max_depth or math.inf:g}] m" + \
        (f" within the {crop} crop" if crop != "none" else "")
    if not int(metric.images):
        raise DataError(f"{args.depth}: no image had {where}: nothing was scored")
    if unscored:  # scored on fewer images than given: say which, never silently
        print(f"warning: {len(unscored)} of {len(source)} images had no {where} and are not scored "
              f"(first: {unscored[0]})", file=sys.stderr)
    scores = {k: float(v) for k, v in metric.compute().items()}
    print(f"{int(metric.images)} images, {predictor.mode} depth, alignment {align}, crop {crop}")
    print("  ".join(f"{k} {scores[k]:.4f}" for k in NAMES))
    if args.json:
        write_text(args.json, json.dumps({"model": args.model, "images": int(metric.images), "alignment": align,
                                          "eval_crop": crop, **scores}, indent=2) + "\n")
    return 0


def _source(args) -> DepthFolderSource:
    """The images and maps to score, the options checked first (nothing is loaded before)."""
    if not (args.images and args.depth):
        raise DataError("for a depth model give --images and --depth (a path template: {stem}, {name}, {dir} or {id}); "
                        "--depth-scale if the maps are not millimetres (16-bit) or metres (float)")
    if args.depth_scale is not None and not 0 < np.float32(args.depth_scale) < np.inf:  # maps are divided in float32
        raise ConfigError(f"--depth-scale must be a positive number of stored values per metre, got {args.depth_scale}")
    refuse_segmentation_options(args)  # they were ignored: the scores of --mode slide were the whole image's
    if getattr(args, "confusion", None):
        raise ConfigError(f"--confusion {args.confusion}: a depth model has no classes, so no confusion matrix "
                          "(--json writes its scores)")
    source = DepthFolderSource(args.root or ".", args.images, args.depth, args.depth_scale,
                               negative=getattr(args, "negative_depth", "error"))
    if getattr(args, "held_back", False):  # the export's held-back images only (evaluate --held-back)
        from dptune.export.held_back import keep_held_back

        source = keep_held_back(source, args.root or ".", args.model, "depth")
    if args.json:
        refuse_output(args.json, "--json", [*source.images, *source.depths], args, json_is_ours)
    return source


def _score(args, source: DepthFolderSource, predictor, metric: DepthMetrics, crop: str) -> list[str]:
    """Every image's prediction into ``metric``; the names of those with no valid pixel. A map in
    another unit than the split's stops the run, as training's pre-flight check does."""
    medians, unscored = {}, []
    with logging_redirect_tqdm():  # a reader's warning (a depth_scale against depth_format.json) on its own line
        for i in tqdm(range(len(source)), desc="evaluating"):
            image, gt, name = source.load(i)
            check_depth_size(name, image.shape[:2], gt)
            if (gt > 0).any():
                medians[i] = float(np.median(gt[gt > 0]))
            with of_image(source.name(i)):
                pred = torch.from_numpy(np.ascontiguousarray(mirror_mean(predictor, image, args.flip)))[None]
            gt_t = torch.from_numpy(gt)[None]
            valid = valid_depth(gt_t, metric.min_depth, metric.max_depth)
            mask = eval_crop_mask(gt.shape, crop)
            if mask is not None:
                valid &= torch.from_numpy(mask)[None]
            metric.update(pred, gt_t, valid)
            if not bool(valid.any()):
                unscored.append(source.name(i))
    _, problems = check_split_depth(args.depth, medians, source, lambda i: source.depths[i])
    odd = list(problems.values())
    if odd:
        raise DataError(odd[0] + (f" ({len(odd)} such maps; nothing was scored)" if len(odd) > 1
                                  else " (nothing was scored)"))
    return unscored
