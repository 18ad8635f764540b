"""Model cards of exported directories: what the model predicts, how to load it, its metrics and
how they were measured."""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)


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


NOT_SCORED = "No validation image was scored in the run's last validation, so there are no figures."


def scored(val: dict | None) -> bool:
    """Whether a validation's figures are results: it scored something (NaN figures are none)."""
    return bool(val) and val.get("images", 1) != 0 and all(v == v for v in val.values() if isinstance(v, float))


def on_images(val: dict) -> str:
    """`` on N validation images`` where the checkpoint counted them (older ones did not)."""
    n = val.get("images")
    return "" if n is None else f" on {int(n)} validation image{'' if int(n) == 1 else 's'}"


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
    if val and not scored(val):
        lines += ["", "## Validation metrics", "", NOT_SCORED]
    elif val:
        lines += ["", "## Validation metrics (last validation of the run)", "",
                  measured_how(evaluation or {}, processor), "",
                  f"mIoU {val['mIoU']:.4f}{on_images(val)}, pixel accuracy {val['pixel_acc']:.4f}, mean accuracy {val['mAcc']:.4f}", "",
                  "| class | IoU |", "| --- | --- |"]
        lines += [f"| {n} | {'-' if v != v else f'{v:.4f}'} |" for n, v in zip(labels.names, val["IoU"], strict=True)]
    return "\n".join(lines) + "\n"


def depth_range_words(depth: dict) -> str:
    """The ground-truth range a metric model trained on, in words ("from 0.001 m up to 10 m")."""
    lo, hi = depth.get("min_depth"), depth.get("max_depth")
    return (f"from {lo if lo is not None else 0.001:g} m" + (f" up to {hi:g} m" if hi is not None else " (no upper limit)"))


def depth_card(meta: dict, processor, metrics: dict, source: str) -> str:
    """The card of a depth export: output mode and units, loading, validation metrics."""
    depth = meta.get("depth", {})
    mode, units = depth.get("mode", "metric"), depth.get("units", "metres")
    size = processor.size
    lines = [
        "---", "library_name: transformers", "pipeline_tag: depth-estimation", "tags: [dpt, depth-estimation, dptune]",
        "---", "", "# DPT monocular depth (fine-tuned with dptune)", "",
        f"Exported from `{Path(source).name}`. Output: `predicted_depth`, **{mode}** depth in **{units}**"
        + (f", trained on ground truth {depth_range_words(depth)}." if mode == "metric"
           else "; align it to metric depth per image (scale and shift of inverse depth) before comparing."),
        f"Input: images resized to {size['height']}x{size['width']} by the bundled image processor, normalised with "
        f"mean {processor.image_mean} and std {processor.image_std}.",
        "", "```python", "from transformers import pipeline",
        "depth = pipeline(\"depth-estimation\", model=\"<this dir>\")",
        "out = depth(image)  # out[\"predicted_depth\"]: resized (bicubic) to the image's size; out[\"depth\"] a picture",
        "```",
    ]
    val = metrics.get("val") if isinstance(metrics, dict) else None
    if val and not scored(val):
        lines += ["", "## Validation metrics", "", NOT_SCORED]
    elif val:
        over = on_images(val).removeprefix(" on ") or "images"
        how = ("Predictions upsampled (bicubic, as `pipeline` does) to the ground truth's size, scored per image "
               f"on pixels with ground truth and averaged over {over}"
               + (f", after per-image {depth.get('alignment')} alignment"
                  if depth.get("alignment") not in (None, "none") else "")
               + (f", {depth.get('eval_crop')} crop" if depth.get("eval_crop") not in (None, "none") else "") + ".")
        lines += ["", "## Validation metrics (last validation of the run)", "", how, "",
                  "| AbsRel | SqRel | RMSE | RMSE log | log10 | SILog | delta1 | delta2 | delta3 |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
                  "| " + " | ".join(f"{val[k]:.4f}" for k in ("abs_rel", "sq_rel", "rmse", "rmse_log", "log10", "silog",
                                                           "delta1", "delta2", "delta3")) + " |"]
    return "\n".join(lines) + "\n"


def multitask_card(labels, metrics: dict, source: str, onnx: bool, repo: str | None = None) -> str:
    """The top-level card of a segmentation + depth export: one subfolder per task, each a stock
    ``transformers`` model, and (with ONNX) one graph computing both outputs in one pass."""
    where = repo or "<this dir>"
    seg = (metrics.get("segmentation") or {}).get("val") or {}
    depth = (metrics.get("depth") or {}).get("val") or {}
    lines = [
        "---", "library_name: transformers", "tags: [dpt, semantic-segmentation, depth-estimation, multi-task, dptune]",
        "---", "", "# DPT segmentation + depth, one backbone (fine-tuned with dptune)", "",
        f"Exported from `{Path(source).name}`: one backbone trained by both tasks, with a segmentation head "
        f"({labels.num_classes} classes: {', '.join(labels.names)}) and a metric depth head (metres).",
        "Each task is a stock `transformers` model in its own subfolder (its own card and processor); the two "
        "share the backbone's weights.", "",
        "```python", "from transformers import AutoModelForDepthEstimation, DPTForSemanticSegmentation",
        f"seg = DPTForSemanticSegmentation.from_pretrained(\"{where}\", subfolder=\"segmentation\")",
        f"depth = AutoModelForDepthEstimation.from_pretrained(\"{where}\", subfolder=\"depth\")",
        "```",
    ]
    if onnx:
        lines += ["", "`model.onnx` runs the backbone once and returns both `logits` and `predicted_depth` "
                  "(inputs normalised as the subfolders' processors do)."]
    if seg or depth:
        lines += ["", "## Validation metrics (last validation of the run; each task on its own data)", ""]
        if seg:
            lines.append(f"- segmentation: mIoU {seg['mIoU']:.4f}{on_images(seg)}, pixel accuracy {seg['pixel_acc']:.4f}"
                         if scored(seg) else f"- segmentation: {NOT_SCORED}")
        if depth:
            lines.append(f"- depth: AbsRel {depth['abs_rel']:.4f}{on_images(depth)}, RMSE {depth['rmse']:.4f} m, "
                         f"delta1 {depth['delta1']:.4f}" if scored(depth) else f"- depth: {NOT_SCORED}")
    return "\n".join(lines) + "\n"


def training_precision(precision: dict | None) -> str:
    """The card's line on the precision the run trained in (and why, where ``auto`` chose it)."""
    if not precision:
        return ""
    why = "" if precision.get("reason", "as given") == "as given" else f" (precision: auto; {precision['reason']})"
    return f"\n## Training\n\nTrained in `{precision['precision']}`{why}.\n"
