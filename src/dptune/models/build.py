"""Build a DPT for segmentation, adapt its heads to a label set, and run it on any H x W.

With DPT's own ViT (and DPT-Hybrid) the model stays a plain ``transformers.DPTForSemanticSegmentation``
so that an exported directory loads without dptune; only the forward pass is ours (see ``segment``).
Other backbones (Swinv2, BEiT, DINOv2, ...) run in ``DPTBackboneForSemanticSegmentation``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, DPTConfig, PreTrainedModel

from dptune.labels import IGNORE_INDEX, name_key
from dptune.models.backbones import dpt_config_for_backbone, load_backbone_weights, model_class
from dptune.models.dpt_backbone import input_multiple
from dptune.models.forward import segment
from dptune.models.source import model_source

log = logging.getLogger(__name__)



def build_model(
    names: Sequence[str],
    pretrained: str | None = None,
    config: str | Mapping[str, Any] | None = None,
    attn_implementation: str = "sdpa",
    backbone: str | None = None,
    fresh_init: str = "he",
) -> PreTrainedModel:
    """A DPT segmentation model whose classifiers match ``names``.

    ``pretrained`` (hub id or local directory) loads weights; ``config`` (JSON path or dict)
    builds random weights. Exactly one of them must be given. Either may be a whole DPT or a
    bare backbone (e.g. ``facebook/dinov2-small``), which gets a fresh DPT neck and heads.
    ``backbone`` (``vit``, ``hybrid``, ``dinov2``, ...) checks that the model is of that family.
    ``fresh_init``: ``he`` re-initialises the convolutional neck and heads wherever they start
    from random weights (see ``he_init``); ``hf`` keeps ``transformers``' N(0, 0.02).
    """
    ref, cfg = model_source(pretrained, config, backbone, "segmentation", fresh_init)
    if ref is not None:
        if cfg.model_type != "dpt":
            model = _fresh_model(dpt_config_for_backbone(cfg), names, attn_implementation)
            load_backbone_weights(model, ref)
            fresh = head_layers(model)
        else:
            # a depth checkpoint's head does not fit a segmentation head: those weights start fresh
            model, info = model_class(cfg).from_pretrained(
                ref, dtype=torch.float32, attn_implementation={"": attn_implementation}, ignore_mismatched_sizes=True,
                output_loading_info=True,
            )
            # layers the checkpoint lacks, or has in another shape (a depth head), start from random weights
            missing = set(info["missing_keys"]) | {key for key, *_shapes in info["mismatched_keys"]}
            fresh_names = {n for n, _ in head_layers(model) if f"{n}.weight" in missing}
            init = he_init_layer if fresh_init == "he" else model._init_weights
            carried = adapt_classifiers(model, names, init)
            if any(n.startswith("head.") for n in fresh_names):
                carried = []  # the checkpoint had no segmentation head: nothing was really carried
            log.info("%s: %d of %d classes carried over from the checkpoint's classifier%s", pretrained,
                     len(carried), len(names), f" ({', '.join(carried)})" if carried else "")
            # resolved after adapt_classifiers, which replaces the classifier modules
            fresh = [(n, m) for n, m in head_layers(model) if n in fresh_names]
    else:
        model = _fresh_model(cfg if cfg.model_type == "dpt" else dpt_config_for_backbone(cfg), names, attn_implementation)
        fresh = head_layers(model)
    if fresh_init == "he":
        he_init(m for _, m in fresh)
    model.config.semantic_loss_ignore_index = IGNORE_INDEX
    freeze_unused(model)
    return model


def head_layers(model: PreTrainedModel) -> list[tuple[str, nn.Module]]:
    """(name, layer) of the convolutions and linear layers of the neck and heads, classifiers included."""
    return [
        (name, layer)
        for name, layer in model.named_modules()
        if name.split(".")[0] in ("neck", "head", "auxiliary_head")
        and isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear))
    ]


def he_init(layers) -> None:
    """He-normal weights (fan-in, ReLU gain: std sqrt(2 / fan_in)) and zero biases.

    ``transformers`` starts every convolution of a fresh DPT neck and head at N(0, 0.02), which
    for a 3x3 convolution over 64-256 channels is 3-7x below He's scale; the signal shrinks at
    every layer and a DPT trained from scratch learns little more than the largest classes in a
    few hundred steps (docs/benchmarks.md, "Initialisation and colour"). The 1x1 classifiers get
    He's scale too: kept at N(0, 0.02) they left Dubai's Vegetation unlearned in a 150-step
    probe for two seeds out of two.
    A transposed convolution whose stride equals its kernel (DPT's upsampling) gives every output
    pixel one tap per input channel, so its fan-in is its input channels.
    """
    for layer in layers:
        he_init_layer(layer)


@torch.no_grad()
def he_init_layer(layer: nn.Module) -> None:
    """He-normal init of one convolution or linear layer (see ``he_init``); other modules are left alone."""
    if not isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
        return
    if isinstance(layer, nn.ConvTranspose2d):
        taps = math.prod(max(1, k // s) for k, s in zip(layer.kernel_size, layer.stride, strict=True))
        fan_in = layer.in_channels // layer.groups * taps
    else:  # Conv2d (out, in / groups, kh, kw) or Linear (out, in)
        fan_in = layer.weight[0].numel()
    layer.weight.normal_(0.0, math.sqrt(2.0 / fan_in))
    if layer.bias is not None:
        layer.bias.zero_()


def _fresh_model(cfg: DPTConfig, names: Sequence[str], attn_implementation: str) -> PreTrainedModel:
    cfg.num_labels = len(names)
    cfg.id2label = dict(enumerate(names))
    cfg.label2id = {n: i for i, n in enumerate(names)}
    # the DPT's own ViT only: backbones such as BiT or Swinv2 have no SDPA and pick their own
    cfg._attn_implementation = {"": attn_implementation}
    return model_class(cfg)(cfg)


def load_exported(path: str) -> PreTrainedModel:
    """A model directory written by ``save_pretrained`` (e.g. ``scripts/export.py``), whatever its
    task and backbone."""
    cfg = AutoConfig.from_pretrained(path)
    if any("DepthEstimation" in a for a in cfg.architectures or []):
        from transformers import AutoModelForDepthEstimation

        return AutoModelForDepthEstimation.from_pretrained(path, dtype=torch.float32)
    return model_class(cfg).from_pretrained(path, dtype=torch.float32)


def input_side(model: PreTrainedModel) -> int:
    """The multiple input sides must be of (DPT configs and Depth Anything's)."""
    return config_input_side(model.config)


def config_input_side(cfg) -> int:
    """``input_side`` from the model's config alone (no weights loaded)."""
    return input_multiple(cfg) if cfg.model_type == "dpt" else int(cfg.patch_size)


def freeze_unused(model: PreTrainedModel, forward: Callable | None = None) -> list[str]:
    """Turn off gradients of weights the forward pass (``segment``, or a task's ``forward(model, x)``
    returning one or two tensors) never uses, found by one small forward pass: the encoder's final
    layer norm, encoder layers after the last one the neck reads, the first fusion layer's unused
    residual unit. They stay in the checkpoint (plain ``transformers`` expects them), but the
    optimizer skips them and DDP, which fails on parameters that get no gradient, does not see
    them. Returns the frozen names."""
    forward = forward or segment
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    ref = params[0][1]
    side = 4 * input_side(model)
    was_training = model.training
    model.eval()  # BatchNorm on a 1-image probe
    try:
        with torch.enable_grad():  # callers may sit under no_grad (export, inference)
            x = torch.zeros(1, 3, side, side, device=ref.device, dtype=ref.dtype)
            main, aux = forward(model, x)
            out = main.sum() + (aux.sum() if aux is not None else 0)
            grads = torch.autograd.grad(out, [p for _, p in params], allow_unused=True)
    finally:
        model.train(was_training)
    frozen = []
    for (name, p), g in zip(params, grads, strict=True):
        if g is None:
            p.requires_grad_(False)
            frozen.append(name)
    return frozen


def _classifiers(model: PreTrainedModel) -> list[tuple[nn.Sequential, int]]:
    """(container, index) of each 1x1 classifier conv: main head and, if present, auxiliary head."""
    found = []
    for head in (model.head, model.auxiliary_head):
        if head is None:
            continue
        convs = [i for i, m in enumerate(head.head) if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)]
        found.append((head.head, convs[-1]))
    return found


def adapt_classifiers(model: PreTrainedModel, names: Sequence[str],
                      init: Callable[[nn.Module], None] | None = None) -> list[str]:
    """Point the classifiers at ``names``; copy rows of classes the checkpoint already knows.

    Matching is by class name, case and surrounding spaces aside (``name_key``). A replaced classifier starts from ``init``
    (a per-layer initialiser; default: PyTorch's) before the known rows are copied in, so the
    rows of new classes start like every other fresh layer. Returns the carried class names.
    """
    old: dict[str, int] = {}
    for k, v in sorted(model.config.id2label.items(), key=lambda kv: int(kv[0])):
        old.setdefault(name_key(v), int(k))  # two names alike ("Car", "car "): the first one's row
    new_names = list(names)
    same = [name_key(n) for n in new_names] == [
        name_key(model.config.id2label[i]) for i in range(len(model.config.id2label))
    ]
    carried = [n for n in new_names if name_key(n) in old]
    if not same:
        for container, idx in _classifiers(model):
            prev: nn.Conv2d = container[idx]
            conv = nn.Conv2d(prev.in_channels, len(new_names), kernel_size=1).to(prev.weight.device, prev.weight.dtype)
            if init is not None:
                init(conv)
            with torch.no_grad():
                for j, name in enumerate(new_names):
                    i = old.get(name_key(name))
                    if i is not None and i < prev.out_channels:
                        conv.weight[j] = prev.weight[i]
                        conv.bias[j] = prev.bias[i]
            container[idx] = conv
    else:
        carried = list(new_names)
    model.config.num_labels = len(new_names)
    model.config.id2label = dict(enumerate(new_names))
    model.config.label2id = {n: i for i, n in enumerate(new_names)}
    return carried
