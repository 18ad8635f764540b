"""Where an ONNX graph's time goes in ONNX Runtime, by operator type: ``dptune benchmark --infer
EXPORT --profile N`` runs N profiled batch-1 runs of each CPU graph (after untimed warm-up runs) and
sums ONNX Runtime's per-node kernel times by operator type.

The operators split into the arithmetic (convolutions and matrix products: ``ARITHMETIC``), of which
the integer kernels are those INT8 quantization put in place (``INTEGER``; an INT8 graph also runs
float ones: the convolutions and attention products it keeps in float, transposed convolutions), and
the rest (layout reorders, normalisation, activations, element-wise adds, resizes, the shape
computations of a graph with dynamic sizes, and the INT8 graph's quantize / dequantize steps). An
INT8 graph can only be as much faster than the fp32 one as its arithmetic is, diluted by the rest:
``compare`` says both ratios.

ONNX Runtime's profiler adds a little time to every node, so profiled runs are slower than the
timed runs of the benchmark (most in a graph of many small nodes): read the shares and the ratios,
and take the latencies from the timing."""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np

# operator types (as ONNX Runtime runs them, after its fusions) that carry the multiply-adds
ARITHMETIC = frozenset({
    "Conv", "FusedConv", "ConvTranspose", "NhwcFusedConv", "QLinearConv", "ConvInteger",
    "MatMul", "FusedMatMul", "Gemm", "FusedGemm", "MatMulIntegerToFloat", "MatMulInteger", "QLinearMatMul",
    "QGemm", "DynamicQuantizeMatMul", "QAttention", "Attention", "MultiHeadAttention",
})
INTEGER = frozenset({"QLinearConv", "ConvInteger", "MatMulIntegerToFloat", "MatMulInteger", "QLinearMatMul", "QGemm",
                     "DynamicQuantizeMatMul", "QAttention"})
TOP = 12  # operator types listed by name; the others are summed as "other"


def profile_graph(path: Path, x: np.ndarray, threads: int, runs: int, warmup: int = 3) -> dict:
    """``runs`` profiled runs of the graph ``path`` on ``x`` (after ``warmup`` runs that are not
    counted) on ONNX Runtime's CPU provider with ``threads`` intra-op threads: milliseconds per run
    by operator type, the arithmetic and the rest, and the part of a run spent outside any kernel."""
    from dptune.inference.onnx_runner import require_onnxruntime, session_options

    ort = require_onnxruntime("profiling")
    if runs < 1:
        raise ValueError(f"runs must be at least 1, got {runs}")
    with tempfile.TemporaryDirectory(prefix="dptune-profile-") as tmp:
        so = session_options(threads)
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(tmp) / "ort")
        session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        feed = {session.get_inputs()[0].name: np.ascontiguousarray(x, dtype=np.float32)}
        for _ in range(warmup + runs):
            session.run(None, feed)
        events = json.loads(Path(session.end_profiling()).read_text())
    return summarize(events, warmup)


def summarize(events: list[dict], warmup: int) -> dict:
    """ONNX Runtime's profile ``events`` (its JSON trace) as milliseconds per run, leaving out the
    first ``warmup`` runs (their nodes start before the end of the last warm-up ``model_run``)."""
    model_runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                        key=lambda e: e["ts"])
    counted = model_runs[warmup:]
    if not counted:
        raise ValueError(f"the profile holds {len(model_runs)} runs, none after the {warmup} warm-up runs")
    start = counted[0]["ts"]
    by_op: Counter = Counter()
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time") and e["ts"] >= start:
            by_op[e.get("args", {}).get("op_name", "?")] += e["dur"]
    n = len(counted)
    ms = {op: us / n / 1000 for op, us in by_op.items()}
    run_ms = sum(e["dur"] for e in counted) / n / 1000
    kernels = sum(ms.values())
    arithmetic = sum(v for op, v in ms.items() if op in ARITHMETIC | INTEGER)
    integer = sum(v for op, v in ms.items() if op in INTEGER)
    ranked = sorted(ms.items(), key=lambda kv: -kv[1])
    listed = dict(ranked[:TOP])
    if len(ranked) > TOP:
        listed["other"] = sum(v for _, v in ranked[TOP:])
    return {"runs": n, "run_ms": run_ms, "kernels_ms": kernels, "outside_kernels_ms": max(0.0, run_ms - kernels),
            "arithmetic_ms": arithmetic, "integer_arithmetic_ms": integer, "float_arithmetic_ms": arithmetic - integer,
            "rest_ms": kernels - arithmetic,
            "arithmetic_share": arithmetic / kernels if kernels else 0.0,
            "ms_by_op_type": {op: round(v, 4) for op, v in listed.items()}}


def compare(fp32: dict, int8: dict) -> dict:
    """How much faster the INT8 graph's arithmetic and its rest are than the fp32 graph's (profiled)."""
    def ratio(a: float, b: float) -> float | None:
        return a / b if b > 0 else None

    return {"arithmetic": ratio(fp32["arithmetic_ms"], int8["arithmetic_ms"]),
            "rest": ratio(fp32["rest_ms"], int8["rest_ms"]),
            "kernels": ratio(fp32["kernels_ms"], int8["kernels_ms"]),
            "int8_float_arithmetic_share": (int8["float_arithmetic_ms"] / int8["arithmetic_ms"]
                                            if int8["arithmetic_ms"] > 0 else None),
            "note": "INT8 over fp32 in profiled runs: the arithmetic (convolutions, matrix products; in the INT8 "
                    "graph integer kernels and the float ones it keeps, int8_float_arithmetic_share of it) and the "
                    "rest (everything else the graph runs, quantize / dequantize included); the whole graph's gain "
                    "lies between the two, weighted by the shares"}
