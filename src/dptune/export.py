"""Export to a directory plain ``transformers`` loads (and serves), optionally ONNX too.

    python scripts/export.py RUN/checkpoints/last.ckpt OUT [--onnx] [--fp16] [--push-to-hub user/repo]

The source can also be a directory written by this script (re-export, e.g. to add ONNX).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dptune.models import dpt_backbone, segment
from dptune.models.dpt_backbone import input_multiple, uses_backbone

log = logging.getLogger(__name__)


class LogitsOnly(nn.Module):
    """``pixel_values -> logits`` through dptune's forward (any H x W, auxiliary head skipped)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return segment(self.model, pixel_values, with_aux=False)[0]


def _load(src: str):
    """(model, image processor, label set, metrics) from a checkpoint or an exported directory."""
    if Path(src).is_dir():
        from transformers import AutoImageProcessor

        from dptune.models import load_exported
        from dptune.predictor import exported_labels

        model = load_exported(src)

        card = Path(src) / "dptune.json"
        meta = json.loads(card.read_text()) if card.exists() else {}
        labels = exported_labels(src, model.config.id2label)
        return (model, AutoImageProcessor.from_pretrained(src), labels, meta.get("metrics", {}),
                meta.get("evaluation", {}))
    from dptune.tasks.segmentation import load_module

    module = load_module(src)
    return (module.model, module.image_processor(), module.label_set, module.checkpoint_metrics,
            module.checkpoint_evaluation)


REMOTE_MODULE = "modeling_dptune"


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


def measured_how(evaluation: dict, processor) -> str:
    """One sentence on how the card's metrics were measured."""
    if evaluation.get("mode") == "slide":
        size = evaluation.get("size")
        h, w = (size, size) if isinstance(size, int) else (size or ["?", "?"])
        stride = evaluation.get("stride", 2 / 3)
        return (f"Measured with sliding {h}x{w} windows at each image's native resolution (stride {stride:.2f} of the "
                "window, overlapping logits averaged), not on whole images resized by the bundled image processor: "
                "`pipeline(...)` scores lower on large images. Reproduce with "
                "`scripts/evaluate.py --mode slide` or predict with `scripts/predict.py --mode slide`.")
    size = processor.size
    backend = evaluation.get("processor_backend")
    how = "" if backend is None else (
        f" Images were resized with the {backend} backend of `DPTImageProcessor`, the one `AutoImageProcessor` "
        f"picks when torchvision is {'installed' if backend == 'torchvision' else 'absent'}; the other backend's "
        "bicubic resize differs by up to one grey level.")
    return (f"Measured on whole images resized to {size['height']}x{size['width']} as the bundled image processor "
            f"does, logits upsampled to the label size: what `pipeline(...)` computes.{how}")


def warn_backend(evaluation: dict, source: str) -> None:
    """Say so when this environment resizes with the other image-processor backend than validation did."""
    from dptune.data.transforms import processor_backend

    used, here = evaluation.get("processor_backend"), processor_backend()
    if used and used != here:
        log.warning("%s was validated with the %s backend of DPTImageProcessor; AutoImageProcessor resolves to %s "
                    "here (torchvision %s), whose resize differs by up to one grey level: metrics may move slightly",
                    source, used, here, "installed" if here == "torchvision" else "absent")


def model_card(labels, processor, metrics: dict, source: str, remote: bool = False,
               evaluation: dict | None = None) -> str:
    size = processor.size
    lines = [
        "---", "library_name: transformers", "pipeline_tag: image-segmentation", "tags: [dpt, semantic-segmentation, dptune]",
        "---", "", "# DPT semantic segmentation (fine-tuned with dptune)", "",
        f"Exported from `{Path(source).name}`. Input: images resized to {size['height']}x{size['width']} "
        f"by the bundled image processor, normalised with mean {processor.image_mean} and std {processor.image_std}.",
        "", "```python", "from transformers import pipeline",
        "segmenter = pipeline(\"image-segmentation\", model=\"<this dir>\"" + (", trust_remote_code=True)" if remote else ")"),
        "```", "", "## Classes", "", "| id | name | colour |", "| --- | --- | --- |",
    ]
    lines += [f"| {i} | {n} | {tuple(c)} |" for i, (n, c) in enumerate(zip(labels.names, labels.colors, strict=True))]
    val = metrics.get("val") if isinstance(metrics, dict) else None
    if val:
        lines += ["", "## Validation metrics (last validation of the run)", "",
                  measured_how(evaluation or {}, processor), "",
                  f"mIoU {val['mIoU']:.4f}, pixel accuracy {val['pixel_acc']:.4f}, mean accuracy {val['mAcc']:.4f}", "",
                  "| class | IoU |", "| --- | --- |"]
        lines += [f"| {n} | {'-' if v != v else f'{v:.4f}'} |" for n, v in zip(labels.names, val["IoU"], strict=True)]
    return "\n".join(lines) + "\n"


def onnx_dynamic_size(model: nn.Module) -> bool:
    """Whether the ONNX graph can take any H x W. DPT-Hybrid's BiT stem computes its "same"
    padding in Python, which tracing freezes to the traced size: its graph keeps the processor's
    size (the bundled image processor resizes every image to it anyway)."""
    return not model.config.is_hybrid


