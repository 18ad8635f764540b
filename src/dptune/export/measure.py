"""What each graph of an export costs: every graph written (fp32, int8, and fp16 where ONNX Runtime
runs it on this CPU) scored against the fp32 torch model on the held-back images: mIoU, pixel
accuracy and expected calibration error against the masks (segmentation), AbsRel and delta1 against
the depth maps (depth), and how often / how far each graph departs from torch's own output."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from dptune.errors import of_image
from dptune.export.serving_data import ServingData, TaskData, prepare
from dptune.inference.onnx_runner import GRAPHS, OnnxGraph
from dptune.metrics import require_finite
from dptune.metrics.segmentation import class_map

log = logging.getLogger(__name__)


class Reference(nn.Module):
    """``pixel_values -> {output name: tensor}`` of the torch model, for one task or a joint model."""

    def __init__(self, model: nn.Module, joint: bool) -> None:
        super().__init__()
        from dptune.export.onnx import JointOutputs, TaskOutput

        self.joint = joint
        self.net = (JointOutputs(model) if joint else TaskOutput(model)).eval().float()

    @torch.no_grad()
    def forward(self, x: np.ndarray) -> dict[str, np.ndarray]:
        out = self.net(torch.from_numpy(x))
        outs = {"logits": out[0].numpy(), "predicted_depth": out[1].numpy()} if self.joint else {self.net.output: out.numpy()}
        for name, value in outs.items():
            require_finite(value, f"the model's output ({name})")
        return outs


def graph_sessions(folder: Path, precisions: list[str]) -> dict[str, OnnxGraph | str]:
    """Sessions of the graphs to measure; a graph ONNX Runtime cannot run on this CPU is the reason why."""
    out: dict[str, OnnxGraph | str] = {}
    for p in precisions:
        try:
            g = OnnxGraph(folder / GRAPHS[p])
            out[p] = g
        except Exception as e:  # fp16 kernels missing on this CPU build, typically
            out[p] = f"not run on this CPU ({str(e).splitlines()[0][:160]})"
    return out


# why a graph's output is NaN/inf where the torch model's (checked first, on the same input) is finite
BROKEN_BY = {
    "fp32": "the ONNX export broke it: run `dptune export --onnx` alone to see the parity check",
    "int8": "the INT8 quantization broke it: keep the offending nodes in float (--int8-keep-float) or try another "
            "--calibration-method",
    "fp16": "the fp16 conversion overflows float16's range (65504): leave --onnx-fp16 out",
}


def _run(g: OnnxGraph | str, x: np.ndarray, precision: str) -> dict[str, np.ndarray] | None:
    if isinstance(g, str):
        return None
    outs = g(x)
    for name, value in outs.items():
        require_finite(value, f"the output ({name}) of {g.path.name}", BROKEN_BY[precision])
    return outs


def every_output(ref: Reference, graphs: dict, x: np.ndarray) -> dict[str, dict[str, np.ndarray] | None]:
    """Every model's outputs for one input: the torch model's first, so that a graph whose output
    alone is NaN/inf is blamed on its conversion, not on the weights."""
    return {"torch": ref(x), **{n: _run(g, x, n) for n, g in graphs.items()}}


def measure(model: nn.Module, processor, labels, meta: dict, data: ServingData, folder: Path,
            precisions: list[str], joint: bool) -> dict:
    """Each graph in ``folder`` (``precisions``) and the fp32 torch model scored on the held-back
    images of each task; returns ``{task: {"images": n, "torch": {...}, "fp32": {...}, ...}}``."""
    ref = Reference(model, joint)
    graphs = graph_sessions(folder, precisions)
    result: dict[str, dict] = {}
    for task, part in data.tasks.items():
        names = ["torch", *graphs]
        if task == "segmentation":  # the source's own encoding (its ignore values), in the model's classes
            scores = _segmentation_scores(part, ref, graphs, processor, part.labels or labels, labels.num_classes)
        else:
            scores = _depth_scores(part, ref, graphs, processor, meta.get("depth", {}) or {})
        task_out: dict = {"images": len(part.held)}
        for n in names:
            task_out[n] = {"skipped": graphs[n]} if isinstance(graphs.get(n), str) else scores[n]
        key = "mIoU" if task == "segmentation" else "abs_rel"
        for n in names[1:]:  # the cost, relative to the torch model's own figure
            row, base = task_out[n], task_out["torch"]
            if key in row and base.get(key):
                row[f"{key}_relative_change"] = (row[key] - base[key]) / base[key]
        result[task] = task_out
        log.info("measured on %d held-back %s images: %s", len(part.held), task,
                 "; ".join(f"{n} {_summary(task, task_out[n])}" for n in names))
    return result


def _segmentation_scores(part: TaskData, ref: Reference, graphs: dict, processor, encoding, c: int) -> dict:
    """Per model that ran: mIoU, pixel accuracy, agreement with torch's class map, ECE."""
    from dptune.data.dataset import encode_sample
    from dptune.export.temperature import ECEBins
    from dptune.metrics.segmentation import metrics_from_confmat

    names = ["torch", *graphs]
    conf = {n: np.zeros((c, c), np.int64) for n in names}
    agree = dict.fromkeys(names, 0)
    calibration = {n: ECEBins() for n in names}  # of what each graph serves: T was fitted on fp32 logits
    pixels = 0
    for i in part.held:
        image, mask = encode_sample(*part.source.load(i), encoding)
        with of_image(part.source.name(i)):
            outs = every_output(ref, graphs, prepare(processor, image))
        ok = torch.from_numpy(mask != 255)
        target = torch.from_numpy(mask).long()[ok]
        base = None
        for n, o in outs.items():
            if o is None:
                continue
            up = F.interpolate(torch.from_numpy(o["logits"]), size=mask.shape, mode="bilinear", align_corners=False)[0]
            pred = class_map(up, 0)
            base = pred if n == "torch" else base
            calibration[n].add(up.double().softmax(0).amax(0)[ok], pred[ok] == target)
            agree[n] += int((pred == base).sum())
            conf[n] += np.bincount((target * c + pred[ok]).numpy(), minlength=c * c).reshape(c, c)
        pixels += mask.size
    out = {}
    for n in names:
        m = metrics_from_confmat(torch.from_numpy(conf[n]))
        out[n] = {"mIoU": float(m["mIoU"]), "pixel_acc": float(m["pixel_acc"]),
                  "agreement_with_torch": agree[n] / max(pixels, 1), "ece": calibration[n].value()}
    return out


