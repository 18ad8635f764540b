r"""Training throughput, peak memory and MFU of dptune, and the same for a plain HF Trainer.

    python scripts/benchmark.py --model ../shared/bench/dpt-bench-tiny.json --crop 192 --batch 8 --baseline --rounds 4
    python scripts/benchmark.py --model dpt-large-ade --crop 512 --batch 16 --precision bf16-mixed \
        --device cuda --baseline --max-batch
    python scripts/benchmark.py --joint --model dpt-large-ade --crop 384 --precision 32-true --steps 5

Each measurement runs in a fresh subprocess (clean peak memory, no shared caches), one after
the other, on the same in-memory batches. Images/s are steady-state: time between the end of
the first timed step and the end of the last, after ``--warmup`` untimed steps. With ``--baseline
--rounds N`` (N even) the two recipes run N times each, alternately (dptune first in odd rounds, the
Trainer first in even ones), and the ratio is the geometric mean of the N rounds' ratios: a shared
machine's speed drifts by 10-20% within minutes, each round's pair runs back to back, and each
order runs equally often.
MFU = (training FLOPs per image from ``dptune.models.flops``) x images/s / peak FLOP/s of the device.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from dptune.errors import path_arg
from dptune.tools.jobs import run_job
from dptune.tools.step_timers import PRESETS, max_batch, model_config, time_dptune, time_hf_trainer

# dense bf16 / fp16 tensor-core peaks (no sparsity), TFLOP/s
GPU_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "L4": 121.0}


def peak_tflops(device: str, precision: str) -> tuple[float, str]:
    """Peak FLOP/s of the device, with where the figure comes from."""
    import torch

    if device == "cuda":
        name = torch.cuda.get_device_name()
        for key, tf in GPU_PEAK_TFLOPS.items():
            if key in name:
                half = "bf16" in precision or "16" in precision
                return (tf if half else tf / 2), f"{name} dense {'bf16' if half else 'tf32'} spec"
        return float("nan"), f"{name}: unknown peak (pass --peak-tflops)"
    from dptune.cores import usable_cores

    cores = usable_cores()
    mhz = 0.0
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("cpu MHz"):
                mhz = max(mhz, float(line.split(":")[1]))
    except OSError:
        pass
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    # per core per cycle: AVX-512 = 2 FMA units x 16 fp32 lanes x 2; avx512_bf16 doubles it
    per_cycle = 64 if "avx512f" in flags else 32
    if "bf16" in precision and "avx512_bf16" in flags:
        per_cycle *= 2
    return cores * mhz * 1e6 * per_cycle / 1e12, f"{cores} cores x {mhz:.0f} MHz x {per_cycle} FLOP/cycle (estimate)"


def _timed_rounds(jobs: list[str], n_rounds: int, opts: dict[str, Any], flops: float,
                  peak: float) -> tuple[list[dict[str, Any]], str | None]:
    """Each job once per round, each in a fresh process; who runs first alternates, so with an even
    number of rounds each order runs equally often (a first-run advantage cancels in the ratio).
    Returns the rounds and the first error ("round N: job: message"), after which no round runs."""
    timers = {"dptune": time_dptune, "hf_trainer": time_hf_trainer}
    rounds: list[dict[str, Any]] = []
    for n in range(n_rounds):
        order = jobs if n % 2 == 0 else jobs[::-1]
        this: dict[str, Any] = {"first": order[0]}
        for job in order:
            # --profile profiles dptune's steps once, in the first round
            r = run_job(timers[job], opts if n == 0 and job == "dptune" else dict(opts, profile=0))
            tag = f"  (round {n + 1} of {n_rounds})" if n_rounds > 1 else ""
            if "error" in r:
                print(f"{job:<11} failed: {r['error']}{tag}")
            else:
                r["mfu"] = r["images_per_s"] * flops / (peak * 1e12)
                print(f"{job:<11} {r['images_per_s']:8.2f} images/s  peak mem {r['peak_mem_gib']:6.2f} GiB  "
                      f"MFU {100 * r['mfu']:5.1f}%{tag}")
            for row in r.get("profile", []):
                print(f"  {100 * row['share']:5.1f}%  {row['ms_per_step']:8.1f} ms/step  {row['calls_per_step']:4.1f}x  "
                      f"{row['op']}  {row['shapes']}")
            for row in r.get("profile_parts", []):
                print(f"  {100 * row['share']:5.1f}%  {row['ms_per_step']:8.1f} ms/step  within {row['part']}")
            if r.get("profile_parts") and opts.get("compile"):
                print("  (--compile: the network's parts run inside the compiled graph, so only the network and the "
                      "loss are timed as parts)")
            this[job] = r
        rounds.append(this)
        failed = [job for job in jobs if "error" in this[job]]
        if failed:  # a failed job fails the same way again
            return rounds, f"round {n + 1}: {failed[0]}: {this[failed[0]]['error']}"
        if "hf_trainer" in jobs:
            this["ratio_vs_hf_trainer"] = this["dptune"]["images_per_s"] / this["hf_trainer"]["images_per_s"]
    return rounds, None


def _summary(rounds: list[dict[str, Any]], jobs: list[str], flops: float, peak: float) -> dict[str, Any]:
    """Per job: images/s as the geometric mean over the rounds (one round: its figure), MFU from it,
    the largest peak memory, the first round's profile; and the geometric mean of the rounds'
    ratios. A job that failed keeps its error."""
    out: dict[str, Any] = {}
    for job in jobs:
        runs = [r[job] for r in rounds if job in r]
        if any("error" in x for x in runs):
            out[job] = next(x for x in runs if "error" in x)
            continue
        ips = statistics.geometric_mean([x["images_per_s"] for x in runs])
        out[job] = {**runs[0], "images_per_s": ips, "mfu": ips * flops / (peak * 1e12),
                    "peak_mem_gib": max(x["peak_mem_gib"] for x in runs)}
        if len(runs) > 1:
            out[job]["images_per_s_rounds"] = [x["images_per_s"] for x in runs]
    ratios = [r["ratio_vs_hf_trainer"] for r in rounds if "ratio_vs_hf_trainer" in r]
    if ratios and len(ratios) == len(rounds):
        out["ratio_vs_hf_trainer"] = statistics.geometric_mean(ratios)
    return out


def main(argv: list[str] | None = None) -> int:
    """The benchmark; a model config or data that cannot be used is one error line, exit 2."""
    from dptune.errors import ConfigError, DataError

    try:
        return _main(argv)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _main(argv: list[str] | None = None) -> int:
    if any(a == "--infer" or a.startswith("--infer=") for a in (sys.argv[1:] if argv is None else argv)):
        from dptune.tools.infer_bench import main as infer_main  # inference speed of an export instead

        return infer_main(argv)
    args = _parser().parse_args(argv)
    refusal = _refusal(args)
    if refusal:
        print(f"error: {refusal}", file=sys.stderr)
        return 2
    if args.data:
        from dptune.tools.loader_bench import loader_benchmark

        return loader_benchmark(args)
    import torch

    from dptune.models.dpt_backbone import uses_backbone
    from dptune.training.hardware import resolve_precision

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    precision, why = resolve_precision(args.precision, device)
    if why != "as given":
        print(f"# precision {precision} chosen: {why} (--precision overrides)")
    cfg = model_config(args.model, args.num_labels)
    if args.baseline and uses_backbone(cfg):
        print(f"error: {args.model}: plain transformers has no segmentation model for a "
              f"{cfg.backbone_config.model_type} backbone, so there is no Trainer baseline to run", file=sys.stderr)
        return 2
    machine = torch.cuda.get_device_name() if device == "cuda" else f"{platform.processor() or 'cpu'}"
    if args.joint:
        return _joint(args, cfg, device, precision, machine)
    return _training(args, cfg, device, precision, machine)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    ap.add_argument("--model", default="dpt-bench-tiny", help=f"preset {sorted(PRESETS)} or a DPTConfig JSON")
    ap.add_argument("--num-labels", type=int, default=None, help="classes (default: the config's)")
    ap.add_argument("--crop", type=int, default=192)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10, help="timed steps")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    ap.add_argument("--precision", default="auto",
                    help="auto (default: what is fast on this machine, see dptune.training.hardware), 32-true, bf16-mixed, 16-mixed")
    ap.add_argument("--device", default=None, choices=["cpu", "cuda"])
    ap.add_argument("--baseline", action="store_true", help="also time the plain HF Trainer recipe")
    ap.add_argument("--rounds", type=int, default=1,
                    help="with --baseline: time both recipes this many times (1 or an even number), alternately, "
                         "and give the geometric mean of the rounds' ratios (a shared machine's speed drifts within minutes)")
    ap.add_argument("--max-batch", action="store_true", help="largest batch, with and without checkpointing (GPU)")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--compile", action="store_true", help="torch.compile the forward pass")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--attention", choices=["auto", "sdpa", "eager"], default="auto",
                    help="dptune's attention kernel (model.attn_implementation; auto: eager on a CPU in bfloat16)")
    ap.add_argument("--gradient-clip-val", type=float, default=None, help="clip gradients (unfused AdamW then)")
    ap.add_argument("--profile", type=int, default=0, metavar="STEPS",
                    help="after the timed steps, profile STEPS more of dptune's (torch profiler; not the --baseline's) "
                         "and print the operators that take the most time, in all and by input shape (the images/s "
                         "come from the timed steps only; on a GPU the times are the CPU's, kernels run asynchronously)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="override the device's peak")
    ap.add_argument("--data", help="loader benchmark instead: a train.py config whose data: section to read")
    ap.add_argument("--root", help="with --data: override data.root")
    ap.add_argument("--samples", type=int, default=200, help="with --data: samples to time")
    ap.add_argument("--joint", action="store_true",
                    help="inference instead: one segmentation + depth DPT against the two single-task models")
    ap.add_argument("--json", type=path_arg, help="write results here")
    ap.add_argument("--infer", metavar="EXPORT_DIR",
                    help="time an export's inference instead (torch eager / compiled, ONNX Runtime fp32 / int8 / fp16); "
                         "its own options: dptune benchmark --infer EXPORT_DIR --help")
    return ap


def _refusal(args: argparse.Namespace) -> str | None:
    """Why these options cannot run together, or None."""
    # the training step's timing starts at the end of a warm-up step; --joint times passes from the start
    warmup_least = 0 if args.joint or args.data else 1
    for flag, value, least in (("--profile", args.profile, 0), ("--warmup", args.warmup, warmup_least),
                               ("--steps", args.steps, 1), ("--rounds", args.rounds, 1), ("--batch", args.batch, 1),
                               ("--crop", args.crop, 1), ("--num-labels", args.num_labels, 1),
                               ("--samples", args.samples, 1)):
        if value is not None and value < least:
            what = {"--profile": "steps to profile after the timed ones", "--rounds": "rounds", "--batch": "images",
                    "--crop": "pixels", "--num-labels": "classes", "--samples": "samples"}.get(flag, "steps")
            return f"{flag} {value}: at least {least} ({what})"
    if args.peak_tflops is not None and not 0 < args.peak_tflops < math.inf:
        return f"--peak-tflops {args.peak_tflops}: the device's peak, a number above 0"
    if args.gradient_clip_val is not None and not 0 < args.gradient_clip_val < math.inf:
        return f"--gradient-clip-val {args.gradient_clip_val}: a gradient norm above 0 (leave it out to not clip)"
    if args.json and not Path(args.json).resolve().parent.is_dir():
        return f"--json {args.json}: no folder {Path(args.json).resolve().parent} to write it in"
    other = "--joint" if args.joint else "--data" if args.data else None
    if args.baseline and other:
        return f"--baseline times the HF Trainer's training steps; {other} benchmarks something else"
    if args.rounds > 1 and not args.baseline:
        return (f"--rounds {args.rounds}: rounds alternate dptune and the HF Trainer's training steps; give "
                "--baseline too")
    if args.rounds > 1 and args.rounds % 2:
        return (f"--rounds {args.rounds}: give an even number (each recipe runs first in half of the rounds, "
                "so an advantage of running first cancels) or 1")
    if args.profile and other:
        return f"--profile profiles the training step; it does not apply to {other}"
    return None


def _joint(args: argparse.Namespace, cfg: Any, device: str, precision: str, machine: str) -> int:
    """--joint: batch-1 inference of one segmentation + depth DPT against the two single-task models."""
    import torch

    from dptune.tools.joint_bench import joint_benchmark

    print(f"# {args.model} {args.crop}x{args.crop} batch 1 inference, {precision} on {device} ({machine}), "
          f"torch {torch.__version__}, {args.warmup} warm-up + {args.steps} timed passes each")
    r = joint_benchmark(args, cfg, device, precision)
    if args.json:
        Path(args.json).write_text(json.dumps({**r, "model": args.model, "crop": args.crop, "device": machine,
                                               "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv)}))
    return 0


def _training(args: argparse.Namespace, cfg: Any, device: str, precision: str, machine: str) -> int:
    """The training step's throughput, MFU and peak memory (and the HF Trainer's with --baseline)."""
    import tempfile

    from dptune.models.flops import train_flops

    opts = {"model": args.model, "num_labels": cfg.num_labels, "crop": args.crop, "batch": args.batch,
            "steps": args.steps, "warmup": args.warmup, "precision": precision, "device": device,
            "gradient_checkpointing": args.gradient_checkpointing, "compile": args.compile,
            "channels_last": args.channels_last, "gradient_clip_val": args.gradient_clip_val,
            "attention": args.attention, "profile": args.profile, "tmp": tempfile.mkdtemp(prefix="dptune-bench-")}
    if args.attention == "auto":
        from dptune.models.attention import choose_attention

        kernel, why_kernel = choose_attention(cfg, device, precision, [args.crop])
        print(f"# attention {kernel} chosen: {why_kernel} (--attention overrides)")
    peak, peak_src = peak_tflops(device, precision)
    if args.peak_tflops:
        peak, peak_src = args.peak_tflops, "--peak-tflops"
    flops, flops_src = train_flops(cfg, args.crop, args.crop)
    print(f"# {args.model} crop {args.crop} batch {args.batch} {precision} on {device} ({machine}); "
          f"train GFLOP/image {flops / 1e9:.1f} ({flops_src}); peak {peak:.3g} TFLOP/s ({peak_src})")
    results: dict[str, Any] = {"model": args.model, "crop": args.crop, "batch": args.batch, "precision": precision,
                               "device": machine, "train_gflop_per_image": flops / 1e9, "peak_tflops": peak,
                               "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv)}
    jobs = ["dptune"] + (["hf_trainer"] if args.baseline else [])
    rounds, error = _timed_rounds(jobs, args.rounds, opts, flops, peak)
    results.update(_summary(rounds, jobs, flops, peak))
    if args.rounds > 1:
        results["rounds"] = rounds
    if error:
        results["error"] = error
    elif args.baseline:
        _print_ratio(results["ratio_vs_hf_trainer"], rounds)
    if args.max_batch and device == "cuda":
        for gc in (False, True):
            r = run_job(max_batch, dict(opts, gradient_checkpointing=gc))
            results[f"max_batch{'_checkpointing' if gc else ''}"] = r
            print(f"max batch{' (gradient checkpointing)' if gc else ''}: {r.get('max_batch', r.get('error'))}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 1 if error else 0


def _print_ratio(ratio: float, rounds: list[dict[str, Any]]) -> None:
    if len(rounds) > 1:
        ratios = [r["ratio_vs_hf_trainer"] for r in rounds]
        print(f"dptune / HF Trainer: {ratio:.2f}x (geometric mean of {len(ratios)} rounds, each recipe first in "
              f"half of them: " + ", ".join(f"{x:.2f}x" for x in ratios) + ")")
    else:
        print(f"dptune / HF Trainer: {ratio:.2f}x")


if __name__ == "__main__":
    sys.exit(main())
