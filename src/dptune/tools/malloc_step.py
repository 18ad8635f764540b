"""Times dptune's training steps with the allocator setting of a CPU run (``dptune.training.memory``) and
with glibc's defaults (``DPTUNE_MALLOC=system``), each in a fresh process, the two alternating:

    python -m dptune.tools.malloc_step [--rounds 2] [--steps 8]

Two steps, on random data at the recipes' sizes: **depth**, the 7-Scenes recipe's (the bench-tiny depth
model, a batch of 8 at 224 x 224, SILog, metric head up to 10 m) and **segmentation**, CamVid's (bench-tiny,
11 classes, a batch of 8 at 192 x 192, cross-entropy + Dice and the auxiliary head at 0.4); forward,
loss, backward and a fused AdamW step under the precision ``auto`` picks (said in the first line), with
the attention ``auto`` picks. Per process: 3 warm-up steps, then ``--steps`` timed; the median step and the
minor page faults per step (the kernel's count of fresh pages touched). Medians over the rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

TASKS = ("depth", "segmentation")
SETTINGS = ("dptune", "system")  # dptune's setting, glibc's defaults


def make_depth_step(batch: int = 8, size: int = 224):
    """The 7-Scenes recipe's training step (``configs/depth/7scenes.yaml``) on the bench-tiny depth model."""
    import torch

    from dptune.models.attention import auto_attention
    from dptune.tasks.depth import DepthModule
    from dptune.tools.step_timers import REPO, model_config
    from dptune.training.hardware import resolve_precision

    torch.manual_seed(0)
    cfg = model_config(str(REPO.parent / "shared" / "bench" / "dpt-depth-bench-tiny.json"), None)
    tokens = (size // cfg.patch_size) ** 2 + 1
    module = DepthModule(config=cfg.to_dict(), mode="metric", max_depth=10.0, init_depth=2.0, image_size=size,
                         lr=5e-4, weight_decay=0.05, warmup_steps=0,
                         attn_implementation=auto_attention("cpu", resolve_precision("auto", "cpu")[0], tokens)[0],
                         ).train()
    return _step(module, torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8),
                 torch.rand(batch, size, size) * 4 + 0.5)


def _step(module, images, target):
    import torch

    from dptune.training.hardware import resolve_precision

    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=5e-4, fused=True)
    bf16 = resolve_precision("auto", "cpu")[0] == "bf16-mixed"

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = module(images)
            losses = module.loss(*out, target) if isinstance(out, tuple) else module.loss(out, target)
            loss = losses["loss"] if isinstance(losses, dict) else losses
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def child(task: str, steps: int) -> dict[str, float]:
    """One process's timing of one task's step (run with ``--child TASK``)."""
    from dptune.training.memory import keep_freed_memory

    keep_freed_memory()  # a no-op under DPTUNE_MALLOC=system
    if task == "depth":
        step = make_depth_step()
    else:
        from dptune.tools.resize_step import make_step
        from dptune.tools.step_timers import model_config

        step = make_step(model_config("dpt-bench-tiny", 11))
    for _ in range(3):
        step()
    took, faults = [], []
    for _ in range(steps):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start = time.perf_counter()
        step()
        took.append(time.perf_counter() - start)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return {"ms": statistics.median(took) * 1e3, "faults": statistics.median(faults),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2, help="fresh processes per task and setting (at least 1)")
    ap.add_argument("--steps", type=int, default=8, help="timed steps per process (at least 1)")
    ap.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, of {list(TASKS)}")
    ap.add_argument("--child", choices=TASKS, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.steps < 1:
        ap.error(f"--rounds {args.rounds} --steps {args.steps}: at least 1 each")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks or any(t not in TASKS for t in tasks):
        ap.error(f"--tasks {args.tasks!r}: comma-separated, of {list(TASKS)}")
    if args.child:
        print(json.dumps(child(args.child, args.steps)))
        return 0
    from dptune.training.hardware import resolve_precision
    from dptune.training.memory import left_to

    if left_to() is not None:
        print(f"error: {left_to()}: this tool sets the allocator itself; run it without", file=sys.stderr)
        return 2
    import torch

    print(f"# precision {resolve_precision('auto', 'cpu')[0]}, {torch.get_num_threads()} threads; "
          "median ms per step, minor page faults per step, peak RSS MiB")
    for task in tasks:
        rows: dict[str, list[dict[str, float]]] = {s: [] for s in SETTINGS}
        for r in range(args.rounds):
            for setting in (SETTINGS if r % 2 == 0 else SETTINGS[::-1]):
                env = dict(os.environ, DPTUNE_MALLOC="system") if setting == "system" else os.environ
                proc = subprocess.run([sys.executable, "-m", "dptune.tools.malloc_step", "--child", task,
                                       "--steps", str(args.steps)], env=env, capture_output=True, text=True)
                if proc.returncode != 0:
                    print(f"error: the {task} step ({setting}) failed: {proc.stderr.strip().splitlines()[-1:]}",
                          file=sys.stderr)
                    return 1
                rows[setting].append(json.loads(proc.stdout.strip().splitlines()[-1]))
        med = {s: {k: statistics.median(r[k] for r in rows[s]) for k in rows[s][0]} for s in SETTINGS}
        for s in SETTINGS:
            print(f"{task:12s} {s:7s} {med[s]['ms']:7.1f} ms  {med[s]['faults']:8.0f} faults  "
                  f"{med[s]['peak_rss_mib']:7.0f} MiB", flush=True)
        print(f"{task:12s} dptune's setting: {med['system']['ms'] / med['dptune']['ms']:.3f}x the steps per second")
    return 0


if __name__ == "__main__":
    sys.exit(main())
