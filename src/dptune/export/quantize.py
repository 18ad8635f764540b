"""Serving graphs derived from an export's fp32 ``model.onnx``:

- ``model_int8.onnx``: ONNX Runtime static quantization (QDQ), activations calibrated on real images
  prepared by the export's image processor. Only the operators that carry the arithmetic are
  quantized (``Conv``, ``MatMul``: the patch embedding, attention and MLP projections, the neck's and
  head's convolutions); LayerNorm, Softmax, GELU, Resize and the transposed convolutions stay in
  float, where int8 costs accuracy for next to no time. A MatMul's output stays in float (not
  requantized before its bias and residual adds): ONNX Runtime runs it as MatMulIntegerToFloat, int8
  inputs and a float result, which is faster and closer to fp32 than QLinearMatMul with a
  Quantize/Dequantize pair after it. The first convolution (it sees the normalised pixels) and the
  convolutions that compute each output (the classifier's logits, the depth head) stay in float
  too: their error is the output's error. ``KEPT_FLOAT`` says so in the
  card and ``dptune.json`` lists the nodes.
- ``model_fp16.onnx``: every weight and activation in float16 except the graph's inputs and
  outputs (float32, ``keep_io_types``), for GPUs (CUDA / TensorRT execution providers). On a CPU it
  runs, slower than fp32.

Weights are quantized to 7 bits (``reduce_range``) by default, as ONNX Runtime recommends for x86
CPUs without VNNI: there its u8 x s8 kernels (``VPMADDUBSW``) add pairs of products in 16 bits, which
clip with full 8-bit weights; 7-bit weights cannot clip. The graph then gives the same figures on any
x86 CPU. ``target="vnni"`` (``--int8-target vnni``) keeps the full 8-bit range, for CPUs with
AVX512-VNNI / AVX-VNNI / AMX only (elsewhere its accuracy is not what was measured); ``target="u8"``
(``--int8-target u8``) stores uint8 weights at the full 8-bit range, which ONNX Runtime's u8 x u8
kernels multiply without 16-bit overflow on any CPU (ONNX Runtime's other remedy for non-VNNI CPUs).

Both keep the fp32 graph's dynamic batch / height / width (a DPT-Hybrid graph takes its
processor's size only, as its fp32 graph does)."""

from __future__ import annotations

import contextlib
import logging
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from dptune.errors import ConfigError
from dptune.inference.onnx_runner import require_onnx, require_onnxruntime

log = logging.getLogger(__name__)

QUANTIZED_OPS = ["Conv", "MatMul"]
KEPT_FLOAT = ("Only Conv and MatMul with weights run in int8 (weights per output channel, activations uint8 from the "
              "calibration images' ranges; a MatMul's result is not requantized, it stays float); LayerNorm, Softmax, GELU, Resize and transposed convolutions stay in "
              "float, and so do the attention's activation-by-activation products (Q K^T, softmax x V), the first "
              "convolution (the normalised pixels) and the convolutions that compute the outputs (the node names "
              "are listed in dptune.json).")
CALIBRATION_METHODS = ("minmax", "percentile", "entropy")
# reduce_range on (7-bit int8 weights, any x86 CPU) / off (8-bit, VNNI or AMX CPUs only) / uint8 weights (any CPU)
TARGETS = ("portable", "vnni", "u8")
TARGET_WORDS = {"portable": "int8 per output channel, 7-bit range (reduce_range): no 16-bit overflow on AVX2 CPUs "
                            "without VNNI, the same results on any x86 CPU",
                "vnni": "int8 per output channel, full 8-bit range: for CPUs with AVX512-VNNI, AVX-VNNI or AMX only "
                        "(AVX2 without VNNI adds products in 16 bits, which can clip)",
                "u8": "uint8 per output channel, full 8-bit range (u8 x u8 kernels: no 16-bit overflow on any CPU; "
                      "they do not use VNNI's u8 x s8 instructions)"}


