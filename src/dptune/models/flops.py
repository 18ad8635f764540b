"""FLOPs of a DPT segmentation forward pass, counted from the config (nanoGPT-style MFU).

Counts the matrix work a GPU's tensor cores do: linear layers, convolutions, transposed
convolutions and the two attention matmuls (2 FLOPs per multiply-add). Norms, activations,
softmax and interpolation are left out, as ``torch.utils.flop_counter`` leaves them out.
A training step costs about 3x the forward pass (backward = 2x forward).
"""

from __future__ import annotations

import math

from transformers import DPTConfig


def _conv(cin: int, cout: int, k: int, pixels: int) -> int:
    return 2 * cin * cout * k * k * pixels


def _encoder_flops(cfg: DPTConfig, tokens: int, grid: int, layers: int) -> int:
    d, inter = cfg.hidden_size, cfg.intermediate_size
    per_layer = 2 * tokens * d * (4 * d + 2 * inter) + 4 * tokens * tokens * d
    patch = _conv(cfg.num_channels, d, cfg.patch_size, grid)
    return layers * per_layer + patch


def _neck_flops(cfg: DPTConfig, grid_h: int, grid_w: int) -> tuple[int, int]:
    """(FLOPs, pixels of the finest fused map) for reassemble + fusion."""
    d, f = cfg.hidden_size, cfg.fusion_hidden_size
    grid = grid_h * grid_w
    total = 0
    sizes = []
    for c, factor in zip(cfg.neck_hidden_sizes, cfg.reassemble_factors, strict=True):
        if cfg.readout_type == "project":
            total += 2 * grid * (2 * d) * d
        total += _conv(d, c, 1, grid)
        if factor > 1:
            k = int(factor)
            total += 2 * grid * c * c * k * k  # transposed conv, stride = kernel
            h, w = grid_h * k, grid_w * k
        elif factor == 1:
            h, w = grid_h, grid_w
        else:
            s = int(round(1 / factor))
            h, w = math.ceil(grid_h / s), math.ceil(grid_w / s)
            total += _conv(c, c, 3, h * w)
        total += _conv(c, f, 3, h * w)  # neck.convs
        sizes.append((h, w))
    # fusion runs from the coarsest map; its output doubles in size at each layer
    h, w = sizes[-1]
    for i in range(len(sizes)):
        if i > 0:
            total += 2 * _conv(f, f, 3, h * w)  # residual_layer1 on the skip input
        total += 2 * _conv(f, f, 3, h * w)  # residual_layer2
        h, w = 2 * h, 2 * w
        total += _conv(f, f, 1, h * w)  # projection after the x2 upsample
    return total, h * w


def dpt_forward_flops(cfg: DPTConfig, height: int, width: int, layers_run: int | None = None) -> int:
    """FLOPs of one image's forward pass at ``height`` x ``width`` (ViT DPT, not hybrid).

    ``layers_run`` defaults to the encoder layers dptune runs: up to the last one the neck reads.
    """
    p = cfg.patch_size
    gh, gw = height // p, width // p
    tokens = gh * gw + 1
    layers = layers_run if layers_run is not None else max(cfg.backbone_out_indices) + 1
    total = _encoder_flops(cfg, tokens, gh * gw, layers)
    neck, fine = _neck_flops(cfg, gh, gw)
    total += neck
    f, c = cfg.fusion_hidden_size, cfg.num_labels
    head = _conv(f, f, 3, fine) + _conv(f, c, 1, fine)
    total += head
    if cfg.use_auxiliary_head:
        total += head  # same layout on the same map
    return int(total)


def dpt_train_flops(cfg: DPTConfig, height: int, width: int) -> int:
    """FLOPs of one image's training step (forward + backward)."""
    return 3 * dpt_forward_flops(cfg, height, width)


def counted_train_flops(cfg, height: int, width: int) -> int:
    """One image's training-step FLOPs counted by ``torch.utils.flop_counter`` on the meta device:
    for backbones the formula above does not cover (DPT-Hybrid, Swinv2, BEiT, DINOv2)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from dptune.models import segment
    from dptune.models.backbones import model_class

    with torch.device("meta"):
        model = model_class(cfg)(cfg).train()
        x = torch.zeros(1, cfg.num_channels, height, width)
    with FlopCounterMode(display=False) as counter:
        logits, aux = segment(model, x)
        (logits.sum() + (aux.sum() if aux is not None else 0)).backward()
    return int(counter.get_total_flops())


def train_flops(cfg, height: int, width: int) -> tuple[int, str]:
    """(FLOPs of one image's training step, how they were obtained)."""
    if getattr(cfg, "is_hybrid", False) or getattr(cfg, "backbone_config", None) is not None:
        return counted_train_flops(cfg, height, width), "flop_counter"
    return dpt_train_flops(cfg, height, width), "formula"
