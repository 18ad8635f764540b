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
    from dptune.inference.depth_predictor import resized_depth
    from dptune.metrics import require_finite

    h, w = image.shape[:2]
    x = seg.processor(images=image, return_tensors="pt", input_data_format="channels_last")["pixel_values"]
    x = x.to(seg.device)
    logits, _, raw = joint(x)
    require_finite(logits, "the model's segmentation output")
    require_finite(raw, "the model's depth output")
    up = torch.nn.functional.interpolate(logits.float(), size=(h, w), mode="bilinear", align_corners=False)[0]
    conf, pred = up.cpu().softmax(0).max(0)
    metres = resized_depth(depth.processor, raw, h, w)
    return pred.numpy().astype(np.uint8), conf.numpy(), np.clip(metres, 0, None)


def predict_both(args, paths: list[str], stems: list[str]) -> int:
    """Masks and depth maps of ``paths`` into ``args.out`` (outputs named by ``stems``, see ``output_stems``)."""
    from dptune.tools.depth import (
        DepthWrites,
        cloud_intrinsics,
        depth_encoding,
        depth_files,
        depth_views,
        mirror_note,
    )
    from dptune.tools.inputs import parse_scales
    from dptune.tools.masks import mask_files, write_masks
    from dptune.tools.predict_run import failures, predict_each

    scales = parse_scales(args.scales)
    seg, depth, joint = load_joint(args.model, args.device, trust_remote_code=args.trust_remote_code)
    metric = depth.mode == "metric"
    k = cloud_intrinsics(args.intrinsics, metric)
    shared = args.mode == "whole" and scales == (1.0,) and args.flip == "none"
    if not shared:
        notes = [mirror_note(args.flip)] if args.flip != "none" else []
        print("note: --mode/--flip/--scales shape the masks; depth is predicted on the whole image at one scale"
              + "".join(f"; {n}" for n in notes), file=sys.stderr)
    enc = depth_encoding(depth)
    planned = [f for s in stems for f in mask_files(s, args.confidence) + depth_files(s, enc, k)]
    writes = DepthWrites(args.out, planned, args.overwrite, enc, k)
    out = writes.out

    def one(path: str, stem: str, image: np.ndarray) -> None:
        if shared:
            pred, conf, metres = one_pass(joint, seg, depth, image)
        else:
            pred, conf = seg.predict(image, mode=args.mode, flip=args.flip, scales=scales)
            metres = depth_views(depth, image, args.flip)
        write_masks(out, stem, image, pred, conf, seg.labels, args)
        writes.write(path, stem, metres, image)

    failed = predict_each(paths, stems, "predicting masks and depth", one)
    done = len(paths) - len(failed)
    print(f"{done} {'mask and depth map' if done == 1 else 'masks and depth maps'} in {out} ({enc['file']}: "
          f"{writes.words}; depth_format.json)")
    writes.warn()
    return failures(failed, len(paths))


TASK_WORDS = {"segmentation": "segmentation", "depth": "depth", "multitask": "segmentation + depth"}
PARTS = {"segmentation": ("segmentation",), "depth": ("depth",), "multitask": ("segmentation", "depth")}