def _reader(batches: Iterable[np.ndarray], name: str):
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        """Feeds the calibration images' ``pixel_values`` to ONNX Runtime's calibrator, one at a time."""

        def __init__(self) -> None:
            self.it = iter(batches)

        def get_next(self):
            x = next(self.it, None)
            return None if x is None else {name: np.ascontiguousarray(x, dtype=np.float32)}

    return Reader()


def _producers(graph) -> dict[str, object]:
    return {o: n for n in graph.node for o in n.output}


def boundary_convs(model) -> list[str]:
    """Names of the Conv nodes kept in float: those the graph's input reaches first and, for each
    output, the last ones on the way back from it (through any nodes but ``Shape``, whose paths
    carry sizes, not values)."""
    g = model.graph
    prod = _producers(g)
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    keep: list[str] = []

    def walk(start: list, step) -> None:
        seen: set[str] = set()
        todo = list(start)
        while todo:
            n = todo.pop()
            if n is None or n.name in seen or n.op_type == "Shape":
                continue
            seen.add(n.name)
            if n.op_type in ("Conv", "ConvTranspose"):
                if n.op_type == "Conv" and n.name not in keep:
                    keep.append(n.name)
                continue
            todo += step(n)

    walk([c for c in consumers.get(g.input[0].name, [])], lambda n: [c for o in n.output for c in consumers.get(o, [])])
    walk([prod.get(o.name) for o in g.output], lambda n: [prod.get(i) for i in n.input])
    return keep


def activation_matmuls(model) -> list[str]:
    """Names of the MatMul nodes that multiply two activations (attention scores ``Q K^T`` and
    ``softmax x V``): kept in float. Quantized, ONNX Runtime fuses the Softmax between them into a
    QLinearSoftmax slower than the float one, and 8-bit attention probabilities cost accuracy."""
    weights = {i.name for i in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and not any(i in weights for i in n.input)]


class KeepFloatError(ConfigError):
    """An ``--int8-keep-float`` name that is no Conv or MatMul node of the graph; the message names both."""


def keep_float_names(fp32: Path, names: Iterable[str], shown: str | None = None, hint: str = "") -> list[str]:
    """``names`` (``--int8-keep-float``) once each, in order, every one a Conv or MatMul node of the
    graph ``fp32`` (``model.onnx``): the only nodes INT8 quantizes, so the only ones that keeping in
    float changes (a Constant is folded away before quantization, a ConvTranspose stays float anyway;
    either would be recorded as kept while meaning nothing). ``KeepFloatError`` otherwise, naming the
    graph as ``shown`` (default: its path) with a few names it does have, and then ``hint``."""
    onnx = require_onnx("INT8 quantization")
    ops = {n.name: n.op_type for n in onnx.load(str(fp32), load_external_data=False).graph.node}
    unique = list(dict.fromkeys(names))
    for name in unique:
        op = ops.get(name)
        if op in QUANTIZED_OPS:
            continue
        like = " and ".join(repr(next(n for n, o in ops.items() if o == q)) for q in QUANTIZED_OPS if q in ops.values())
        what = "no node of that name" if op is None else f"a {op} node, not a Conv or MatMul (only those run in int8),"
        raise KeepFloatError(f"--int8-keep-float {name}: {what} in {shown or fp32}; its Conv and MatMul nodes are "
                             f"named like {like}{hint}")
    return unique


