"""The model card's sections on serving: the graphs written and what each costs against the fp32
torch model, the calibrated confidence, and what a depth model's values mean."""

from __future__ import annotations

from torch import nn

from dptune.inference.onnx_runner import GRAPHS


def serving_card(serving: dict, dynamic: bool, command: str | None = None) -> str:
    """The card's section on the serving graphs, the measured cost, and the calibration."""
    lines = _graphs_section(serving.get("graphs", {}), dynamic) if serving.get("graphs") or serving.get("measured") \
        else []
    lines += _cost_section(serving)
    lines += _calibration_section(serving.get("calibration"))
    if command and lines:
        lines += ["", f"Written by `{command}`."]
    return "\n".join(lines) + ("\n" if lines else "")


def _graphs_section(graphs: dict, dynamic: bool) -> list[str]:
    """The files, their precision and what each is for; the input; how INT8 was calibrated."""
    from dptune.export.quantize import KEPT_FLOAT

    lines = ["", "## ONNX graphs for serving", "",
             "| file | precision | for |", "| --- | --- | --- |",
             f"| `{GRAPHS['fp32']}` | float32 | reference; any ONNX Runtime execution provider |"]
    if "int8" in graphs:
        lines.append(f"| `{GRAPHS['int8']}` | int8 (QDQ, static) | CPUs (ONNX Runtime CPU execution provider) |")
    if "fp16" in graphs:
        lines.append(f"| `{GRAPHS['fp16']}` | float16, float32 inputs/outputs | GPUs (CUDA / TensorRT providers) |")
    lines += ["", "Input `pixel_values` (batch, 3, height, width), float32, prepared by the bundled image processor; "
              + ("batch, height and width are dynamic (height and width multiples of the patch size)."
                 if dynamic else "the batch is dynamic; height and width are the processor's size only "
                 "(DPT-Hybrid: its BiT stem's padding is fixed when traced).")]
    if "int8" in graphs:
        g = graphs["int8"]
        lines += ["", f"INT8: calibrated on {g['calibration_images']} images ({g['calibration_source']}), "
                  f"{g['calibration_method']} ranges; weights {g.get('weights', 'int8 (per channel)')}. "
                  f"{KEPT_FLOAT}"]
    if "fp16" in graphs:
        lines += ["", "fp16: measured below with ONNX Runtime's CPU provider, which runs the float16 nodes it has "
                  "no float16 kernel for in float32: its row is the cost of float16 weights, not of float16 "
                  "arithmetic. Export checked that no layer's output reaches float16's range on an image at "
                  "the processor's size, which a GPU's float16 would overflow."]
    return lines


def _cost_section(serving: dict) -> list[str]:
    """What each graph costs per task, the CPU it was measured on, and the command that reproduces it."""
    measured = serving.get("measured")
    if not measured:
        return []
    lines = ["", "### What each graph costs (measured at export)", "",
             "Scored on validation images held back from calibration (by path and by content: a copy of a "
             "calibration image is not held back), whole images resized by the bundled "
             "image processor, outputs upsampled to the labels' size (as `pipeline` does); `torch` is the "
             "exported model run in float32 by PyTorch."]
    for task, rows in measured.items():
        lines += [""] + (_segmentation_rows(rows) if task == "segmentation" else _depth_rows(rows))
    if "segmentation" in measured:
        lines += ["", "ECE: expected calibration error of each graph's top-1 softmax confidence (15 equal-width bins, "
                  "every labelled pixel of the held-back images): the confidence each graph serves."]
    by = serving.get("measured_by")
    if by:
        cpu = by.get("cpu", {})
        vnni = {True: "has VNNI", False: "no VNNI: int8 products are added in 16 bits", None: "not x86"}[cpu.get("vnni")]
        flags = ", ".join(cpu.get("flags") or []) or "no SIMD flags read"
        lines += ["", f"Measured on {cpu.get('model', 'an unknown CPU')} ({flags}; {vnni}), "
                  f"ONNX Runtime {by.get('onnxruntime')}."]
    for task, evaluate in (serving.get("reproduce") or {}).items():
        lines += ["", f"Reproduce the {task} int8 row on the same held-back images (listed in `dptune.json`, "
                  "`serving.data`; `--backend torch`, `onnx` or `onnx-fp16` for the other rows):", "",
                  f"    {evaluate.replace('EXPORT_DIR', '<this dir>')}"]
    return lines


def _segmentation_rows(rows: dict) -> list[str]:
    def cells(n: str, r: dict) -> list[str]:
        change = "-" if n == "torch" else f"{100 * r.get('mIoU_relative_change', 0):+.2f}%"
        ece = f"{r['ece']:.4f}" if r.get("ece") is not None else "-"
        return [f"{r['mIoU']:.4f}", f"{r['pixel_acc']:.4f}", change, f"{100 * r['agreement_with_torch']:.2f}%", ece]

    return _table(f"Segmentation, {rows['images']} held-back images:", rows, cells,
                  ["mIoU", "pixel accuracy", "mIoU change", "pixels agreeing with torch", "ECE"])