def export_onnx(model: nn.Module, path: Path, size: tuple[int, int], opset: int = 17) -> Path:
    """ONNX with dynamic batch, height and width (see ``onnx_dynamic_size``); input
    ``pixel_values``, output ``logits``.

    Traced on an input whose patch grid is odd both ways: the fusion blocks then take their
    resize-the-skip-connection branch, which the graph must hold for odd grids (for even grids
    it resizes to the same size, an exact copy)."""
    wrapper = LogitsOnly(model).eval().float()
    p = input_multiple(model.config)
    if onnx_dynamic_size(model):
        x = torch.randn(1, 3, *((s // p) // 2 * 2 * p + p for s in size))
        dyn = {0: "batch", 2: "height", 3: "width"}
    else:
        x = torch.randn(1, 3, *size)
        dyn = {0: "batch"}
    torch.onnx.export(wrapper, (x,), str(path), input_names=["pixel_values"], output_names=["logits"],
                      dynamic_axes={"pixel_values": dyn, "logits": dyn}, opset_version=opset, dynamo=False)
    return path


def onnx_parity(model: nn.Module, path: Path, shapes: list[tuple[int, int, int]], seed: int = 0) -> float:
    """Largest |torch - onnxruntime| / max|torch| over random inputs of the given (B, H, W) shapes."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    wrapper = LogitsOnly(model).eval().float()
    g = torch.Generator().manual_seed(seed)
    worst = 0.0
    for b, h, w in shapes:
        x = torch.randn(b, 3, h, w, generator=g)
        with torch.no_grad():
            ref = wrapper(x).numpy()
        got = sess.run(["logits"], {"pixel_values": x.numpy()})[0]
        if got.shape != ref.shape:
            raise ValueError(f"ONNX output {got.shape} != torch {ref.shape} for input {b}x3x{h}x{w}")
        worst = max(worst, float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-12)))
    return worst


def push_folder(out: Path, repo: str) -> str:
    """Upload the whole exported directory (weights, processor, model card, ``dptune.json`` and,
    where present, ``model.onnx`` and ``modeling_dptune.py``), not just what ``save_pretrained``
    writes: a Swinv2/BEiT/DINOv2 model does not load on the hub without its remote code."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo, exist_ok=True)
    api.upload_folder(folder_path=str(out), repo_id=repo, commit_message="Upload DPT segmentation model (dptune)")
    url = f"https://huggingface.co/{repo}"
    log.info("pushed %s to %s", out, url)
    return url


def export(src: str, out_dir: str | Path, onnx: bool = False, fp16: bool = False, push_to_hub: str | None = None,
           tolerance: float = 1e-4) -> Path:
    """Write ``model.safetensors``, ``config.json`` (id2label), ``preprocessor_config.json``, a model
    card ``README.md`` and, with ``onnx``, ``model.onnx`` checked against torch."""
    model, processor, labels, metrics, evaluation = _load(str(src))
    warn_backend(evaluation, str(src))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.config.architectures = [type(model).__name__]
    size = (processor.size["height"], processor.size["width"])
    if model.config.is_hybrid:
        fit_hybrid_positions(model, size)
    if uses_backbone(model.config):
        remote_code(model, out)
    if onnx:
        export_onnx(model, out / "model.onnx", size)
        p = input_multiple(model.config)
        if onnx_dynamic_size(model):
            shapes = [(1, *size), (2, size[0], size[1] + 2 * p), (1, size[0] + 3 * p, max(p, size[1] - 5 * p))]
        else:
            shapes = [(1, *size), (2, *size)]
            log.info("ONNX: DPT-Hybrid graph takes %dx%d inputs only (dynamic batch)", *size)
        err = onnx_parity(model, out / "model.onnx", shapes)
        log.info("ONNX parity: max relative difference %.2e over %s", err, shapes)
        if err > tolerance:
            (out / "model.onnx").unlink()
            raise ValueError(f"ONNX export differs from torch by {err:.2e} (> {tolerance:.0e}); not written")
    if fp16:
        model = model.half()
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    (out / "README.md").write_text(model_card(labels, processor, metrics, str(src), uses_backbone(model.config),
                                              evaluation))
    (out / "dptune.json").write_text(json.dumps({"source": str(src), "labels": labels.to_dict(), "metrics": metrics,
                                                 "evaluation": evaluation}, indent=2, default=str))
    if push_to_hub:
        push_folder(out, push_to_hub)
    log.info("exported %s -> %s (%d classes)", src, out, labels.num_classes)
    return out


def export_checkpoint(ckpt: str | Path, out_dir: str | Path) -> Path:
    return export(str(ckpt), out_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="dptune checkpoint (.ckpt) or an exported directory")
    parser.add_argument("out_dir", help="output directory (created if missing)")
    parser.add_argument("--onnx", action="store_true", help="also write model.onnx (dynamic batch/height/width)")
    parser.add_argument("--fp16", action="store_true", help="store the weights in float16")
    parser.add_argument("--push-to-hub", metavar="REPO", help="upload to this Hugging Face repo")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not Path(args.source).exists():
        print(f"error: {args.source}: not found", file=sys.stderr)
        return 2
    try:
        with torch.no_grad():
            out = export(args.source, args.out_dir, onnx=args.onnx, fp16=args.fp16, push_to_hub=args.push_to_hub)
    except (ValueError, OSError, KeyError) as e:
        print(f"error: {args.source}: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
