"""Export to a directory plain ``transformers`` loads (and serves), optionally ONNX too.

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
import json
import logging
import math
import os
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from dptune.errors import ConfigError, first_line
from dptune.export.card import depth_card, model_card, multitask_card, training_precision, warn_backend
from dptune.export.checks import check_exportable
from dptune.export.onnx import export_joint_onnx, export_onnx, onnx_dynamic_size, onnx_parity
from dptune.export.quantize import CALIBRATION_METHODS, TARGETS, KeepFloatError
from dptune.export.serving import ServingOptions
from dptune.export.serving_data import DEFAULT_COUNT, CalibrationError
from dptune.export.target import REMOTE_MODULE, OutputDirError, export_target, plain_file_modes, staged
from dptune.inference.onnx_runner import OnnxMissing
from dptune.models import dpt_backbone
from dptune.models.build import input_side
from dptune.models.dpt_backbone import uses_backbone
from dptune.preprocessing import Preprocessing

log = logging.getLogger(__name__)


def is_depth(model: nn.Module) -> bool:
    return "DepthEstimation" in type(model).__name__


def _load(src: str) -> dict:
    """What export needs from a checkpoint or an exported directory, for either task: model, image
    processor, metrics, task metadata (label set or depth mode) and how the metrics were measured."""
    if Path(src).is_dir():
        from transformers import AutoImageProcessor

        from dptune.models import load_exported
        from dptune.models.folders import check_export_files, json_object
        from dptune.models.source import is_joint_export

        if is_joint_export(src):
            raise ConfigError(f"{src}: a segmentation + depth export (segmentation/ and depth/); export again from "
                              f"its checkpoint, or export one part ({Path(src) / 'segmentation'})")
        check_export_files(src)  # each file read below, readable: one line naming a damaged one
        model = load_exported(src)
        card = Path(src) / "dptune.json"
        meta = json_object(card, "dptune's record of the export") if card.exists() else {}
        processor = AutoImageProcessor.from_pretrained(src)
        # one height x width, as every dptune loader reads it: an export it cannot prepare images for is refused here
        Preprocessing.from_processor(processor, source=str(Path(src) / "preprocessor_config.json"))
        out = {"model": model, "processor": processor, "metrics": meta.get("metrics", {}),
               "meta": meta, "evaluation": meta.get("evaluation", {})}
        if not is_depth(model):
            from dptune.inference.predictor import exported_labels

            if card.exists() and "labels" not in meta:
                raise ConfigError(f"{card}: no labels (the class names a segmentation export records)")
            out["labels"] = exported_labels(src, model.config.id2label)
        return out
    from dptune.tasks.checkpoints import load_module

    module = load_module(src)
    return {"model": module.model, "processor": module.image_processor(), "metrics": module.checkpoint_metrics,
            "meta": module.checkpoint_meta, "evaluation": module.checkpoint_evaluation,
            "labels": getattr(module, "label_set", None), "task": module.task}




def remote_code(model: nn.Module, out: Path) -> None:
    """Ship the model class beside the weights: plain ``transformers`` has no DPT segmentation
    model for Swinv2/BEiT/DINOv2 backbones, but loads this one with ``trust_remote_code=True``."""
    (out / f"{REMOTE_MODULE}.py").write_text(Path(dpt_backbone.__file__).read_text())
    cls = f"{REMOTE_MODULE}.{type(model).__name__}"
    model.config.auto_map = {"AutoModel": cls, "AutoModelForSemanticSegmentation": cls}


def fit_hybrid_positions(model: nn.Module, size: tuple[int, int]) -> None:
    """Plain ``transformers`` runs DPT-Hybrid only at ``config.image_size``: store the position
    embeddings resized to the processor's grid (the same resize the forward pass does) and
    declare that size, so the exported model takes what its image processor produces."""
    cfg = model.config
    h, w = size
    if list(cfg.image_size if not isinstance(cfg.image_size, int) else [cfg.image_size] * 2) == [h, w]:
        return
    emb = model.dpt.embeddings
    with torch.no_grad():
        grid = emb._resize_pos_embed(emb.position_embeddings, h // cfg.patch_size, w // cfg.patch_size)
    emb.position_embeddings = nn.Parameter(grid.contiguous())
    emb.image_size = (h, w)
    cfg.image_size = [h, w]
    if cfg.backbone_featmap_shape is not None:
        cfg.backbone_featmap_shape = [*cfg.backbone_featmap_shape[:2], h // cfg.patch_size, w // cfg.patch_size]


def push_folder(out: Path, repo: str) -> str:
    """Upload the whole exported directory (weights, processor, model card, ``dptune.json`` and,
    where present, ``model.onnx`` and ``modeling_dptune.py``), not just what ``save_pretrained``
    writes: a Swinv2/BEiT/DINOv2 model does not load on the hub without its remote code."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo, exist_ok=True)
        api.upload_folder(folder_path=str(out), repo_id=repo, commit_message="Upload DPT model (dptune)")
    except Exception as e:
        # no network, DNS, refused, timeouts: OSErrors (the hub's HTTP errors too) or the HTTP client's own
        if not (isinstance(e, OSError) or any(c.__name__ == "HTTPError" for c in type(e).__mro__)):
            raise
        raise ConfigError(f"--push-to-hub {repo}: the upload failed ({first_line(e)}); the export is complete in {out}, "
                          "push it later with huggingface-cli upload") from None
    url = f"https://huggingface.co/{repo}"
    log.info("pushed %s to %s", out, url)
    return url


