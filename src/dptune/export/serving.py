"""What ``export --int8 / --onnx-fp16 / --calibrate-temperature`` adds to an export, and what it costs.

- ``calibrate``: temperature scaling of a segmentation model (or a joint model's segmentation head),
  fitted on the validation split's fit part and folded into the classifier (``dptune.export.temperature``);
  ECE before / after on the held-back part.
- ``write_graphs``: ``model_int8.onnx`` / ``model_fp16.onnx`` from the export's ``model.onnx``
  (``dptune.export.quantize``), INT8 calibrated on the calibration images.
- ``measure`` (``dptune.export.measure``): every graph written scored against the fp32 torch model
  on the held-back images.

The figures go into the model card (``dptune.export.serving_card``) and ``dptune.json`` (``serving``)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dptune.export.measure import Reference, measure
from dptune.export.serving_data import DEFAULT_COUNT, ServingData, prepare, serving_data
from dptune.inference.onnx_runner import GRAPHS

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