def _depth_rows(rows: dict) -> list[str]:
    def cells(n: str, r: dict) -> list[str]:
        change = "-" if n == "torch" else f"{100 * r.get('abs_rel_relative_change', 0):+.2f}%"
        return [f"{r['abs_rel']:.4f}", f"{r['delta1']:.4f}", change, f"{100 * r['rel_difference_to_torch']:.3f}%"]

    return _table(f"Depth, {rows['images']} held-back images:", rows, cells,
                  ["AbsRel", "delta1", "AbsRel change", "mean relative difference to torch"])


def _table(title: str, rows: dict, cells, header: list[str]) -> list[str]:
    """A task's cost table: one row per model (``cells`` gives its figures), a skipped model's reason."""
    lines = [title, "", "| " + " | ".join(["model", *header]) + " |", "| " + " | ".join(["---"] * (len(header) + 1)) + " |"]
    for n, r in rows.items():
        if n == "images":
            continue
        if "skipped" in r:
            lines.append(f"| {n} | {r['skipped']} |" + " |" * (len(header) - 1))
        else:
            lines.append("| " + " | ".join([n, *cells(n, r)]) + " |")
    return lines


def _calibration_section(cal: dict | None) -> list[str]:
    if not cal:
        return []
    return ["", "## Calibrated confidence", "",
            f"The class probabilities are temperature-scaled: T = {cal['temperature']:.4f}, fitted on "
            f"{cal['fitted_on_images']} validation images (negative log-likelihood of the labelled pixels) and "
            "folded into the classifier's weights and bias, so `softmax(logits)` of the stock class, "
            "`pipeline(\"image-segmentation\")`, the ONNX graphs and `predict`'s confidence maps are the "
            "calibrated probabilities. The masks (argmax) of one view are those of the uncalibrated model; "
            "`predict`'s test-time augmentation (`--flip`, `--scales`) averages the views' probabilities, "
            "which the temperature changes, so its masks can differ in a few per cent of pixels.", "",
            f"Expected calibration error ({cal['bins']} bins, top-1 confidence, up to 20,000 sampled labelled pixels each of "
            f"{cal['held_back_images']} held-back images): {cal['ece_before']:.4f} before, "
            f"{cal['ece_after']:.4f} after; NLL {cal['nll_before']:.4f} -> {cal['nll_after']:.4f}."]


def depth_values_card(meta: dict, model: nn.Module | None = None) -> str:
    """What a depth export's values mean: units, range, what invalid looks like (no uncertainty)."""
    from dptune.models.depth import head_output

    depth = meta.get("depth", {}) or {}
    mode, units = depth.get("mode", "metric"), depth.get("units", "metres")
    hi, lo = depth.get("max_depth"), depth.get("min_depth")
    head = head_output(model.config) if model is not None else None
    bound = head[2] if head and len(head) > 2 else None
    if mode == "metric":
        rng = (f"Values lie in [0, {bound:g}] {units} (the head ends in a sigmoid times {bound:g})" if bound
               else f"Values are >= 0 {units} (the head ends in a ReLU; no upper bound)")
        what = (f"`predicted_depth` is metric depth in {units} along the camera axis for each pixel of the "
                f"processor-sized input. {rng}; the model was trained and scored on ground truth "
                f"from {lo if lo is not None else 0.001:g} {units}" + (f" to {hi:g} {units}" if hi else "") + ".")
    else:
        what = ("`predicted_depth` is relative (affine-invariant inverse) depth: larger is nearer; it has no unit "
                "until aligned per image (scale and shift) to metric depth.")
    return ("\n## What the depth values mean\n\n" + what + " The model outputs a value for every pixel: there is no "
            "invalid marker and no per-pixel uncertainty (none is estimated). Sky, glass, mirrors and pixels "
            "beyond the trained range still get a value; the ground truth it was scored on marked missing depth "
            "as 0, and those pixels were left out of the metrics.\n")


def serving_sections(got: dict, model: nn.Module, served: dict, dynamic: bool) -> str:
    """What a task directory's card says beyond the run: serving graphs and their cost, calibrated
    confidence, and (depth) what the output values mean."""
    calibration = (got.get("serving") or {}).get("calibration") or got.get("calibration_kept")
    text = serving_card({**served, "calibration": calibration}, dynamic)
    if "DepthEstimation" in type(model).__name__:
        text += depth_values_card(got.get("meta") or {}, model)
    return text
