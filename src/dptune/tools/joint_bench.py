"""``scripts/benchmark.py --joint``: inference of one segmentation + depth DPT (one backbone pass,
two necks and heads) against the two single-task models run one after the other, same weights
shapes, batch 1, no gradients.

    python scripts/benchmark.py --joint --model dpt-large-ade --crop 384 --steps 5
"""

from __future__ import annotations

import time
from typing import Any


def _seconds(fn, x, warmup: int, steps: int) -> float:
    import torch

    for _ in range(warmup):
        fn(x)
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        fn(x)
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / steps


def joint_benchmark(args, cfg, device: str, precision: str) -> dict[str, Any]:
    """Seconds per image: joint forward, segmentation model + depth model, and the ratio."""
    import contextlib

    import torch

    from dptune.models import build_model, segment
    from dptune.models.depth import build_depth_model, depth_forward
    from dptune.models.joint import JointDPT

    spec = {k: v for k, v in cfg.to_dict().items() if k not in ("id2label", "label2id", "num_labels")}
    names = [f"class{i}" for i in range(cfg.num_labels)]
    torch.manual_seed(0)
    seg, depth = build_model(names, config=dict(spec)), build_depth_model(config=dict(spec))
    joint = JointDPT(build_model(names, config=dict(spec)), build_depth_model(config=dict(spec)))
    for m in (seg, depth, joint):
        m.eval().to(device)
    x = torch.randn(1, 3, args.crop, args.crop, device=device)
    bf16 = precision.startswith("bf16")
    autocast = torch.autocast(device, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with torch.no_grad(), autocast:
        both = _seconds(lambda v: joint(v), x, args.warmup, args.steps)
        apart = _seconds(lambda v: (segment(seg, v, with_aux=False), depth_forward(depth, v)), x, args.warmup,
                         args.steps)
    out = {"joint_s": both, "separate_s": apart, "speedup": apart / both,
           "params_joint_M": sum(p.numel() for p in joint.parameters()) / 1e6,
           "params_separate_M": (sum(p.numel() for p in seg.parameters())
                                 + sum(p.numel() for p in depth.parameters())) / 1e6}
    print(f"joint forward (segmentation + depth) {1000 * both:9.1f} ms/image  ({out['params_joint_M']:.1f}M params)")
    print(f"two models, one after the other     {1000 * apart:9.1f} ms/image  ({out['params_separate_M']:.1f}M params)")
    print(f"speed-up {out['speedup']:.2f}x")
    return out