def quantize_int8(fp32: Path, out: Path, batches: Iterable[np.ndarray], method: str = "minmax",
                  exclude: list[str] | None = None, target: str = "portable") -> dict:
    """Write ``out`` (int8 QDQ) from the graph ``fp32`` calibrated on ``batches`` of ``pixel_values``;
    returns what was done (for ``dptune.json``). ``exclude``: names of Conv / MatMul nodes of ``fp32``
    (``model.onnx``) kept in float besides dptune's choice (see ``keep_float_names``); ``target``: see
    ``TARGETS``."""
    onnx = require_onnx("INT8 quantization")
    require_onnxruntime("INT8 quantization")
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if method not in CALIBRATION_METHODS:
        raise ValueError(f"calibration method must be one of {', '.join(CALIBRATION_METHODS)}, got {method!r}")
    if target not in TARGETS:
        raise ValueError(f"--int8-target must be one of {', '.join(TARGETS)}, got {target!r}")
    # the names a user reads are model.onnx's (Netron, onnx.load); pre-processing keeps every Conv / MatMul name
    exclude = keep_float_names(fp32, exclude or [])
    with temp_files_beside(out) as tmp:
        pre = tmp / "pre.onnx"
        # shape inference and ORT's graph optimisation (constant folding, fusions) first, as ORT asks:
        # a bias behind an Identity node (deduplicated weights) is otherwise not quantized with its Conv
        _quiet(lambda: quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True))
        model = onnx.load(str(pre))
        lost = [k for k in exclude if k not in {n.name for n in model.graph.node}]
        if lost:  # kept_float_nodes would list a node that is not there
            raise KeepFloatError(f"--int8-keep-float {lost[0]}: ONNX Runtime's pre-processing of {fp32.name} removed "
                                 "that node; it cannot be kept in float")
        kept = boundary_convs(model) + activation_matmuls(model)
        kept += [k for k in exclude if k not in kept]
        cm = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
              "entropy": CalibrationMethod.Entropy}[method]
        extra: dict = {}
        if method == "percentile":
            extra["CalibPercentile"] = 99.999
        _quiet(lambda: quantize_static(
            str(pre), str(out), _reader(batches, model.graph.input[0].name), quant_format=QuantFormat.QDQ,
            op_types_to_quantize=QUANTIZED_OPS, per_channel=True, reduce_range=target == "portable",
            activation_type=QuantType.QUInt8, weight_type=QuantType.QUInt8 if target == "u8" else QuantType.QInt8,
            nodes_to_exclude=kept,
            calibrate_method=cm, extra_options={**extra, "OpTypesToExcludeOutputQuantization": ["MatMul"]}))
    quantized = sum(1 for n in onnx.load(str(out), load_external_data=False).graph.node if n.op_type == "QuantizeLinear")
    return {"file": out.name, "format": "QDQ", "activations": "uint8 (per tensor)", "weights": TARGET_WORDS[target],
            "target": target, "reduce_range": target == "portable", "per_channel": True, "calibration_method": method, "quantized_op_types": QUANTIZED_OPS, "kept_float_nodes": kept,
            "quantize_nodes": quantized}


@contextlib.contextmanager
def temp_files_beside(out: Path) -> Iterator[Path]:
    """A hidden folder beside ``out`` (in an export, inside its staging folder: on the disk the export
    is written to), removed at the end, that is the default temporary folder meanwhile: ONNX Runtime's
    quantization writes its copies of the graph (pre-processed, augmented for calibration; each the
    size of the model) into ``tempfile``'s folders, which on a small system temporary folder (usual
    on clusters) filled it and read as the export's own disk being full. Not for threads that make
    temporary files of their own meanwhile (``tempfile.tempdir`` is one setting of the process)."""
    scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.resolve().parent))
    before, tempfile.tempdir = tempfile.tempdir, str(scratch)
    try:
        yield scratch
    finally:
        tempfile.tempdir = before
        shutil.rmtree(scratch, ignore_errors=True)


def convert_fp16(fp32: Path, out: Path) -> dict:
    """Write ``out``: ``fp32`` with float16 weights and activations, float32 inputs and outputs."""
    onnx = require_onnx("fp16 conversion")
    require_onnxruntime("fp16 conversion")
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(fp32))
    half = _quiet(lambda: convert_float_to_float16(model, keep_io_types=True))
    onnx.save(half, str(out))
    return {"file": out.name, "weights": "float16", "io": "float32 (keep_io_types)"}


def _quiet(fn):
    """Run ``fn`` with onnxruntime.quantization's chatter (root logger warnings) held back and its
    progress lines (the histogram calibrators print them) sent to stderr: stdout is the export's."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))
    try:
        with contextlib.redirect_stdout(sys.stderr):
            return fn()
    finally:
        root.setLevel(level)
