"""Depth models: ``DPTForDepthEstimation`` (DPT's own ViT, DPT-Hybrid, or any ``transformers``
backbone) and Depth Anything (``DepthAnythingForDepthEstimation``), from a hub id, a directory, a
dptune checkpoint or export of either task, a bare backbone, or a config with random weights.

The models stay the stock ``transformers`` classes, so an exported directory loads with
``AutoModelForDepthEstimation`` and ``pipeline("depth-estimation")`` without dptune; only the
forward pass is ours (``depth_forward``: any H x W that is a multiple of the patch size).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from transformers import DPTForDepthEstimation, PreTrainedModel

from dptune.errors import ConfigError
from dptune.models.backbones import depth_model_class, dpt_config_for_backbone, load_backbone_weights
from dptune.models.build import freeze_unused, he_init, head_layers
from dptune.models.dpt_backbone import input_multiple, uses_backbone
from dptune.models.forward import backbone_features, check_multiple
from dptune.models.source import model_source

log = logging.getLogger(__name__)

MODES = ("metric", "relative")
UNITS = {"metric": "metres", "relative": "affine-invariant inverse depth (larger = nearer; no unit)"}


def _set_output(cfg, mode: str, max_depth: float | None) -> None:
    """What the model predicts, stored in its config so that it travels with checkpoints and exports.
    Depth Anything's metric head is bounded (sigmoid x ``max_depth``) when ``max_depth`` is given."""
    cfg.depth_mode, cfg.depth_units = mode, UNITS[mode]
    if cfg.model_type == "depth_anything":
        bounded = mode == "metric" and max_depth is not None
        cfg.depth_estimation_type = "metric" if bounded else "relative"
        if bounded:
            if not float(max_depth).is_integer():  # transformers types DepthAnythingConfig.max_depth as int
                raise ConfigError(f"model.max_depth {max_depth}: Depth Anything's config stores a whole number of "
                                  f"metres; use e.g. {round(max_depth)}")
            cfg.max_depth = int(max_depth)


def build_depth_model(
    pretrained: str | None = None,
    config: str | Mapping[str, Any] | None = None,
    attn_implementation: str = "sdpa",
    backbone: str | None = None,
    fresh_init: str = "he",
    mode: str = "metric",
    max_depth: float | None = None,
    init_depth: float = 1.0,
) -> PreTrainedModel:
    """A depth model; exactly one of ``pretrained`` and ``config``. Layers the source lacks (a
    segmentation checkpoint's depth head, the neck and head of a bare backbone) start fresh: He
    init (``fresh_init``), the last layer set so that the first predictions are ``init_depth``."""
    if mode not in MODES:
        raise ConfigError(f"model.mode must be metric or relative, not {mode!r}")
    ref, cfg = model_source(pretrained, config, backbone, "depth", fresh_init)
    # a bare backbone's config is the backbone's own; DPT and Depth Anything hold theirs
    registers = getattr(getattr(cfg, "backbone_config", None) or cfg, "num_register_tokens", 0) or 0
    if registers:  # their necks would fold them as patches (a shape error at the first image)
        raise ConfigError(f"{pretrained or config or backbone}: a depth model on a backbone with {registers} register "
                          "tokens (dinov2_with_registers): transformers' depth models, which depth exports load in, "
                          "cannot run it; use a backbone without registers (dinov2)")
    if ref is not None:
        if cfg.model_type in ("dpt", "depth_anything"):
            source = head_output(cfg)  # before _set_output says what this model will predict
            _set_output(cfg, mode, max_depth)
            model, info = depth_model_class(cfg).from_pretrained(
                ref, config=cfg, dtype=torch.float32, ignore_mismatched_sizes=True, output_loading_info=True,
                **({"attn_implementation": {"": attn_implementation}} if cfg.model_type == "dpt" else {}))
            missing = set(info["missing_keys"]) | {key for key, *_ in info["mismatched_keys"]}
            fresh = [(n, m) for n, m in head_layers(model) if f"{n}.weight" in missing]
            if source not in (None, head_output(cfg)) and not any(n.startswith("head.") for n, _ in fresh):
                # an inverse-depth head (MiDaS: near = large) read as metres would train from the wrong
                # sign; a sigmoid x max_depth head read through another bound or a ReLU, from the wrong scale
                log.info("%s: its depth head predicts %s, this model %s: the head starts fresh", pretrained,
                         _words(source), _words(head_output(cfg)))
                fresh += [(n, m) for n, m in head_layers(model) if n.startswith("head.")]
            parts = ["backbone", *(p for p in ("neck", "head") if not any(n.startswith(f"{p}.") for n, _ in fresh))]
            carried = " and ".join([", ".join(parts[:-1]), parts[-1]]) if len(parts) > 1 else parts[0]
            log.info("%s: %s carried over; %d fresh layers (%s)", pretrained, carried,
                     len(fresh), ", ".join(sorted({n.split(".")[0] for n, _ in fresh})) or "none")
        else:  # a bare backbone
            cfg = dpt_config_for_backbone(cfg)
            _set_output(cfg, mode, max_depth)
            model = DPTForDepthEstimation(cfg)
            load_backbone_weights(model, ref)
            fresh = head_layers(model)
    else:
        if cfg.model_type not in ("dpt", "depth_anything"):
            cfg = dpt_config_for_backbone(cfg)
        if cfg.model_type == "dpt":
            cfg._attn_implementation = {"": attn_implementation}
        _set_output(cfg, mode, max_depth)
        model = depth_model_class(cfg)(cfg)
        fresh = head_layers(model)
    if fresh_init == "he":
        he_init(m for _, m in fresh)
    last = [m for m in model.head.modules() if isinstance(m, nn.Conv2d)][-1]
    if any(m is last for _, m in fresh):
        start_at(model, last, init_depth)
    freeze_unused(model, forward=lambda m, x: (depth_forward(m, x), None))
    return model


