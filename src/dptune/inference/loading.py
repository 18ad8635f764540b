"""One loading path for the predictors: the model part (segmentation or depth), its image
processor and ``Preprocessing`` spec, label set and task facts, from a dptune ``.ckpt`` or an
exported directory (of a segmentation + depth model, the part asked for)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from dptune.errors import ConfigError
from dptune.labels import LabelSet
from dptune.preprocessing import Preprocessing


def exported_labels(ref: str, id2label: dict) -> LabelSet:
    """The label set of an exported directory: dptune.json's (names and colours) when the export
    wrote one, else the names in config.json's id2label with a default palette. A dptune.json without
    labels, or with labels of another shape, is one line naming it (it was a raw KeyError)."""
    from dptune.models.folders import json_object

    card = Path(ref) / "dptune.json"
    if card.exists():
        spec = json_object(card, "dptune's record of the export", key="labels")["labels"]
        if not isinstance(spec, dict):
            raise ConfigError(f"{card}: labels is a JSON {type(spec).__name__}, not the object of class names and "
                              "colours an export writes")
        labels = LabelSet.from_dict(spec, source=f"{card} labels")
        if labels.names == [id2label[i] for i in sorted(id2label)]:
            return labels
    return LabelSet.from_id2label(id2label, source=ref)


def exported_depth(ref: str, config) -> dict:
    """dptune.json's depth record (mode, units, min/max depth, alignment, eval crop), checked: each value
    of the type the export writes, and its mode config.json's (a mode edited in one of the two files
    changed how the depth was written, without a word)."""
    from dptune.models.depth import UNITS  # the depth modes
    from dptune.models.folders import json_object

    card = Path(ref) / "dptune.json"
    if not card.exists():
        return {}
    meta = json_object(card, "dptune's record of the export").get("depth", {})
    if not isinstance(meta, dict):
        raise ConfigError(f"{card}: depth is a JSON {type(meta).__name__}, not the object (mode, units, depth range) "
                          "an export writes")
    mode = meta.get("mode")
    if mode is not None and mode not in UNITS:
        raise ConfigError(f"{card}: depth.mode {mode!r}: metric or relative")
    own = getattr(config, "depth_mode", None)
    if mode is not None and own in UNITS and mode != own:
        raise ConfigError(f"{card}: depth.mode {mode!r}, but config.json's depth_mode is {own!r}: the two records "
                          "of the export disagree (a hand-edited file); make them the same")
    for key in ("min_depth", "max_depth"):
        value = meta.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
            raise ConfigError(f"{card}: depth.{key} {value!r}: a depth in metres (a number, 0 or more) or null")
    for key in ("alignment", "eval_crop", "units"):
        value = meta.get(key)
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"{card}: depth.{key} {value!r}: a name (text) or null")
    return meta


def load_export(ref: str, trust_remote_code: bool = False) -> tuple[torch.nn.Module, object]:
    """(model, image processor) of an exported directory (segmentation or depth), loaded without
    ever asking at a terminal whether to run code shipped with it: ``trust_remote_code`` goes to
    every ``transformers`` loader, and a directory that needs such code (an ``auto_map`` to a class
    ``transformers`` does not have) stops without it in one line saying how to allow it. dptune's
    own exports load with the stock or dptune class and never need it: the ``modeling_dptune.py``
    they ship is for plain ``transformers``. (What ``dptune.models.load_exported`` does, with the
    flag passed on.)"""
    from transformers import (
        AutoConfig,
        AutoImageProcessor,
        AutoModelForDepthEstimation,
        DepthAnythingConfig,
        DPTConfig,
    )

    from dptune.models.attention import transformers_quiet
    from dptune.models.backbones import model_class
    from dptune.models.folders import check_export_files

    if Path(ref).is_dir():  # a damaged folder is one line naming the file; a hub id goes to transformers as it is
        check_export_files(ref)
    try:
        cfg = AutoConfig.from_pretrained(ref, trust_remote_code=trust_remote_code)
        if not isinstance(cfg, (DPTConfig, DepthAnythingConfig)):  # DPT's classes would take any config's numbers
            raise ConfigError(f"{ref}: config.json says model_type {cfg.model_type!r}: not a DPT or Depth Anything "
                              "model, which is what dptune loads")
        processor = AutoImageProcessor.from_pretrained(ref, trust_remote_code=trust_remote_code)
        with transformers_quiet():  # its LOAD REPORT table: what it says is said below in one line
            if any("DepthEstimation" in a for a in cfg.architectures or []):
                model, info = AutoModelForDepthEstimation.from_pretrained(
                    ref, config=cfg, trust_remote_code=trust_remote_code, dtype=torch.float32,
                    output_loading_info=True, ignore_mismatched_sizes=True)
            else:
                model, info = model_class(cfg).from_pretrained(ref, config=cfg, dtype=torch.float32,
                                                               output_loading_info=True, ignore_mismatched_sizes=True)
    except ValueError as e:
        if "trust_remote_code" not in str(e):
            raise
        raise ConfigError(f"{ref}: the model's config asks to run code shipped with it (auto_map), which is not run "
                          "unless you allow it: give --trust-remote-code if you trust where it came from") from None
    mismatched = sorted(info.get("mismatched_keys") or [])
    if mismatched:  # a weight of another shape than config.json builds (id2label cut to fewer classes)
        key, *shapes = mismatched[0]
        said = f"{key} is {tuple(shapes[0])} in the weights, {tuple(shapes[1])} by config.json" if len(shapes) == 2 \
            else key
        raise ConfigError(f"{ref}: config.json and the weights do not fit each other ({said}"
                          f"{f' and {len(mismatched) - 1} more' if len(mismatched) > 1 else ''}); a damaged or "
                          "hand-edited export")
    # what prediction never uses: BatchNorm's step counters, the auxiliary head (training only)
    missing = sorted(k for k in info.get("missing_keys") or []
                     if not k.endswith("num_batches_tracked") and not k.startswith("auxiliary_head."))
    if missing:  # transformers draws them at random and goes on: every score and mask would be noise
        raise ConfigError(f"{ref}: the weights file lacks {len(missing)} of the model's weights ({', '.join(missing[:3])}"
                          f"{', ...' if len(missing) > 3 else ''}); a damaged or foreign export: nothing is run with "
                          "weights drawn at random")
    return model, processor


def placed(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``model`` in eval mode on ``device``, in float32: dptune's tools compute a ``--fp16`` export's
    weights (loaded as float32, the stored values exactly) in float32 on any device (a CPU without
    native float16 would be many times slower in it, and float16 activations can overflow)."""
    return model.eval().to(device).float()