def export(src: str, out_dir: str | Path, onnx: bool = False, fp16: bool = False, push_to_hub: str | None = None,
           tolerance: float = 1e-4, overwrite: bool = False, serving: ServingOptions | None = None) -> Path:
    """Write ``model.safetensors``, ``config.json`` (id2label, or the depth mode and units),
    ``preprocessor_config.json``, a model card ``README.md``, ``dptune.json`` and, with ``onnx``,
    ``model.onnx`` checked against torch. Segmentation or depth, whichever ``src`` holds.

    ``out_dir`` must be new or empty (``OutputDirError`` otherwise); with ``overwrite`` an earlier export
    there is replaced as a whole. The export is built in a hidden directory and moved into place complete."""
    target = export_target(Path(out_dir), Path(src), overwrite)
    got = _load(str(src))
    if serving is not None and serving.any:  # calibration data checked (and the temperature folded) first
        from dptune.export.serving import prepare_export

        got["serving"] = prepare_export(got, str(src), serving)
        onnx = True  # the INT8 / fp16 graphs derive from model.onnx, and are measured against it
    said: list[tuple[Path, str]] = []  # each directory written and what it holds: said once all is in place
    with staged(target, replace=overwrite) as stage, plain_file_modes(stage):
        if got.get("task") == "multitask":
            export_multitask(got, stage, str(src), onnx, fp16, tolerance, push_to_hub, shown=Path(out_dir), said=said)
        else:
            write_directory(got, stage, str(src), onnx, fp16, tolerance, shown=Path(out_dir), said=said)
    if said:
        parts = "; ".join(f"{where.name}/: {what}" for where, what in said) if len(said) > 1 else said[0][1]
        log.info("exported %s -> %s (%s)", src, out_dir, parts)
    out = Path(out_dir)
    if push_to_hub:
        try:
            push_folder(out, push_to_hub)
        except Interrupted as e:
            raise Interrupted(e.signal, f"the export is complete in {out}; its upload to {push_to_hub} was not") from None
    return out


