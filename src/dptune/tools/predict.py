r"""Predict masks (segmentation models), depth maps (depth models) or both (segmentation + depth
models) for images.

    python scripts/predict.py --model OUT --images "photos/*.jpg" --out preds
    python scripts/predict.py --model DEPTH-OUT --images "frames/*.jpg" --out depth \
        --intrinsics ../shared/data/7scenes-kitchen/camera-intrinsics.txt
    python scripts/predict.py --model RUN/checkpoints/last.ckpt --images frame.jpg --out preds \
        --mode slide --flip --confidence --device cuda

For each image ``<stem>.png`` holds class indices (uint8, the model's id2label order),
``<stem>_overlay.png`` the prediction in the label colours blended on the image with a legend of
the classes present, and with ``--confidence`` ``<stem>_confidence.png`` the top-class
probability (black 0, white 1). Depth models: see ``dptune.tools.depth`` (16-bit depth PNGs in
millimetres, colourised maps, ``.ply`` point clouds with ``--intrinsics``; the whole image at one
scale, so ``--mode slide``, ``--scales`` and ``--confidence`` are refused; ``--flip`` averages the
left-right mirror). Segmentation + depth models write both sets of files and take every option:
``--mode``, ``--flip`` and ``--scales`` shape the masks as for a segmentation model, depth is the
depth model's (see ``dptune.tools.multitask``).

Inputs: a file, a folder (its images: .jpg .jpeg .png .bmp .tif .tiff .webp .gif, in any case; a
warning counts what else it holds, sub-folders included) or a glob (``*.jpg`` takes ``.JPG``
too; ``.jpeg`` files beside the ones it takes are counted in a warning that offers ``*.jp*g``). Each image is read upright: its EXIF orientation applied as ``transformers``' ``pipeline``
applies it. ``<stem>`` is the file name without its extension; inputs from several folders keep
their folders below their common one (``a/x.jpg``, ``b/x.jpg`` -> ``OUT/a/x.png``, ``OUT/b/x.png``),
and inputs that would still share a name get the extension added (``x.jpg``, ``x.png`` -> ``x``,
``x_png``), so no prediction replaces another. An image that cannot be read or predicted is named
in one line and the rest go on; the exit status is then 2, with the count.

Inputs are never written: ``--out`` may not be an input, an input's folder or inside one (refused in
one line before anything is written). ``OUT/dptune-predict.json`` lists the files predict wrote
there (size, time, content hash); those are replaced by a later run unless changed since, any other file in the way stops the run before
anything is written unless ``--overwrite`` is given. Every file is written beside its place and
then moved into it: a link found in ``--out`` at an output's name (to an input, say) is replaced,
never written through. Loading a model never runs code shipped with
it unless ``--trust-remote-code`` is given (dptune's own exports never need it).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

from dptune.errors import ConfigError, DataError, Once, device_arg, path_arg
from dptune.inference.windows import FLIP_VIEWS
from dptune.tools.inputs import list_images, parse_scales, refuse_out_among_inputs
from dptune.tools.masks import mask_files, write_masks
from dptune.tools.outputs import output_stems
from dptune.tools.predict_run import MANIFEST, failures, predict_each, prepare_out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    ap.add_argument("--model", action=Once, required=True, help="dptune .ckpt or exported directory")
    ap.add_argument("--images", action=Once, required=True, help="an image file, a folder or a glob (extensions in any case)")
    ap.add_argument("--out", action=Once, required=True, type=path_arg, help="output folder: not an input, nor an input's folder or inside one")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace files in --out that predict did not write (its own, listed in "
                         f"{MANIFEST} and unchanged since, are always replaced); without it such a file stops the run")
    ap.add_argument("--trust-remote-code", action="store_true",
                    help="allow a model whose config asks for code shipped with it (auto_map) to run that code; "
                         "never needed for dptune's exports")
    ap.add_argument("--mode", choices=["whole", "slide"], default="whole",
                    help="masks: whole image or sliding windows (depth: whole image only)")
    ap.add_argument("--flip", nargs="?", const="h", default="none", choices=list(FLIP_VIEWS),
                    help="flip TTA: h, hv (also up-down) or d4 (also 90-degree turns); bare --flip = h. "
                         "Depth averages only the left-right mirror")
    ap.add_argument("--scales", default="1", help="masks: comma-separated scales to average (depth: 1 only)")
    ap.add_argument("--confidence", action="store_true", help="also write the top-class probability (masks)")
    ap.add_argument("--alpha", type=float, default=0.5, help="overlay opacity, 0 to 1")
    ap.add_argument("--device", type=device_arg, default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--backend", choices=["torch", "onnx", "onnx-int8", "onnx-fp16"], default="torch",
                    help="run the export's ONNX graph instead of torch: onnx (model.onnx), onnx-int8 "
                         "(model_int8.onnx), onnx-fp16 (model_fp16.onnx); --model must be an exported directory")
    ap.add_argument("--intrinsics", help="depth and segmentation + depth models: fx,fy,cx,cy or a 3x3 camera "
                                         "matrix file, in pixels of the image as shown (upright: after its EXIF "
                                         "orientation); writes <stem>.ply")
    args = ap.parse_args(argv)
    from dptune.inference.predictor import Predictor
    from dptune.tools.depth import predict_depth
    from dptune.tools.inputs import model_task

    try:
        if not 0 <= args.alpha <= 1:  # NaN too: a blend weight outside [0, 1] wraps the overlay's colours
            raise ConfigError(f"--alpha {args.alpha}: the overlay's opacity, from 0 (the image) to 1 (the classes)")
        paths = list_images(args.images)
        stems = output_stems(paths)
        refuse_out_among_inputs(args.out, paths, stems, args.model)
        task = model_task(args.model)
        if task == "depth":
            return predict_depth(args, paths, stems)
        if task == "multitask":
            from dptune.tools.multitask import predict_both

            if args.backend != "torch":
                raise ConfigError(f"--backend {args.backend}: give one part of the joint export ("
                                  f"{args.model}/segmentation or {args.model}/depth); each runs the joint graph")

            return predict_both(args, paths, stems)
        scales = parse_scales(args.scales)
        if args.intrinsics:
            raise ConfigError("--intrinsics: point clouds need depth; this is a segmentation model")
        predictor = Predictor.load(args.model, args.device, trust_remote_code=args.trust_remote_code,
                                   backend=args.backend)
        out = prepare_out(args.out, [f for s in stems for f in mask_files(s, args.confidence)], args.overwrite)
    except (DataError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    def one(path: str, stem: str, image: np.ndarray) -> None:
        pred, conf = predictor.predict(image, mode=args.mode, flip=args.flip, scales=scales)
        write_masks(out, stem, image, pred, conf, predictor.labels, args)

    failed = predict_each(paths, stems, "predicting", one)
    done = len(paths) - len(failed)
    print(f"{done} prediction{'' if done == 1 else 's'} in {out}")
    return failures(failed, len(paths))


if __name__ == "__main__":
    sys.exit(main())
