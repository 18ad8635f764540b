r"""``dptune export``: export to a directory plain ``transformers`` loads (and serves), optionally ONNX too.

    python scripts/export.py RUN/checkpoints/last.ckpt OUT [--onnx] [--fp16] [--push-to-hub user/repo] [--overwrite]
    python scripts/export.py RUN/checkpoints/last.ckpt OUT --int8 [--onnx-fp16] [--calibrate-temperature] \
        [--calibration-images "calib/*.jpg"] [--data configs/camvid.yaml]

``--int8`` writes ``model_int8.onnx`` (static INT8, calibrated on a few dozen validation images, or the
``--calibration-images``), ``--onnx-fp16`` ``model_fp16.onnx`` (for GPUs); both also write ``model.onnx``
and measure each graph against the fp32 torch model on held-back validation images (card and
``dptune.json``). ``--calibrate-temperature`` folds a fitted temperature into a segmentation model's
classifier (calibrated confidences; masks unchanged). The validation split is read from the run's
``config.yaml`` (beside ``checkpoints/``) unless ``--data`` names a config.

The source can also be a directory written by this script (re-export, e.g. to add ONNX). OUT must be
new or empty: the export is built in a hidden temporary directory and moved into place only when
complete, so nothing of another model (or of yours) is mixed in and a failed export leaves nothing
behind. ``--overwrite`` replaces an earlier export in OUT as a whole (nothing of it remains; a
directory holding no model is not replaced). When OUT is a symbolic link, the export goes to the
directory it points to, and says so.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from dptune.errors import path_arg
from dptune.export import Interrupted, export
from dptune.export.quantize import CALIBRATION_METHODS, TARGETS, KeepFloatError
from dptune.export.serving import ServingOptions
from dptune.export.serving_data import DEFAULT_COUNT, CalibrationError
from dptune.export.target import OutputDirError
from dptune.inference.onnx_runner import OnnxMissing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument("source", help="dptune checkpoint (.ckpt) or an exported directory")
    parser.add_argument("out_dir", type=path_arg, help="output directory: new or empty (created if missing)")
    parser.add_argument("--onnx", action="store_true", help="also write model.onnx (dynamic batch/height/width)")
    parser.add_argument("--fp16", action="store_true", help="store the weights in float16")
    parser.add_argument("--push-to-hub", metavar="REPO", help="upload to this Hugging Face repo")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier export in out_dir as a whole (nothing of it remains)")
    serve = parser.add_argument_group("serving graphs and calibrated confidence (need onnx + onnxruntime: "
                                      "pip install 'dptune[onnx]')")
    serve.add_argument("--int8", action="store_true",
                       help="also write model_int8.onnx: static INT8 (QDQ) for CPUs, calibrated on images; implies --onnx")
    serve.add_argument("--onnx-fp16", action="store_true",
                       help="also write model_fp16.onnx (float16, float32 inputs/outputs) for GPUs; implies --onnx")
    serve.add_argument("--calibrate-temperature", action="store_true",
                       help="segmentation: fit a temperature on validation images (NLL) and fold it into the "
                            "classifier, so confidences are calibrated (masks unchanged); ECE before/after in the card")
    serve.add_argument("--calibration-images", metavar="GLOB",
                       help="INT8 calibration images, a glob or a folder (default: a few dozen images of the run's validation split)")
    serve.add_argument("--calibration-count", type=int, default=None, metavar="N",
                       help=f"calibration images used at most (default {DEFAULT_COUNT}; spread evenly over the split "
                            "or the glob's matches): INT8's, and the temperature's fit images; when both of a joint "
                            "model's splits give fit images (--int8 without --calibration-images) N is split between "
                            "them (the odd one to segmentation), so N is 8 or more there")
    serve.add_argument("--calibration-method", choices=CALIBRATION_METHODS, default=None,
                       help="how INT8 activation ranges are taken from the calibration images (default minmax)")
    serve.add_argument("--int8-keep-float", action="append", default=[], metavar="NODE",
                       help="a Conv or MatMul node of model.onnx (its name) to keep in float besides dptune's "
                            "choice (repeatable)")
    serve.add_argument("--int8-target", choices=TARGETS, default=None,
                       help="portable (default): 7-bit weights (ONNX Runtime's reduce_range), the same results on any "
                            "x86 CPU, AVX2 without VNNI included; vnni: full 8-bit weights, for CPUs with AVX512-VNNI, "
                            "AVX-VNNI or AMX only (on AVX2 alone their int16 sums can clip); u8: full 8-bit uint8 weights, u8 x u8 "
                            "kernels without the clipping on any CPU")
    serve.add_argument("--data", metavar="CONFIG",
                       help="train.py config whose data: section names the validation split (default: the run's "
                            "config.yaml beside checkpoints/); its held-back part measures every graph")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not Path(args.source).exists():
        print(f"error: {args.source}: not found", file=sys.stderr)
        return 2
    refused = refuse_options(args)
    if refused:
        print(f"error: {refused}", file=sys.stderr)
        return 2
    serving = ServingOptions(int8=args.int8, fp16=args.onnx_fp16, temperature=args.calibrate_temperature,
                             calibration_images=args.calibration_images, data=args.data,
                             count=DEFAULT_COUNT if args.calibration_count is None else args.calibration_count,
                             method=args.calibration_method or "minmax", keep_float=tuple(args.int8_keep_float),
                             target=args.int8_target or "portable")
    try:
        with torch.no_grad(), interruptible():
            out = export(args.source, args.out_dir, onnx=args.onnx, fp16=args.fp16, push_to_hub=args.push_to_hub,
                         overwrite=args.overwrite, serving=serving)
    except (OutputDirError, CalibrationError, OnnxMissing, KeepFloatError) as e:  # each names its file, glob or the fix
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (ValueError, OSError, KeyError) as e:
        print(f"error: {naming_source(str(e), args.source)}", file=sys.stderr)
        return 2
    except Interrupted as e:  # SIGINT (Ctrl-C) or SIGTERM: the staging folder is gone already
        what = e.after or f"nothing was written to {args.out_dir}"
        print(f"error: interrupted ({e.signal.name}); {what}", file=sys.stderr)
        return 128 + e.signal
    print(out)
    return 0


def naming_source(message: str, src: str) -> str:
    """``message`` led by the source's name, once: one that starts with it already (a checkpoint's
    loader names the file it could not read; a file in an exported directory) is left as it is."""
    for name in dict.fromkeys((src, str(Path(src)))):
        if message.startswith(name) and message[len(name):len(name) + 1] in (":", "/", os.sep):
            return message
    return f"{src}: {message}"


# the serving options, and what each needs given to apply
CALIBRATION_OPTIONS = ("--calibration-images", "--calibration-count", "--calibration-method", "--data",
                       "--int8-keep-float", "--int8-target")


def refuse_options(args) -> str | None:
    """Why the options given do not go together (None when they do): a calibration option without
    anything it sets."""
    given = [o for o, v in zip(CALIBRATION_OPTIONS, (args.calibration_images, args.calibration_count,
                                                     args.calibration_method, args.data, args.int8_keep_float,
                                                     args.int8_target), strict=True) if v not in (None, [])]
    if given and not (args.int8 or args.onnx_fp16 or args.calibrate_temperature):
        return (f"{', '.join(CALIBRATION_OPTIONS[:-1])} and {CALIBRATION_OPTIONS[-1]} apply to --int8, --onnx-fp16 or "
                "--calibrate-temperature (--calibration-method, --int8-keep-float and --int8-target to --int8 only); "
                f"given: {' '.join(given)}")
    int8_only = [o for o in given if o in ("--calibration-images", "--calibration-method", "--int8-keep-float",
                                           "--int8-target")]
    if int8_only and not args.int8:
        return ("--calibration-images, --calibration-method, --int8-keep-float and --int8-target apply to --int8 "
                f"(the temperature is fitted on the validation split); given: {' '.join(int8_only)}")
    if "--calibration-count" in given and not (args.int8 or args.calibrate_temperature):
        return ("--calibration-count applies to --int8 (the images INT8 is calibrated on) or --calibrate-temperature "
                "(the images the temperature is fitted on)")
    return None


@contextmanager
def interruptible() -> Iterator[None]:
    """SIGINT and SIGTERM raise ``Interrupted`` in the block (SIGTERM would otherwise end the process
    at once, leaving the hidden ``*.partial`` folder behind). A signal the process ignores stays ignored;
    the handlers are put back after (only the main thread may set them: elsewhere nothing changes)."""
    def stop(signum, frame):
        raise Interrupted(signal.Signals(signum))

    before = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            if signal.getsignal(sig) is not signal.SIG_IGN:
                before[sig] = signal.signal(sig, stop)
        except ValueError:  # not the main thread
            break
    try:
        yield
    except KeyboardInterrupt:  # a SIGINT that arrived while the handler was not set (it raises this)
        raise Interrupted(signal.SIGINT) from None
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(main())
