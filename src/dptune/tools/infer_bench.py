"""Inference speed of an export: PyTorch eager, PyTorch compiled, ONNX Runtime fp32 / int8 (and fp16,
CUDA / TensorRT execution providers where present), in one run on one machine.

    python scripts/benchmark.py --infer EXPORT_DIR [--threads 2] [--batch 8] [--runs 50] [--json out.json]

For each engine: batch-1 latency (p50, p95 over ``--runs`` timed runs after ``--warmup``) at the
export's size and at a non-square size (the export's height x 1.5 its width, rounded to the patch
size; a graph that takes one size only is timed at it alone), and batch-N throughput (images/s) at
the export's size. ``torch.compile``'s compile time is reported apart from its runs (or why it did
not compile). The CPU (lscpu model name, avx2 / avx512 / vnni flags), the threads and the versions
are printed with the figures as one JSON document. Inputs are random ``pixel_values``: speed does
not depend on the pixels.

The threads: ``--threads`` (default: ``OMP_NUM_THREADS``, else the cores this process may use) for
torch's intra-op pool and ONNX Runtime's ``intra_op_num_threads`` alike."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from dptune.errors import ConfigError


def cpu_info() -> dict:
    """The CPU's model name and the SIMD flags that decide int8 and bf16 speed (Linux: lscpu)."""
    info = {"machine": platform.machine(), "cores_usable": len(os.sched_getaffinity(0))
            if hasattr(os, "sched_getaffinity") else os.cpu_count()}
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and "model" not in info:
                info["model"] = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        info["model"] = platform.processor() or "unknown"
    info["flags"] = sorted(f for f in flags if f in ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni",
                                                     "avx512_bf16", "amx_int8", "amx_bf16"))
    return info


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("onnxruntime", "onnx", "transformers"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = None
    return out


def timed(fn, x, warmup: int, runs: int) -> dict:
    for _ in range(warmup):
        fn(x)
    ts = []
    for _ in range(runs):
        t = time.perf_counter()
        fn(x)
        ts.append(time.perf_counter() - t)
    ms = np.array(ts) * 1000
    return {"p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)), "runs": runs}


def throughput(fn, x, warmup: int, runs: int) -> dict:
    for _ in range(max(1, warmup // 2)):
        fn(x)
    t = time.perf_counter()
    for _ in range(runs):
        fn(x)
    dt = time.perf_counter() - t
    return {"images_per_s": x.shape[0] * runs / dt, "batch": int(x.shape[0]), "runs": runs}


def sizes(export: Path, model) -> tuple[tuple[int, int], tuple[int, int]]:
    proc = json.loads((export / "preprocessor_config.json").read_text())
    h, w = proc["size"]["height"], proc["size"]["width"]
    from dptune.models.build import input_side

    p = input_side(model)
    return (h, w), (h, max(p, int(round(w * 1.5 / p)) * p))


def task_dir(export: Path) -> Path:
    """The directory holding the torch model (a joint export: its segmentation part, run with its
    graph at the top; the torch timing then covers that part alone, said in the output)."""
    if (export / "config.json").is_file():
        return export
    if (export / "segmentation" / "config.json").is_file():
        return export / "segmentation"
    raise ConfigError(f"{export}: not a dptune export (no config.json)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--infer", required=True, metavar="EXPORT_DIR", help="an export directory (scripts/export.py)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--batch", type=int, default=8, help="batch of the throughput runs")
    ap.add_argument("--runs", type=int, default=50, help="timed batch-1 runs per engine and size")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--engines", default="eager,compiled,ort-fp32,ort-int8,ort-fp16",
                    help="comma-separated subset (a missing graph or provider is skipped and said)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    try:
        result = run(Path(args.infer), args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


def run(export: Path, args) -> dict:
    from dptune.export.onnx import TaskOutput
    from dptune.inference.onnx_runner import GRAPHS, OnnxGraph, require_onnxruntime
    from dptune.models import load_exported

    if not export.is_dir():
        raise ConfigError(f"{export}: not a directory")
    threads = args.threads or int(os.environ.get("OMP_NUM_THREADS") or 0) or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    part = task_dir(export)
    model = load_exported(str(part)).eval().float()
    square, wide = sizes(part, model)
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    out: dict = {"export": str(export), "threads": threads, "cpu": cpu_info(), "versions": versions(),
                 "sizes": {"export": list(square), "non_square": list(wide)}, "batch": args.batch, "engines": {},
                 "command": " ".join(sys.argv)}
    if part != export:
        out["note"] = "joint export: torch times its segmentation part; ONNX graphs compute both outputs"
    rng = np.random.default_rng(0)

    def inputs(b: int, hw: tuple[int, int]) -> np.ndarray:
        return rng.standard_normal((b, 3, *hw)).astype(np.float32)

    def measure(fn, fixed: tuple[int, int] | None = None) -> dict:
        res = {}
        for name, hw in (("export_size", square), ("non_square", wide)):
            if fixed and tuple(hw) != tuple(fixed):
                res[name] = {"skipped": f"the graph takes {fixed[0]}x{fixed[1]} only"}
                continue
            res[name] = timed(fn, inputs(1, hw), args.warmup, args.runs)
        res["throughput"] = throughput(fn, inputs(args.batch, square), args.warmup, max(3, args.runs // args.batch))
        return res

    wrapper = TaskOutput(model).eval()
    if "eager" in engines:
        with torch.inference_mode():
            out["engines"]["torch-eager"] = measure(lambda x: wrapper(torch.from_numpy(x)))
    if "compiled" in engines:
        try:
            compiled = torch.compile(wrapper, dynamic=True)
            t = time.perf_counter()
            with torch.inference_mode():
                compiled(torch.from_numpy(inputs(1, square)))
                compile_s = time.perf_counter() - t
                res = measure(lambda x: compiled(torch.from_numpy(x)))
            out["engines"]["torch-compiled"] = {"compile_s": compile_s, **res}
        except Exception as e:  # no C compiler, an unsupported op: say why, time the rest
            out["engines"]["torch-compiled"] = {"skipped": f"torch.compile failed: {str(e).splitlines()[0][:200]}"}
    ort = require_onnxruntime("the ONNX Runtime timings")
    available = ort.get_available_providers()
    out["onnxruntime_providers"] = available
    graph_dir = export
    for precision in ("fp32", "int8", "fp16"):
        if f"ort-{precision}" not in engines:
            continue
        path = graph_dir / GRAPHS[precision]
        if not path.is_file():
            out["engines"][f"ort-{precision}"] = {"skipped": f"no {path.name} in the export"}
            continue
        providers = [["CPUExecutionProvider"]]
        if precision == "fp16":  # fp16 is for GPUs; on a CPU it is said and not timed
            providers = [[p, "CPUExecutionProvider"] for p in ("CUDAExecutionProvider", "TensorrtExecutionProvider")
                         if p in available]
            if not providers:
                out["engines"]["ort-fp16"] = {"skipped": "no CUDA / TensorRT execution provider here"}
                continue
        elif "CUDAExecutionProvider" in available and precision == "fp32":
            providers.append(["CUDAExecutionProvider", "CPUExecutionProvider"])
        for prov in providers:
            g = OnnxGraph(path, providers=prov, threads=threads)
            key = f"ort-{precision}" + ("" if prov[0] == "CPUExecutionProvider" else f"-{prov[0].removesuffix('ExecutionProvider').lower()}")
            out["engines"][key] = {"file": path.name, **measure(g, g.fixed_size)}
    eager = out["engines"].get("ort-fp32", {}).get("export_size", {}).get("p50_ms")
    int8 = out["engines"].get("ort-int8", {}).get("export_size", {}).get("p50_ms")
    if eager and int8:
        out["int8_speedup_vs_fp32_batch1"] = eager / int8
    return out


if __name__ == "__main__":
    sys.exit(main())
