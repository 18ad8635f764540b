"""What ``export --int8 / --onnx-fp16 / --calibrate-temperature`` adds to an export, and what it costs.

- ``calibrate``: temperature scaling of a segmentation model (or a joint model's segmentation head),
  fitted on the validation split's fit part and folded into the classifier (``dptune.export.temperature``);
  ECE before / after on the held-back part.
- ``write_graphs``: ``model_int8.onnx`` / ``model_fp16.onnx`` from the export's ``model.onnx``
  (``dptune.export.quantize``), INT8 calibrated on the calibration images.
- ``measure``: every graph written (fp32, int8, and fp16 where ONNX Runtime runs it on this CPU)
  scored against the fp32 torch model on the held-back images: mIoU and pixel accuracy against the
  masks (segmentation), AbsRel and delta1 against the depth maps (depth), and how often / how far
  each graph departs from torch's own output.

The figures go into the model card (``dptune.export.serving_card``) and ``dptune.json`` (``serving``)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from dptune.errors import of_image
from dptune.export.serving_data import DEFAULT_COUNT, ServingData, prepare, serving_data
from dptune.inference.onnx_runner import GRAPHS, OnnxGraph
from dptune.metrics import require_finite
from dptune.metrics.segmentation import class_map

log = logging.getLogger(__name__)


@dataclass
class ServingOptions:
    int8: bool = False
    fp16: bool = False  # model_fp16.onnx (the --fp16 of export stores float16 safetensors)
    temperature: bool = False
    calibration_images: str | None = None
    data: str | None = None  # a train.py config naming the validation split (default: the run's config.yaml)
    count: int = DEFAULT_COUNT
    method: str = "minmax"
    keep_float: tuple[str, ...] = ()
    target: str = "portable"  # INT8 weights: 7-bit (any x86 CPU) or "vnni" (full 8-bit; VNNI / AMX CPUs only)

    @property
    def any(self) -> bool:
        return self.int8 or self.fp16 or self.temperature

    @property
    def needs_data(self) -> bool:  # calibration, temperature, and the measurement of every graph
        return self.any


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


def segmentation_model(model: nn.Module, joint: bool) -> nn.Module:
    return model.seg if joint else model


# ----------------------------------------------------------------------------------------- temperature
def calibrate(model: nn.Module, processor, labels, data: ServingData, joint: bool) -> dict:
    """Fit T on the segmentation split's fit part, fold it into ``model``; ECE before / after on
    the held-back part."""
    from dptune.data.dataset import encode_sample
    from dptune.export.temperature import calibration_report, fold_temperature, pixel_logits

    seg = data.tasks["segmentation"]
    labels = seg.labels or labels  # the source's own (its ignore values), in the model's classes
    ref = Reference(model, joint)
    rng = np.random.default_rng(0)

    def gather(indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = [], []
        for i in indices:
            image, mask = encode_sample(*seg.source.load(i), labels)
            x, y = pixel_logits(ref(prepare(processor, image))["logits"], mask, rng)
            xs.append(x)
            ys.append(y)
        return torch.cat(xs), torch.cat(ys)

    fit, held = gather(seg.fit), gather(seg.held)
    if not len(fit[1]) or not len(held[1]):
        raise ValueError(f"{data.where}: no labelled pixel in the validation images to fit a temperature on")
    report = calibration_report(fit, held, len(seg.fit), len(seg.held))
    fold_temperature(segmentation_model(model, joint), report["temperature"])
    log.info("temperature %.3f folded into the classifier: ECE %.4f -> %.4f on %d held-back images",
             report["temperature"], report["ece_before"], report["ece_after"], len(seg.held))
    return report


# ----------------------------------------------------------------------------------------------- graphs
def write_graphs(fp32: Path, processor, data: ServingData | None, options: ServingOptions) -> dict:
    """``model_int8.onnx`` and / or ``model_fp16.onnx`` beside ``fp32``; what each holds."""
    from dptune.export.quantize import convert_fp16, quantize_int8

    done = {}
    if options.int8:
        batches = (prepare(processor, p) for p in data.calibration)
        done["int8"] = quantize_int8(fp32, fp32.parent / GRAPHS["int8"], batches, options.method,
                                     list(options.keep_float), options.target)
        done["int8"].update(calibration_images=len(data.calibration),
                            calibration_source=data.glob or f"validation split of {data.where} (fit part)")
        log.info("INT8 graph: %s calibrated on %d images (%s); kept in float: %s", GRAPHS["int8"],
                 len(data.calibration), options.method, ", ".join(done["int8"]["kept_float_nodes"]) or "none")
    if options.fp16:
        done["fp16"] = convert_fp16(fp32, fp32.parent / GRAPHS["fp16"])
        log.info("fp16 graph: %s", GRAPHS["fp16"])
    return done


def _graphs(folder: Path, precisions: list[str]) -> dict[str, OnnxGraph | str]:
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


def _outputs(ref: Reference, graphs: dict, x: np.ndarray) -> dict[str, dict[str, np.ndarray] | None]:
    """Every model's outputs for one input: the torch model's first, so that a graph whose output
    alone is NaN/inf is blamed on its conversion, not on the weights."""
    return {"torch": ref(x), **{n: _run(g, x, n) for n, g in graphs.items()}}


def measure(model: nn.Module, processor, labels, meta: dict, data: ServingData, folder: Path,
            precisions: list[str], joint: bool) -> dict:
    """Each graph in ``folder`` (``precisions``) and the fp32 torch model scored on the held-back
    images of each task; returns ``{task: {"images": n, "torch": {...}, "fp32": {...}, ...}}``."""
    from dptune.data.dataset import encode_sample
    from dptune.export.temperature import ECEBins
    from dptune.metrics.depth import DepthMetrics, valid_depth
    from dptune.metrics.segmentation import metrics_from_confmat

    ref = Reference(model, joint)
    graphs = _graphs(folder, precisions)
    result: dict[str, dict] = {}
    for task, part in data.tasks.items():
        names = ["torch", *graphs]
        if task == "segmentation":
            encoding = part.labels or labels  # the source's own (its ignore values), in the model's classes
            c = labels.num_classes
            conf = {n: np.zeros((c, c), np.int64) for n in names}
            agree = dict.fromkeys(names, 0)
            calibration = {n: ECEBins() for n in names}  # of what each graph serves: T was fitted on fp32 logits
            pixels = 0
            for i in part.held:
                image, mask = encode_sample(*part.source.load(i), encoding)
                x = prepare(processor, image)
                with of_image(part.source.name(i)):
                    outs = _outputs(ref, graphs, x)
                ok = mask != 255
                target = torch.from_numpy(mask[ok].astype(np.int64))
                base = None
                for n, o in outs.items():
                    if o is None:
                        continue
                    up = F.interpolate(torch.from_numpy(o["logits"]), size=mask.shape, mode="bilinear",
                                       align_corners=False)[0]
                    pred = class_map(up, 0)
                    base = pred if n == "torch" else base
                    labelled = torch.from_numpy(ok)
                    calibration[n].add(up.double().softmax(0).amax(0)[labelled], pred[labelled] == target)
                    agree[n] += int((pred == base).sum())
                    conf[n] += np.bincount((target * c + pred[torch.from_numpy(ok)]).numpy(),
                                           minlength=c * c).reshape(c, c)
                pixels += mask.size
            task_out = {"images": len(part.held)}
            for n in names:
                if isinstance(graphs.get(n), str):
                    task_out[n] = {"skipped": graphs[n]}
                    continue
                m = metrics_from_confmat(torch.from_numpy(conf[n]))
                task_out[n] = {"mIoU": float(m["mIoU"]), "pixel_acc": float(m["pixel_acc"]),
                               "agreement_with_torch": agree[n] / max(pixels, 1), "ece": calibration[n].value()}
        else:
            depth = meta.get("depth", {}) or {}
            lo, hi = float(depth.get("min_depth") or 1e-3), depth.get("max_depth")
            align = depth.get("alignment") if depth.get("alignment") not in (None, "none") else None
            scores = {n: DepthMetrics(min_depth=lo, max_depth=hi, alignment=align) for n in names}
            dev = dict.fromkeys(names, 0.0)
            for i in part.held:
                image, gt, _ = part.source.load(i)
                x = prepare(processor, image)
                with of_image(part.source.name(i)):
                    outs = _outputs(ref, graphs, x)
                g_t = torch.from_numpy(np.asarray(gt, np.float32))[None]
                valid = valid_depth(g_t, lo, hi)
                base = None
                for n, o in outs.items():
                    if o is None:
                        continue
                    pred = F.interpolate(torch.from_numpy(o["predicted_depth"])[:, None], size=gt.shape[:2],
                                         mode="bicubic", align_corners=False)[:, 0]
                    base = pred if n == "torch" else base
                    scores[n].update(pred, g_t, valid)
                    dev[n] += float(((pred - base).abs() / base.abs().clamp(min=1e-6)).mean())
            task_out = {"images": len(part.held)}
            for n in names:
                if isinstance(graphs.get(n), str):
                    task_out[n] = {"skipped": graphs[n]}
                    continue
                m = scores[n].compute()
                task_out[n] = {"abs_rel": float(m["abs_rel"]), "delta1": float(m["delta1"]),
                               "rel_difference_to_torch": dev[n] / max(len(part.held), 1)}
        for n in names[1:]:  # the cost, relative to the torch model's own figure
            row, base = task_out[n], task_out["torch"]
            key = "mIoU" if task == "segmentation" else "abs_rel"
            if key in row and base.get(key):
                row[f"{key}_relative_change"] = (row[key] - base[key]) / base[key]
        result[task] = task_out
        log.info("measured on %d held-back %s images: %s", len(part.held), task,
                 "; ".join(f"{n} {_summary(task, task_out[n])}" for n in names))
    return result


def _summary(task: str, row: dict) -> str:
    if "skipped" in row:
        return row["skipped"]
    if task == "segmentation":
        return f"mIoU {row['mIoU']:.4f} pixel acc {row['pixel_acc']:.4f}"
    return f"AbsRel {row['abs_rel']:.4f} delta1 {row['delta1']:.4f}"


def prepare_serving(src: str, task: str, options: ServingOptions, labels=None) -> ServingData | None:
    """The data the options need (None when they need none), checked against the model's ``labels``."""
    if not options.needs_data:
        return None
    return serving_data(src, task, options.data, options.calibration_images, options.count,
                        int8=options.int8, temperature=options.temperature, labels=labels)


