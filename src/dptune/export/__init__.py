"""Export to a directory plain ``transformers`` loads (and serves), optionally ONNX too: ``export``
(its command line: ``dptune.export.cli``)."""

from __future__ import annotations

import json
import logging
import math
import signal
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from dptune.errors import ConfigError, first_line
from dptune.export.card import depth_card, model_card, multitask_card, training_precision, warn_backend
from dptune.export.checks import check_exportable
from dptune.export.onnx import export_joint_onnx, export_onnx, onnx_dynamic_size, onnx_parity
from dptune.export.serving import ServingOptions
from dptune.export.sources import is_depth, load_source
from dptune.export.target import REMOTE_MODULE, export_target, plain_file_modes, staged
from dptune.models import dpt_backbone
from dptune.models.build import input_side
from dptune.models.dpt_backbone import uses_backbone
from dptune.preprocessing import Preprocessing

log = logging.getLogger(__name__)


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
    got = load_source(str(src))
    kept = _earlier_calibration(got, str(src), serving)
    if kept:  # an export re-exported: its weights hold the temperature, and its records say so again, with the
        got["calibration_kept"] = kept  # images its figures were measured on (evaluate --held-back reads them)
        got["calibration_data_kept"] = (got["meta"].get("serving") or {}).get("data")
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


def _earlier_calibration(got: dict, src: str, serving) -> dict | None:
    """The temperature an export given as the source was calibrated with (folded into its weights), which
    its re-export keeps saying; calibrating it again would fit a second temperature on top of the first,
    and its card would give T as the second alone: one line then."""
    earlier = ((got.get("meta") or {}).get("serving") or {}).get("calibration") if Path(src).is_dir() else None
    if not isinstance(earlier, dict):
        return None
    if serving is not None and getattr(serving, "temperature", False):
        from dptune.errors import ConfigError

        raise ConfigError(f"--calibrate-temperature: {src} is calibrated already (T = {earlier.get('temperature')}, "
                          f"folded into its weights); calibrate from the checkpoint it was exported from "
                          f"({(got.get('meta') or {}).get('source') or 'its run'})")
    return earlier


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
    # an export re-exported (to add a graph, in place or elsewhere) keeps the checkpoint it was made from
    earlier = got["meta"].get("source") if Path(src).is_dir() else None
    origin = earlier if isinstance(earlier, str) and earlier else src
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
    if fp16:  # the float16 weights it stores, in float32: the ONNX graph and the card's figures are of those
        import copy

        model = copy.deepcopy(model).half().float()  # a copy: the caller's model stays as it was (see below)
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
        (out / "README.md").write_text(depth_card(got["meta"], processor, metrics, origin))
        summary = f"depth, {got['meta'].get('depth', {}).get('mode', 'metric')}"
    else:
        labels = got["labels"]
        meta = {"labels": labels.to_dict()}
        (out / "README.md").write_text(model_card(labels, processor, metrics, origin, uses_backbone(model.config),
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
    calibration = (got.get("serving") or {}).get("calibration") or got.get("calibration_kept")
    if served or calibration:
        meta["serving"] = {**served, **({"calibration": calibration} if calibration else {})}
        kept = got.get("calibration_data_kept")
        if calibration and "data" not in meta["serving"] and isinstance(kept, dict):
            meta["serving"]["data"] = kept
    again = {"re_exported_from": src} if origin != src else {}
    (out / "dptune.json").write_text(json.dumps(nan_to_null({"source": origin, **again, **meta, "metrics": metrics,
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
    joint = joint.float().eval()
    if fp16:  # the float16 weights its parts store, in float32: the graph and the card's figures are of those
        joint = joint.half().float()  # in place (nothing reads the unrounded model after this; a copy cost memory)
    if onnx:
        size = (got["processor"].size["height"], got["processor"].size["width"])
        err = export_joint_onnx(joint, out / "model.onnx", size,
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


class Interrupted(BaseException):
    """A signal (SIGINT, SIGTERM) stopped the export; raised where it was, so the staging folder is
    removed on the way out. ``after``: what was already done, when the export itself was complete."""

    def __init__(self, sig: signal.Signals, after: str | None = None) -> None:
        super().__init__(sig.name)
        self.signal, self.after = sig, after
