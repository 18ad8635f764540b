r"""Score a model on labelled images: mIoU, pixel accuracy, mean accuracy, per-class IoU.

    python scripts/evaluate.py --model RUN/checkpoints/last.ckpt --config configs/camvid.yaml \
        --root ../shared/data/camvid --split val
    python scripts/evaluate.py --model OUT --images "val/*.jpg" --masks "valannot/{stem}.png" \
        --labels labels.yaml --root ../shared/data/camvid --mode slide --flip \
        --json scores.json --confusion confusion.png

Depth models (the metrics of ``dptune.tools.depth``):

    python scripts/evaluate.py --model DEPTH-OUT --root ../shared/data/7scenes-kitchen \
        --images "val/rgb/*.jpg" --depth "val/depth/{stem}.png" --depth-scale 1000

``--model`` is a dptune checkpoint or an exported directory (of a segmentation + depth model, the
part that ``--depth`` or the masks score); ``--mode whole`` resizes like the
exported image processor, ``--mode slide`` slides windows of the processor size at native
resolution. Optional test-time augmentation: ``--flip`` and ``--scales 0.75,1,1.25``. Images are
read upright (their EXIF orientation applied, as ``transformers``' ``pipeline`` does); ``*.jpg``
takes ``.JPG`` too.

Inputs are never written: ``--json`` and ``--confusion`` may not be an input (image, mask, depth map,
config, any file the config names such as its label file, model) nor lie in the folder of an image, mask or depth map or in an exported
model's directory (refused in one line before scoring). An existing file there is replaced only
when evaluate wrote it (scores JSON, confusion PNG) or with ``--overwrite``, and always by replacing
its directory entry (a link there is replaced, never written through). Loading a model never
runs code shipped with it unless ``--trust-remote-code`` is given (dptune's exports never need it).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import yaml
from tqdm.auto import tqdm

from dptune.errors import ConfigError, DataError, Once, device_arg, of_image, path_arg
from dptune.inference.windows import FLIP_VIEWS
from dptune.labels import IGNORE_INDEX, LabelSet, check_same_classes
from dptune.metrics.segmentation import metrics_from_confmat
from dptune.tools.inputs import json_is_ours, parse_scales, refuse_output
from dptune.tools.outputs import write_replacing, write_text

CONFUSION_TAG = "dptune evaluate: confusion matrix"  # the PNG's Software text: how a later run knows it wrote it


def confusion_is_ours(path: Path) -> bool:
    """A confusion-matrix picture evaluate wrote (its PNG text says so)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return getattr(im, "text", {}).get("Software") == CONFUSION_TAG
    except (OSError, SyntaxError, ValueError):
        return False


def source_files(source) -> list[str]:
    """The files a source reads (images, masks or depth maps); none for a Hugging Face dataset."""
    return [f for attr in ("images", "masks", "depths") for f in (getattr(source, attr, None) or [])]