def head_mode(cfg) -> str | None:
    """What a depth checkpoint's head predicts (``metric`` or ``relative``); None without a depth
    head. dptune's exports say it (``depth_mode``), Depth Anything by ``depth_estimation_type``;
    the published DPT depth checkpoints (``Intel/dpt-large``, ``dpt-hybrid-midas``) are MiDaS's
    relative inverse depth and say nothing."""
    if getattr(cfg, "depth_mode", None) in MODES:
        return cfg.depth_mode
    if cfg.model_type == "depth_anything":
        return "metric" if getattr(cfg, "depth_estimation_type", "relative") == "metric" else "relative"
    if any("DepthEstimation" in a for a in getattr(cfg, "architectures", None) or []):
        return "relative"
    return None


def head_output(cfg) -> tuple | None:
    """What a depth head's output means, as far as its weights depend on it: the mode, and for Depth
    Anything whether it ends in a sigmoid x ``max_depth`` (bounded) or not, and that bound. None
    without a depth head."""
    mode = head_mode(cfg)
    if mode is None or cfg.model_type != "depth_anything":
        return None if mode is None else (mode,)
    bounded = getattr(cfg, "depth_estimation_type", "relative") == "metric"
    return (mode, bounded, float(cfg.max_depth) if bounded else None)


def _words(output: tuple) -> str:
    if len(output) == 1 or not output[1]:
        return f"{output[0]} depth"
    return f"{output[0]} depth bounded at {output[2]:g} m"


@torch.no_grad()
def start_at(model: PreTrainedModel, last: nn.Conv2d, depth: float) -> None:
    """A fresh depth head's last convolution: the bias that gives ``depth`` and weights of std 1e-4,
    so that every first prediction is ``depth`` give or take a few thousandths: positive (the head
    ends in a ReLU, or a sigmoid x max depth, and a prediction at 0 would get no gradient through
    the ReLU nor from a log-space loss) yet not constant (a constant prediction has no
    scale-and-shift alignment, so the relative loss would give no gradient)."""
    bounded = getattr(model.config, "depth_estimation_type", None) == "metric"
    if bounded:
        last.weight.normal_(0.0, 1e-4)
        ratio = min(max(depth / model.config.max_depth, 1e-3), 1 - 1e-3)
        last.bias.fill_(math.log(ratio / (1 - ratio)))
    else:  # Depth Anything's unbounded head multiplies its ReLU by max_depth too (DPT's does not)
        scale = float(model.config.max_depth) if model.config.model_type == "depth_anything" else 1.0
        last.weight.normal_(0.0, 1e-4 / scale)
        last.bias.fill_(depth / scale)


def depth_multiple(config) -> int:
    """What a depth model's input height and width must be multiples of."""
    return input_multiple(config) if config.model_type == "dpt" else config.patch_size


def depth_forward(model: PreTrainedModel, pixel_values: torch.Tensor) -> torch.Tensor:
    """(B, h, w) predicted depth for normalised images of any H x W divisible by the patch size.
    DPT's own ViT (and Hybrid) get the patch grid passed to the neck, which the stock forward does
    not do; models on a ``transformers`` backbone and Depth Anything pass it themselves."""
    multiple = check_multiple(pixel_values, depth_multiple(model.config))
    h, w = pixel_values.shape[-2:]
    if isinstance(model, DPTForDepthEstimation) and not uses_backbone(model.config):
        features = backbone_features(model, pixel_values)
        features = model.neck(features, patch_height=h // multiple, patch_width=w // multiple)
        return model.head(features)
    return model(pixel_values=pixel_values).predicted_depth