# ------------------------------------------------------------------------------- the export's hooks
def prepare_export(got: dict, src: str, options: ServingOptions) -> dict:
    """Before anything is written: the data the options need (checked, one line when unusable) and,
    with ``options.temperature``, the temperature fitted and folded into ``got["model"]``."""
    from dptune.errors import ConfigError
    from dptune.inference.onnx_runner import require_onnx, require_onnxruntime

    joint = got.get("task") == "multitask"
    depth = "DepthEstimation" in type(got["model"]).__name__
    task = "multitask" if joint else "depth" if depth else "segmentation"
    if options.temperature and depth:
        raise ConfigError("--calibrate-temperature: a depth model has no class probabilities to calibrate "
                          "(its card says what its values mean)")
    if options.int8 or options.fp16:
        require_onnxruntime("--int8 / --onnx-fp16")
        require_onnx("--int8 / --onnx-fp16")
    data = prepare_serving(src, task, options, None if depth else got.get("labels"))
    calibration = None
    if options.temperature:
        calibration = calibrate(got["model"], got["processor"], got["labels"], data, joint)
    return {"options": options, "data": data, "calibration": calibration, "task": task}


def serve(got: dict, model: nn.Module, fp32: Path, joint: bool) -> dict:
    """The serving graphs beside ``fp32`` and every graph's measured cost (for ``dptune.json``): the
    images it was measured and calibrated on, the machine that measured it and the commands that
    reproduce the figures."""
    from dptune.inference.onnx_runner import cpu_info, require_onnxruntime

    s = got["serving"]
    options, data = s["options"], s["data"]
    graphs = write_graphs(fp32, got["processor"], data, options) if (options.int8 or options.fp16) else {}
    measured = measure(model, got["processor"], got.get("labels"), got.get("meta") or {}, data, fp32.parent,
                       ["fp32", *graphs], joint)
    return {"graphs": graphs, "measured": measured,
            "measured_on": f"held-back part of the validation split of {data.where}",
            "measured_by": {"cpu": cpu_info(), "onnxruntime": require_onnxruntime().__version__},
            "data": data_record(data, options), "reproduce": reproduce_commands(data)}