def config_task(path: str) -> tuple[str, dict]:
    """(task, data section) of a training config: its ``task:``, else what its data section holds
    (``segmentation:`` / ``depth:`` sources: a joint config; ``depth`` templates in its splits: depth)."""
    from dptune.errors import ConfigError
    from dptune.tools.inspect import read_config_mapping

    try:
        cfg = read_config_mapping(path)
    except OSError as e:
        raise ConfigError(f"--config {path}: cannot be read ({e.strerror or e})") from None
    data = cfg.get("data") or {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: data: is not a mapping")
    task = cfg.get("task")
    if not task:
        splits = data.get("splits") if isinstance(data.get("splits"), dict) else {}
        task = ("multitask" if "segmentation" in data or "depth" in data
                else "depth" if any(isinstance(v, dict) and "depth" in v for v in splits.values()) else "segmentation")
    if task not in PARTS:
        raise ConfigError(f"--config {path}: task {task!r} is none of {', '.join(PARTS)}")
    return str(task), data


def one_source(path: str, data: dict, part: str) -> dict:
    """The joint config's ``data.<part>`` source, without the joint-only keys (``name``, ``weight``)."""
    from dptune.errors import ConfigError

    section = data.get(part)
    if isinstance(section, list):
        if len(section) != 1:
            raise ConfigError(f"--config {path}: data.{part} lists {len(section)} sources; evaluate one at a time "
                              f"with --images and --{'masks and --labels' if part == 'segmentation' else 'depth'} "
                              "(and --root)")
        section = section[0]
    if not isinstance(section, dict):
        raise ConfigError(f"--config {path}: data.{part} is not a source (root, splits, ...)")
    return {k: v for k, v in section.items() if k not in ("name", "weight")}


def without_option(argv: list[str], flag: str) -> list[str]:
    """``argv`` without ``flag`` and its value (``flag value`` or ``flag=value``)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == flag:
            skip = True
        elif not a.startswith(flag + "="):
            out.append(a)
    return out


def evaluate_with_config(args, model_task: str, main, argv: list[str]) -> int | None:
    """``evaluate --config``: each part of the model that the config has data for, on that part's own
    source and split with the config's settings (a joint model with a joint config: both, one after
    the other, as ``--part segmentation`` and ``--part depth``). Returns the exit status, or None
    for the segmentation path of ``evaluate`` to go on with (``args.config_data`` then holds the
    data section it reads). A config of another task than the model's is one ``ConfigError``."""
    from dptune.errors import ConfigError, DataError

    ctask, data = config_task(args.config)
    parts = [p for p in PARTS[ctask] if p in PARTS[model_task] and args.part in (None, p)]
    if not parts:
        if args.part and args.part not in PARTS[model_task]:
            raise ConfigError(f"--part {args.part}: the model {args.model} is a {TASK_WORDS[model_task]} model")
        if args.part:
            raise ConfigError(f"--part {args.part}: --config {args.config} is a {TASK_WORDS[ctask]} config")
        hint = {"segmentation": "a segmentation config (data: root, labels, splits with masks), or --images, "
                                "--masks and --labels",
                "depth": "a depth config (data: root, depth_scale, splits with depth), or --images, --depth and "
                         "--depth-scale"}
        raise ConfigError(f"--config {args.config}: a {TASK_WORDS[ctask]} config, but {args.model} is a "
                          f"{TASK_WORDS[model_task]} model: give {hint[PARTS[model_task][0]]}")
    if len(parts) == 2:
        for flag, given in (("--json", args.json), ("--root", args.root)):
            if given:
                raise ConfigError(f"{flag}: a segmentation + depth config scores two parts (each with its own data "
                                  f"root); give --part segmentation or --part depth with {flag}")
        rcs = []
        for part in parts:
            print(f"{part} ({one_source(args.config, data, part).get('root', '.')}, split {args.split}):")
            extra = ["--part", part]
            if part == "depth" and (args.mode != "whole" or args.scales.strip() != "1"):
                # asked of both parts, they shape the masks; the depth part alone refuses them
                print("note: --mode/--scales shape the masks; depth is scored on the whole image at one scale",
                      file=sys.stderr)
                extra += ["--mode", "whole", "--scales", "1"]
            # --confusion is the segmentation part's picture (checked before either part ran)
            rcs.append(main([*(argv if part == "segmentation" else without_option(argv, "--confusion")), *extra]))
            if rcs[-1]:  # said in its own line: the command stops there, as a single part's would
                break
        return max(rcs)
    part = parts[0]
    section = data if ctask == part else one_source(args.config, data, part)
    if part == "segmentation":
        args.config_data = section
        return None
    from dptune.tools.depth_evaluate import evaluate_depth

    if section.get("source", "folder") != "folder":
        raise ConfigError(f"--config {args.config}: a {section.get('source')} depth source; evaluate reads image "
                          "and depth files: give --images, --depth and --depth-scale")
    split = (section.get("splits") or {}).get(args.split)
    if not isinstance(split, dict) or not split.get("images") or not split.get("depth"):
        raise DataError(f"{args.config}: no depth split {args.split!r} (images and a depth template)")
    args.images, args.depth = split["images"], split["depth"]
    args.root = args.root or str(section.get("root", "."))
    if args.depth_scale is None:
        args.depth_scale = section.get("depth_scale")
    if args.negative_depth == "error":
        args.negative_depth = section.get("negative_depth", "error")
    args.eval_crop = args.eval_crop or section.get("eval_crop")
    return evaluate_depth(args)