def confusion_image(confmat: np.ndarray, names: list[str], path: str, cell: int = 40) -> None:
    """Row-normalised confusion matrix as a picture, class names on both axes (a PNG says in its
    text that evaluate wrote it)."""
    import cv2
    from PIL import Image, PngImagePlugin


    c = len(names)
    rows = confmat / np.maximum(confmat.sum(1, keepdims=True), 1)
    margin = 10 + 8 * max(len(n) for n in names)
    img = np.full((margin + c * cell + 40, margin + c * cell + 10, 3), 255, np.uint8)
    for i in range(c):
        for j in range(c):
            v = rows[i, j]
            color = tuple(int(255 - v * (255 - x)) for x in (180, 80, 20))  # white -> blue
            y0, x0 = margin + i * cell, margin + j * cell
            cv2.rectangle(img, (x0, y0), (x0 + cell - 1, y0 + cell - 1), color, -1)
            cv2.putText(img, f"{v:.2f}", (x0 + 3, y0 + cell // 2 + 4), cv2.FONT_HERSHEY_SIMPLEX, 0.35,
                        (255, 255, 255) if v > 0.5 else (0, 0, 0), 1, cv2.LINE_AA)
        cv2.putText(img, names[i], (5, margin + i * cell + cell // 2 + 4), cv2.FONT_HERSHEY_SIMPLEX, 0.4,
                    (0, 0, 0), 1, cv2.LINE_AA)
    col_names = np.full((margin, c * cell, 3), 255, np.uint8)
    for j, n in enumerate(names):  # column names written rotated
        strip = np.full((cell, margin, 3), 255, np.uint8)
        cv2.putText(strip, n, (5, cell // 2 + 4), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
        col_names[:, j * cell : (j + 1) * cell] = np.rot90(strip)
    img[:margin, margin : margin + c * cell] = col_names
    cv2.putText(img, "rows: ground truth, columns: prediction (row-normalised)", (5, img.shape[0] - 12),
                cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    if Path(path).suffix.lower() not in Image.registered_extensions():
        raise DataError(f"--confusion {path}: could not be written (unknown file extension "
                        f"{Path(path).suffix or '(none)'}; give a .png path)")
    info = PngImagePlugin.PngInfo()
    info.add_text("Software", CONFUSION_TAG)
    try:
        write_replacing(path, lambda tmp: Image.fromarray(img).save(tmp, pnginfo=info))
    except (OSError, ValueError) as e:  # no such folder, an extension PIL does not know
        why = e.strerror if isinstance(e, OSError) and e.strerror else e
        raise DataError(f"--confusion {path}: could not be written ({why})") from None


def check_labels_fit_model(args, task: str) -> None:
    """Labels for a part the model does not have are refused, never passed over: depth maps for a
    segmentation model, masks for a depth model; a joint model given both as files scores one part
    per command (``--part``; a joint ``--config`` scores both)."""
    from dptune.tools.multitask import PARTS, TASK_WORDS

    masks = args.masks or args.labels
    if args.part and args.part not in PARTS[task]:
        raise DataError(f"--part {args.part}: {args.model} is a {TASK_WORDS[task]} model (no {args.part} output)")
    if args.part and not args.config and not (args.depth if args.part == "depth" else masks):
        need = "--depth (a path template)" if args.part == "depth" else "--masks and --labels"
        raise DataError(f"--part {args.part}: give {need} to score the {args.part} part of {args.model}")
    if task == "segmentation" and args.depth:
        how = ("leave out --depth" + (" to score it on the config's masks" if args.config else "")
               if args.config or masks else "score it with --masks and --labels (or --config)")
        raise DataError(f"--depth: {args.model} is a segmentation model (no depth output); {how}, or give a "
                        "depth model")
    if task == "depth" and masks and not args.config:
        how = "leave out --masks and --labels" if args.depth else "score it with --depth (a path template)"
        raise DataError(f"--masks: {args.model} is a depth model (no classes); {how}, or give a segmentation model")
    if task == "multitask" and args.depth and masks and not args.config and not args.part:
        raise DataError(f"--masks and --depth: {args.model} is a segmentation + depth model, scored on files one part "
                        "per command: add --part segmentation or --part depth (a joint --config scores both)")


def _source_and_labels(args) -> tuple[object, LabelSet]:
    from dptune.data.datamodule import SegmentationDataModule
    from dptune.data.sources import FolderSource, build_source

    if args.config:
        data = dict(getattr(args, "config_data", None)  # a joint config's segmentation source
                    or (yaml.safe_load(open(args.config)) or {}).get("data") or {})
        if args.root:
            data["root"] = args.root
        data.update(check=False, cache=False, num_workers=0)
        dm = SegmentationDataModule(**data)
        if args.split not in dm.splits:
            raise DataError(f"{args.config}: no split {args.split!r}")
        src = build_source(dm.source_kind, dict(dm.splits[args.split]), dm.root,
                           dm.label_set.mask_format == "rgb", args.split, dm.hf)
        return src, dm.label_set
    if not (args.images and args.masks and args.labels):
        raise DataError("give --config (and --split), or --images, --masks and --labels")
    root = args.root or "."
    labels = LabelSet.from_yaml(args.labels if Path(args.labels).is_absolute() else Path(root) / args.labels)
    return FolderSource(root, args.images, args.masks, labels.mask_format == "rgb"), labels


def evaluate(predictor, source, labels: LabelSet, mode: str, flip: bool | str, scales: tuple[float, ...],
             model: str = "") -> np.ndarray:
    from dptune.data.dataset import encode_sample

    check_same_classes(predictor.labels.names, labels.names, model, labels.source)
    c = predictor.labels.num_classes
    confmat = np.zeros((c, c), np.int64)
    for i in tqdm(range(len(source)), desc="evaluating"):
        image, mask = encode_sample(*source.load(i), labels)  # its values and its size against the image's
        with of_image(source.name(i)):
            pred, _ = predictor.predict(image, mode=mode, flip=flip, scales=scales)
        valid = mask != IGNORE_INDEX
        confmat += np.bincount(mask[valid].astype(np.int64) * c + pred[valid], minlength=c * c).reshape(c, c)
    return confmat


def held_back(source, args, task: str):
    """``source`` cut to the export's held-back ``task`` images (``--held-back``)."""
    from dptune.export.held_back import keep_held_back

    if not hasattr(source, "images"):
        raise DataError("--held-back: the images are not a folder split (give --config with a folder split, or "
                        "--images and --masks)")
    return keep_held_back(source, getattr(source, "root", None) or args.root or ".", args.model, task)


def report(confmat: np.ndarray, names: list[str]) -> dict:
    m = metrics_from_confmat(torch.from_numpy(confmat))
    out = {"mIoU": float(m["mIoU"]), "pixel_acc": float(m["pixel_acc"]), "mAcc": float(m["mAcc"]),
           "IoU": {n: (None if np.isnan(v) else float(v)) for n, v in zip(names, m["IoU"].tolist(), strict=True)}}
    return out


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    ap.add_argument("--model", action=Once, required=True, help="dptune .ckpt or exported directory")
    ap.add_argument("--config", help="train.py YAML whose data: section describes the split")
    ap.add_argument("--split", default="val")
    ap.add_argument("--part", choices=["segmentation", "depth"],
                    help="of a segmentation + depth model or config: score only this part (default: each part "
                         "the config has data for, on its own source's split)")
    ap.add_argument("--root", help="data root (overrides the config's)")
    ap.add_argument("--images", action=Once, help="image glob (relative to --root)")
    ap.add_argument("--masks", action=Once, help="mask template with {stem}/{name}/{dir}/{id}")
    ap.add_argument("--labels", action=Once, help="labels.yaml")
    ap.add_argument("--mode", choices=["whole", "slide"], default="whole")
    ap.add_argument("--flip", nargs="?", const="h", default="none", choices=list(FLIP_VIEWS),
                    help="flip TTA: h (left-right, the default when given bare), hv (also up-down), d4 (also "
                         "90-degree turns: 8 views, for imagery with no up such as aerial tiles)")
    ap.add_argument("--scales", default="1", help="comma-separated test scales, e.g. 0.75,1,1.25")
    ap.add_argument("--device", type=device_arg, default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--backend", choices=["torch", "onnx", "onnx-int8", "onnx-fp16"], default="torch",
                    help="run the export's ONNX graph instead of torch: onnx (model.onnx), onnx-int8 "
                         "(model_int8.onnx), onnx-fp16 (model_fp16.onnx); --model must be an exported directory")
    ap.add_argument("--held-back", action="store_true",
                    help="score only the images an export's serving graphs were measured on (listed in its "
                         "dptune.json by export --int8 / --onnx-fp16 / --calibrate-temperature): with --backend "
                         "onnx-int8 it reproduces the card's int8 figures; the images must be among those given")
    ap.add_argument("--json", type=path_arg, help="write the scores here (not among the inputs)")
    ap.add_argument("--confusion", type=path_arg, help="write a row-normalised confusion-matrix picture here (.png; not among the "
                                        "inputs)")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace an existing --json / --confusion file that evaluate did not write")
    ap.add_argument("--trust-remote-code", action="store_true",
                    help="allow a model whose config asks for code shipped with it (auto_map) to run that code; "
                         "never needed for dptune's exports")
    depth = ap.add_argument_group("depth models")
    depth.add_argument("--depth", action=Once, help="depth map template with {stem}/{name}/{dir}/{id}")
    depth.add_argument("--depth-scale", type=float, default=None,
                       help="stored value per metre (1000: mm PNG, 256: KITTI, 1: metres); default by file type: 1 for float, 1000 for integer files")
    depth.add_argument("--negative-depth", choices=["error", "invalid"], default="error",
                       help="a negative stored depth: error (default; names the file) or invalid (the format marks "
                            "missing depth that way: read as no measurement, as data.negative_depth in training)")
    depth.add_argument("--min-depth", type=float, default=None, help="default: the model's (else 0.001 m)")
    depth.add_argument("--max-depth", type=float, default=None, help="default: the model's")
    depth.add_argument("--alignment", choices=["none", "median", "lstsq"], help="default: the model's")
    depth.add_argument("--eval-crop", choices=["none", "eigen", "garg"], help="default: the model's")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    replaced = [flag for flag in ("--images", "--masks", "--labels") if getattr(args, flag[2:])]
    if args.config and replaced and not args.depth:  # the config's split would be scored, these unread
        print(f"error: {replaced[0]} and --config: a config names its split's images, masks and labels; give "
              "--config (and --split), or --images, --masks and --labels without it", file=sys.stderr)
        return 2
    from dptune.inference.predictor import Predictor
    from dptune.tools.depth_evaluate import evaluate_depth
    from dptune.tools.inputs import model_task

    try:
        task = model_task(args.model)
        if args.config and not args.depth:  # each part the config has data for, on its own source's split
            from dptune.tools.multitask import evaluate_with_config

            check_score_outputs(args)  # before any part is scored (a joint config scores two)
            if args.confusion:  # a picture evaluate did not write, the config's files (the data's: in the part)
                refuse_output(args.confusion, "--confusion", [], args, confusion_is_ours)
            rc = evaluate_with_config(args, task, main, sys.argv[1:] if argv is None else list(argv))
            if rc is not None:
                return rc
        check_labels_fit_model(args, task)
        if task == "depth" or (task == "multitask" and args.depth and args.part != "segmentation"):
            return evaluate_depth(args)  # a joint model given files: the part they label
        source, labels = _source_and_labels(args)
        if args.held_back:
            source = held_back(source, args, "segmentation")
        check_score_outputs(args)
        for path, flag, is_ours in ((args.json, "--json", json_is_ours),
                                    (args.confusion, "--confusion", confusion_is_ours)):
            if path:
                refuse_output(path, flag, source_files(source), args, is_ours)
        scales = parse_scales(args.scales)  # before the model loads
        predictor = Predictor.load(args.model, args.device, trust_remote_code=args.trust_remote_code,
                                   backend=args.backend)
        confmat = evaluate(predictor, source, labels, args.mode, args.flip, scales, args.model)
    except (DataError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return write_scores(args, confmat, predictor.labels.names, len(source), scales)


def check_score_outputs(args: argparse.Namespace) -> None:
    """Before anything is scored: --confusion is a PNG (what evaluate recognises as its own to
    replace), and --json and --confusion are two files (the second replaced the first)."""
    if args.confusion and Path(args.confusion).suffix.lower() != ".png":
        raise ConfigError(f"--confusion {args.confusion}: the confusion matrix is written as a PNG; give a .png path")
    if args.json and args.confusion and Path(args.json).resolve() == Path(args.confusion).resolve():
        raise ConfigError(f"--json and --confusion are one file ({args.json}): the picture would replace the scores")


def write_scores(args: argparse.Namespace, confmat: np.ndarray, names: list[str], images: int,
                 scales: tuple[float, ...]) -> int:
    """The scores printed, and written to ``--json`` / ``--confusion`` where asked; the exit status."""
    if not confmat.sum():  # every score would be NaN (and the JSON not JSON)
        print(f"error: the {images} images' masks have no labelled pixel (every value is ignored): nothing to score; "
              "nothing written", file=sys.stderr)
        return 2
    scores = report(confmat, names)
    print(f"mIoU {scores['mIoU']:.4f}  pixel_acc {scores['pixel_acc']:.4f}  mAcc {scores['mAcc']:.4f}"
          f"  ({images} images, mode {args.mode}{'' if args.flip == 'none' else ', flip ' + args.flip}, scales {args.scales})")
    for n, v in scores["IoU"].items():
        print(f"  {n:<20} {'-' if v is None else f'{v:.4f}'}")
    if args.json:
        scores.update(model=args.model, mode=args.mode, flip=args.flip, scales=list(scales), images=images,
                      confusion=confmat.tolist())
        try:
            write_text(args.json, json.dumps(scores, indent=2) + "\n")
        except OSError as e:
            print(f"error: --json {args.json}: could not be written ({e.strerror or e})", file=sys.stderr)
            return 2
    if args.confusion:
        try:
            confusion_image(confmat, names, args.confusion)
        except DataError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