def _depth_scores(part: TaskData, ref: Reference, graphs: dict, processor, depth: dict) -> dict:
    """Per model that ran: AbsRel and delta1 on valid pixels, mean relative difference to torch's depth."""
    from dptune.metrics.depth import DepthMetrics, valid_depth

    names = ["torch", *graphs]
    lo, hi = float(depth.get("min_depth") or 1e-3), depth.get("max_depth")
    align = depth.get("alignment") if depth.get("alignment") not in (None, "none") else None
    scores = {n: DepthMetrics(min_depth=lo, max_depth=hi, alignment=align) for n in names}
    dev = dict.fromkeys(names, 0.0)
    for i in part.held:
        image, gt, _ = part.source.load(i)
        with of_image(part.source.name(i)):
            outs = every_output(ref, graphs, prepare(processor, image))
        g_t = torch.from_numpy(np.asarray(gt, np.float32))[None]
        valid = valid_depth(g_t, lo, hi)
        base = None
        for n, o in outs.items():
            if o is None:
                continue
            pred = F.interpolate(torch.from_numpy(o["predicted_depth"])[:, None], size=gt.shape[:2], mode="bicubic",
                                 align_corners=False)[:, 0]
            base = pred if n == "torch" else base
            scores[n].update(pred, g_t, valid)
            dev[n] += float(((pred - base).abs() / base.abs().clamp(min=1e-6)).mean())
    out = {}
    for n in names:
        m = scores[n].compute()
        out[n] = {"abs_rel": float(m["abs_rel"]), "delta1": float(m["delta1"]),
                  "rel_difference_to_torch": dev[n] / max(len(part.held), 1)}
    return out


def _summary(task: str, row: dict) -> str:
    if "skipped" in row:
        return row["skipped"]
    if task == "segmentation":
        return f"mIoU {row['mIoU']:.4f} pixel acc {row['pixel_acc']:.4f}"
    return f"AbsRel {row['abs_rel']:.4f} delta1 {row['delta1']:.4f}"
