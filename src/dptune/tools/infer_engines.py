"""The engines of the inference benchmark (``dptune.tools.infer_bench``): torch eager and compiled,
the export's ONNX Runtime graphs per execution provider, their interleaved timing and the ONNX
Runtime profile."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from dptune.errors import ConfigError, first_line
from dptune.tools.engine_rounds import interleaved, latency, throughput
from dptune.tools.infer_export import out_of_memory


class Inputs:
    """Random ``pixel_values`` batches from one seeded generator (speed does not depend on the pixels)."""

    def __init__(self) -> None:
        self.rng = np.random.default_rng(0)

    def __call__(self, b: int, hw: tuple[int, int]) -> np.ndarray:
        return self.rng.standard_normal((b, 3, *hw)).astype(np.float32)


def torch_engines(engines: list[str], wrapper: torch.nn.Module, first: Callable[[], np.ndarray], said: dict) -> dict:
    """torch eager and compiled, as named; compiling is timed on the batch ``first()`` gives and said in
    ``said``."""
    fns: dict = {}
    if "eager" in engines:
        fns["torch-eager"] = (lambda x: wrapper(torch.from_numpy(x)), None, None)
    if "compiled" in engines:
        try:
            compiled = torch.compile(wrapper, dynamic=True)
            t = time.perf_counter()
            with torch.inference_mode():
                compiled(torch.from_numpy(first()))
            said["torch-compiled"] = {"compile_s": time.perf_counter() - t}
            fns["torch-compiled"] = (lambda x: compiled(torch.from_numpy(x)), None, None)
        except Exception as e:  # no C compiler, an unsupported op: say why, time the rest
            said["torch-compiled"] = {"skipped": f"torch.compile failed: {first_line(e, 200)}"}
    return fns


def ort_engines(export: Path, engines: list[str], threads: int, outputs: list[str], classes, out: dict) -> dict:
    """The export's ONNX graphs named in ``engines``, per execution provider present; a missing graph or
    provider is said in ``out["engines"]``. Each graph must give the export's outputs."""
    from dptune.inference.onnx_runner import GRAPHS, OnnxGraph, check_output, require_onnxruntime

    ort = require_onnxruntime("the ONNX Runtime timings")
    available = ort.get_available_providers()
    out["onnxruntime_providers"] = available
    fns: dict = {}
    for precision in ("fp32", "int8", "fp16"):
        if f"ort-{precision}" not in engines:
            continue
        path = export / GRAPHS[precision]
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
            for name in outputs:  # another model's graph in this one's place
                check_output(g, name, classes)
            gpu = "" if prov[0] == "CPUExecutionProvider" else f"-{prov[0].removesuffix('ExecutionProvider').lower()}"
            out["engines"][f"ort-{precision}{gpu}"] = {"file": path.name}
            fns[f"ort-{precision}{gpu}"] = (g, g.fixed_size, g.fixed_batch)
    return fns


def time_engines(fns: dict, args, inputs: Inputs, cases: dict, said: dict) -> None:
    """Each case (name -> size, batch) timed on every engine that takes it, interleaved; into ``said``."""
    with torch.inference_mode():
        for name, (hw, batch) in cases.items():
            runs = args.runs if name != "throughput" else max(3, args.runs // args.batch)
            able = {}
            for k, (f, size, one_batch) in fns.items():
                if size and tuple(size) != tuple(hw):
                    said[k][name] = {"skipped": f"the graph takes {size[0]}x{size[1]} only"}
                elif one_batch and one_batch != batch:
                    said[k][name] = {"skipped": f"the graph takes batch {one_batch} only"}
                else:
                    able[k] = f
            if not able:
                continue
            try:
                got = interleaved(able, inputs(batch, hw), args.warmup if batch == 1 else max(1, args.warmup // 2),
                                  runs)
            except Exception as e:  # an engine that ran out of memory: one line; anything else is a defect, raised
                if not out_of_memory(e):
                    raise
                raise ConfigError(f"--batch {batch}: out of memory at {hw[0]}x{hw[1]} ({first_line(e, 300)}); give a "
                                  "smaller --batch") from None
            for k, g in got.items():
                said.setdefault(k, {})[name] = throughput(g, batch) if name == "throughput" else latency(g)


def profile_graphs(fns: dict, args, inputs: Inputs, square: tuple[int, int], threads: int) -> dict:
    """``--profile``: the ONNX Runtime CPU graphs' time by operator type, and INT8 against fp32 where
    both ran at the same batch and size."""
    from dptune.tools.ort_profile import compare, profile_graph

    prof = {}
    for k, (g, size, one_batch) in fns.items():
        if k in ("ort-fp32", "ort-int8"):  # the CPU graphs, at the batch and size each takes
            batch, hw = one_batch or 1, tuple(size or square)
            try:
                prof[k] = {"batch": batch, "size": list(hw),
                           **profile_graph(g.path, inputs(batch, hw), threads, args.profile, warmup=max(1, args.warmup))}
            except Exception as e:  # ONNX Runtime's own exception types; the timings above stand
                prof[k] = {"error": f"profiling failed: {first_line(e, 300)}"}
                print(f"error: --profile: {k}: {prof[k]['error']}", file=sys.stderr)
    a, b = prof.get("ort-fp32", {}), prof.get("ort-int8", {})
    if "runs" in a and "runs" in b:  # like with like only: graphs fed other batches or sizes are not compared
        same = (a["batch"], a["size"]) == (b["batch"], b["size"])
        prof["int8_over_fp32"] = compare(a, b) if same else {
            "skipped": f"the graphs ran at other batches or sizes (fp32 {a['batch']} x {a['size']}, "
                       f"int8 {b['batch']} x {b['size']})"}
    return prof or {"skipped": "no ONNX Runtime CPU graph was timed (no model.onnx / model_int8.onnx)"}