@dataclass
class Loaded:
    """What a predictor needs of a model part."""

    model: torch.nn.Module
    processor: object  # the DPTImageProcessor plain transformers uses with it
    preprocessing: Preprocessing  # the spec: the checkpoint's own, or the export's processor's
    labels: LabelSet | None = None  # segmentation
    meta: dict = field(default_factory=dict)  # depth: mode, units, min/max depth, alignment, eval crop


def load_part(ref: str, part: Literal["segmentation", "depth"], trust_remote_code: bool = False) -> Loaded:
    """``ref``: a dptune ``.ckpt`` or a directory written by ``scripts/export.py``; of a
    segmentation + depth model, its ``part``. Code shipped with a directory runs only with
    ``trust_remote_code`` (see ``load_export``)."""
    if Path(ref).is_dir():
        from dptune.models.source import joint_part

        ref = joint_part(ref, part)
        model, processor = load_export(ref, trust_remote_code)
        if part == "segmentation":
            return Loaded(model, processor, Preprocessing.from_processor(processor, ref),
                          labels=exported_labels(ref, model.config.id2label))
        return Loaded(model, processor, Preprocessing.from_processor(processor, ref),
                      meta=exported_depth(ref, model.config))
    from dptune.tasks.checkpoints import load_module

    module = load_module(ref)
    model = module.model
    if module.task == "multitask":
        model = module.model.seg if part == "segmentation" else module.model.depth
    common = (model, module.image_processor(), module.preprocessing)
    if part == "segmentation":
        return Loaded(*common, labels=module.label_set)
    return Loaded(*common, meta=module.checkpoint_meta.get("depth", {}))
