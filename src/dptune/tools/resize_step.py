"""Times a segmentation training step with the head's bilinear upsampling as matrix products
(``dptune.models.resize``) against PyTorch's kernel, in one process, the two alternating:

    python -m dptune.tools.resize_step [--rounds 12] [--model ../shared/bench/dpt-bench-tiny.json]
    python -m dptune.tools.resize_step --sizes      # the resize alone, forward + backward, at several sizes

The step is dptune's segmentation module's under the CamVid recipe's losses, on random data: the
bench-tiny model (11 classes) on a batch of 8 at 192 x 192 under bf16 autocast, cross-entropy + Dice
on the logits, the auxiliary head's cross-entropy at 0.4, backward and a fused AdamW step. Each round times two steps of each kernel after three
warm-up steps; medians over the rounds. The products run only in bfloat16 on a CPU with native bf16
(elsewhere both rows time PyTorch's kernel, as said in the first line).

``--sizes`` times the resize alone in bfloat16 (forward + backward, best of ``--rounds``, the two
alternating) from the head's logits up to sizes past ``dptune.models.resize.MAX_COST``, where dptune
leaves the resize to PyTorch's kernel.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from dptune.errors import ConfigError
from dptune.models.resize import bilinear_products, kernel_only, products_cost, products_pay
from dptune.tools.step_timers import PRESETS, model_config


def make_step(cfg, batch: int = 8, crop: int = 192, classes: int = 11, bf16: bool = True,
              attention: str = "eager"):
    """One training step of dptune's segmentation module with the CamVid recipe's losses, on a DPT config
    (``classes`` classes; the crop rounded to what its backbone's input must be a multiple of), under bf16
    autocast (``bf16``) with ``attention`` (eager: what ``auto`` picks on a CPU in bf16)."""
    from dptune.labels import LabelSet
    from dptune.models.dpt_backbone import input_multiple
    from dptune.tasks.segmentation import SegmentationModule

    torch.manual_seed(0)
    multiple = input_multiple(cfg)
    crop = max(multiple, round(crop / multiple) * multiple)
    module = SegmentationModule(
        config=cfg.to_dict(), label_spec=LabelSet(names=[f"class{i}" for i in range(classes)]).to_dict(),
        image_size=crop, lr=5e-4, region_loss="dice", aux_weight=0.4, warmup_steps=0, attn_implementation=attention,
    )
    return module_step(module, torch.randint(0, 256, (batch, 3, crop, crop), dtype=torch.uint8),
                       torch.randint(0, classes, (batch, crop, crop)), bf16)


def module_step(module, images: torch.Tensor, target: torch.Tensor, bf16: bool):
    """A training step of a dptune task module on one batch: forward, its loss, backward and a fused AdamW
    step (bf16 autocast where ``bf16``)."""
    module.train()
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=5e-4, fused=True)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = module(images)
            losses = module.loss(*out, target) if isinstance(out, tuple) else module.loss(out, target)
            loss = losses["loss"] if isinstance(losses, dict) else losses
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


# (N, C, h, w) -> (H, W): the bench-tiny head, its auxiliary logits, CamVid validation logits, DPT-Large's
# head at 384 and 512 px (150 classes), and a 1024 x 2048 frame's (19 classes)
SIZES = [((8, 11, 96, 96), (192, 192)), ((8, 11, 12, 12), (192, 192)), ((8, 11, 180, 240), (360, 480)),
         ((2, 150, 192, 192), (384, 384)), ((1, 150, 256, 256), (512, 512)), ((1, 19, 384, 384), (768, 768)),
         ((1, 19, 512, 1024), (1024, 2048))]


def time_sizes(rounds: int) -> None:
    import torch.nn.functional as F

    print("# (N, C, h, w) -> (H, W), layout: multiply-adds per output element; ms forward, forward + backward: "
          "kernel, products")
    for (shape, big), layout in ((size, layout) for size in SIZES for layout in ("contiguous", "channels-last")):
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(*shape, generator=gen).bfloat16()
        if layout == "channels-last":  # as a CPU convolution gives bf16 logits
            x = x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_(True)
        grad = torch.randn(*shape[:2], *big, generator=gen).bfloat16()
        kernels = {"kernel": lambda x=x, big=big: F.interpolate(x, size=big, mode="bilinear", align_corners=False),
                   "products": lambda x=x, big=big: bilinear_products(x, big)}
        best = {(name, part): float("inf") for name in kernels for part in ("forward", "both")}
        for r in range(rounds + 1):
            for name, run in kernels.items():
                start = time.perf_counter()
                out = run()
                forward = time.perf_counter() - start
                out.backward(grad)
                both = time.perf_counter() - start
                x.grad = None
                if r:
                    best[name, "forward"] = min(best[name, "forward"], forward)
                    best[name, "both"] = min(best[name, "both"], both)
        ms = "  ".join(f"{best[k, p] * 1e3:7.1f}" for p in ("forward", "both") for k in kernels)
        print(f"{shape} -> {big} {layout:13s} {products_cost(shape[-2:], big):5.0f}  {ms}", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=12, help="timed rounds (at least 1)")
    ap.add_argument("--model", default="dpt-bench-tiny", help=f"a preset {sorted(PRESETS)} or a DPTConfig JSON "
                    "(DPT segmentation: model_type dpt)")
    ap.add_argument("--sizes", action="store_true", help="time the resize alone at several sizes instead")
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error(f"--rounds {args.rounds}: at least 1")
    if args.sizes:
        time_sizes(args.rounds)
        return 0
    try:
        cfg = model_config(args.model, 11)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if cfg.model_type != "dpt":
        print(f"error: {args.model}: a {cfg.model_type} config; this tool times DPT segmentation (model_type dpt)",
              file=sys.stderr)
        return 2
    used = products_pay(torch.zeros(1, 1, 2, 2, dtype=torch.bfloat16, requires_grad=True))
    print(f"# products {'used' if used else 'not used on this machine'}; {torch.get_num_threads()} threads")
    step = make_step(cfg)
    for _ in range(3):
        step()
    took: dict[str, list[float]] = {"products": [], "kernel": []}
    for _ in range(args.rounds):
        for name in took:
            start = time.perf_counter()
            if name == "kernel":
                with kernel_only():
                    step()
                    step()
            else:
                step()
                step()
            took[name].append((time.perf_counter() - start) / 2)
    med = {k: statistics.median(v) * 1e3 for k, v in took.items()}
    for name, ms in med.items():
        print(f"{name:8s} median {ms:7.1f} ms/step  best {min(took[name]) * 1e3:7.1f}")
    print(f"products over kernel: {med['kernel'] / med['products']:.3f}x the steps per second")
    return 0


if __name__ == "__main__":
    sys.exit(main())
