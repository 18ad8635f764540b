"""Times dptune's training steps with the allocator setting of a CPU run (``dptune.training.memory``) and
with glibc's defaults (``DPTUNE_MALLOC=system``), each in a fresh process, the two alternating:

    python -m dptune.tools.malloc_step [--rounds 2] [--steps 8]

Two steps, on random data at the recipes' sizes: **depth**, the 7-Scenes recipe's (the bench-tiny depth
model, a batch of 8 at 224 x 224, SILog, metric head up to 10 m) and **segmentation**, CamVid's (bench-tiny,
11 classes, a batch of 8 at 192 x 192, cross-entropy + Dice and the auxiliary head at 0.4); forward,
loss, backward and a fused AdamW step under the precision ``auto`` picks (said in the first line), with
the attention ``auto`` picks. Per process: 3 warm-up steps, then ``--steps`` timed; the median step in
wall-clock and in CPU time (all the process's threads: on a machine shared with other work, the wall clock
also holds their time) and the minor page faults per step (the kernel's count of fresh pages touched).
Medians over the rounds. The models are the bench-tiny ones of ``../shared/bench``, written into the tool.
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


# the bench-tiny models of ../shared/bench (dpt-bench-tiny.json, dpt-depth-bench-tiny.json), written here so
# that the tool runs without that folder
BENCH_TINY = {"hidden_size": 192, "num_hidden_layers": 6, "num_attention_heads": 3, "intermediate_size": 768,
              "image_size": 192, "patch_size": 16, "backbone_out_indices": [1, 3, 4, 5],
              "neck_hidden_sizes": [48, 96, 192, 192], "fusion_hidden_size": 64, "reassemble_factors": [4, 2, 1, 0.5]}


def make_step(task: str, batch: int = 8):
    """One training step of the 7-Scenes depth recipe (224 x 224) or the CamVid segmentation recipe (192 x
    192, 11 classes, Dice and the auxiliary head at 0.4) on the bench-tiny model, random data, with the
    precision and attention ``auto`` picks on this CPU."""
    import torch
    from transformers import DPTConfig

    from dptune.models.attention import auto_attention
    from dptune.tools.resize_step import make_step as segmentation_step
    from dptune.tools.resize_step import module_step
    from dptune.training.hardware import resolve_precision

    precision = resolve_precision("auto", "cpu")[0]
    size = 224 if task == "depth" else 192
    attention = auto_attention("cpu", precision, (size // 16) ** 2 + 1)[0]
    if task != "depth":
        cfg = DPTConfig(**BENCH_TINY, use_auxiliary_head=True, auxiliary_loss_weight=0.4, num_labels=11)
        return segmentation_step(cfg, batch, size, 11, bf16=precision == "bf16-mixed", attention=attention)
    from dptune.tasks.depth import DepthModule

    torch.manual_seed(0)
    module = DepthModule(config=DPTConfig(**BENCH_TINY).to_dict(), mode="metric", max_depth=10.0, init_depth=2.0,
                         image_size=size, lr=5e-4, warmup_steps=0, attn_implementation=attention)
    return module_step(module, torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8),
                       torch.rand(batch, size, size) * 4 + 0.5, precision == "bf16-mixed")


def child(task: str, steps: int) -> dict[str, float]:
    """One process's timing of one task's step (run with ``--child TASK``)."""
    from dptune.training.memory import keep_freed_memory

    said = keep_freed_memory()
    step = make_step(task)
    for _ in range(3):
        step()
    took, cpu, faults = [], [], []
    for _ in range(steps):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start, start_cpu = time.perf_counter(), time.process_time()
        step()
        took.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return {"ms": statistics.median(took) * 1e3, "cpu_ms": statistics.median(cpu) * 1e3,
            "faults": statistics.median(faults),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "kept": bool(said and said.startswith("glibc malloc keeps"))}


def failure(proc: subprocess.CompletedProcess) -> str:
    """Why a child process failed, in one line."""
    if proc.returncode < 0:
        return f"killed by signal {-proc.returncode}"
    lines = [line.strip() for line in proc.stderr.splitlines() if line.strip()]
    return lines[-1] if lines else f"exit status {proc.returncode}, nothing on stderr"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2, help="fresh processes per task and setting (at least 1)")
    ap.add_argument("--steps", type=int, default=8, help="timed steps per process (at least 1)")
    ap.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, of {list(TASKS)}")
    ap.add_argument("--child", choices=TASKS, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.steps < 1:
        ap.error(f"--rounds {args.rounds} --steps {args.steps}: at least 1 each")
    tasks = list(dict.fromkeys(t.strip() for t in args.tasks.split(",") if t.strip()))
    if not tasks or any(t not in TASKS for t in tasks):
        ap.error(f"--tasks {args.tasks!r}: comma-separated, of {list(TASKS)}")
    if args.child:
        print(json.dumps(child(args.child, args.steps)))
        return 0
    from dptune.errors import ConfigError
    from dptune.training.hardware import resolve_precision
    from dptune.training.memory import glibc, left_to

    try:
        left = left_to()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if left is not None:
        print(f"error: {left}: this tool sets the allocator itself; run it without", file=sys.stderr)
        return 2
    if glibc() is None:
        print("error: this process's malloc is not glibc's (another OS or C library, or an allocator in LD_PRELOAD): "
              "there is no setting to time", file=sys.stderr)
        return 2
    import torch

    print(f"# precision {resolve_precision('auto', 'cpu')[0]}, {torch.get_num_threads()} threads; median per step: "
          "wall-clock ms, CPU ms (all threads; a busy machine's other work stays out), minor page faults; peak RSS")
    for task in tasks:
        rows: dict[str, list[dict[str, float]]] = {s: [] for s in SETTINGS}
        for r in range(args.rounds):
            for setting in (SETTINGS if r % 2 == 0 else SETTINGS[::-1]):
                env = dict(os.environ, DPTUNE_MALLOC="system") if setting == "system" else os.environ
                proc = subprocess.run([sys.executable, "-m", "dptune.tools.malloc_step", "--child", task,
                                       "--steps", str(args.steps)], env=env, capture_output=True, text=True)
                if proc.returncode != 0:
                    print(f"error: the {task} step ({setting}) failed: {failure(proc)}", file=sys.stderr)
                    return 1
                row = json.loads(proc.stdout.strip().splitlines()[-1])
                if row.pop("kept") != (setting == "dptune"):
                    print(f"error: the {task} step ({setting}) ran with the other allocator setting", file=sys.stderr)
                    return 1
                rows[setting].append(row)
        med = {s: {k: statistics.median(r[k] for r in rows[s]) for k in rows[s][0]} for s in SETTINGS}
        for s in SETTINGS:
            print(f"{task:12s} {s:7s} {med[s]['ms']:7.1f} ms  {med[s]['cpu_ms']:7.1f} CPU ms  {med[s]['faults']:8.0f} "
                  f"faults  {med[s]['peak_rss_mib']:7.0f} MiB", flush=True)
        print(f"{task:12s} dptune's setting: {med['system']['ms'] / med['dptune']['ms']:.3f}x the steps per second, "
              f"{med['system']['cpu_ms'] / med['dptune']['cpu_ms']:.3f}x per CPU second")
    return 0


if __name__ == "__main__":
    sys.exit(main())