def data_record(data: ServingData, options: ServingOptions) -> dict:
    """Which images calibrated and which measured (paths relative to each task's data root)."""
    out: dict = {"config": data.where, "split": "val"}
    for task, part in data.tasks.items():
        out[task] = {"root": part.root, "held_back": part.relative(part.held)}
        if part.fit:  # it calibrated INT8 or fitted the temperature
            out[task]["fit"] = part.relative(part.fit)
    if data.glob:
        out["calibration_images"] = {"glob": data.glob, "images": [Path(p).as_posix() for p in data.calibration]}
    return out


def reproduce_commands(data: ServingData) -> dict[str, str]:
    """Per task, the ``evaluate`` command that scores exactly the held-back images (the int8 row;
    ``--backend`` torch / onnx / onnx-fp16 for the others)."""
    import shlex

    out = {}
    for task, part in data.tasks.items():
        sec, split = part.section, (part.section.get("splits") or {}).get("val") or {}
        if task == "segmentation" and len(data.tasks) == 1:
            where = f"--config {shlex.quote(data.where)}"
        elif task == "segmentation":
            labels = sec.get("labels") if isinstance(sec.get("labels"), str) else "LABELS.yaml"
            where = (f"--root {shlex.quote(part.root)} --images {shlex.quote(split.get('images', ''))} "
                     f"--masks {shlex.quote(split.get('masks', ''))} --labels {shlex.quote(labels)}")
        else:
            scale = sec.get("depth_scale")
            where = (f"--root {shlex.quote(part.root)} --images {shlex.quote(split.get('images', ''))} "
                     f"--depth {shlex.quote(split.get('depth', ''))}" + (f" --depth-scale {scale:g}" if scale else ""))
        out[task] = f"dptune evaluate --model EXPORT_DIR {where} --backend onnx-int8 --held-back"
    return out


def record_joint(out: Path, served: dict) -> None:
    """A joint export's graphs lie at its top; each part's ``dptune.json`` records its task's figures."""
    import json

    for task in ("segmentation", "depth"):
        path = out / task / "dptune.json"
        if not path.is_file() or task not in served.get("measured", {}):
            continue
        meta = json.loads(path.read_text())
        data = served.get("data") or {}
        meta["serving"] = {**meta.get("serving", {}), "graphs_in": "..", "graphs": served["graphs"],
                           "measured": {task: served["measured"][task]}, "measured_on": served["measured_on"],
                           "measured_by": served.get("measured_by"),
                           "data": {k: v for k, v in data.items() if k not in ("segmentation", "depth") or k == task},
                           "reproduce": {task: (served.get("reproduce") or {}).get(task)}}
        path.write_text(json.dumps(meta, indent=2, default=str))