def nan_to_null(value):
    """``value`` with every NaN or infinity replaced by None: strict JSON (figures of a validation that
    scored nothing are NaN, and JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: nan_to_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [nan_to_null(v) for v in value]
    return value


def write_directory(got: dict, out: Path, src: str, onnx: bool, fp16: bool, tolerance: float,
                    shown: Path | None = None, said: list[tuple[Path, str]] | None = None) -> Path:
    """One task's directory: weights, config, image processor, model card, dptune.json, ONNX.
    ``shown``: the directory's name in the log (where it will end up; ``out`` may be a staging one);
    ``said``: gets (directory, what it holds) instead of an "exported" line in the log (the caller says
    it once the whole export is in place)."""
    model, processor, metrics, evaluation = got["model"], got["processor"], got["metrics"], got["evaluation"]
    warn_backend(evaluation, src)
    out.mkdir(parents=True, exist_ok=True)
    model.config.architectures = [type(model).__name__]
    size = (processor.size["height"], processor.size["width"])
    if getattr(model.config, "is_hybrid", False):
        fit_hybrid_positions(model, size)
    # written from float32 (a re-exported --fp16 export loads as float16); stored in float16 with fp16 only
    model = model.float()
    serving = (got.get("serving") or {}).get("options")
    half = "--fp16" if fp16 else "--onnx-fp16" if serving is not None and serving.fp16 else None
    check_exportable(model, processor, size, half)  # before a file of it is written
    if not is_depth(model) and uses_backbone(model.config):
        remote_code(model, out)  # transformers' DPTForDepthEstimation takes any backbone itself
    if onnx:
        write_onnx(model, out / "model.onnx", size, tolerance, keep_float_check(got, src, shown or out),
                   Preprocessing.from_processor(processor))
    served = {}
    if got.get("serving") and onnx:
        from dptune.export.serving import serve

        served = serve(got, model, out / "model.onnx", joint=False)
    if fp16:  # a copy: the caller's model stays float32 (a joint export traces its ONNX graph from it next)
        import copy

        model = copy.deepcopy(model).half()
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    if is_depth(model):
        meta = {k: got["meta"].get(k) for k in ("task", "depth") if k in got["meta"]}
        (out / "README.md").write_text(depth_card(got["meta"], processor, metrics, src))
        summary = f"depth, {got['meta'].get('depth', {}).get('mode', 'metric')}"
    else:
        labels = got["labels"]
        meta = {"labels": labels.to_dict()}
        (out / "README.md").write_text(model_card(labels, processor, metrics, src, uses_backbone(model.config),
                                                  evaluation))
        summary = f"{labels.num_classes} classes"
    precision = got["meta"].get("precision")
    if precision:  # what the run trained in (precision: auto resolved on its machine)
        with open(out / "README.md", "a") as card:
            card.write(training_precision(precision))
        meta["precision"] = precision
    from dptune.export.serving_card import serving_sections

    with open(out / "README.md", "a") as card:  # serving graphs, their measured cost, calibration, depth values
        card.write(serving_sections(got, model, served, onnx_dynamic_size(model)))
    if served or (got.get("serving") or {}).get("calibration"):
        meta["serving"] = {**served, **({"calibration": got["serving"]["calibration"]}
                                        if got["serving"].get("calibration") else {})}
    (out / "dptune.json").write_text(json.dumps(nan_to_null({"source": src, **meta, "metrics": metrics,
                                                             "evaluation": evaluation}),
                                                indent=2, default=str, allow_nan=False))
    if said is None:
        log.info("exported %s -> %s (%s)", src, shown or out, summary)
    else:
        said.append((shown or out, summary))
    return out


def export_multitask(got: dict, out: Path, src: str, onnx: bool, fp16: bool, tolerance: float,
                     repo: str | None = None, shown: Path | None = None,
                     said: list[tuple[Path, str]] | None = None) -> Path:
    """A segmentation + depth checkpoint: ``out/segmentation`` and ``out/depth`` (each a stock
    ``transformers`` directory with its own card), a top-level ``README.md`` saying how to load each
    (``subfolder=``, also from a hub repo) and, with ``onnx``, ``out/model.onnx``: one graph, one
    backbone pass, outputs ``logits`` and ``predicted_depth``."""
    joint, metrics = got["model"], got["metrics"]
    common = {"processor": got["processor"], "evaluation": got["evaluation"],
              # each part is checked for float16's range where --onnx-fp16 asks for it (served from the joint graph)
              **({"serving": {"options": got["serving"]["options"]}} if got.get("serving") else {})}
    calibration = (got.get("serving") or {}).get("calibration")
    write_directory({**common, "model": joint.seg, "labels": got["labels"],
                     **({"serving": {**common.get("serving", {}), "calibration": calibration}} if calibration else {}),
                     "meta": {"task": "segmentation", "precision": got["meta"].get("precision")},
                     "metrics": metrics.get("segmentation", {})}, out / "segmentation", src, False, fp16, tolerance,
                    (shown or out) / "segmentation", said)
    write_directory({**common, "model": joint.depth, "meta": {"task": "depth", "depth": got["meta"].get("depth", {}),
                                                               "precision": got["meta"].get("precision")},
                     "metrics": metrics.get("depth", {})}, out / "depth", src, False, fp16, tolerance,
                    (shown or out) / "depth", said)
    if onnx:
        size = (got["processor"].size["height"], got["processor"].size["width"])
        err = export_joint_onnx(joint.float().eval(), out / "model.onnx", size,
                                check=keep_float_check(got, src, shown or out),
                                prep=Preprocessing.from_processor(got["processor"]))
        log.info("ONNX parity (both outputs): max relative difference %.2e", err)
        if err > tolerance:
            (out / "model.onnx").unlink()
            raise ValueError(f"ONNX export differs from torch by {err:.2e} (> {tolerance:.0e}); not written")
    served = {}
    if got.get("serving") and onnx:
        from dptune.export.serving import record_joint, serve

        served = serve(got, joint, out / "model.onnx", joint=True)
        record_joint(out, served)  # each part's dptune.json gets the figures of its task
    from dptune.export.serving_card import serving_card

    (out / "README.md").write_text(multitask_card(got["labels"], metrics, src, onnx, repo)
                                   + serving_card({**served, "calibration": calibration}, True)
                                   + training_precision(got["meta"].get("precision")))
    return out


def keep_float_check(got: dict, src: str, shown: Path) -> Callable[[Path], object] | None:
    """What checks the ``--int8-keep-float`` names against ``model.onnx`` as soon as it is written
    (the earliest they can be: they are its node names), before its parity and the calibration; the
    message names the graph as the export's (``shown``: where it goes), never the staging folder it
    was written in, which is gone once the export has failed. None without such names."""
    serving = got.get("serving") or {}
    options = serving.get("options")
    if options is None or not options.int8 or not options.keep_float:
        return None
    from dptune.export.quantize import keep_float_names

    hint = f" (`dptune export {src} {shown} --onnx` writes it to {shown / 'model.onnx'}, to look them all up)"
    return lambda path: keep_float_names(path, options.keep_float, f"the model.onnx exported from {src}", hint)


def write_onnx(model: nn.Module, path: Path, size: tuple[int, int], tolerance: float,
               check: Callable[[Path], object] | None = None, prep: Preprocessing | None = None) -> None:
    """``model.onnx``, kept only if ONNX Runtime reproduces torch within ``tolerance`` on square and
    non-square inputs (processor-size inputs only for DPT-Hybrid). ``check``: called with the graph
    as soon as it is written, before the parity is measured. ``prep``: the processor's spec, whose
    range of inputs the parity is measured on (see ``parity_input``)."""
    export_onnx(model, path, size)
    if check is not None:
        check(path)
    p = input_side(model)
    if onnx_dynamic_size(model):
        shapes = [(1, *size), (2, size[0], size[1] + 2 * p), (1, size[0] + 3 * p, max(p, size[1] - 5 * p))]
    else:
        shapes = [(1, *size), (2, *size)]
        log.info("ONNX: DPT-Hybrid graph takes %dx%d inputs only (dynamic batch)", *size)
    err = onnx_parity(model, path, shapes, prep=prep)
    log.info("ONNX parity: max relative difference %.2e over %s", err, shapes)
    if err > tolerance:
        path.unlink()
        raise ValueError(f"ONNX export differs from torch by {err:.2e} (> {tolerance:.0e}); not written")


def export_checkpoint(ckpt: str | Path, out_dir: str | Path, overwrite: bool = False) -> Path:
    return export(str(ckpt), out_dir, overwrite=overwrite)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument("source", help="dptune checkpoint (.ckpt) or an exported directory")
    parser.add_argument("out_dir", help="output directory: new or empty (created if missing)")
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
                       help="INT8 calibration images (default: a few dozen images of the run's validation split)")
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


class Interrupted(BaseException):
    """A signal (SIGINT, SIGTERM) stopped the export; raised where it was, so the staging folder is
    removed on the way out. ``after``: what was already done, when the export itself was complete."""

    def __init__(self, sig: signal.Signals, after: str | None = None) -> None:
        super().__init__(sig.name)
        self.signal, self.after = sig, after


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
